"""The optimizer registry and :func:`build`, which routes a model's parameters into param groups."""

from __future__ import annotations

import inspect
import re
import typing
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch

from eopt._adamw import ADAMW_DEFAULTS
from eopt.base import Optimizer

ROLES = (
    "embedding",
    "pos_embedding",
    "head",
    "norm",
    "bias",
    "q",
    "k",
    "v",
    "qkv",
    "attn_out",
    "mlp",
    "matrix",
    "vector",
)
HINT_KEYS = ("role", "in_out", "split_qkv", "n_heads", "n_kv_heads")
BACKUP_ROLES = ("embedding", "pos_embedding", "head")


@dataclass(frozen=True)
class Entry:
    """A registered optimizer.

    ``routing`` is the default split of a model's parameters: ``"matrices"`` sends hidden matrices to
    the algorithm and embeddings, head and 1-D parameters to the backup AdamW; ``"all"`` sends every
    parameter to the algorithm (Adam-mini and Sophia do so in their papers).
    """

    cls: type[Optimizer]
    routing: str
    summary: str

    @property
    def defaults(self) -> dict:
        """The constructor's hyperparameters and their default values."""
        sig = inspect.signature(self.cls.__init__)
        return {
            k: v.default
            for k, v in list(sig.parameters.items())[2:]
            if v.default is not inspect.Parameter.empty and v.kind is not inspect.Parameter.VAR_KEYWORD
        }

    @property
    def annotations(self) -> dict:
        """The constructor's type hints, resolved (``typing.get_type_hints``)."""
        return typing.get_type_hints(self.cls.__init__)


OPTIMIZERS: dict[str, Entry] = {}


def register(name: str, cls: type[Optimizer], routing: str, summary: str) -> None:
    """Add ``cls`` to :data:`OPTIMIZERS` under ``name``."""
    if routing not in ("matrices", "all"):
        raise ValueError(f"invalid routing: must be 'matrices' or 'all', got {routing!r}")
    OPTIMIZERS[name] = Entry(cls, routing, summary)


def _route(
    pname: str, p: torch.Tensor, role: str, algorithm: str, routing: str, rules: Sequence[tuple[str, str]]
) -> str:
    for pattern, target in rules:
        if re.search(pattern, pname):
            return target
    if algorithm == "adamw" or routing == "all":
        return algorithm
    return algorithm if p.ndim >= 2 and role not in BACKUP_ROLES else "adamw"


def build(
    named_parameters: Iterable[tuple[str, torch.Tensor]],
    name: str,
    *,
    backup: Mapping | None = None,
    rules: Mapping[str, str] | Sequence[tuple[str, str]] | None = None,
    hints: Mapping[str, Mapping] | None = None,
    routing: str | None = None,
    decay_1d: bool = False,
    **hparams,
) -> Optimizer:
    """Build optimizer ``name`` over a model's parameters, routed into param groups.

    Args:
        named_parameters: ``model.named_parameters()``; parameters without ``requires_grad`` are left out.
        name: a key of :data:`OPTIMIZERS`.
        backup: AdamW hyperparameters (``lr``, ``betas``, ``eps``, ``weight_decay``) of the backup
            groups; missing keys take ``torch.optim.AdamW``'s defaults.
        rules: ``{regex: algorithm}`` (or pairs), searched against parameter names in order; the
            first match decides the parameter's algorithm (``name`` or ``"adamw"``) before any default.
        hints: ``{parameter name: {role, in_out, split_qkv, n_heads, n_kv_heads}}`` from the model
            (see :mod:`eopt.base`). Without a hint a parameter's role is ``matrix`` (2-D and up) or
            ``vector``.
        routing: ``"matrices"`` or ``"all"``; defaults to the entry's (see :class:`Entry`).
        decay_1d: apply weight decay to 1-D parameters too (off by default, as in nanoGPT).
        **hparams: the optimizer's own hyperparameters.

    Returns one optimizer whose groups each carry ``algorithm``, ``role``, ``param_names`` and the hints.
    """
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}: choose one of {', '.join(sorted(OPTIMIZERS))}")
    entry = OPTIMIZERS[name]
    routing = entry.routing if routing is None else routing
    if routing not in ("matrices", "all"):
        raise ValueError(f"invalid routing: must be 'matrices' or 'all', got {routing!r}")
    unknown = sorted(set(hparams) - set(entry.defaults))
    if unknown:
        raise ValueError(
            f"unknown hyperparameter {unknown[0]!r} for {name}: valid ones are {', '.join(entry.defaults)}"
        )
    backup = dict(backup or {})
    unknown = sorted(set(backup) - set(ADAMW_DEFAULTS))
    if unknown:
        raise ValueError(f"unknown backup hyperparameter {unknown[0]!r}: valid ones are {', '.join(ADAMW_DEFAULTS)}")
    rule_list = list(rules.items()) if isinstance(rules, Mapping) else list(rules or [])
    for pattern, target in rule_list:
        if target not in ("adamw", name):
            raise ValueError(f"invalid rules: {pattern!r} -> {target!r}; a target is 'adamw' or {name!r}")
    hints = hints or {}
    for pname, hint in hints.items():
        bad = sorted(set(hint) - set(HINT_KEYS))
        if bad:
            raise ValueError(f"invalid hints for {pname!r}: unknown key {bad[0]!r} (valid: {', '.join(HINT_KEYS)})")
        if hint.get("role", "matrix") not in ROLES:
            raise ValueError(f"invalid hints for {pname!r}: role {hint['role']!r} is not one of {', '.join(ROLES)}")

    groups: dict[tuple, dict] = {}
    for pname, p in named_parameters:
        if not p.requires_grad:
            continue
        hint = dict(hints.get(pname, {}))
        hint.setdefault("role", "matrix" if p.ndim >= 2 else "vector")
        algorithm = _route(pname, p, hint["role"], name, routing, rule_list)
        no_decay = p.ndim < 2 and not decay_1d
        key = (algorithm, no_decay, *(repr(hint.get(k)) for k in HINT_KEYS))
        if key not in groups:
            group = {"params": [], "param_names": [], "algorithm": algorithm, **hint}
            if algorithm == "adamw" and name != "adamw":
                group.update({**ADAMW_DEFAULTS, **backup})
            if no_decay:
                group["weight_decay"] = 0.0
            groups[key] = group
        groups[key]["params"].append(p)
        groups[key]["param_names"].append(pname)
    if not groups:
        raise ValueError("no trainable parameters: named_parameters yielded none with requires_grad")
    return entry.cls(list(groups.values()), **hparams)
