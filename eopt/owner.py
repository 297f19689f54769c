"""Owner-computes matrix updates (``matrix_update="owner"``): each matrix's work runs once, on one rank.

With ``matrix_update="replicated"`` (:mod:`eopt.distributed`) every rank gathers every full matrix and runs
every Newton–Schulz, so at W ranks the matrix work and its state are W times what is needed. Here each
param group gets a :class:`Plan`, built once and identically on every rank without communication:

- **Units and costs.** A unit is one parameter (all its ``split_qkv`` pieces); its cost is the FLOPs of its
  matrix work (e.g. Newton–Schulz on each piece) and its state bytes are what only the owner holds.
- **Assignment.** Greedy longest-processing-time: units in order of decreasing cost (ties by position) each
  go to the least-loaded rank (ties to the lowest; loads carried from one group to the next, so the
  optimizer's matrices are balanced as a whole), over *all* ranks: the shard ranks of FSDP2, the
  replicate x shard ranks of HSDP (so no replica repeats another's work) and the ranks of DDP.
- **Gather** (:meth:`Plan.gather`). Under FSDP2/HSDP the ranks of the owner's shard group send it their rows of
  the unit's input in one ``all_to_all_single`` with uneven splits (never ``full_tensor()``, which would send
  every matrix to every rank); under DDP the owner already holds the full input.
- **Scatter** (:meth:`Plan.scatter`). The owner sends each shard rank its rows of the update (the reverse
  ``all_to_all_single``), then, when there are several replicas (HSDP, DDP), each rank all-gathers the rows
  that the other replicas' owners computed along the replicate group. Every rank then applies the rows it
  holds with elementwise ops.
- **Overlap.** Both exchanges only start the collectives (``async_op``) and return a function that collects
  the results. An optimizer's owner step is a generator that yields while its exchanges are in flight, and
  :meth:`eopt.base.Optimizer.step` advances the groups in turn: every group's inputs travel before any group
  computes, and a group's results travel while the next groups compute and the backup AdamW runs, so a rank
  waits only for what it has no work left without.

Traffic per step is the minimum for a sharded matrix: each unit's shards go to its owner once and its
update comes back once, plus the replicate-group all-gather that replicas need anyway.

State that only the owner needs (NorMuon's and AdaMuon's second moments; under DDP Muon's momentum too; SOAP's
and Shampoo's moments, factors and bases) lives on the owner only, as a plain tensor under the parameter's usual
key: ``torch.distributed.checkpoint`` saves the one copy and, after a change of world size, each new owner's
placeholder loads it by key (the plan is rebuilt from the new world). A rank keeps an entry for every parameter,
empty when it holds nothing of it: ``set_state_dict`` wants the entry, and an empty one gives DCP no key to look
for, so checkpoints of any layout load.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard

MATRIX_UPDATES = ("owner", "replicated")

# What :meth:`Plan.gather` and :meth:`Plan.scatter` return: wait for the exchange they started, give its results.
Collect = Callable[[], list[torch.Tensor]]


@dataclass(frozen=True)
class Ranks:
    """The ranks that share a param group's matrix work: ``replicas`` x ``shards``, rank = replica * shards + shard.

    The shard group holds the ranks with the other row shards of a parameter (FSDP2's mesh, HSDP's shard dim
    ``shard_dim``); the replicate group the ranks with the same rows (HSDP's replicate dim ``replicate_dim``, or
    the default group under DDP, where there is no ``mesh``). The groups are looked up at each use rather than
    held, so that a plan never keeps a process group alive past ``destroy_process_group``.
    """

    shards: int
    shard: int
    replicas: int
    replica: int
    mesh: DeviceMesh | None = None
    shard_dim: int | None = None
    replicate_dim: int | None = None

    def shard_group(self) -> dist.ProcessGroup | None:
        return self.mesh.get_group(self.shard_dim) if self.mesh is not None and self.shard_dim is not None else None

    def replicate_group(self) -> dist.ProcessGroup | None:
        """The replicate dim's group; ``None`` (the default group) under DDP."""
        if self.mesh is not None and self.replicate_dim is not None:
            return self.mesh.get_group(self.replicate_dim)
        return None

    @property
    def size(self) -> int:
        return self.replicas * self.shards

    @property
    def rank(self) -> int:
        return self.replica * self.shards + self.shard


def ranks_of(p: torch.Tensor) -> Ranks | None:
    """The :class:`Ranks` over which ``p``'s updates are shared, or ``None`` for a one-process run.

    A DTensor parameter (FSDP2, HSDP) names them through its mesh: its ``Shard(0)`` dim and its ``Replicate``
    dim. A plain parameter inside an initialized process group of several ranks is taken as DDP (whole and
    identical on every rank of the default group).
    """
    if isinstance(p, DTensor):
        mesh, placements = p.device_mesh, p.placements
        shard_dims = [d for d, pl in enumerate(placements) if isinstance(pl, Shard)]
        replicate_dims = [d for d, pl in enumerate(placements) if isinstance(pl, Replicate)]
        if len(shard_dims) > 1 or len(replicate_dims) > 1 or any(placements[d].dim != 0 for d in shard_dims):
            raise ValueError(f"matrix_update='owner' takes Shard(0) (FSDP2) or HSDP placements, got {placements}")
        shard_dim = shard_dims[0] if shard_dims else None
        replicate_dim = replicate_dims[0] if replicate_dims else None
        (shards, shard), (replicas, replica) = (
            (mesh.size(d), mesh.get_local_rank(d)) if d is not None else (1, 0) for d in (shard_dim, replicate_dim)
        )
        return Ranks(shards, shard, replicas, replica, mesh=mesh, shard_dim=shard_dim, replicate_dim=replicate_dim)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return Ranks(1, 0, dist.get_world_size(), dist.get_rank())
    return None


def assign(costs: Sequence[float], loads: list[float]) -> list[int]:
    """The owner rank of each unit: greedy longest-processing-time balancing of ``costs`` over ``len(loads)`` ranks.

    ``loads`` are the ranks' loads so far (the plans of earlier param groups), updated in place, so that
    consecutive groups balance the optimizer's total. Deterministic (units by decreasing cost, ties by index;
    each to the least-loaded rank, ties to the lowest rank), so every rank computes the same assignment without
    communicating.
    """
    owners = [0] * len(costs)
    for unit in sorted(range(len(costs)), key=lambda u: (-costs[u], u)):
        rank = min(range(len(loads)), key=lambda r: (loads[r], r))
        owners[unit] = rank
        loads[rank] += costs[unit]
    return owners


def _rows(n: int, shards: int, shard: int) -> tuple[int, int]:
    """Rows ``[start, stop)`` of a dim-0 size ``n`` held by ``shard`` of ``shards`` (``torch.chunk``, as FSDP2)."""
    chunk = -(-n // shards)
    return min(shard * chunk, n), min((shard + 1) * chunk, n)


class Plan:
    """Who computes each unit of one param group, and the collectives that move inputs to owners and back.

    Args:
        shapes: the global shape of each parameter (unit) of the group.
        costs: each unit's matrix-work FLOPs per step (what the assignment balances).
        state_bytes: the bytes of each unit's owner-only state (reported, not balanced).
        ranks: :func:`ranks_of` a parameter of the group.
        dtype, device: of the exchanged inputs and results (the parameters').
        loads: the ranks' costs from the plans of the optimizer's earlier groups (updated in place), so that
            the assignment balances all the optimizer's matrices, not each group on its own.
    """

    def __init__(
        self,
        shapes: Sequence[torch.Size],
        costs: Sequence[float],
        state_bytes: Sequence[int],
        ranks: Ranks,
        dtype: torch.dtype,
        device: torch.device,
        loads: list[float],
    ) -> None:
        self.shapes = [torch.Size(s) for s in shapes]
        self.costs = list(costs)
        self.state_bytes = list(state_bytes)
        self.ranks = ranks
        self.dtype, self.device = dtype, device
        self.owners = assign(self.costs, loads)

    def owns(self, unit: int) -> bool:
        """Whether this rank computes ``unit``."""
        return self.owners[unit] == self.ranks.rank

    def loads(self) -> tuple[list[float], list[int]]:
        """This group's matrix-work FLOPs and owner-only state bytes on each rank."""
        flops, held = [0.0] * self.ranks.size, [0] * self.ranks.size
        for unit, owner in enumerate(self.owners):
            flops[owner] += self.costs[unit]
            held[owner] += self.state_bytes[unit]
        return flops, held

    def _numel(self, unit: int, shard: int) -> int:
        """Elements of ``unit`` held by shard rank ``shard``."""
        start, stop = _rows(self.shapes[unit][0], self.ranks.shards, shard)
        return (stop - start) * math.prod(self.shapes[unit][1:])

    def _owned_by(self, rank: int, active: Sequence[int]) -> list[int]:
        return [u for u in active if self.owners[u] == rank]

    def _by_shard_owner(self, active: Sequence[int]) -> list[list[int]]:
        """For each rank of this rank's shard group, the ``active`` units it owns."""
        r = self.ranks
        return [self._owned_by(r.replica * r.shards + d, active) for d in range(r.shards)]

    def _exchange(
        self, send: list[torch.Tensor], in_splits: list[int], out_splits: list[int]
    ) -> tuple[torch.Tensor, dist.Work]:
        """Start one ``all_to_all_single`` over the shard group with uneven splits (gloo's list form rejects them);
        returns the output buffer and the work to wait for."""
        inp = torch.cat(send) if send else torch.empty(0, dtype=self.dtype, device=self.device)
        out = torch.empty(sum(out_splits), dtype=self.dtype, device=self.device)
        work = dist.all_to_all_single(out, inp, out_splits, in_splits, group=self.ranks.shard_group(), async_op=True)
        return out, work

    def gather(self, active: Sequence[int], parts: Sequence[torch.Tensor]) -> Collect:
        """Start sending the rows of the ``active`` units' inputs to their owners; returns the function that waits
        for them and gives the full input of every unit this rank owns among ``active`` (in ``active`` order).

        ``parts[j]`` is this rank's rows of unit ``active[j]``'s input (the whole of it when unsharded).
        """
        r = self.ranks
        part_of = dict(zip(active, parts, strict=True))
        mine = self._owned_by(r.rank, active)
        if r.shards == 1:
            fulls = [part_of[u] for u in mine]
            return lambda: fulls
        dests = self._by_shard_owner(active)
        out_splits = [sum(self._numel(u, s) for u in mine) for s in range(r.shards)]
        out, work = self._exchange(
            [part_of[u].reshape(-1) for units in dests for u in units],
            in_splits=[sum(self._numel(u, r.shard) for u in units) for units in dests],
            out_splits=out_splits,
        )

        def collect() -> list[torch.Tensor]:
            work.wait()
            rows: dict[int, list[torch.Tensor]] = {u: [] for u in mine}
            for s, chunk in enumerate(out.split(out_splits)):
                for u, piece in zip(mine, chunk.split([self._numel(u, s) for u in mine]), strict=True):
                    rows[u].append(piece)
            return [torch.cat(rows[u]).view(self.shapes[u]) for u in mine]

        return collect

    def scatter(self, active: Sequence[int], fulls: Sequence[torch.Tensor]) -> Collect:
        """Start sending every rank its rows of the ``active`` units' results; returns the function that waits for
        them and gives this rank's rows of every ``active`` unit, one tensor per unit shaped like its rows.

        ``fulls`` are the full results of the units this rank owns among ``active``, in the order :meth:`gather`
        returned their inputs. Under HSDP the replicas' all-gather starts when the shard exchange is complete,
        inside the returned function.
        """
        r = self.ranks
        mine = self._owned_by(r.rank, active)
        local_shape = {}
        for u in active:
            start, stop = _rows(self.shapes[u][0], r.shards, r.shard)
            local_shape[u] = (stop - start, *self.shapes[u][1:])
        result: dict[int, torch.Tensor] = {}
        if r.shards == 1:
            result.update(zip(mine, fulls, strict=True))
            replicas = self._gather_replicas(active, result, local_shape) if r.replicas > 1 else None
            return lambda: self._complete(active, result, replicas)
        send = []
        for s in range(r.shards):
            for u, full in zip(mine, fulls, strict=True):
                start, stop = _rows(self.shapes[u][0], r.shards, s)
                send.append(full[start:stop].reshape(-1))
        sources = self._by_shard_owner(active)
        out_splits = [sum(self._numel(u, r.shard) for u in units) for units in sources]
        out, work = self._exchange(
            send, in_splits=[sum(self._numel(u, s) for u in mine) for s in range(r.shards)], out_splits=out_splits
        )

        def collect() -> list[torch.Tensor]:
            work.wait()
            for chunk, units in zip(out.split(out_splits), sources, strict=True):
                for u, piece in zip(units, chunk.split([self._numel(u, r.shard) for u in units]), strict=True):
                    result[u] = piece.view(local_shape[u])
            replicas = self._gather_replicas(active, result, local_shape) if r.replicas > 1 else None
            return self._complete(active, result, replicas)

        return collect

    @staticmethod
    def _complete(
        active: Sequence[int], result: dict[int, torch.Tensor], replicas: Callable[[], None] | None
    ) -> list[torch.Tensor]:
        if replicas is not None:
            replicas()
        return [result[u] for u in active]

    def _gather_replicas(
        self, active: Sequence[int], result: dict[int, torch.Tensor], local_shape: dict
    ) -> Callable[[], None]:
        """Start the all-gather over the replicate group of the rows that each replica's owners computed (each
        replica's rows padded to the longest); returns the function that waits for it and completes ``result``."""
        r = self.ranks
        by_replica = [[u for u in active if self.owners[u] // r.shards == q] for q in range(r.replicas)]
        sizes = [sum(self._numel(u, r.shard) for u in units) for units in by_replica]
        buf = torch.zeros(max(sizes), dtype=self.dtype, device=self.device)
        mine = [result[u].reshape(-1) for u in by_replica[r.replica]]
        if mine:
            torch.cat(mine, out=buf[: sizes[r.replica]])
        bufs = [torch.empty_like(buf) for _ in range(r.replicas)]
        work = dist.all_gather(bufs, buf, group=r.replicate_group(), async_op=True)

        def complete() -> None:
            work.wait()
            for q, (units, got) in enumerate(zip(by_replica, bufs, strict=True)):
                if q == r.replica:
                    continue
                pieces = got[: sizes[q]].split([self._numel(u, r.shard) for u in units])
                for u, piece in zip(units, pieces, strict=True):
                    result[u] = piece.view(local_shape[u])

        return complete


class OwnerPlans:
    """What an optimizer with ``matrix_update`` keeps: one :class:`Plan` per param group (under
    ``matrix_update="owner"`` on several ranks) and the ranks' loads that carry from one group's plan to the next.
    Mixed into :class:`eopt.Muon` and :class:`eopt.kronecker.KroneckerOptimizer`."""

    param_groups: list[dict]

    def _init_plans(self) -> None:
        self._plans: dict[tuple[int, ...], Plan] = {}
        self._loads: list[float] = []  # each rank's matrix-work FLOPs over the plans so far

    def _make_plan(self, group: dict, costs: Sequence[float], state_bytes: Sequence[int]) -> Plan | None:
        """The owner plan of ``group`` (``costs`` and owner-only ``state_bytes`` per parameter) under
        ``matrix_update="owner"`` across several ranks, else ``None``."""
        params = group["params"]
        ranks = ranks_of(params[0]) if params and group["matrix_update"] == "owner" else None
        if ranks is None:
            return None
        if not self._loads:
            self._loads = [0.0] * ranks.size
        plan = Plan(
            [p.shape for p in params], costs, state_bytes, ranks, params[0].dtype, params[0].device, self._loads
        )
        self._plans[tuple(id(p) for p in params)] = plan
        return plan

    def _plan_of(self, group: dict) -> Plan | None:
        return self._plans.get(tuple(id(p) for p in group["params"]))

    def plan(self) -> dict:
        """The owner plan under ``matrix_update="owner"`` on several ranks (empty otherwise): ``units`` (matrices),
        ``ranks``, ``balance`` (the busiest rank's matrix-work FLOPs over the mean; 1.0 is perfect),
        ``max_state_bytes`` / ``total_state_bytes`` (owner-only state) and ``owners`` (each parameter's rank, by
        name when the group has ``param_names``)."""
        flops, held, owners = [], [], {}
        for group in self.param_groups:
            plan = self._plan_of(group)
            if plan is None:
                continue
            group_flops, group_held = plan.loads()
            flops = [a + b for a, b in zip(flops or [0.0] * len(group_flops), group_flops, strict=True)]
            held = [a + b for a, b in zip(held or [0] * len(group_held), group_held, strict=True)]
            names = group.get("param_names") or [f"{len(owners) + i}" for i in range(len(plan.owners))]
            owners.update(zip(names, plan.owners, strict=True))
        if not owners:
            return {}
        mean = sum(flops) / len(flops)
        return {
            "units": len(owners),
            "ranks": len(flops),
            "balance": max(flops) / mean if mean else 1.0,
            "max_state_bytes": max(held),
            "total_state_bytes": sum(held),
            "owners": owners,
        }
