"""What eopt's optimizers need to run on distributed parameters: local shards, full gathers, partial-sum reductions.

Under DDP every parameter and gradient is a plain tensor, identical on every rank after the gradient
all-reduce, so every optimizer runs unchanged (and every rank computes the same update). Under FSDP2 and
HSDP a parameter is a ``DTensor`` sharded along dim 0 over the mesh's shard dim (``Shard(0)``, replicated
over HSDP's replicate dim); its ``shape`` is the global one and its gradient is sharded the same way.
The optimizers then work in three ways, chosen by the math:

- elementwise math (AdamW, Sophia, Muon's momentum, weight decay) runs on :func:`local` shards;
- a statistic that spans shards (Adam-mini's per-block second moment, Adafactor's column factor and RMS) is
  a local partial sum, reduced over the shard groups with one :func:`all_reduce_sum_` per param group;
- matrix work (Muon's Newton–Schulz, SOAP's and Shampoo's factors and bases) runs on the whole matrix: once,
  on the matrix's owner rank (``matrix_update="owner"``, :mod:`eopt.owner`), or on the :func:`full` matrix
  identically on every rank (``"replicated"``), each rank then applying the rows of the result that it holds
  (:func:`local_slice`, or :func:`copy_local_` around the one-process in-place update).

State layout rule (see :mod:`eopt.base`): a state tensor is sharded like its parameter (a ``DTensor``), holds
the same value on every rank, or exists on one rank only (an owner's); never a plain tensor whose value differs
between ranks under one key, since ``torch.distributed.checkpoint`` keeps one rank's copy of a plain tensor.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Shard
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset


def is_sharded(t: torch.Tensor) -> bool:
    """Whether ``t`` is a ``DTensor`` (FSDP2/HSDP parameter, gradient or state)."""
    return isinstance(t, DTensor)


def local(t: torch.Tensor) -> torch.Tensor:
    """The part of ``t`` this rank holds: ``t.to_local()`` for a DTensor, ``t`` itself otherwise."""
    return t.to_local() if isinstance(t, DTensor) else t


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole (global) value of ``t`` as a plain tensor: gathered for a DTensor, ``t`` itself otherwise."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def gather(part: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The global tensor whose shards are the ranks' ``part`` s, laid out like ``like`` (a DTensor parameter):
    an all-gather over the shard groups. For a plain ``like`` it is ``part`` itself."""
    if not isinstance(like, DTensor):
        return part
    return DTensor.from_local(
        part, like.device_mesh, like.placements, shape=like.shape, stride=like.stride()
    ).full_tensor()


def local_slice(whole: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The view of ``whole`` (a global-shape plain tensor) that corresponds to ``like``'s local shard."""
    if not isinstance(like, DTensor):
        return whole
    shape, offset = compute_local_shape_and_global_offset(like.shape, like.device_mesh, like.placements)
    view = whole
    for dim, (size, start) in enumerate(zip(shape, offset, strict=True)):
        if size != whole.shape[dim]:
            view = view.narrow(dim, start, size)
    return view


def local_rows(like: torch.Tensor) -> tuple[int, int]:
    """``(start, stop)``: the global indices along dim 0 of the rows that this rank holds of ``like``."""
    if not isinstance(like, DTensor):
        return 0, like.shape[0]
    shape, offset = compute_local_shape_and_global_offset(like.shape, like.device_mesh, like.placements)
    return offset[0], offset[0] + shape[0]


def shard_groups(like: torch.Tensor) -> list[dist.ProcessGroup]:
    """The process groups of the mesh dims over which ``like`` is sharded (none for a plain tensor)."""
    if not isinstance(like, DTensor):
        return []
    mesh = like.device_mesh
    return [mesh.get_group(d) for d, p in enumerate(like.placements) if isinstance(p, Shard) and mesh.size(d) > 1]


def all_reduce_sum_(buffer: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Sum the partial values in ``buffer`` over the ranks that hold the other shards of ``like``, in place.

    ``like`` is any parameter of the group the partials come from (all share a mesh and placements); with a
    plain ``like`` (one process, DDP) nothing is communicated. Returns ``buffer``.
    """
    for group in shard_groups(like):
        dist.all_reduce(buffer, group=group)
    return buffer


def copy_local_(wholes: Sequence[torch.Tensor], params: Sequence[torch.Tensor], into_params: bool) -> None:
    """Copy between this rank's rows of global-shape tensors ``wholes[i]`` and the local shards of ``params[i]``:
    into the parameters (``into_params``) or out of them. One foreach call."""
    views = [local_slice(w, p) for w, p in zip(wholes, params, strict=True)]
    shards = [local(p) for p in params]
    if views:
        torch._foreach_copy_(*((shards, views) if into_params else (views, shards)))
