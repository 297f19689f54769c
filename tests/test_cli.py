"""End-to-end tests of `python train.py` in a subprocess: runs, outputs, resume exactness, bad input."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.tiny import TINY_GPT2, signal_mid_run, wait_for_steps

REPO = Path(__file__).resolve().parents[1]
# A small model and batch so that each run takes seconds on two CPU cores.
SMALL = [
    *TINY_GPT2,
    "train.seq_len=64",
    "train.batch_size=4",
    "train.micro_batch_size=2",
    "train.eval_tokens=4096",
    "train.save_model=false",
]


def train_cmd(*args: str) -> list[str]:
    return [sys.executable, str(REPO / "train.py"), *args]


def run_train(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    return subprocess.run(train_cmd(*args), cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env)


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def losses(run_dir: Path) -> list[tuple[int, str, float]]:
    """(step, key, value) of every train/val loss, in file order."""
    return [(r["step"], k, r[k]) for r in read_metrics(run_dir) for k in ("train/loss", "val/loss") if k in r]


def assert_one_line_error(proc: subprocess.CompletedProcess, *fragments: str) -> None:
    assert proc.returncode != 0, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, proc.stderr
    for fragment in fragments:
        assert fragment in errors[0], errors[0]


def test_default_run_on_reduced_budget(pystdlib_data_root, tmp_path):
    run_dir = tmp_path / "run"
    proc = run_train(
        f"data.root={pystdlib_data_root}", "train.max_steps=40", "train.eval_every=20", f"hydra.run.dir={run_dir}"
    )
    assert proc.returncode == 0, proc.stderr
    assert f"outputs in {run_dir}" in proc.stdout
    records = read_metrics(run_dir)
    train_records = [r for r in records if "train/loss" in r]
    for key in (
        "step",
        "tokens",
        "time",
        "train/loss",
        "lr",
        "lr/adamw",
        "grad_norm",
        "tokens_per_s",
        "optim/step_ms",
        "optim/state_bytes",
        "mem/peak_bytes",
    ):
        assert key in train_records[-1], key
    val = [r["val/loss"] for r in records if "val/loss" in r]
    assert [r["step"] for r in records if "val/loss" in r] == [0, 20, 40]
    assert val[-1] < val[0] - 1.5  # clearly falling from ~ln(8192) = 9.0
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["params"] == 5_518_848 and summary["steps"] == 40
    assert summary["tokens"] == 40 * 8 * 256 and summary["final_val_loss"] == val[-1]
    assert summary["tokens_to_target"] is None and summary["optimizer"] == "adamw"
    assert (run_dir / ".hydra" / "config.yaml").exists()
    exported = AutoModelForCausalLM.from_pretrained(run_dir / "model")
    tokenizer = AutoTokenizer.from_pretrained(run_dir / "model")
    assert exported.config.vocab_size == len(tokenizer) == 8192
    assert len(list((run_dir / "checkpoints").iterdir())) == 1


def test_zero_steps_writes_the_parameter_count(pystdlib_data_root, tmp_path):
    proc = run_train(
        f"data.root={pystdlib_data_root}", "model=llama_tiny", "train.max_steps=0", f"hydra.run.dir={tmp_path}"
    )
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["params"] == 4 * (2 * 256 * 256 + 2 * 256 * 128 + 3 * 256 * 688 + 2 * 256) + 256 + 2 * 8192 * 256
    assert not (tmp_path / "metrics.jsonl").exists()


@pytest.mark.parametrize(
    "combo",
    [
        ["model=llama_tiny", "optimizer=adamw", "schedule=wsd"],
        ["schedule=linear", "train.max_tokens=2048", "train.target_val_loss=20.0"],
    ],
)
def test_group_combinations_train(pystdlib_data_root, tmp_path, combo):
    proc = run_train(
        f"data.root={pystdlib_data_root}",
        *SMALL,
        "train.max_steps=6",
        "train.eval_every=3",
        f"hydra.run.dir={tmp_path}",
        *combo,
    )
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((tmp_path / "summary.json").read_text())
    if "train.target_val_loss=20.0" in combo:  # reached at the first evaluation: stops at once
        assert summary["steps_to_target"] == 0 and summary["tokens_to_target"] == 0 and summary["steps"] == 0
    else:
        assert summary["steps"] == 6


def test_help_and_cfg_job_show_the_config():
    proc = run_train("--help")
    assert proc.returncode == 0 and "model: gpt2_124m, gpt2_1558m" in proc.stdout and "optimizer:" in proc.stdout
    proc = run_train("--cfg", "job", "model=llama_tiny")
    assert proc.returncode == 0
    assert "family: llama" in proc.stdout and "max_steps: 250" in proc.stdout and "name: adamw" in proc.stdout


@pytest.mark.parametrize("how", ["sigkill", "sigterm"])
def test_interrupted_and_resumed_run_matches_uninterrupted_bitwise(pystdlib_data_root, tmp_path, how):
    common = [
        f"data.root={pystdlib_data_root}",
        *SMALL,
        "train.max_steps=16",
        "train.log_every=1",
        "train.eval_every=4",
        "train.checkpoint_every=4",
        "train.keep_checkpoints=2",
    ]
    straight = tmp_path / "straight"
    assert run_train(*common, f"hydra.run.dir={straight}").returncode == 0

    resumed = tmp_path / "resumed"
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    proc = subprocess.Popen(
        train_cmd(*common, f"hydra.run.dir={resumed}"),
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_for_steps(resumed, proc, 6)
    signal_mid_run(proc.pid, signal.SIGKILL if how == "sigkill" else signal.SIGTERM, resumed, max_steps=16)
    proc.wait(timeout=120)
    # SIGKILL dies; SIGTERM (preemption) checkpoints the step it stopped after and exits 0, so SLURM requeues it.
    assert proc.returncode == (0 if how == "sigterm" else -signal.SIGKILL)
    assert not (resumed / "summary.json").exists()
    if how == "sigterm":
        assert "checkpoint saved" in proc.stderr.read()
    second = run_train(*common, f"hydra.run.dir={resumed}")
    assert second.returncode == 0, second.stderr
    assert "resumed from step_" in second.stdout
    assert losses(resumed) == losses(straight)
    assert (
        json.loads((resumed / "summary.json").read_text())["final_val_loss"]
        == json.loads((straight / "summary.json").read_text())["final_val_loss"]
    )
    assert sorted(p.name for p in (resumed / "checkpoints").iterdir()) == ["step_00000012", "step_00000016"]


def test_init_from_continues_from_exported_weights(pystdlib_data_root, tmp_path):
    first = tmp_path / "first"
    common = [f"data.root={pystdlib_data_root}", *SMALL, "train.eval_every=5"]
    proc = run_train(*common, "train.max_steps=5", "train.save_model=true", f"hydra.run.dir={first}")
    assert proc.returncode == 0, proc.stderr
    trained_loss = json.loads((first / "summary.json").read_text())["final_val_loss"]
    second = tmp_path / "second"
    proc = run_train(*common, "train.max_steps=1", f"model.init_from={first / 'model'}", f"hydra.run.dir={second}")
    assert proc.returncode == 0, proc.stderr
    assert [r["val/loss"] for r in read_metrics(second) if r["step"] == 0] == [trained_loss]


BAD_CONFIGS = [
    (["model=gpt3"], ["model/gpt3", "available options"]),
    (["train.foo=1"], ["train.foo"]),
    (["optimizer.lr=0"], ["optimizer.lr"]),
    (["optimizer.lr=-1e-3"], ["optimizer.lr"]),
    (["model.n_head=5"], ["model.n_head", "divide"]),
    (["train.batch_size=10", "train.micro_batch_size=4"], ["train.batch_size", "micro_batch_size"]),
    (["train.seq_len=2048"], ["train.seq_len", "max_position_embeddings"]),
    (["optimizer.betas=[0.9]"], ["betas"]),
    (["train.max_steps=many"], ["train.max_steps"]),
    (["data=text_files", "data.tokenizer=bpe", "data.files=[/nonexistent/*.txt]"], ["/nonexistent/*.txt"]),
]


@pytest.mark.parametrize("args, fragments", BAD_CONFIGS, ids=[" ".join(a) for a, _ in BAD_CONFIGS])
def test_bad_configs_fail_with_one_line(tmp_path, args, fragments):
    proc = run_train(f"data.root={tmp_path / 'data'}", f"hydra.run.dir={tmp_path / 'run'}", *args)
    assert_one_line_error(proc, *fragments)
    assert not any((tmp_path / "data").glob("*"))  # failed before preparing anything


def test_empty_corpus_fails_with_one_line(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    proc = run_train(
        "data=text_files",
        "data.tokenizer=bpe",
        f"data.files=[{tmp_path}/*.txt]",
        f"data.root={tmp_path / 'data'}",
        f"hydra.run.dir={tmp_path / 'run'}",
    )
    assert_one_line_error(proc, "empty")


def test_corrupt_shard_fails_with_one_line(pystdlib_data_dir, tmp_path):
    root = tmp_path / "data"
    copy = root / pystdlib_data_dir.name
    shutil.copytree(pystdlib_data_dir, copy)
    shard = sorted(copy.glob("train_*.bin"))[0]
    with open(shard, "r+b") as f:
        f.write(b"\x00\x00\x00\x00")
    proc = run_train(f"data.root={root}", *SMALL, "train.max_steps=2", f"hydra.run.dir={tmp_path / 'run'}")
    assert_one_line_error(proc, shard.name)


def test_non_finite_loss_stops_without_saving_a_bad_checkpoint(pystdlib_data_root, tmp_path):
    args = [
        f"data.root={pystdlib_data_root}",
        *SMALL,
        "train.max_steps=30",
        "train.checkpoint_every=1",
        "train.grad_clip=null",
        "optimizer.lr=1e30",
        "schedule=constant",
        "schedule.warmup_fraction=0",
        f"hydra.run.dir={tmp_path}",
    ]
    proc = run_train(*args)
    assert_one_line_error(proc, "non-finite")
    assert not (tmp_path / "summary.json").exists()
    steps = [int(p.name[5:]) for p in (tmp_path / "checkpoints").glob("step_*")]
    train_records = [r for r in read_metrics(tmp_path) if "train/loss" in r]
    finite = [r["step"] for r in train_records if r["train/loss"] is not None]
    assert all(step <= max(finite, default=0) for step in steps)
    assert train_records[-1]["train/loss_avg"] is None  # the run files show where it diverged (recipes.compare)


def test_checkpoint_from_another_model_is_refused_and_left_intact(pystdlib_data_root, tmp_path):
    common = [f"data.root={pystdlib_data_root}", *SMALL, "train.max_steps=3", f"hydra.run.dir={tmp_path}"]
    assert run_train(*common).returncode == 0
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file() and ".hydra" not in p.parts}
    proc = run_train(*common, "model.n_layer=3", "train.max_steps=6")
    assert_one_line_error(proc, "cannot resume", "n_layer")
    after = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file() and ".hydra" not in p.parts}
    assert after == before


@pytest.mark.slow
def test_compiled_run_matches_eager_run(pystdlib_data_root, tmp_path):
    common = [f"data.root={pystdlib_data_root}", *SMALL, "train.max_steps=6", "train.eval_every=3"]
    eager, compiled = tmp_path / "eager", tmp_path / "compiled"
    assert run_train(*common, f"hydra.run.dir={eager}").returncode == 0
    proc = run_train(*common, "train.compile=true", f"hydra.run.dir={compiled}", timeout=900)
    assert proc.returncode == 0, proc.stderr
    for (step_a, key_a, a), (step_b, key_b, b) in zip(losses(eager), losses(compiled), strict=True):
        assert (step_a, key_a) == (step_b, key_b)
        assert b == pytest.approx(a, rel=1e-4)
