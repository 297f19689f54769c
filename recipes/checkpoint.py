"""Checkpoints with ``torch.distributed.checkpoint``: sharded, atomic, keep-last-K, exact resume.

A checkpoint is a directory ``step_XXXXXXXX`` holding the model and optimizer state (DCP) and
``trainer_state.pt`` (step, tokens, train time, scheduler, RNG, the config it was written with). It is
written as ``step_XXXXXXXX.tmp`` and renamed when complete, so a directory without the suffix is
always whole; a crash mid-write leaves only a ``.tmp`` directory, which the next save replaces.
"""

from __future__ import annotations

import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from recipes.errors import CheckpointError

_STEP_DIR = re.compile(r"^step_(\d{8})$")
TRAINER_STATE = "trainer_state.pt"

# DCP warns on every call that it runs without a process group; on one device that is the intent.
warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)


class Checkpointer:
    """Saves to and restores from ``directory``, keeping the newest ``keep`` checkpoints."""

    def __init__(self, directory: Path, keep: int) -> None:
        self.directory = directory
        self.keep = keep

    def complete(self) -> list[Path]:
        """Complete checkpoints, oldest first."""
        if not self.directory.is_dir():
            return []
        found = [p for p in self.directory.iterdir() if p.is_dir() and _STEP_DIR.match(p.name)]
        return sorted(found, key=lambda p: int(_STEP_DIR.match(p.name).group(1)))

    def latest(self) -> Path | None:
        done = self.complete()
        return done[-1] if done else None

    def save(self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer, trainer_state: dict) -> Path:
        final = self.directory / f"step_{step:08d}"
        if final.exists():
            return final
        tmp = final.with_name(final.name + ".tmp")
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        model_sd, optim_sd = get_state_dict(model, optimizer)
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp))
        torch.save(trainer_state, tmp / TRAINER_STATE)
        tmp.rename(final)
        for old in self.complete()[: -self.keep] if self.keep > 0 else []:
            shutil.rmtree(old)
        return final

    def read_trainer_state(self, path: Path) -> dict[str, Any]:
        """The trainer state of checkpoint ``path`` (step, scheduler, RNG, the config it was written with)."""
        try:
            return torch.load(path / TRAINER_STATE, weights_only=True)
        except Exception as e:
            raise CheckpointError(
                f"checkpoint {path} is unreadable ({type(e).__name__}): delete that directory to resume from the "
                "one before it, or start a new run directory"
            ) from e

    def load(self, path: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Restore model and optimizer state from checkpoint ``path``."""
        model_sd, optim_sd = get_state_dict(model, optimizer)
        state = {"model": model_sd, "optim": optim_sd}
        try:
            dcp.load(state, checkpoint_id=str(path))
            set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        except (Exception, CheckpointException) as e:
            reason = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
            raise CheckpointError(
                f"checkpoint {path} does not fit this run's model/optimizer ({reason[:200]}): resume with the "
                "config it was written with, or start a new run directory"
            ) from e
