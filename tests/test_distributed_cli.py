"""``train.py`` launched as several processes (torchrun, or srun-style environment variables): the command line
a user types, stop signals on one rank, and ranks that die, hang or fail on their own."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.distributed_utils import free_port, losses
from tests.tiny import TINY_LLAMA, TINY_RUN, signal_mid_run, wait_for_steps

pytestmark = pytest.mark.distributed

REPO = Path(__file__).resolve().parents[1]
SMALL = [*TINY_LLAMA, *TINY_RUN, "train.log_every=1", "train.save_model=false"]
LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID", "SLURM_NTASKS")


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS and k != "HYDRA_FULL_ERROR"}
    return {**env, "OMP_NUM_THREADS": "1", **extra}


def popen(command: list[str], env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def run_train(command: list[str]) -> subprocess.CompletedProcess:
    """Run a ``train.py`` command (one process or torchrun) to the end; it must succeed."""
    proc = subprocess.run(command, cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return proc


def torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "train.py", *args]


def rank_pid(parent: int, rank: int) -> int:
    """The pid of the ``train.py`` process of ``rank`` among ``parent``'s descendants (read from /proc)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    todo = list(children.get(parent, []))
    while todo:
        pid = todo.pop()
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in environ and b"train.py" in Path(f"/proc/{pid}/cmdline").read_bytes():
            return pid
        todo += children.get(pid, [])
    raise AssertionError(f"no train.py process of rank {rank} under pid {parent}")


def one_error_line(stderr: str) -> str:
    assert "Traceback" not in stderr, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert errors, stderr
    return errors[0]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_torchrun_fsdp_stopped_on_one_rank_resumes_to_the_one_process_run(pystdlib_data_root, tmp_path, sig):
    args = [
        *SMALL,
        f"data.root={pystdlib_data_root}",
        "optimizer=soap",
        "optimizer.precondition_frequency=2",
        "train.max_steps=30",
        "train.eval_every=10",
    ]
    reference = tmp_path / "single"
    run_train([sys.executable, "train.py", *args, f"hydra.run.dir={reference}"])

    run_dir = tmp_path / "fsdp"
    command = torchrun(*args, "parallelism=fsdp", f"hydra.run.dir={run_dir}")
    proc = subprocess.Popen(
        command, cwd=REPO, env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    wait_for_steps(run_dir, proc, 5)
    signal_mid_run(rank_pid(proc.pid, 0), sig, run_dir, max_steps=30, target=rank_pid(proc.pid, 1))
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, err
    stopped = re.search(rf"stopped by signal {int(sig)} at step (\d+)", err)
    assert stopped is not None, err
    assert 5 <= int(stopped.group(1)) < 30
    assert "fsdp 2 ranks" in out
    assert not (run_dir / "summary.json").exists()

    proc = run_train(command)
    assert f"resumed from step_{int(stopped.group(1)):08d}" in proc.stdout
    got, want = losses(run_dir), losses(reference)
    assert got.keys() == want.keys()
    for key in want:
        assert got[key] == pytest.approx(want[key], rel=1e-5), key


def launch_srun_style(args: list[str], run_dir: Path, timeout_s: int) -> list[subprocess.Popen]:
    """Two ``train.py`` ranks started as srun starts tasks: environment variables, no torchrun agent watching."""
    port = str(free_port())
    procs = []
    for rank in range(2):
        env = clean_env(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        command = [
            sys.executable,
            "train.py",
            *args,
            "parallelism=fsdp",
            f"parallelism.timeout_s={timeout_s}",
            f"hydra.run.dir={run_dir}",
        ]
        procs.append(popen(command, env))
    return procs


@pytest.mark.parametrize(("sig", "limit"), [(signal.SIGKILL, 30), (signal.SIGSTOP, 15 + 30)])
def test_a_rank_that_dies_or_hangs_ends_the_job_within_the_timeout(pystdlib_data_root, tmp_path, sig, limit):
    args = [*SMALL, f"data.root={pystdlib_data_root}", "train.max_steps=100000", "train.eval_every=100000"]
    rank0, rank1 = launch_srun_style(args, tmp_path / "run", timeout_s=15)
    try:
        wait_for_steps(tmp_path / "run", rank0, 3)
        os.kill(rank1.pid, sig)
        start = time.monotonic()
        _, err = rank0.communicate(timeout=limit + 60)
        assert time.monotonic() - start < limit
        assert rank0.returncode not in (0, None)
        assert "another rank stopped or died" in one_error_line(err)
    finally:
        for proc in (rank0, rank1):
            if proc.poll() is None:
                proc.kill()
            proc.communicate()


def test_a_corrupt_shard_of_one_rank_fails_every_rank_with_one_line(pystdlib_data_root, tmp_path):
    args = [*SMALL, f"data.root={pystdlib_data_root}", "train.max_steps=4", "train.eval_every=2"]
    run_dir = tmp_path / "run"
    procs = launch_srun_style(args, run_dir, timeout_s=60)
    for proc in procs:
        proc.communicate(timeout=300)
        assert proc.returncode == 0
    checkpoint = run_dir / "checkpoints" / "step_00000004"
    (run_dir / "summary.json").unlink()  # pretend the run stopped at its last checkpoint
    shard = next(checkpoint.glob("__1_*.distcp"))
    shard.write_bytes(shard.read_bytes()[:100])
    before = {p.name: p.read_bytes() for p in checkpoint.iterdir()}
    metrics = (run_dir / "metrics.jsonl").read_text()

    procs = launch_srun_style([*args, "train.max_steps=4"], run_dir, timeout_s=60)
    results = [proc.communicate(timeout=300) for proc in procs]
    assert all(proc.returncode == 2 for proc in procs), results
    lines = [line for _, err in results for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, results  # reported once, by rank 0, for every rank
    assert str(checkpoint) in lines[0] and "delete" in lines[0], lines[0]
    assert {p.name: p.read_bytes() for p in checkpoint.iterdir()} == before
    assert (run_dir / "metrics.jsonl").read_text() == metrics


@pytest.mark.parametrize(
    ("layout", "optimizer", "model"), [("fsdp", "muon", "llama_tiny"), ("ddp", "adamw", "gpt2_tiny")]
)
def test_torchrun_with_the_default_batch_matches_one_process(pystdlib_data_root, tmp_path, layout, optimizer, model):
    """The command a user types first, default batch settings and all (``micro_batch_size`` null: each rank takes
    its half of the batch). One process runs one micro-batch of 8 and each rank one of 4, so the gradients are the
    same sums in another order: equal to fp32 rounding, not bitwise."""
    args = [
        f"model={model}",
        "model.n_layer=2",
        f"optimizer={optimizer}",
        f"data.root={pystdlib_data_root}",
        "train.max_steps=4",
        "train.eval_every=2",
        "train.eval_tokens=2048",
        "train.log_every=1",
        "train.save_model=false",
        "logger.progress=false",
    ]
    reference = tmp_path / "single"
    run_train([sys.executable, "train.py", *args, f"hydra.run.dir={reference}"])
    run_dir = tmp_path / layout
    proc = run_train(torchrun(*args, f"parallelism={layout}", f"hydra.run.dir={run_dir}"))
    assert f"{layout} 2 ranks" in proc.stdout
    got, want = losses(run_dir), losses(reference)
    assert got.keys() == want.keys() and len(got) >= 6
    for key in want:
        assert got[key] == pytest.approx(want[key], rel=1e-5), key
