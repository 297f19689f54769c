"""Pretrain a language model with the optimizer, model and data chosen on the Hydra command line.

python train.py optimizer=muon model=llama_tiny train.max_steps=200
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from recipes.cli import format_user_error, is_user_error
from recipes.config import Config, register_configs
from recipes.errors import RecipeError

register_configs()
FULL_TRACEBACK = os.environ.get("HYDRA_FULL_ERROR") == "1"


@hydra.main(config_path="conf", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from recipes.trainer import train

    config: Config = OmegaConf.to_object(cfg)
    config.optimizer = OmegaConf.to_container(cfg.optimizer, resolve=True)
    try:
        summary = train(config, Path(HydraConfig.get().runtime.output_dir))
    except RecipeError as e:
        if FULL_TRACEBACK:
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    if "final_val_loss" in summary:
        loss, steps = summary["final_val_loss"], summary["steps"]
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
