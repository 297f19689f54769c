"""Pretrain a language model with the optimizer, model and data chosen on the Hydra command line.

python train.py optimizer=muon model=llama_tiny train.max_steps=200
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from recipes import metrics
from recipes.cli import format_user_error, is_user_error
from recipes.config import register_configs, resolve_config
from recipes.errors import RecipeError
from recipes.parallel import peer_failure, world_from_env

register_configs()
FULL_TRACEBACK = os.environ.get("HYDRA_FULL_ERROR") == "1"


def hand_on_signal(signum: int) -> None:
    """Call the handler that listened to ``signum`` before training, now that the checkpoint is written: under
    submitit (``hydra/launcher=slurm``) that handler requeues the job on USR2, and the requeued job resumes from
    this checkpoint in the same run directory. A plain run has no such handler and exits 0."""
    handler = signal.getsignal(signum)
    if callable(handler):
        handler(signum, None)


@hydra.main(config_path="conf", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from recipes.trainer import train

    world = world_from_env()
    try:
        summary = train(resolve_config(cfg), Path(HydraConfig.get().runtime.output_dir))
    except RecipeError as e:
        if FULL_TRACEBACK:
            raise
        # An error every rank raised together is printed once; one rank's own error by that rank.
        if world.main or not getattr(e, "all_ranks", False):
            prefix = "" if world.world_size == 1 or world.main else f"(rank {world.rank}) "
            print(f"error: {prefix}{e}", file=sys.stderr)
        sys.exit(2)
    except Exception as e:
        lost = None if FULL_TRACEBACK or world.world_size == 1 else peer_failure(e)
        if lost is None:
            raise
        print(f"error: (rank {world.rank}) {lost}", file=sys.stderr)
        sys.exit(1)
    if "stopped" in summary:
        if world.main:
            print(
                f"stopped by signal {summary['stopped']} at step {summary['step']}; checkpoint saved in "
                f"{summary['checkpoints']}: run the same command again to resume",
                file=sys.stderr,
            )
        hand_on_signal(summary["stopped"])
        return
    if not world.main:
        return
    if metrics.FINAL_VAL_LOSS in summary:
        loss, steps = summary[metrics.FINAL_VAL_LOSS], summary[metrics.STEPS]
        print(f"done: val/loss {loss:.4f} after {steps} steps; outputs in {summary['run_dir']}")
    else:
        print(f"{summary['model']}: {summary['params']:,} parameters; outputs in {summary['run_dir']}")


if __name__ == "__main__":
    os.environ["HYDRA_FULL_ERROR"] = "1"  # let composition errors reach us, so that we print them as one line
    try:
        main()
    except Exception as e:
        if FULL_TRACEBACK or not is_user_error(e):
            raise
        print(f"error: {format_user_error(e)}", file=sys.stderr)
        sys.exit(2)
