"""Checkpoints with ``torch.distributed.checkpoint``: sharded, atomic, keep-last-K, exact resume at any world size.

A checkpoint is a directory ``step_XXXXXXXX`` holding the model and optimizer state (DCP: one file per rank
plus the metadata, resharded on load, so a checkpoint of 2 FSDP ranks loads into 1 process, DDP or 4 ranks)
and ``trainer_state.pt`` (step, tokens, train time, scheduler, RNG, the config it was written with). It is
written as ``step_XXXXXXXX.tmp`` and renamed when complete, so a directory without the suffix is always
whole; a crash mid-write leaves only a ``.tmp`` directory, which the next save replaces.

Under several ranks rank 0 owns the directory (prepare, rename, prune) around the collective DCP write, and
every decision that could differ between ranks (is there a checkpoint, does it fit this run) is made once and
given to all, so a missing or foreign checkpoint is one line on every rank, never a hang.
"""

from __future__ import annotations

import re
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from recipes import parallel
from recipes.errors import CheckpointError

_STEP_DIR = re.compile(r"^step_(\d{8})$")
TRAINER_STATE = "trainer_state.pt"

# DCP warns on every call that it runs without a process group; on one device that is the intent.
warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)


def first_difference(a: Any, b: Any, prefix: str = "") -> str | None:
    """Where two nested config dicts first differ, as ``key: checkpoint has X, this run has Y`` (None if equal)."""
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b)):
            diff = first_difference(a.get(key), b.get(key), f"{prefix}{key}.")
            if diff:
                return diff
        return None
    return None if a == b else f"{prefix[:-1]}: checkpoint has {a!r}, this run has {b!r}"


class Checkpointer:
    """Saves to and restores from ``directory``, keeping the newest ``keep`` checkpoints.

    The low-level calls (:meth:`save`, :meth:`load`, :meth:`latest`, :meth:`read_trainer_state`) take what they
    save; :meth:`resume` and :meth:`maybe_save` are the trainer's: they decide when to save (every ``every``
    steps, at the last step, on a stop signal) and what a checkpoint holds (``model``, ``optimizer``,
    ``scheduler``, RNG, the run ``fingerprint`` that a resume must match). ``async_save`` writes in the
    background (``dcp.async_save``: the state is staged to host memory, training goes on, the checkpoint is
    renamed complete at the next save or at :meth:`close`).
    """

    def __init__(
        self,
        directory: Path,
        keep: int,
        *,
        every: int = 0,
        model: nn.Module | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        scheduler: Any = None,
        fingerprint: dict | None = None,
        async_save: bool = False,
    ) -> None:
        self.directory = directory
        self.keep = keep
        self.every = every
        self.model, self.optimizer, self.scheduler, self.fingerprint = model, optimizer, scheduler, fingerprint
        self.async_save = async_save
        self._pending: tuple[Any, Path, Path, dict] | None = None
        # Background saves communicate from another thread: on a group of their own, not the training one's.
        self._async_group = parallel.new_gloo_group() if async_save else None

    # ------------------------------------------------------------------------------------ files

    def complete(self) -> list[Path]:
        """Complete checkpoints, oldest first."""
        if not self.directory.is_dir():
            return []
        found = [p for p in self.directory.iterdir() if p.is_dir() and _STEP_DIR.match(p.name)]
        return sorted(found, key=lambda p: int(_STEP_DIR.match(p.name).group(1)))

    def latest(self) -> Path | None:
        done = self.complete()
        return done[-1] if done else None

    def _prepare(self, final: Path) -> bool:
        """Rank 0: make an empty ``.tmp`` directory for ``final``; True if ``final`` already exists."""
        if final.exists():
            return True
        tmp = final.with_name(final.name + ".tmp")
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        return False

    def _finish(self, tmp: Path, final: Path, trainer_state: dict) -> None:
        """After every rank has written: rank 0 adds the trainer state, renames, prunes the oldest."""
        parallel.barrier()
        if parallel.is_main():
            torch.save(trainer_state, tmp / TRAINER_STATE)
            tmp.rename(final)
            for old in self.complete()[: -self.keep] if self.keep > 0 else []:
                shutil.rmtree(old)
        parallel.barrier()

    def save(self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer, trainer_state: dict) -> Path:
        """Write checkpoint ``step`` (collective: every rank calls it). Returns its final path."""
        self.wait()
        final = self.directory / f"step_{step:08d}"
        if parallel.decided_once(lambda: self._prepare(final)):
            return final
        tmp = final.with_name(final.name + ".tmp")
        model_sd, optim_sd = get_state_dict(model, optimizer)
        state = {"model": model_sd, "optim": optim_sd}
        if self.async_save:
            future = dcp.async_save(state, checkpoint_id=str(tmp), process_group=self._async_group)
            self._pending = (future, tmp, final, trainer_state)
            return final
        dcp.save(state, checkpoint_id=str(tmp))
        self._finish(tmp, final, trainer_state)
        return final

    def wait(self) -> None:
        """Complete a background save (no-op without one)."""
        if self._pending is not None:
            future, tmp, final, trainer_state = self._pending
            self._pending = None
            future.result()
            self._finish(tmp, final, trainer_state)

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
        """Restore model and optimizer state from checkpoint ``path`` (collective), resharded to this run."""
        error = None
        try:
            model_sd, optim_sd = get_state_dict(model, optimizer)
            state = {"model": model_sd, "optim": optim_sd}
            dcp.load(state, checkpoint_id=str(path))
            set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        except (Exception, CheckpointException) as e:
            reason = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
            error = CheckpointError(
                f"checkpoint {path} does not fit this run's model/optimizer or is damaged ({reason[:200]}): resume "
                "with the config it was written with, delete that directory to resume from the one before it, or "
                "start a new run directory"
            )
            error.__cause__ = e
        parallel.raise_together(error)

    # ------------------------------------------------------------------------------- run level

    def _checked_trainer_state(self, path: Path) -> dict[str, Any]:
        saved = self.read_trainer_state(path)
        diff = first_difference(saved["config"], self.fingerprint)
        if diff:
            raise CheckpointError(f"cannot resume from {path}: {diff}; match the config or use a new run directory")
        return saved

    def resume(self, device: torch.device) -> tuple[Path, dict] | None:
        """Restore the newest complete checkpoint into the model, optimizer, scheduler and RNG.

        Returns ``(path, trainer_state)``, or None when the run directory has no checkpoint. A checkpoint from
        another config raises :class:`CheckpointError` on every rank, and nothing is loaded.
        """
        latest = parallel.decided_once(self.latest)
        if latest is None:
            return None
        saved = parallel.decided_once(lambda: self._checked_trainer_state(latest))
        self.load(latest, self.model, self.optimizer)
        self.scheduler.load_state_dict(saved["scheduler"])
        torch.set_rng_state(saved["rng"])
        if device.type == "cuda" and "cuda_rng" in saved:
            torch.cuda.set_rng_state(saved["cuda_rng"], device)
        return latest, saved

    def due(self, step: int, last: bool = False, stop: bool = False) -> bool:
        """Whether :meth:`maybe_save` saves after ``step``: the cadence, the last step, or a stop signal."""
        return last or stop or (self.every > 0 and step % self.every == 0)

    def maybe_save(self, step: int, run_state: Callable[[], dict], last: bool = False, stop: bool = False) -> None:
        """Save after optimizer step ``step`` when :meth:`due`; ``run_state()`` gives the trainer's counters."""
        if not self.due(step, last, stop):
            return
        device = next(self.model.parameters()).device
        trainer_state = {
            "state": run_state(),
            "scheduler": self.scheduler.state_dict(),
            "rng": torch.get_rng_state(),
            "config": self.fingerprint,
        }
        if device.type == "cuda":
            trainer_state["cuda_rng"] = torch.cuda.get_rng_state(device)
        self.save(step, self.model, self.optimizer, trainer_state)
        if stop or last:
            self.wait()

    def close(self) -> None:
        self.wait()
