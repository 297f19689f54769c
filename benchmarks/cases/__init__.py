"""Benchmark cases for ``benchmarks/optimizer_step.py``.

Each optimizer family adds its rows in ``benchmarks/cases/<family>.py``, which defines
``def cases() -> list[Case]``. The runner discovers those modules, builds the model's parameters once per
size, calls every case's ``make`` and times ``step()``.

Helpers shared by the case modules live here too: :func:`split_params` (hidden matrices vs the rest, the
split eopt's default routing makes) and :class:`Chain` (several optimizers stepped as one, so that an oracle
that only handles matrices can be timed with torch's fused AdamW on the rest, as eopt does internally).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

NamedParams = list[tuple[str, torch.nn.Parameter]]


@dataclass
class Case:
    """One row of the optimizer-step table.

    ``make(named_params, info)`` builds the optimizer over ``named_params`` (every parameter of the model);
    ``info`` holds ``n_heads``, ``n_kv_heads``, ``hidden`` (model width) and ``hints`` (parameter name ->
    eopt hint dict, as the recipe would pass to :func:`eopt.build`). ``make`` may raise ``ImportError``
    when an oracle is missing: the row is then reported ``n/a``.
    """

    name: str
    family: str
    make: Callable[[NamedParams, dict], torch.optim.Optimizer]
    baseline: bool = False
    steps: int = 10
    warmup: int = 3
    before_step: Callable[[torch.optim.Optimizer, int], None] | None = None


def split_params(named_params: NamedParams, info: dict) -> tuple[NamedParams, NamedParams]:
    """(hidden matrices, everything else): eopt's ``"matrices"`` routing from the model's hints."""
    matrices, others = [], []
    for name, p in named_params:
        role = info["hints"].get(name, {}).get("role", "matrix" if p.ndim >= 2 else "vector")
        is_matrix = p.ndim >= 2 and role not in ("embedding", "head")
        (matrices if is_matrix else others).append((name, p))
    return matrices, others


class Chain(torch.optim.Optimizer):
    """Several optimizers stepped in order as one (for timing and state bytes only)."""

    def __init__(self, *optimizers: torch.optim.Optimizer) -> None:
        self.optimizers = optimizers
        params = [p for opt in optimizers for g in opt.param_groups for p in g["params"]]
        super().__init__(params, {})
        self.param_groups = [g for opt in optimizers for g in opt.param_groups]

    @property
    def state(self) -> dict:  # type: ignore[override]
        merged: dict = {}
        for opt in self.optimizers:
            merged.update(opt.state)
        return merged

    @state.setter
    def state(self, value: dict) -> None:
        """torch.optim.Optimizer's constructor assigns an empty state; the members keep their own."""

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> None:  # type: ignore[override]
        for opt in self.optimizers:
            opt.step()


def backup_adamw(others: NamedParams, **hparams) -> torch.optim.Optimizer:
    """torch's fused AdamW over the non-matrix parameters (what eopt's backup groups run)."""
    return torch.optim.AdamW([p for _, p in others], fused=True, **hparams)
