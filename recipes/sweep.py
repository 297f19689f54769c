"""Sweep identity: the sweep id every job of a sweep shares, and run names made from a job's overrides.

Both are OmegaConf resolvers, so ``conf/train.yaml`` can put them in directory names and the wandb logger in the
group and run name:

- ``${eopt.sweep_id:}``: ``$EOPT_SWEEP_ID`` when set, else a new id (UTC time to the second) that is exported to
  ``$EOPT_SWEEP_ID``. The launcher resolves the sweep directory before it submits, so every job it starts (a
  submitit subprocess, a SLURM job, a requeued SLURM job, which all inherit the submitting environment) finds
  the same id, however late it starts. Export the variable yourself to add jobs to an existing sweep.
- ``${eopt.sweep_group:}``: the sweep id inside a sweep (``$EOPT_SWEEP_ID`` is set), else null.
- ``${eopt.run_name:${optimizer.name},${seed},${hydra:overrides.task}}``: ``muon-lr0.02-s1337`` for
  ``optimizer=muon optimizer.lr=0.02``: the optimizer, then every override that changes the optimization (last
  key component and value; a group choice by its value), then the seed. Overrides that only say where or how
  to run (paths, logging, devices, parallel layout, launcher) are left out, so the same experiment gets the
  same name on a laptop and on a cluster.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterable

from omegaconf import OmegaConf

SWEEP_ID_ENV = "EOPT_SWEEP_ID"
# Override keys that do not change what is trained, or are in the name already (optimizer, seed); a key under
# one of NOT_IN_NAME_GROUPS (hydra.*, logger.*, parallelism.*) neither.
NOT_IN_NAME_GROUPS = ("hydra", "logger", "parallelism")
NOT_IN_NAME = {
    "optimizer",
    "seed",
    "data.root",
    "data.num_proc",
    "data.streaming",
    "train.device",
    "train.compile",
    "train.save_model",
    "train.log_every",
    "train.eval_every",
    "train.checkpoint_every",
    "train.keep_checkpoints",
    "train.async_checkpoint",
}


def sweep_id() -> str:
    """The id of the sweep this process belongs to, created (and exported for child processes) on first use."""
    if not os.environ.get(SWEEP_ID_ENV):
        os.environ[SWEEP_ID_ENV] = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    return os.environ[SWEEP_ID_ENV]


def sweep_group() -> str | None:
    return os.environ.get(SWEEP_ID_ENV) or None


def _named(key: str) -> bool:
    return key not in NOT_IN_NAME and key.split(".")[0] not in NOT_IN_NAME_GROUPS


def run_name(optimizer: str, seed: int, overrides: Iterable[str]) -> str:
    """``<optimizer>-<override>...-s<seed>``, safe as a directory name: the optimizer's own overrides first, then
    the others, each group in the order given."""
    named = []
    for override in overrides:
        key, _, value = override.lstrip("+~").partition("=")
        key = key.replace("/", ".")
        if _named(key):
            named.append((not key.startswith("optimizer."), value if "." not in key else key.rsplit(".", 1)[1] + value))
    parts = [optimizer, *(part for _, part in sorted(named, key=lambda item: item[0])), f"s{seed}"]
    return re.sub(r"[^A-Za-z0-9_.+=-]", "_", "-".join(parts))


# Registered on import, not from train.py: a submitit job process unpickles train.py's task function, which
# imports recipes.config (and so this module) but runs no code of train.py before Hydra resolves the job's paths.
OmegaConf.register_new_resolver("eopt.sweep_id", sweep_id, replace=True)
OmegaConf.register_new_resolver("eopt.sweep_group", sweep_group, replace=True)
OmegaConf.register_new_resolver("eopt.run_name", run_name, replace=True)
