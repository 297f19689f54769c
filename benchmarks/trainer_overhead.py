"""The trainer's throughput versus a bare PyTorch loop over the same model, batches and optimizer.

    python benchmarks/trainer_overhead.py [--steps 60] [--repeats 3] [overrides ...]

Both loops run in this process on the same config (default: the tiny GPT-2 of ``python train.py`` on the
embedded corpus): the trainer through :func:`recipes.trainer.train` (its ``train_time`` excludes evaluation
and checkpointing, as in every run), the bare loop as forward, cross-entropy, backward, clip, fused AdamW
step, zero_grad, with the batches from the same :class:`recipes.data.TrainBatches`. They alternate
``--repeats`` times so that drifts of the machine hit both; the table reports each pair and the median ratio.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from recipes.config import Config, register_configs  # noqa: E402
from recipes.data import TrainBatches, read_meta  # noqa: E402
from recipes.models import build_model  # noqa: E402
from recipes.prepare import prepare  # noqa: E402
from recipes.trainer import train  # noqa: E402


def load_config(steps: int, overrides: list[str]) -> Config:
    register_configs()
    fixed = [
        f"train.max_steps={steps}",
        f"train.eval_every={steps}",
        "train.eval_tokens=2048",
        "train.save_model=false",
        "logger.progress=false",
    ]
    with initialize_config_dir(str(REPO / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=fixed + overrides)
    config: Config = OmegaConf.to_object(cfg)
    config.optimizer = OmegaConf.to_container(cfg.optimizer, resolve=True)
    return config


def bare_loop_tokens_per_s(cfg: Config, data_dir: Path, steps: int) -> float:
    meta = read_meta(data_dir)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, meta["vocab_size"], eot_token=meta["eot_token"])
    o = cfg.optimizer
    optimizer = torch.optim.AdamW(
        model.parameters(),
        lr=o["lr"],
        betas=tuple(o["betas"]),
        eps=o["eps"],
        weight_decay=o["weight_decay"],
        fused=True,
    )
    t = cfg.train
    batches = TrainBatches(
        data_dir, seq_len=t.seq_len, batch_size=t.batch_size, micro_batch_size=t.micro_batch(1), seed=cfg.seed
    )
    start = time.perf_counter()
    for step in range(steps):
        micro = batches.micro_batches(step)
        for inputs, targets in micro:
            logits = model(input_ids=inputs).logits
            loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
            (loss / len(micro)).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    loss.item()
    return steps * t.batch_size * t.seq_len / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=60, help="optimizer steps per measurement")
    parser.add_argument("--repeats", type=int, default=3, help="alternating trainer/bare pairs")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. model=llama_tiny")
    args = parser.parse_args()
    cfg = load_config(args.steps, args.overrides)
    data_dir = prepare(cfg.data, progress=True)
    print(
        f"model={cfg.model.name} batch={cfg.train.batch_size}x{cfg.train.seq_len} steps={args.steps} "
        f"threads={torch.get_num_threads()} torch={torch.__version__}"
    )
    print("| repeat | bare loop tok/s | trainer tok/s | trainer / bare |\n|---|---|---|---|")
    ratios = []
    for repeat in range(args.repeats):
        bare = bare_loop_tokens_per_s(cfg, data_dir, args.steps)
        with tempfile.TemporaryDirectory() as run_dir:
            summary = train(cfg, Path(run_dir))
        trainer = summary["tokens"] / summary["train_time_s"]
        ratios.append(trainer / bare)
        print(f"| {repeat} | {bare:,.0f} | {trainer:,.0f} | {trainer / bare:.3f} |", flush=True)
    print(f"\nmedian trainer / bare loop: {statistics.median(ratios):.3f}")


if __name__ == "__main__":
    main()
