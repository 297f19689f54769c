"""Sweep identity (the shared sweep id, run names from overrides) and the same sweep without SLURM
(``hydra/launcher=local``: submitit's local executor, one subprocess per job)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from recipes import sweep
from tests.tiny import TINY_GPT2, TINY_RUN

REPO = Path(__file__).resolve().parents[1]


def test_run_name_is_the_optimizer_its_overrides_the_rest_and_the_seed():
    overrides = [
        "model=llama_60m",
        "optimizer=muon",
        "optimizer.lr=0.02",
        "hydra/launcher=slurm",
        "hydra.launcher.nodes=2",
        "logger=wandb",
        "parallelism=fsdp",
        "data.root=/scratch/data",
        "train.max_steps=1000",
        "+optimizer.nesterov=false",
    ]
    assert sweep.run_name("muon", 1337, overrides) == "muon-lr0.02-nesterovfalse-llama_60m-max_steps1000-s1337"
    assert sweep.run_name("adamw", 7, []) == "adamw-s7"
    assert sweep.run_name("soap", 1, ["data.files=[a/b.txt,c.txt]"]) == "soap-files_a_b.txt_c.txt_-s1"


def test_sweep_id_is_created_once_and_inherited(monkeypatch):
    monkeypatch.delenv(sweep.SWEEP_ID_ENV, raising=False)
    assert sweep.sweep_group() is None
    first = sweep.sweep_id()
    assert os.environ[sweep.SWEEP_ID_ENV] == first == sweep.sweep_id() == sweep.sweep_group()
    child = subprocess.run(
        [sys.executable, "-c", "from recipes import sweep; print(sweep.sweep_id())"],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert child.stdout.strip() == first


def test_local_launcher_runs_the_sweep_without_slurm(pystdlib_data_root, tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("HYDRA_FULL_ERROR", "EOPT_SWEEP_ID")}
    env.update(OMP_NUM_THREADS="1", EOPT_SWEEP_ID="local-test")
    command = [
        sys.executable,
        "train.py",
        "-m",
        "hydra/launcher=local",
        "optimizer=muon",
        "optimizer.lr=0.01,0.02",
        f"data.root={pystdlib_data_root}",
        *TINY_GPT2,
        *TINY_RUN,
        "train.max_steps=2",
        "train.save_model=false",
        f"hydra.sweep.dir={tmp_path}/${{eopt.sweep_id:}}",
    ]
    proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    runs = sorted(p for p in (tmp_path / "local-test").iterdir() if p.is_dir() and not p.name.startswith("."))
    suffix = "-n_layer2-hidden_size64-n_head2-seq_len32-batch_size4-micro_batch_size2-eval_tokens1024-max_steps2-s1337"
    assert [p.name for p in runs] == [f"0_muon-lr0.01{suffix}", f"1_muon-lr0.02{suffix}"]
    for run_dir in runs:
        assert json.loads((run_dir / "summary.json").read_text())["steps"] == 2
        assert (run_dir / "metrics.jsonl").read_text().count("train/loss") == 2
