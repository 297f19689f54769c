"""Config -> optimizer and LR schedule: the only place the recipe constructs an optimizer.

The optimizer config group is flat: ``name``, ``lr``, ``weight_decay``, the chosen eopt optimizer's own
constructor arguments, a ``backup`` block (AdamW for embeddings, head and 1-D parameters), and optionally
``routing``, ``rules`` and ``decay_1d``. Also here: the gradient-norm clip every rank agrees on.
"""

from __future__ import annotations

import collections.abc
import math
import types
import typing
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

import eopt
from eopt.distributed import all_reduce_sum_, local
from recipes.config import ScheduleConfig
from recipes.errors import ConfigError
from recipes.models import param_hints

RECIPE_KEYS = ("name", "lr", "weight_decay", "backup", "routing", "rules", "decay_1d")
SCHEDULES = ("cosine", "wsd", "linear", "constant")


def _admits_sequence(hint: Any) -> bool:
    """Whether a constructor type hint accepts a list (e.g. Muon's ``coefficients: str | Sequence[...]``)."""
    options = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    return any(typing.get_origin(o) in (list, tuple, collections.abc.Sequence) for o in options)


def _nested_tuple(value: Any) -> Any:
    return tuple(_nested_tuple(v) for v in value) if isinstance(value, (list, tuple)) else value


def _typed(key: str, value: Any, default: Any, hint: Any = None) -> Any:
    """``value`` converted to the type of the constructor default, or a ConfigError naming the key.

    A list is also taken where the constructor's type hint admits a sequence although its default is not
    one (Muon's custom coefficient list); the optimizer then validates its contents.
    """
    if default is None or value is None:
        return value
    if isinstance(value, (list, tuple)) and not isinstance(default, tuple) and _admits_sequence(hint):
        return _nested_tuple(value)
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, (int, float)):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok and isinstance(default, float) else value
    elif isinstance(default, tuple):
        ok = isinstance(value, (list, tuple))
        value = tuple(value) if ok else value
    else:
        ok = isinstance(value, type(default))
    if not ok:
        raise ConfigError(f"optimizer.{key}={value!r} has the wrong type: expected {type(default).__name__}")
    return value


def optimizer_kwargs(ocfg: Mapping[str, Any]) -> tuple[str, dict]:
    """Validate an optimizer config and return (name, keyword arguments of its eopt constructor)."""
    name = ocfg.get("name")
    if name not in eopt.OPTIMIZERS:
        raise ConfigError(f"optimizer.name={name!r} is unknown: choose one of {', '.join(sorted(eopt.OPTIMIZERS))}")
    entry = eopt.OPTIMIZERS[name]
    for key in ocfg:
        if key == "matrix_update":
            raise ConfigError(
                "optimizer.matrix_update is not an optimizer key: set parallelism.matrix_update=owner|replicated"
            )
        if key not in RECIPE_KEYS and key not in entry.defaults:
            raise ConfigError(
                f"optimizer.{key} is not an argument of {name}: valid keys are {', '.join(entry.defaults)}"
            )
    lr = ocfg.get("lr")
    if not isinstance(lr, (int, float)) or isinstance(lr, bool) or not lr > 0:
        raise ConfigError(f"optimizer.lr={lr!r} must be a number > 0: e.g. optimizer.lr=3e-4")
    hints = entry.annotations
    kwargs = {k: _typed(k, v, entry.defaults.get(k), hints.get(k)) for k, v in ocfg.items() if k in entry.defaults}
    return name, kwargs


def _build(
    named_parameters, hints: dict, ocfg: Mapping[str, Any], tokens_per_step: int, matrix_update: str
) -> torch.optim.Optimizer:
    name, kwargs = optimizer_kwargs(ocfg)
    entry = eopt.OPTIMIZERS[name]
    if "matrix_update" in entry.defaults:
        kwargs["matrix_update"] = matrix_update
    if "bs" in eopt.OPTIMIZERS[name].defaults and kwargs.get("bs") is None:
        kwargs["bs"] = tokens_per_step
    backup = ocfg.get("backup")
    if backup is not None:
        backup = {k: tuple(v) if k == "betas" else v for k, v in backup.items()}
    try:
        return eopt.build(
            named_parameters,
            name,
            backup=backup,
            rules=dict(ocfg.get("rules") or {}),
            hints=hints,
            routing=ocfg.get("routing"),
            decay_1d=bool(ocfg.get("decay_1d", False)),
            **kwargs,
        )
    except (ValueError, TypeError) as e:
        raise ConfigError(f"optimizer ({name}): {e}") from e


def check_optimizer(ocfg: Mapping[str, Any], matrix_update: str = "owner") -> None:
    """Validate an optimizer config (with the parallelism's ``matrix_update``) by building it over two small
    stand-in parameters, before any real work."""
    params = [("matrix", nn.Parameter(torch.zeros(4, 4))), ("vector", nn.Parameter(torch.zeros(4)))]
    _build(params, {}, ocfg, 1, matrix_update)


def build_optimizer(
    model: nn.Module, ocfg: Mapping[str, Any], *, tokens_per_step: int, matrix_update: str = "owner"
) -> torch.optim.Optimizer:
    """The eopt optimizer for ``model``, parameters routed with the model's hints; ``matrix_update`` (owner or
    replicated) goes to the optimizers that take it (Muon, SOAP, Shampoo)."""
    return _build(model.named_parameters(), param_hints(model), ocfg, tokens_per_step, matrix_update)


def clip_grad_norm_(params: list[nn.Parameter], max_norm: float | None) -> torch.Tensor:
    """Scale the gradients of ``params`` so that their global norm is at most ``max_norm`` (``None``: no clip);
    returns the norm before clipping (fp32, the same on every rank).

    The sum of squares is taken in float64 over each rank's local shards and summed over the shard groups
    (one all-reduce), so the norm and the clip factor are the same at any world size and layout: the fp32
    ``torch.nn.utils.clip_grad_norm_`` differs from one layout to another in its last digits (1e-5 relative
    on a 7M-parameter model), which SOAP's and Shampoo's eigenbases amplify into different runs.
    """
    grads = [p.grad for p in params if p.grad is not None]
    shards = [local(g) for g in grads]
    squares = torch.stack(torch._foreach_norm(shards, 2, dtype=torch.float64)).square().sum()
    norm = all_reduce_sum_(squares.view(1), grads[0]).sqrt()[0]
    if max_norm is not None:
        scale = (max_norm / (norm + 1e-6)).clamp(max=1.0).float()
        torch._foreach_mul_(shards, scale)
    return norm.float()


def check_schedule(cfg: ScheduleConfig) -> None:
    if cfg.name not in SCHEDULES:
        raise ConfigError(f"schedule.name={cfg.name!r} is unknown: choose one of {', '.join(SCHEDULES)}")
    if cfg.warmup_steps < 0 or not 0.0 <= cfg.warmup_fraction < 1.0:
        raise ConfigError("schedule.warmup_steps must be >= 0 and schedule.warmup_fraction in [0, 1)")
    if not 0.0 <= cfg.min_lr_ratio <= 1.0:
        raise ConfigError(f"schedule.min_lr_ratio={cfg.min_lr_ratio} must be in [0, 1]")
    if not 0.0 <= cfg.decay_fraction <= 1.0:
        raise ConfigError(f"schedule.decay_fraction={cfg.decay_fraction} must be in [0, 1]")


def lr_factor(cfg: ScheduleConfig, max_steps: int) -> Callable[[int], float]:
    """The multiplier of the peak LR for the update at step ``s`` (0-based) of a ``max_steps`` run."""
    warmup = cfg.warmup_steps or int(cfg.warmup_fraction * max_steps)
    floor = cfg.min_lr_ratio

    def factor(s: int) -> float:
        if s < warmup:
            return (s + 1) / warmup
        if cfg.name == "constant":
            return 1.0
        if cfg.name == "wsd":
            decay_start = max(warmup, max_steps - int(cfg.decay_fraction * max_steps))
            if s < decay_start:
                return 1.0
            progress = (s - decay_start + 1) / max(1, max_steps - decay_start)
            return 1.0 - (1.0 - floor) * min(1.0, progress)
        progress = min(1.0, (s - warmup) / max(1, max_steps - 1 - warmup))
        if cfg.name == "linear":
            return 1.0 - (1.0 - floor) * progress
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: ScheduleConfig, max_steps: int):
    """A ``LambdaLR`` scaling every param group's LR by the schedule's factor."""
    check_schedule(cfg)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(cfg, max_steps))


def group_learning_rates(optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """Current LR per algorithm (``lr/muon``, ``lr/adamw``, ...) and ``lr``, the LR of the optimizer's own groups."""
    own = getattr(optimizer, "algorithm", "adamw")
    rates: dict[str, float] = {}
    for group in optimizer.param_groups:
        algorithm = group.get("algorithm", own)
        rates.setdefault(f"lr/{algorithm}", group["lr"])
        if algorithm == own:
            rates.setdefault("lr", group["lr"])
    return rates
