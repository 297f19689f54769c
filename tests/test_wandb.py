"""``logger=wandb`` against the real wandb library, offline: the run is read back from its ``.wandb`` file with
wandb's own reader (``wandb leet inspect --json``) and compared with ``metrics.jsonl`` and ``summary.json``."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from recipes.config import LoggerConfig
from recipes.metrics import WandbSink
from tests.tiny import TINY_GPT2, TINY_RUN, signal_mid_run, wait_for_steps

REPO = Path(__file__).resolve().parents[1]
SMALL = [*TINY_GPT2, *TINY_RUN, "train.save_model=false", "train.log_every=1", "logger=wandb"]
SECRET = "0123456789abcdef0123456789abcdef01234567"  # the shape of a wandb API key


def wandb_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """No API key, no netrc, no network: wandb can only work offline."""
    drop = ("HYDRA_FULL_ERROR", "WANDB_API_KEY", "WANDB_MODE", "WANDB_BASE_URL", "EOPT_SWEEP_ID")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    return {
        **env,
        "OMP_NUM_THREADS": "1",
        "NETRC": str(tmp_path / "no-netrc"),
        "WANDB_CACHE_DIR": str(tmp_path),
        **extra,
    }


def train(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    command = [sys.executable, "train.py", *args]
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def read_wandb_runs(run_dir: Path) -> list[list[dict]]:
    """Every wandb run file under ``run_dir``, oldest first, as wandb's reader prints its records."""
    files = sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    runs = []
    for path in files:
        out = subprocess.run(
            [sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(path)],
            capture_output=True,
            text=True,
            timeout=120,
            check=True,
        ).stdout
        runs.append([json.loads(line) for line in out.splitlines() if line.strip()])
    return runs


def records_of(records: list[dict], kind: str) -> list[dict]:
    return [r[kind] for r in records if r.get("type") == kind]


def jsonl(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def user_keys(item: dict) -> set[str]:
    return {k for k in item if not k.startswith("_")}


def test_offline_run_reads_back_with_the_metrics_and_summary(pystdlib_data_root, tmp_path):
    run_dir = tmp_path / "run"
    env = wandb_env(tmp_path, EOPT_SWEEP_ID="sweep-test")
    args = [f"data.root={pystdlib_data_root}", *SMALL, "optimizer=muon", "optimizer.lr=0.02", "train.max_steps=4"]
    proc = train(*args, "train.eval_every=2", f"hydra.run.dir={run_dir}", env=env)
    assert proc.returncode == 0, proc.stderr
    # mode=online (the default) without an API key logs offline and says how to upload, once
    assert proc.stderr.count("no API key configured") == 1, proc.stderr
    assert f"wandb sync {run_dir / 'wandb'}/offline-run-" in proc.stderr

    (records,) = read_wandb_runs(run_dir)
    (run,) = records_of(records, "run")
    assert run["project"] == "eopt-recipes"
    assert run["run_group"] == "sweep-test"
    assert run["display_name"] == (
        "muon-lr0.02-n_layer2-hidden_size64-n_head2-seq_len32-batch_size4-micro_batch_size2-eval_tokens1024-"
        "max_steps4-s1337"
    )
    assert {"muon", "gpt2_tiny", "pystdlib", "single"} <= set(run["tags"])
    config = run["config"]["update"]
    assert config["optimizer"]["name"] == "muon" and config["optimizer"]["lr"] == 0.02
    assert config["train"]["max_steps"] == 4 and config["logger"]["name"] == "wandb"
    assert run["run_id"] == (run_dir / "wandb_run_id").read_text().strip()

    metrics = records_of(records, "metric")
    assert {"name": "tokens", "options": {"defined": True}} in metrics
    assert any(m.get("glob_name") == "*" and m.get("step_metric") == "tokens" for m in metrics)

    history = [h["item"] for h in records_of(records, "history")]
    expected = jsonl(run_dir)
    assert len(history) == len(expected) == 4 + 3  # a train record per step, val at steps 0, 2 and 4
    for item, want in zip(history, expected, strict=True):
        assert user_keys(item) == set(want), (item, want)
        assert item["tokens"] == want["tokens"] and item["step"] == want["step"]
        for key in ("train/loss", "val/loss"):
            if key in want:
                assert item[key] == pytest.approx(want[key], rel=1e-12)

    summary = json.loads((run_dir / "summary.json").read_text())
    logged = {}
    for update in records_of(records, "summary"):
        logged.update(update["update"])
    for key in ("final_val_loss", "tokens", "steps", "params", "optimizer", "optim/state_bytes"):
        assert logged[key] == summary[key], key


def test_online_without_network_falls_back_to_offline_and_keeps_the_key_out(pystdlib_data_root, tmp_path):
    run_dir = tmp_path / "run"
    env = wandb_env(tmp_path, WANDB_API_KEY=SECRET, WANDB_BASE_URL="http://127.0.0.1:9")
    args = [f"data.root={pystdlib_data_root}", *SMALL, "train.max_steps=2", "logger.init_timeout_s=3"]
    started = time.monotonic()
    proc = train(*args, "logger.mode=online", f"hydra.run.dir={run_dir}", env=env)
    assert proc.returncode == 0, proc.stderr
    assert time.monotonic() - started < 120
    assert proc.stderr.count("cannot reach the server") == 1, proc.stderr
    assert "logging offline" in proc.stderr and "wandb sync" in proc.stderr
    assert len(jsonl(run_dir)) == 2 + 2
    (records,) = read_wandb_runs(run_dir)
    assert len(records_of(records, "history")) == 4
    assert (run_dir / "summary.json").exists()
    for path in [*run_dir.rglob("*"), *tmp_path.glob("*")]:
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), path
    assert SECRET not in proc.stdout + proc.stderr


def test_resumed_run_continues_the_same_wandb_run(pystdlib_data_root, tmp_path):
    run_dir = tmp_path / "run"
    env = wandb_env(tmp_path)
    command = [
        sys.executable,
        "train.py",
        f"data.root={pystdlib_data_root}",
        *SMALL,
        "logger.mode=offline",
        "train.max_steps=40",
        "train.eval_every=40",
        f"hydra.run.dir={run_dir}",
    ]
    proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_steps(run_dir, proc, 3)
    signal_mid_run(proc.pid, signal.SIGTERM, run_dir, max_steps=40)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0 and "stopped by signal" in err, err
    stopped_at = jsonl(run_dir)[-1]["step"]
    assert 3 <= stopped_at < 40

    proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    first, second = read_wandb_runs(run_dir)
    (run1,), (run2,) = records_of(first, "run"), records_of(second, "run")
    assert run1["run_id"] == run2["run_id"]
    steps = [h["item"]["step"] for h in records_of(first, "history") + records_of(second, "history")]
    assert steps == [r["step"] for r in jsonl(run_dir)] == [0, *range(1, 41), 40]


def test_a_failing_wandb_warns_once_and_stops_sending(tmp_path, capsys, monkeypatch):
    for name in ("WANDB_API_KEY", "WANDB_BASE_URL", "WANDB_MODE"):
        monkeypatch.delenv(name, raising=False)
    sink = WandbSink(LoggerConfig(name="wandb", mode="offline"), tmp_path, {"seed": 1}, ["adamw"])
    run = sink.run
    assert run is not None

    def broken(*args, **kwargs):
        raise ConnectionError("service down")

    monkeypatch.setattr(run, "log", broken)
    try:
        sink.log({"step": 1, "tokens": 10, "train/loss": 1.0})
        sink.log({"step": 2, "tokens": 20, "train/loss": 0.5})
        sink.finish({"final_val_loss": 0.5})
    finally:
        run.finish()
    err = capsys.readouterr().err
    assert err.count("warning: wandb failed (service down)") == 1, err
    assert sink.run is None


def test_disabled_mode_keeps_wandb_out(pystdlib_data_root, tmp_path):
    run_dir = tmp_path / "run"
    args = [f"data.root={pystdlib_data_root}", *SMALL, "train.max_steps=1", "logger.mode=disabled"]
    proc = train(*args, f"hydra.run.dir={run_dir}", env=wandb_env(tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert len(jsonl(run_dir)) == 1 + 2
    assert not (run_dir / "wandb").exists() and not (run_dir / "wandb_run_id").exists()
    assert "wandb" not in proc.stderr
