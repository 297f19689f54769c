"""Sweeps through ``hydra/launcher=slurm`` against a real SLURM controller: the single-node cluster of
``slurm/local_cluster.sh`` (started here unless it already runs, stopped here if started here). Each job runs the
recipe as 2 srun tasks (DDP over gloo on CPU).

The preemption test signals a running job as SLURM does before preempting it or reaching the time limit
(submitit's USR2), and checks that the job saves a checkpoint at that step, is requeued, resumes in the same run
directory and ends with the losses of an uninterrupted 2-task run of the same config.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from tests.tiny import TINY_GPT2, TINY_RUN, wait_for_steps

pytestmark = pytest.mark.slurm

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "slurm" / "local_cluster.sh"
SLURM_DIR = Path(os.environ.get("EOPT_SLURM_DIR", "/tmp/eopt-slurm"))
SMALL = [*TINY_GPT2, *TINY_RUN, "train.save_model=false", "train.log_every=1", "parallelism=ddp"]
ON_THE_TEST_CLUSTER = [
    "hydra/launcher=slurm",
    "hydra.launcher.tasks_per_node=2",
    "hydra.launcher.gpus_per_node=null",
    "hydra.launcher.cpus_per_task=1",
    "hydra.launcher.timeout_min=20",
]
# Job names unique in the cluster's accounting, which outlives test sessions (a process id alone gets reused).
UNIQUE = uuid.uuid4().hex[:12]
DROP = ("HYDRA_FULL_ERROR", "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "WANDB_API_KEY")


@pytest.fixture(scope="module")
def slurm_env() -> dict[str, str]:
    """The environment of a client of the local cluster, started for this module if it is not up already."""
    env = {k: v for k, v in os.environ.items() if k not in DROP and not k.startswith("SLURM_")}
    env.update(OMP_NUM_THREADS="1", SLURM_CONF=str(SLURM_DIR / "slurm.conf"), NETRC=os.devnull)
    already_up = subprocess.run([str(CLUSTER), "status"], capture_output=True, text=True).returncode == 0
    if not already_up:
        if os.geteuid() != 0 or not Path("/usr/bin/apt-get").exists():
            pytest.skip("SLURM cannot be installed here: slurm/local_cluster.sh needs root and apt-get (Debian)")
        start = subprocess.run([str(CLUSTER), "start"], capture_output=True, text=True, timeout=600)
        assert start.returncode == 0, start.stderr
    cancel_test_jobs(env)  # jobs that an earlier, interrupted session left in the controller's saved state
    yield env
    if not already_up:
        stop = subprocess.run([str(CLUSTER), "stop"], capture_output=True, text=True, timeout=120)
        assert stop.returncode == 0, stop.stderr


LAUNCHERS: list[subprocess.Popen] = []


@pytest.fixture(autouse=True)
def no_leftovers(slurm_env):
    """After each test, stop its sweep launchers and cancel the test jobs still queued or running (all named
    ``eopt*``), so that a failed or timed-out test never holds the node the next one needs."""
    yield
    while LAUNCHERS:
        proc = LAUNCHERS.pop()
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    cancel_test_jobs(slurm_env)


def cancel_test_jobs(env: dict[str, str]) -> None:
    """Cancel every queued or running job named ``eopt*`` (the tests' sweeps, templates and reference runs)."""
    jobs = slurm("squeue", "-h", "-o", "%i %j", env=env).splitlines()
    ours = [job for job, name in (line.split(maxsplit=1) for line in jobs) if name.startswith("eopt")]
    if ours:
        slurm("scancel", *ours, env=env)


def slurm(*command: str, env: dict[str, str], cwd: Path | None = None) -> str:
    proc = subprocess.run(list(command), env=env, cwd=cwd, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def jsonl(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def losses(run_dir: Path) -> dict[tuple[int, str], float]:
    return {(r["step"], k): r[k] for r in jsonl(run_dir) for k in ("train/loss", "val/loss") if k in r}


def sweep(args: list[str], env: dict[str, str]) -> subprocess.Popen:
    command = [sys.executable, "train.py", "-m", *ON_THE_TEST_CLUSTER, *SMALL, *args]
    proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    LAUNCHERS.append(proc)
    return proc


def test_lr_sweep_runs_one_job_per_point_with_two_tasks_each(slurm_env, pystdlib_data_root, tmp_path):
    sweep_id = f"lr-sweep-{UNIQUE}"
    env = {**slurm_env, "EOPT_SWEEP_ID": sweep_id}
    proc = sweep(
        [
            f"data.root={pystdlib_data_root}",
            "optimizer=muon",
            "optimizer.lr=0.01,0.02,0.04",
            "train.max_steps=4",
            "train.eval_every=2",
            "logger=wandb",
            "logger.mode=offline",
            f"hydra.sweep.dir={tmp_path}/sweeps/${{eopt.sweep_id:}}",
        ],
        env,
    )
    out, err = proc.communicate(timeout=900)
    assert proc.returncode == 0, err
    sweep_dir = tmp_path / "sweeps" / sweep_id
    runs = sorted(p for p in sweep_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    assert [p.name.split("_", 1)[1].split("-n_layer")[0] for p in runs] == ["muon-lr0.01", "muon-lr0.02", "muon-lr0.04"]
    for run_dir in runs:
        assert run_dir.name.endswith("-s1337")
        records = jsonl(run_dir)
        assert [r["step"] for r in records if "train/loss" in r] == [1, 2, 3, 4]
        assert [r["step"] for r in records if "val/loss" in r] == [0, 2, 4]
        summary = json.loads((run_dir / "summary.json").read_text())
        assert summary["steps"] == 4 and summary["parallelism"] == "ddp 2 ranks"
        assert summary["final_val_loss"] == records[-1]["val/loss"]
        # one wandb run per job (rank 0 only), grouped by the sweep id and named after the overrides
        (wandb_file,) = (run_dir / "wandb").glob("offline-run-*/run-*.wandb")
        dump = subprocess.run(
            [sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(wandb_file)],
            capture_output=True,
            text=True,
            check=True,
            timeout=120,
        ).stdout
        (run,) = [r["run"] for r in map(json.loads, dump.splitlines()) if r.get("type") == "run"]
        assert run["run_group"] == sweep_id
        assert run["display_name"] == run_dir.name.split("_", 1)[1]
    # distinct learning rates gave distinct runs
    assert len({json.loads((r / "summary.json").read_text())["final_val_loss"] for r in runs}) == 3
    states = slurm("sacct", "-n", "-X", "-P", "-o", "JobName,State", "--name", f"eopt-{sweep_id}", env=env)
    assert states.split() == [f"eopt-{sweep_id}|COMPLETED"] * 3


PREEMPTED = ["optimizer=muon", "optimizer.lr=0.02", "train.max_steps=40", "train.eval_every=10"]


@pytest.fixture(scope="module")
def uninterrupted(slurm_env, pystdlib_data_root, tmp_path_factory) -> Path:
    """The run the preempted ones must reproduce: the same config as 2 srun tasks, never signalled."""
    run_dir = tmp_path_factory.mktemp("uninterrupted")
    command = [sys.executable, "train.py", *SMALL, f"data.root={pystdlib_data_root}", *PREEMPTED]
    proc = subprocess.run(
        ["srun", "-J", "eopt-uninterrupted", "-n", "2", *command, f"hydra.run.dir={run_dir}"],
        cwd=REPO,
        env=slurm_env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    return run_dir


def assert_same_losses(run_dir: Path, reference: Path) -> None:
    got, want = losses(run_dir), losses(reference)
    assert got.keys() == want.keys()
    for key in want:
        assert got[key] == want[key], key


def job_states(job: str, env: dict[str, str], timeout: float = 60) -> list[str]:
    """The job's states in accounting, one per start, once the last start has ended (or ``timeout`` passed)."""
    deadline = time.monotonic() + timeout
    while True:
        states = slurm("sacct", "-n", "-X", "-D", "-P", "-o", "State", "-j", job, env=env).split()
        if states[-1] not in ("PENDING", "RUNNING", "COMPLETING", "REQUEUED") or time.monotonic() > deadline:
            return states
        time.sleep(1)


def test_preempted_job_checkpoints_requeues_and_resumes_to_the_uninterrupted_losses(
    slurm_env, pystdlib_data_root, uninterrupted, tmp_path
):
    common = [f"data.root={pystdlib_data_root}", *PREEMPTED]
    env = {**slurm_env, "EOPT_SWEEP_ID": f"preemption-{UNIQUE}"}
    proc = sweep([*common, f"hydra.sweep.dir={tmp_path}/sweep"], env)
    name = "muon-lr0.02-n_layer2-hidden_size64-n_head2-seq_len32-batch_size4-micro_batch_size2-eval_tokens1024-"
    run_dir = tmp_path / "sweep" / f"0_{name}max_steps40-s1337"

    wait_for_steps(run_dir, proc, 5, timeout=600)
    job = slurm("squeue", "-h", "-n", f"eopt-preemption-{UNIQUE}", "-o", "%i", env=env).split()[0]
    slurm("scancel", "--signal=USR2", job, env=env)

    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err

    logs = tmp_path / "sweep" / ".submitit" / job
    err_log, out_log = (logs / f"{job}_0_log.err").read_text(), (logs / f"{job}_0_log.out").read_text()
    stopped = re.search(r"stopped by signal 12 at step (\d+)", err_log)
    assert stopped is not None, err_log
    step = int(stopped.group(1))
    assert 5 <= step < 40
    assert f"Requeued job {job}" in out_log
    # the requeued job started from the checkpoint of the signalled step: nothing lost beyond it
    assert f"resumed from step_{step:08d} (step {step})" in out_log
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == [f"step_{step:08d}", "step_00000040"]

    assert job_states(job, env) == ["REQUEUED", "COMPLETED"]
    assert_same_losses(run_dir, uninterrupted)


def test_sbatch_template_requeues_on_the_time_limit_warning(slurm_env, pystdlib_data_root, uninterrupted, tmp_path):
    """slurm/single_node.sbatch (torchrun, 2 processes, no GPU here) gets USR1 as --signal=B:USR1@N sends it."""
    run_dir = tmp_path / "run"
    env = {**slurm_env, "RUN_DIR": str(run_dir), "NPROC": "2"}
    args = [*SMALL, f"data.root={pystdlib_data_root}", *PREEMPTED]
    job = slurm(
        "sbatch",
        "--parsable",
        "--gpus-per-node=0",
        "--cpus-per-task=2",
        f"--output={tmp_path}/%j.out",
        "slurm/single_node.sbatch",
        *args,
        env=env,
        cwd=REPO,
    ).strip()
    wait_for_steps(run_dir, None, 5, timeout=600)
    slurm("scancel", "--signal=USR1", "--batch", job, env=env)
    states = job_states(job, env, timeout=600)
    log = (tmp_path / f"{job}.out").read_text()
    assert states == ["REQUEUED", "COMPLETED"], log
    stopped = re.search(r"stopped by signal 15 at step (\d+)", log)
    assert stopped is not None, log
    step = int(stopped.group(1))
    assert f"resumed from step_{step:08d} (step {step})" in log
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == [f"step_{step:08d}", "step_00000040"]
    assert_same_losses(run_dir, uninterrupted)
