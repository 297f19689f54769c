"""The optimizer base every eopt algorithm builds on.

One optimizer object holds every parameter of a model. Each param group names the algorithm that
updates it in its ``"algorithm"`` key: the optimizer's own (``cls.algorithm``) or ``"adamw"``, the
backup AdamW that updates embeddings, the output head and 1-D parameters with exactly
``torch.optim.AdamW``'s arithmetic from that group's ``lr``/``betas``/``eps``/``weight_decay``.
One state dict and one LR scheduler cover both.

Per-group hints the recipe may set (eopt never guesses them from parameter names):

- ``in_out`` (bool): the weights are stored (in, out), like GPT-2's ``Conv1D``; shape-dependent rules
  use the mathematical (out, in) orientation, so they see the transpose.
- ``split_qkv`` (tuple of ints): a fused QKV weight whose output dim is Q, K, V of these sizes.
- ``role`` (str): what the tensors are (``embedding``, ``pos_embedding``, ``head``, ``norm``, ``bias``, ``q``,
  ``k``, ``v``, ``qkv``, ``attn_out``, ``mlp``, ``matrix``, ``vector``); ``n_heads`` (heads in the tensor) and
  ``n_kv_heads`` for attention.

State is created eagerly when a group is added, so that every rank of a distributed run holds the same
state keys from the start (lazily created state breaks ``torch.distributed.checkpoint``).

Distributed state layout (DDP, FSDP2, HSDP; see :mod:`eopt.distributed`): every rank keeps a state entry for
every parameter (``set_state_dict`` wants one; it may be empty), and each state tensor is sharded like its
parameter (a ``DTensor``), holds the same value on every rank, or exists on one rank only (an owner's, see
:mod:`eopt.owner`). A plain tensor whose value differs between ranks is never held under one key:
``torch.distributed.checkpoint`` would silently keep one rank's copy.
"""

from __future__ import annotations

import abc
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence

import torch

from eopt._adamw import ADAMW_DEFAULTS, adamw_step_groups, init_adamw_state

ParamGroups = Iterable[torch.Tensor] | Iterable[dict]


def check(name: str, ok: bool, requirement: str) -> None:
    """Raise ``ValueError`` naming argument ``name`` unless ``ok``."""
    if not ok:
        raise ValueError(f"invalid {name}: {requirement}")


def check_adamw_group(group: dict) -> None:
    """Validate the AdamW hyperparameters of a backup group."""
    check("lr", group["lr"] >= 0.0, f"must be >= 0, got {group['lr']}")
    betas = group["betas"]
    check("betas", len(betas) == 2 and all(0.0 <= b < 1.0 for b in betas), f"each must be in [0, 1), got {betas}")
    check("eps", group["eps"] >= 0.0, f"must be >= 0, got {group['eps']}")
    check("weight_decay", group["weight_decay"] >= 0.0, f"must be >= 0, got {group['weight_decay']}")


class Optimizer(torch.optim.Optimizer, metaclass=abc.ABCMeta):
    """Base class: routes each param group to the backup AdamW or to the subclass's algorithm.

    Subclasses set ``algorithm`` and implement :meth:`_check_group` (validate hyperparameters),
    :meth:`_init_state` (eager state for one group) and :meth:`_step_group` (one update of one group).
    """

    algorithm: str = ""

    def __init__(self, params: ParamGroups, defaults: dict) -> None:
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict) -> None:
        param_group.setdefault("algorithm", self.algorithm)
        algorithm = param_group["algorithm"]
        check(
            "algorithm",
            algorithm in ("adamw", self.algorithm),
            f"a {type(self).__name__} param group takes 'adamw' or {self.algorithm!r}, got {algorithm!r}",
        )
        if algorithm == "adamw" and self.algorithm != "adamw":
            for key, value in ADAMW_DEFAULTS.items():
                param_group.setdefault(key, value)
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        if algorithm == "adamw":
            check_adamw_group(group)
            for p in group["params"]:
                init_adamw_state(self.state[p], p)
        else:
            self._check_group(group)
            self._init_state(group)

    def _check_group(self, group: dict) -> None:
        """Validate the hyperparameters of one of this algorithm's groups (raise ``ValueError``)."""

    @abc.abstractmethod
    def _init_state(self, group: dict) -> None:
        """Create the state of every parameter of one of this algorithm's groups."""

    @abc.abstractmethod
    def _step_group(self, group: dict) -> Iterator[None] | None:
        """Update the parameters of one of this algorithm's groups that have a gradient; or return a generator that
        does, yielding while it waits on other ranks (owner-computes exchanges), for :meth:`step` to advance."""

    def metrics(self) -> dict[str, torch.Tensor]:
        """Scalars worth logging next to the loss (e.g. Sophia's win rate, eigendecomposition failures), as 0-d
        tensors named without a prefix; the same value on every rank (reduced over shards where needed), so
        every rank must call it at the same steps. Reading them is the caller's host sync, not the step's."""
        return {}

    def load_state_dict(self, state_dict: dict) -> None:
        """``torch.optim.Optimizer.load_state_dict`` that restores every state tensor in its saved dtype.

        torch casts floating-point state to the parameter's dtype, which would turn the fp32 statistics of a
        bf16 parameter into bf16 and make a resumed run differ from an uninterrupted one.
        """
        super().load_state_dict(state_dict)
        saved = state_dict["state"]
        index = 0
        for group in self.param_groups:
            for p in group["params"]:
                for key, value in saved.get(index, {}).items():
                    current = self.state[p].get(key)
                    if isinstance(value, torch.Tensor) and isinstance(current, torch.Tensor):
                        if current.dtype != value.dtype:
                            self.state[p][key] = value.to(device=current.device, dtype=value.dtype)
                index += 1

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        # Generator steps (owner-computes) are advanced in turns, each to its next exchange with the other ranks, in
        # the same group order on every rank: the exchanges of one group travel while the others compute. The
        # backup AdamW runs after the first turn, while the first exchanges are in flight.
        running = [self._step_group(group) for group in self.param_groups if group["algorithm"] != "adamw"]
        running = _advance([steps for steps in running if steps is not None])
        adamw_groups = [group for group in self.param_groups if group["algorithm"] == "adamw"]
        if adamw_groups:
            adamw_step_groups(adamw_groups, self.state)
        while running:
            running = _advance(running)
        return loss


_DONE = object()


def _advance(running: list[Iterator[None]]) -> list[Iterator[None]]:
    """Resume each generator step once, in order; the ones that have not finished."""
    return [steps for steps in running if next(steps, _DONE) is not _DONE]


def params_with_grad(group: dict) -> list[torch.Tensor]:
    """The group's parameters that received a gradient this step (dense gradients only)."""
    params = [p for p in group["params"] if p.grad is not None]
    if any(p.grad.is_sparse for p in params):
        raise RuntimeError("eopt optimizers do not support sparse gradients")
    return params


def use_foreach(group: dict, params: list[torch.Tensor]) -> bool:
    """The group's ``foreach`` setting; ``None`` means foreach kernels off the CPU and the tensor-by-tensor path on
    it, where a tensor stays in cache across the elementwise ops and so beats one launch per op."""
    foreach = group["foreach"]
    return params[0].device.type != "cpu" if foreach is None else foreach


def group_by_shape(tensors: Sequence[torch.Tensor]) -> dict[tuple, list[int]]:
    """Indices of ``tensors`` grouped by (shape, dtype, device), in first-seen order, for batching."""
    groups: dict[tuple, list[int]] = defaultdict(list)
    for i, t in enumerate(tensors):
        groups[(tuple(t.shape), t.dtype, t.device)].append(i)
    return dict(groups)


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes held in tensors of ``optimizer.state`` (any torch optimizer)."""
    total = 0
    for st in optimizer.state.values():
        for value in st.values():
            if isinstance(value, torch.Tensor):
                value = value.to_local() if hasattr(value, "to_local") else value
                total += value.numel() * value.element_size()
    return total
