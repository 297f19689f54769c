"""Overrides shared by the tests that run the recipe end to end: tiny models and a small batch, so that a run
takes seconds on two CPU cores; and :func:`wait_for_steps` and :func:`signal_mid_run`, to act on such a run once it
has trained a while."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

# GPT-2 (the default model family) at 2 layers x 64.
TINY_GPT2 = ["model.n_layer=2", "model.hidden_size=64", "model.n_head=2"]

# A 2-layer Llama small enough for multi-process recipe runs on CPU (GQA: 2 query heads, 1 key/value head).
TINY_LLAMA = [
    "model=llama_tiny",
    "model.n_layer=2",
    "model.hidden_size=64",
    "model.n_head=2",
    "model.n_kv_head=1",
    "model.intermediate_size=172",
]

# 4 sequences of 32 tokens per step in micro-batches of 2, a 1024-token validation set, no progress bar.
TINY_RUN = [
    "train.seq_len=32",
    "train.batch_size=4",
    "train.micro_batch_size=2",
    "train.eval_tokens=1024",
    "logger.progress=false",
]


def train_records(run_dir: Path) -> int:
    """The train records in ``run_dir``'s ``metrics.jsonl`` so far (by their key: ``train/loss_avg`` not counted)."""
    path = run_dir / "metrics.jsonl"
    return path.read_text().count('"train/loss":') if path.exists() else 0


def wait_for_steps(run_dir: Path, proc: subprocess.Popen | None, steps: int, timeout: float = 240) -> None:
    """Wait until the run has written ``steps`` train records (``train.log_every=1``: steps); fail if ``proc``, the
    launcher when there is one, ends first or the time runs out."""
    deadline = time.monotonic() + timeout
    while train_records(run_dir) < steps:
        assert proc is None or proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the run did not start training in time"
        time.sleep(0.2)


def signal_mid_run(writer: int, sig: int, run_dir: Path, max_steps: int, target: int | None = None) -> None:
    """Send ``sig`` to ``target`` (default: ``writer``) while ``writer``, the process that writes ``metrics.jsonl``
    (rank 0), is held by SIGSTOP. The signal lands before the run's last step however long the machine takes between
    seeing a step and sending it: a held rank 0 keeps the other ranks within a step of it, and the signal is handled
    when it goes on."""
    os.kill(writer, signal.SIGSTOP)
    try:
        written = train_records(run_dir)
        assert written <= max_steps - 3, f"the run reached step {written} of {max_steps} before it was signalled"
        os.kill(target or writer, sig)
    finally:
        os.kill(writer, signal.SIGCONT)
