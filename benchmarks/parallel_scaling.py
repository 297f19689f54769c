"""Throughput, optimizer step time and state bytes per rank: one process against 2 ranks (DDP and FSDP2).

    python benchmarks/parallel_scaling.py [--optimizers adamw,muon,...] [--steps 24] [overrides ...]

Each optimizer trains the same config (default: ``llama_tiny`` on the embedded corpus, global batch 8 x 256,
micro-batch 4) three ways, one after another on this machine: ``single`` (one process, as many threads as
``--threads``), and ``ddp`` / ``fsdp`` (``torchrun --nproc_per_node 2``, ``--threads`` split between the ranks),
so every layout gets the same cores. The numbers are read from each run's ``metrics.jsonl``: tokens/s and
``optim/step_ms`` (the slowest rank) are medians over the train records after the first (warm-up) one, and
``optim/state_bytes`` is the largest rank's state next to the total over ranks. The table gives each layout's
ratio to ``single`` (tokens/s: higher is faster; step time and state per rank: lower is better).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OPTIMIZERS = ("adamw", "muon", "soap", "shampoo", "adam_mini", "sophia", "adafactor")
LAYOUTS = ("single", "ddp", "fsdp")
LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID", "SLURM_NTASKS")


def run(layout: str, optimizer: str, steps: int, threads: int, overrides: list[str], run_dir: Path) -> dict:
    """Train one layout and return its medians and state bytes, read from the run's files."""
    log_every = max(steps // 6, 1)
    args = [
        f"optimizer={optimizer}",
        f"train.max_steps={steps}",
        f"train.log_every={log_every}",
        f"train.eval_every={steps}",
        "train.eval_tokens=2048",
        "train.save_model=false",
        "logger.progress=false",
        f"hydra.run.dir={run_dir}",
        *overrides,
    ]
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}
    if layout == "single":
        env["OMP_NUM_THREADS"] = str(threads)
        command = [sys.executable, "train.py", *args]
    else:
        env["OMP_NUM_THREADS"] = str(max(threads // 2, 1))
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
        command = [*launcher, "train.py", *args, f"parallelism={layout}"]
    proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{layout} {optimizer} failed:\n{proc.stderr[-3000:]}")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "train/loss" in r][1:]
    return {
        "tokens_per_s": statistics.median(r["tokens_per_s"] for r in train),
        "step_ms": statistics.median(r["optim/step_ms"] for r in train),
        "state": train[-1]["optim/state_bytes"],
        "state_total": train[-1]["optim/state_bytes_total"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--optimizers", default=",".join(OPTIMIZERS), help="comma-separated optimizer names")
    parser.add_argument("--steps", type=int, default=24, help="optimizer steps per run")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads per layout (split between 2 ranks)")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for every run, e.g. model=gpt2_tiny")
    args = parser.parse_args()
    overrides = ["model=llama_tiny", "train.batch_size=8", "train.micro_batch_size=4", *args.overrides]
    print(f"overrides: {' '.join(overrides)} | steps={args.steps} | threads per layout={args.threads}")
    print(
        "| optimizer | layout | tok/s | tok/s vs single | optim ms (max rank) | vs single | state/rank MB | "
        "vs single | state total MB |\n|---|---|---|---|---|---|---|---|---|"
    )
    with tempfile.TemporaryDirectory() as root:
        for optimizer in args.optimizers.split(","):
            results = {}
            for layout in LAYOUTS:
                results[layout] = r = run(
                    layout, optimizer, args.steps, args.threads, overrides, Path(root) / f"{optimizer}-{layout}"
                )
                base = results["single"]
                print(
                    f"| {optimizer} | {layout} | {r['tokens_per_s']:,.0f} | "
                    f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}x | {r['step_ms']:.1f} | "
                    f"{r['step_ms'] / base['step_ms']:.2f}x | {r['state'] / 1e6:.2f} | "
                    f"{r['state'] / base['state']:.2f}x | {r['state_total'] / 1e6:.2f} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
