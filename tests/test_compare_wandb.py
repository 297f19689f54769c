"""``python -m recipes.compare --wandb``: runs read back from wandb give the report their run files give.

Offline runs are real: a tiny sweep of ``train.py`` with ``logger=wandb logger.mode=offline`` (and a run that
diverges, and one stopped and resumed), read with wandb's own reader. A wandb server cannot be reached from CI,
so the ``entity/project[:group]`` path is driven through an object with the public API's surface
(``Api.runs(path, filters)``; a run's ``id``, ``url``, ``state``, ``config``, ``summary``, ``scan_history()``),
filled from those same offline runs.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from recipes import wandb_runs
from recipes.compare import CompareError, compare, read_run
from tests.tiny import TINY_GPT2, TINY_RUN, signal_mid_run, wait_for_steps

REPO = Path(__file__).resolve().parents[1]
TINY = [
    *TINY_GPT2,
    *TINY_RUN,
    "train.max_steps=8",
    "train.eval_every=2",
    "train.log_every=2",
    "train.save_model=false",
    "logger=wandb",
    "logger.mode=offline",
]
DIVERGES = ["optimizer.lr=1e30"]  # the rest of the config as the sweep's AdamW: the same group, a diverged LR


def offline_env(tmp_path: Path) -> dict[str, str]:
    """No API key, no netrc: wandb can only log offline, and the server cannot be asked."""
    drop = ("HYDRA_FULL_ERROR", "WANDB_API_KEY", "WANDB_MODE", "WANDB_BASE_URL", "EOPT_SWEEP_ID")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    return {**env, "OMP_NUM_THREADS": "1", "NETRC": str(tmp_path / "no-netrc"), "WANDB_CACHE_DIR": str(tmp_path)}


def train(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    command = [sys.executable, "train.py", *args]
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def runs(pystdlib_data_root: Path, tmp_path_factory) -> Path:
    """``runs/sweep``: AdamW and Muon, finished; ``runs/diverged``: AdamW at LR 1e30, non-finite by step 2."""
    root = tmp_path_factory.mktemp("runs")
    env = offline_env(root)
    common = [f"data.root={pystdlib_data_root}", *TINY]
    sweep = train("-m", *common, "optimizer=adamw,muon", f"hydra.sweep.dir={root / 'sweep'}", env=env)
    assert sweep.returncode == 0, sweep.stderr
    diverged = train(*common, *DIVERGES, f"hydra.run.dir={root / 'diverged'}", env=env)
    assert diverged.returncode != 0 and "non-finite" in diverged.stderr, diverged.stderr
    return root


def main_table(result: str) -> str:
    return result.split("\n\n", 1)[1]


def test_offline_wandb_runs_give_the_report_of_their_run_files(runs: Path, tmp_path: Path):
    from_files = compare([runs], tmp_path / "files")
    from_wandb = compare([], tmp_path / "wandb", wandb=[str(runs)])
    assert from_wandb == from_files
    assert from_files.startswith("3 runs: 2 done, 1 diverged; baseline adamw")
    report = (tmp_path / "wandb" / "report.md").read_text()
    assert f"3 runs from wandb `{runs}`: 2 done, 1 diverged, 0 stopped, 0 running." in report
    assert report.count("/wandb/offline-run-") == 3  # the runs table names each run's wandb directory
    for name in ("val_loss_vs_tokens.png", "val_loss_vs_time.png", "lr_sensitivity.png"):
        assert (tmp_path / "wandb" / name).stat().st_size > 10_000

    # the same runs given both ways count once: the run directories' files win
    both = compare([runs], tmp_path / "both", wandb=[str(runs / "sweep")])
    assert main_table(both) == main_table(from_files) and both.startswith("3 runs:")
    assert "2 wandb runs were also read from their run directories and count once." in (
        (tmp_path / "both" / "report.md").read_text()
    )


def test_each_offline_run_reads_back_as_its_run_directory(runs: Path):
    now = time.time()
    by_id = {r.wandb_id: r for r in wandb_runs.read(str(runs), now)}
    dirs = sorted(p.parent for p in runs.rglob("wandb_run_id"))
    assert len(dirs) == len(by_id) == 3
    for directory in dirs:
        want = read_run(directory, now)
        got = by_id[want.wandb_id]
        assert (got.status, got.evals, got.last_step, got.final_val_loss) == (
            want.status,
            want.evals,
            want.last_step,
            want.final_val_loss,
        )
        assert (got.ms_per_step, got.optim_ms, got.state_bytes) == (want.ms_per_step, want.optim_ms, want.state_bytes)
        # the same config (the run files keep the logger's interpolations unresolved; compare ignores logger.*)
        shared = {k for k in got.config.keys() & want.config.keys() if not k.startswith("logger.")}
        assert len(shared) > 50 and {k: got.config[k] for k in shared} == {k: want.config[k] for k in shared}
    assert sorted(r.status for r in by_id.values()) == ["diverged", "done", "done"]


def test_replay_keeps_what_metrics_jsonl_keeps_after_a_resume():
    """Steps 3 and 4 were logged, the run stopped, and resumed from its step-2 checkpoint: the second process's
    records replace everything after step 2; wandb's own keys are dropped and encoded non-finite floats decoded."""
    rows = [
        {"_step": 0, "step": 0, "tokens": 0, "time": 0.0, "val/loss": 9.0},
        {"_step": 1, "step": 2, "tokens": 20, "time": 1.0, "train/loss": 8.0},
        {"_step": 2, "step": 2, "tokens": 20, "time": 1.0, "val/loss": 8.5},
        {"_step": 3, "step": 4, "tokens": 40, "time": 2.0, "train/loss": 7.0},
        {"_step": 4, "step": 4, "tokens": 40, "time": 2.0, "val/loss": 7.5},
        {"_step": 5, "step": 3, "tokens": 30, "time": 1.5, "train/loss": 7.4},
        {"_step": 6, "step": 4, "tokens": 40, "time": 2.0, "train/loss": "NaN"},
        {"_runtime": 3.0},
    ]
    records = wandb_runs.replay(rows)
    assert [(r["step"], "val/loss" in r) for r in records] == [(0, True), (2, False), (2, True), (3, False), (4, False)]
    assert records[-1]["train/loss"] != records[-1]["train/loss"]  # NaN
    assert all(not k.startswith("_") for r in records for k in r)


def test_a_stopped_and_resumed_run_reads_back_as_its_run_directory(pystdlib_data_root: Path, tmp_path: Path):
    run_dir = tmp_path / "run"
    env = offline_env(tmp_path)
    args = [f"data.root={pystdlib_data_root}", *TINY, "train.max_steps=40", "train.eval_every=10", "train.log_every=1"]
    command = [sys.executable, "train.py", *args, f"hydra.run.dir={run_dir}"]
    proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_steps(run_dir, proc, 6, timeout=300)
    signal_mid_run(proc.pid, signal.SIGTERM, run_dir, max_steps=40)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0 and "stopped by signal" in err, err

    now = time.time()
    (stopped,) = wandb_runs.read(str(run_dir / "wandb"), now)
    from_files = read_run(run_dir, now)  # written a moment ago, but stopped.json says the signal ended it
    assert stopped.status == from_files.status == "stopped" and stopped.last_step == from_files.last_step
    assert json.loads((run_dir / "stopped.json").read_text()) == {"signal": 15, "step": from_files.last_step}

    resumed = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert len(list((run_dir / "wandb").glob("offline-run-*"))) == 2 and not (run_dir / "stopped.json").exists()
    (got,) = wandb_runs.read(str(run_dir / "wandb"), now)
    want = read_run(run_dir, now)
    assert got.status == want.status == "done"
    assert got.evals == want.evals and [e.step for e in got.evals] == [0, 10, 20, 30, 40]
    assert got.final_val_loss == want.final_val_loss and got.last_step == 40


# ------------------------------------------------------------------------------------------------ the server


class PublicApi:
    """``wandb.Api`` as far as :func:`recipes.wandb_runs.read_online` uses it, serving the offline runs under
    ``root`` as one project; ``state`` overrides a run's state by id."""

    def __init__(self, root: Path, state: dict[str, str] | None = None) -> None:
        self.calls: list[tuple[str, dict | None]] = []
        self.runs_by_group: dict[str, list[SimpleNamespace]] = {}
        for file in sorted(root.rglob("run-*.wandb")):
            records = wandb_runs.read_log(file)
            (run,) = [r["run"] for r in records if r["type"] == "run"]
            summary: dict = {}
            for r in records:
                if r["type"] == "summary":
                    summary.update(r["summary"]["update"])
            history = [r["history"]["item"] for r in records if r["type"] == "history"]
            public_run = SimpleNamespace(
                id=run["run_id"],
                url=f"https://wandb.example/team/eopt/runs/{run['run_id']}",
                state=(state or {}).get(run["run_id"], "finished"),
                config=run["config"]["update"],
                summary=SimpleNamespace(items=summary.items),
                scan_history=lambda history=history: iter(history),
            )
            group = "diverged" if "diverged" in file.parts[-4] else "sweep"
            self.runs_by_group.setdefault(group, []).append(public_run)

    def runs(self, path: str, filters: dict | None = None):
        self.calls.append((path, filters))
        if filters:
            return iter(self.runs_by_group.get(filters["group"], []))
        return iter([r for group in self.runs_by_group.values() for r in group])


def test_a_project_and_a_group_on_the_server(runs: Path, tmp_path: Path):
    api = PublicApi(runs)
    whole = compare([], tmp_path / "project", wandb=["team/eopt"], wandb_api=api)
    assert whole == compare([runs], tmp_path / "files")
    assert "3 runs from wandb `team/eopt`" in (tmp_path / "project" / "report.md").read_text()
    assert "https://wandb.example/team/eopt/runs/" in (tmp_path / "project" / "report.md").read_text()

    group = compare([], tmp_path / "group", wandb=["team/eopt:sweep"], wandb_api=api)
    assert group == compare([runs / "sweep"], tmp_path / "sweep-files")
    assert api.calls == [("team/eopt", None), ("team/eopt", {"group": "sweep"})]

    muon_id = next(r.id for r in api.runs_by_group["sweep"] if r.config["optimizer"]["name"] == "muon")
    (muon,) = [r for r in wandb_runs.read("team/eopt:sweep", time.time(), api=PublicApi(runs)) if r.wandb_id == muon_id]
    assert muon.status == "done"
    live = PublicApi(runs, state={muon_id: "running"})
    (live_muon,) = [r for r in live.runs_by_group["sweep"] if r.id == muon_id]
    live_muon.summary = SimpleNamespace(items=dict().items)  # a running run has no final val loss yet
    statuses = {r.wandb_id: r.status for r in wandb_runs.read("team/eopt:sweep", time.time(), api=live)}
    assert sorted(statuses.values()) == ["done", "running"] and statuses[muon_id] == "running"


def test_server_failures_and_empty_groups_are_one_line_errors(runs: Path):
    class Down:
        def runs(self, path, filters=None):
            raise ConnectionError("Max retries exceeded with url: /graphql\n(Caused by NewConnectionError)")

    with pytest.raises(CompareError, match=r"^--wandb team/eopt: the wandb API failed \(Max retries .*\); check"):
        wandb_runs.read("team/eopt", time.time(), api=Down())
    with pytest.raises(CompareError, match="--wandb team/eopt:nope: no runs there"):
        wandb_runs.read("team/eopt:nope", time.time(), api=PublicApi(runs))


def test_cli_errors_name_the_problem_and_the_fix(tmp_path: Path):
    env = offline_env(tmp_path)
    garbage = tmp_path / "damaged" / "wandb" / "offline-run-20260101_000000-abc"
    garbage.mkdir(parents=True)
    (garbage / "run-abc.wandb").write_bytes(b"not a transaction log")
    (tmp_path / "empty").mkdir()
    cases = [
        ([], "nothing to compare: pass run or sweep directories, or --wandb SOURCE"),
        (["--wandb", "no such thing"], "neither a local directory nor entity/project[:group]"),
        (["--wandb", "team/eopt:sweep"], "no wandb API key is configured; set WANDB_API_KEY or run `wandb login`"),
        (["--wandb", str(tmp_path / "empty")], "no wandb runs under it"),
        (["--wandb", str(tmp_path / "damaged")], "run-abc.wandb is not a readable wandb run"),
    ]
    for args, message in cases:
        command = [sys.executable, "-m", "recipes.compare", *args, "--out", str(tmp_path / "report")]
        proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 2, (args, proc.stderr)
        assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1, (args, proc.stderr)
        assert message in proc.stderr, (args, proc.stderr)
    assert not (tmp_path / "report").exists()
