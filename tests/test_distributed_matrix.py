"""Muon, SOAP and Shampoo on FSDP2 and HSDP shards equal the same optimizer in one process (gloo, CPU ranks).

SOAP and Shampoo run with ``matrix_update="replicated"`` here (every rank gathers each full matrix and adds the
rows it holds; ``tests/test_distributed_owner.py`` checks the owner path against it); Muon and the failure
counters with the default, ``"owner"``. The checks cover what sharding could break: uneven and empty shards, a
3-D tensor, fused QKV stored (in, out), SOAP's one-sided and merged factors, Shampoo blocks that straddle
shards, basis/root refreshes within the 5 steps, and the failure counters of :meth:`metrics`.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist

from tests.distributed_utils import optimizer_parity, spawn

pytestmark = pytest.mark.distributed

# At 2 shards (FSDP on 2 ranks, HSDP 2 x 2): (5, 6) splits 3/2, (1, 4) leaves rank 1 with no rows, (6, 4, 3) is
# flattened by Muon and has three factors in SOAP; the bias goes to the backup AdamW.
SHAPES = {"a.weight": (5, 6), "b.weight": (1, 4), "c.weight": (12, 8), "d.weight": (6, 4, 3), "c.bias": (12,)}

# GPT-2's c_attn: Conv1D stored (in, out) = (5, 15), Q, K, V of width 5 each; Shard(0) cuts the *in* dim.
QKV_SHAPES = {**SHAPES, "h.attn.c_attn.weight": (5, 15)}
QKV_HINTS = {"h.attn.c_attn.weight": {"in_out": True, "split_qkv": (5, 5, 5), "role": "qkv"}}

KINDS = [("fsdp", 2), ("hsdp", 4)]


def _muon_cases(rank: int, world_size: int, kind: str) -> None:
    for hparams in (
        {"lr": 0.02, "weight_decay": 0.1},
        {"lr": 0.02, "weight_decay": 0.1, "foreach": False},
        {"lr": 0.02, "nesterov": False, "second_moment": "normuon"},
        {"lr": 0.02, "second_moment": "adamuon", "scale": "match_rms_adamw"},
    ):
        optimizer_parity(rank, world_size, kind, "muon", SHAPES, {}, hparams)
    for second_moment in (None, "normuon", "adamuon"):
        hparams = {"lr": 0.02, "weight_decay": 0.1, "second_moment": second_moment}
        optimizer_parity(rank, world_size, kind, "muon", QKV_SHAPES, QKV_HINTS, hparams)


def _kronecker_cases(rank: int, world_size: int, kind: str) -> None:
    for hparams in (
        # (12, 8): the 12-dim is above max_precond_dim, so it is rotated on one side only.
        {"lr": 1e-2, "precondition_frequency": 2, "max_precond_dim": 10},
        # (6, 4, 3) merges to (6, 12).
        {"lr": 1e-2, "precondition_frequency": 2, "max_precond_dim": 12, "merge_dims": True},
        # NVIDIA's factor order (the first call already steps) and eigh refreshes at every step.
        {"lr": 1e-2, "precondition_frequency": 1, "factor_update_order": "before", "use_eigh": True},
    ):
        optimizer_parity(rank, world_size, kind, "soap", SHAPES, {}, {**hparams, "matrix_update": "replicated"})
    for hparams in (
        # Blocks of at most 4 rows: (5, 6) and (12, 8) have blocks across the shard boundary.
        {"lr": 1e-2, "weight_decay": 0.01, "max_preconditioner_dim": 4, "precondition_frequency": 2},
        {"lr": 1e-2, "max_preconditioner_dim": 4, "precondition_frequency": 1, "betas": (0.0, 0.99)},
    ):
        optimizer_parity(rank, world_size, kind, "shampoo", SHAPES, {}, {**hparams, "matrix_update": "replicated"})


@pytest.mark.parametrize(("kind", "world_size"), KINDS)
def test_muon_matches_one_process(kind, world_size):
    spawn(_muon_cases, world_size, kind)


@pytest.mark.parametrize(("kind", "world_size"), KINDS)
def test_soap_and_shampoo_match_one_process(kind, world_size):
    spawn(_kronecker_cases, world_size, kind)


def _failing_eigh(a: torch.Tensor, *args, **kwargs):
    raise torch.linalg.LinAlgError("forced failure")


def _metrics_per_step(rank: int, world_size: int, kind: str, name: str, hparams: dict, steps: int) -> list[dict]:
    """``metrics()`` of the one-process and the sharded optimizer (alternating) after each step of a parity run."""
    seen: list[dict[str, torch.Tensor]] = []
    optimizer_parity(
        rank, world_size, kind, name, SHAPES, {}, hparams, steps, between_steps=lambda o, _: seen.append(o.metrics())
    )
    return seen


def _failure_metrics(rank: int, world_size: int, kind: str) -> None:
    # Every eigh fails (patched in this spawned process, for both runs), so each factor counts once per step.
    torch.linalg.eigh = _failing_eigh
    matrices = [shape for shape in SHAPES.values() if len(shape) >= 2]
    steps = 3
    cases = (
        ("soap", "soap_basis_failures", {"precondition_frequency": 1, "use_eigh": True}, sum(map(len, matrices))),
        (
            "shampoo",
            "shampoo_root_failures",
            {"precondition_frequency": 1, "max_preconditioner_dim": 4},
            sum(math.prod(math.ceil(n / 4) for n in shape) * len(shape) for shape in matrices),
        ),
    )
    for name, key, hparams, per_step in cases:
        seen = _metrics_per_step(rank, world_size, kind, name, hparams, steps)
        for step in range(steps):
            one_process, sharded = seen[2 * step], seen[2 * step + 1]
            assert set(sharded) == {key} and sharded[key].ndim == 0
            assert sharded[key].item() == one_process[key].item() == per_step * (step + 1), (name, step, sharded)
        everyone = [None] * world_size
        dist.all_gather_object(everyone, seen[-1][key].item())
        assert len(set(everyone)) == 1, f"{key} differs between ranks: {everyone}"


def test_failure_metrics_count_every_failed_refresh():
    spawn(_failure_metrics, 2, "fsdp")
