"""Owner-computes Muon, SOAP and Shampoo (``matrix_update="owner"``) under DDP, FSDP2 and HSDP (gloo, CPU ranks).

Each matrix's work runs on one rank only (:mod:`eopt.owner`); the checks: the result equals one process and the
replicated reference, each matrix is orthogonalized (SOAP's and Shampoo's direction computed) exactly once per
step over all ranks, owner-only state shrinks with the ranks, and the plan is the same on every rank and balanced.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

import eopt.muon
import eopt.shampoo
import eopt.soap
from eopt.owner import assign
from tests.distributed_utils import (
    Tensors,
    _full_grads,
    assert_close_rows,
    named,
    optimizer_parity,
    set_grads,
    shard,
    spawn,
)
from tests.test_distributed_matrix import QKV_HINTS, QKV_SHAPES, SHAPES

pytestmark = pytest.mark.distributed

# 3 ranks divide neither the 5 matrices nor most dims; HSDP 2 x 2 assigns over all 4 ranks.
KINDS = [("ddp", 2), ("ddp", 3), ("fsdp", 3), ("hsdp", 4)]

# A fused QKV stored (out, in), its pieces row ranges with different step sizes (Q 6 x 4, K and V 3 x 4): the shard
# rows of 2 and 3 ranks cut them.
ROW_QKV_SHAPES = {**SHAPES, "attn.qkv.weight": (12, 4)}
ROW_QKV_HINTS = {"attn.qkv.weight": {"split_qkv": (6, 3, 3), "role": "qkv"}}

MUON_CASES = [
    (SHAPES, {}, {"lr": 0.02, "weight_decay": 0.1}),
    (SHAPES, {}, {"lr": 0.02, "weight_decay": 0.1, "foreach": False}),
    (SHAPES, {}, {"lr": 0.02, "nesterov": False, "second_moment": "normuon"}),
    (SHAPES, {}, {"lr": 0.02, "second_moment": "adamuon", "scale": "match_rms_adamw"}),
    (QKV_SHAPES, QKV_HINTS, {"lr": 0.02, "weight_decay": 0.1, "second_moment": "normuon"}),
    (QKV_SHAPES, QKV_HINTS, {"lr": 0.02, "weight_decay": 0.1, "second_moment": "adamuon"}),
    (ROW_QKV_SHAPES, ROW_QKV_HINTS, {"lr": 0.02, "weight_decay": 0.1, "second_moment": "normuon"}),
]


def _parity(rank: int, world_size: int, kind: str) -> None:
    # Bitwise: the owner runs the one-process kernels on the same stacks and each rank adds its rows of the
    # orthogonalized pieces with their step sizes, in one rounding as one process does.
    for shapes, hints, hparams in MUON_CASES:
        for mode in ("owner", "replicated"):
            config = {**hparams, "matrix_update": mode}
            optimizer_parity(rank, world_size, kind, "muon", shapes, hints, config, rtol=0.0)


@pytest.mark.parametrize(("kind", "world_size"), KINDS)
def test_owner_and_replicated_match_one_process(kind, world_size):
    spawn(_parity, world_size, kind)


KRONECKER_CASES = [
    # (12, 8): the 12-dim is above max_precond_dim, so it is rotated on one side only.
    ("soap", {"lr": 1e-2, "weight_decay": 0.1, "precondition_frequency": 2, "max_precond_dim": 10}),
    # (6, 4, 3) merges to (6, 12); NVIDIA's factor order (the first call already steps), eigh at every step.
    ("soap", {"lr": 1e-2, "merge_dims": True, "max_precond_dim": 12, "factor_update_order": "before", "use_eigh": 1}),
    # Blocks of at most 4 rows: (5, 6) and (12, 8) have blocks that straddle the shard boundaries.
    ("shampoo", {"lr": 1e-2, "weight_decay": 0.01, "max_preconditioner_dim": 4, "precondition_frequency": 2}),
    ("shampoo", {"lr": 1e-2, "max_preconditioner_dim": 4, "precondition_frequency": 1, "betas": (0.0, 0.99)}),
]


def _kronecker_parity(rank: int, world_size: int, kind: str) -> None:
    for name, hparams in KRONECKER_CASES:
        for mode in ("owner", "replicated"):
            optimizer_parity(rank, world_size, kind, name, SHAPES, {}, {**hparams, "matrix_update": mode})


@pytest.mark.parametrize(("kind", "world_size"), KINDS)
def test_soap_and_shampoo_owner_and_replicated_match_one_process(kind, world_size):
    spawn(_kronecker_parity, world_size, kind)


def assert_done_once_and_shared(mine: int, total: int, world_size: int, what: str) -> None:
    """The ranks' counts of units computed (``mine`` here) add up to ``total``, and more than one rank did some."""
    counts = torch.tensor(mine)
    everyone = [torch.zeros_like(counts) for _ in range(world_size)]
    dist.all_gather(everyone, counts)
    assert sum(t.item() for t in everyone) == total, f"{what}: units computed per rank {everyone}, {total} in all"
    assert sum(t.item() > 0 for t in everyone) > 1, f"{what}: one rank did all the work: {everyone}"


def _directions_counted(rank: int, world_size: int, kind: str) -> None:
    # Count the matrices whose SOAP / Shampoo direction (rotations, factors, refreshes) this rank computes: the
    # batch size of each call, whose gradients are argument 2 of soap_direction and 1 of shampoo_direction.
    steps, matrices = 3, sum(1 for s in SHAPES.values() if len(s) >= 2)
    for module, function, grads_at, name in (
        (eopt.soap, "soap_direction", 2, "soap"),
        (eopt.shampoo, "shampoo_direction", 1, "shampoo"),
    ):
        calls = []
        real = getattr(module, function)

        def counted(*args, real=real, grads_at=grads_at, calls=calls):
            calls.append(args[grads_at].shape[0])
            return real(*args)

        setattr(module, function, counted)
        optimizer_parity(rank, world_size, kind, name, SHAPES, {}, {"precondition_frequency": 1}, steps)
        setattr(module, function, real)
        # the one-process reference did every matrix here too
        assert_done_once_and_shared(sum(calls) - matrices * steps, matrices * steps, world_size, name)


@pytest.mark.parametrize(("kind", "world_size"), [("ddp", 3), ("fsdp", 2), ("hsdp", 4)])
def test_each_soap_and_shampoo_direction_is_computed_once_per_step(kind, world_size):
    spawn(_directions_counted, world_size, kind)


def _counted(rank: int, world_size: int, kind: str) -> None:
    # Count every matrix orthogonalized on this rank (the stack depth of each Newton–Schulz call).
    calls = []
    real = eopt.muon.orthogonalize
    eopt.muon.orthogonalize = lambda group, X: calls.append(X.shape[0]) or real(group, X)
    steps = 3
    optimizer_parity(rank, world_size, kind, "muon", QKV_SHAPES, QKV_HINTS, {"second_moment": "normuon"}, steps)
    eopt.muon.orthogonalize = real
    # optimizer_parity also ran the one-process optimizer here, which orthogonalized every piece at every step.
    pieces = (
        sum(1 for s in QKV_SHAPES.values() if len(s) >= 2) - 1 + len(QKV_HINTS["h.attn.c_attn.weight"]["split_qkv"])
    )
    assert_done_once_and_shared(sum(calls) - pieces * steps, pieces * steps, world_size, "muon")


@pytest.mark.parametrize(("kind", "world_size"), [("ddp", 3), ("fsdp", 2), ("hsdp", 4)])
def test_each_matrix_is_orthogonalized_once_per_step(kind, world_size):
    spawn(_counted, world_size, kind)


class _Waited:
    """A collective's work that records when it is waited on."""

    def __init__(self, work, events: list[str]) -> None:
        self._work, self._events = work, events

    def wait(self, *args):
        self._events.append("wait")
        return self._work.wait(*args)


def _overlapped(rank: int, world_size: int, kind: str) -> None:
    events: list[str] = []
    real_a2a, real_ortho = dist.all_to_all_single, eopt.muon.orthogonalize

    def a2a(*args, **kwargs):
        events.append("send")
        work = real_a2a(*args, **kwargs)
        return _Waited(work, events) if kwargs.get("async_op") else work

    model = shard(Tensors(QKV_SHAPES), kind, world_size)
    opt = eopt.build(named(model), "muon", hints=QKV_HINTS)
    groups = sum(1 for g in opt.param_groups if g["algorithm"] == "muon")
    set_grads(dict(named(model)), _full_grads(QKV_SHAPES, 0))
    dist.all_to_all_single = a2a
    eopt.muon.orthogonalize = lambda group, X: events.append("compute") or real_ortho(group, X)
    try:
        opt.step()
    finally:
        dist.all_to_all_single, eopt.muon.orthogonalize = real_a2a, real_ortho
    assert groups >= 2 and events.count("send") == 2 * groups, events
    # Every group's inputs are on their way before any group computes, and no result is waited for until every
    # group has computed and sent its own.
    assert events[:groups] == ["send"] * groups and "compute" in events, events
    waits = [i for i, e in enumerate(events) if e == "wait"]
    last_compute = max(i for i, e in enumerate(events) if e == "compute")
    assert all(i > last_compute for i in waits[groups:]), events
    assert events[: waits[groups]].count("send") == 2 * groups, events


def test_owner_exchanges_overlap_the_other_groups_work():
    spawn(_overlapped, 2, "fsdp")


EQUAL = {f"m{i}.weight": (8, 12) for i in range(6)}


def _state_bytes(rank: int, world_size: int, kind: str) -> None:
    def matrix_state(opt, name: str) -> int:
        matrices = [p for g in opt.param_groups if g["algorithm"] == name for p in g["params"]]
        return sum(
            (v.to_local() if hasattr(v, "to_local") else v).numel() * v.element_size()
            for p in matrices
            for v in opt.state[p].values()
            if isinstance(v, torch.Tensor)
        )

    for name, hparams in (("muon", {"second_moment": "adamuon"}), ("soap", {}), ("shampoo", {})):
        # Plain tensors in a process group count as DDP: "replicated" holds what one process would.
        one = eopt.build(list(Tensors(EQUAL).named_parameters()), name, **hparams, matrix_update="replicated")
        opt = optimizer_parity(rank, world_size, kind, name, EQUAL, {}, {**hparams, "matrix_update": "owner"})
        ratio = matrix_state(opt, name) / matrix_state(one, name)
        # Muon: momentum sharded under FSDP (on the owner under DDP), moment2 on the owner. SOAP and Shampoo:
        # everything but the step counters on the owner, under both.
        assert ratio <= 0.55, f"{kind} rank {rank}: {name} state {ratio:.2f}x one process"
        plan = opt.plan()
        assert plan["units"] == len(EQUAL) and plan["ranks"] == world_size and plan["balance"] == 1.0, plan
        mine = torch.tensor([plan["owners"][n] for n in EQUAL])
        everyone = [torch.zeros_like(mine) for _ in range(world_size)]
        dist.all_gather(everyone, mine)
        assert all(torch.equal(o, mine) for o in everyone), f"{name}: the plan differs between ranks: {everyone}"


@pytest.mark.parametrize(("kind", "world_size"), [("fsdp", 2), ("ddp", 2)])
def test_owner_state_shrinks_with_the_ranks(kind, world_size):
    spawn(_state_bytes, world_size, kind)


def test_assignment_is_longest_first_to_the_least_loaded_rank():
    # By hand: 9 -> 0, 7 -> 1, 6 -> 2, 5 -> 2 (11), 4 -> 1 (11), 4 -> 0 (13), 3 -> 1 (14); ties to the lower rank.
    loads = [0.0, 0.0, 0.0]
    assert assign([9.0, 7.0, 6.0, 5.0, 4.0, 4.0, 3.0], loads) == [0, 1, 2, 2, 1, 0, 1]
    assert loads == [13.0, 14.0, 11.0]
    # The next group starts from those loads: 2 -> 2 (13), then the tie 13/13 goes to rank 0.
    assert assign([2.0, 2.0], loads) == [2, 0]
    assert assign([1.0, 1.0], [0.0] * 4) == [0, 1]


RESUMED = [
    ("muon", {"lr": 0.02, "weight_decay": 0.1, "second_moment": "normuon"}),
    ("soap", {"lr": 1e-2, "weight_decay": 0.1, "precondition_frequency": 2, "max_precond_dim": 10}),
    ("shampoo", {"lr": 1e-2, "weight_decay": 0.01, "max_preconditioner_dim": 4, "precondition_frequency": 2}),
]
SAVED_AT, RESUMED_TO = 3, 6


def _train_and_save(rank: int, world_size: int, kind: str, directory: str) -> None:
    for name, hparams in RESUMED:
        model = shard(Tensors(SHAPES), kind, world_size)
        params = dict(named(model))
        opt = eopt.build(named(model), name, **hparams)
        for step in range(SAVED_AT):
            set_grads(params, _full_grads(SHAPES, step))
            opt.step()
        model_sd, optim_sd = get_state_dict(model, opt)
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=f"{directory}/{name}")


def _resume_and_compare(rank: int, world_size: int, kind: str, directory: str) -> None:
    for name, hparams in RESUMED:
        model = shard(Tensors(SHAPES, seed=1), kind, world_size)  # other weights: all must come from the checkpoint
        params = dict(named(model))
        opt = eopt.build(named(model), name, **hparams)
        model_sd, optim_sd = get_state_dict(model, opt)
        state = {"model": model_sd, "optim": optim_sd}
        dcp.load(state, checkpoint_id=f"{directory}/{name}")
        set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
        reference = Tensors(SHAPES)
        ref_params = dict(named(reference))
        ref_opt = eopt.build(named(reference), name, **{**hparams, "matrix_update": "replicated"})
        for step in range(RESUMED_TO):
            grads = _full_grads(SHAPES, step)
            set_grads(ref_params, grads)
            ref_opt.step()
            if step >= SAVED_AT:
                set_grads(params, grads)
                opt.step()
                assert_close_rows(params, ref_params, 1e-5, f"{name} {kind} {world_size} ranks, step {step}")


@pytest.mark.parametrize(
    ("source", "target"),
    [
        (("fsdp", 2), ("fsdp", 3)),  # 2 -> 3: every unit re-planned, state moved to its new owner
        (("fsdp", 2), ("ddp", 1)),  # 2 -> 1: one process holds every unit's state
        (("ddp", 1), ("fsdp", 2)),  # 1 -> 2
        (("fsdp", 2), ("ddp", 2)),  # fsdp -> ddp
        (("ddp", 2), ("fsdp", 3)),  # ddp -> fsdp: Muon's owner-only momentum sharded again
        (("ddp", 3), ("ddp", 2)),  # ddp 3 -> 2: every owner-only tensor to its new owner
    ],
)
def test_resume_at_another_world_size_moves_owner_state_exactly(source, target, tmp_path):
    """Saved after 3 steps with ``torch.distributed.checkpoint`` (as the recipe does), resumed on another layout:
    steps 4-6 equal one process that never stopped, within 1e-5 (the same full gradients everywhere)."""
    spawn(_train_and_save, source[1], source[0], str(tmp_path))
    spawn(_resume_and_compare, target[1], target[0], str(tmp_path))
