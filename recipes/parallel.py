"""Parallelism: process groups, device meshes, DDP / FSDP2 / HSDP wrapping, and the rank helpers the recipe uses.

The only module of ``recipes/`` that calls ``torch.distributed`` directly (DCP aside). Modes
(``parallelism.name``):

- ``single``: one process, one device, no process group.
- ``ddp``: every rank holds the whole model; gradients are all-reduced after the last micro-batch (``no_sync``
  on the others). Optimizers see plain tensors, identical on every rank.
- ``fsdp``: FSDP2 ``fully_shard`` per transformer block, then the root (which holds the embeddings, the tied
  head and the final norm); parameters, gradients and the optimizer state are ``Shard(0)`` DTensors.
- ``hsdp``: FSDP2 on a 2-D ``(replicate, shard)`` mesh: sharded within a group of ``shard`` ranks, replicated
  over ``replicate`` groups.

The rank comes from torchrun's ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` or, when those are absent, SLURM's
``SLURM_PROCID``/``SLURM_NTASKS``/``SLURM_LOCALID`` (an ``srun`` launch without torchrun; the master is then the
first host of the job's node list). CPU runs use gloo with an explicit CPU mesh, GPU runs NCCL. In every mode
``train.batch_size`` is the global batch, so one config is one optimization at any world size.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from eopt.owner import MATRIX_UPDATES
from recipes.config import ParallelismConfig
from recipes.errors import ConfigError, RecipeError

MODES = ("single", "ddp", "fsdp", "hsdp")
T = TypeVar("T")


@dataclass(frozen=True)
class World:
    """This process's place in the job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def _env_int(*names: str) -> int | None:
    for name in names:
        if os.environ.get(name, "").strip():
            return int(os.environ[name])
    return None


def world_from_env() -> World:
    """The rank, world size and local rank from torchrun's variables, else SLURM's, else one process."""
    if os.environ.get("WORLD_SIZE"):
        return World(_env_int("RANK") or 0, _env_int("WORLD_SIZE"), _env_int("LOCAL_RANK") or 0)
    if os.environ.get("SLURM_NTASKS") and os.environ.get("SLURM_PROCID"):
        return World(_env_int("SLURM_PROCID"), _env_int("SLURM_NTASKS"), _env_int("SLURM_LOCALID") or 0)
    return World()


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list: ``gpu[03-05,9],cpu1`` -> ``gpu03``."""
    match = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip())
    if match is None:
        raise ConfigError(f"cannot read SLURM_JOB_NODELIST={nodelist!r}: set MASTER_ADDR to the first node's address")
    prefix, ranges = match.groups()
    return prefix + ranges.split(",")[0].split("-")[0] if ranges else prefix


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _set_rendezvous_env(world: World) -> None:
    """MASTER_ADDR/MASTER_PORT for ``init_process_group``: torchrun sets them; srun and one process do not."""
    if "MASTER_ADDR" not in os.environ:
        nodelist = os.environ.get("SLURM_JOB_NODELIST") or os.environ.get("SLURM_NODELIST")
        if world.world_size > 1 and not nodelist:
            raise ConfigError("a multi-process run without torchrun needs MASTER_ADDR and MASTER_PORT set")
        os.environ["MASTER_ADDR"] = first_host(nodelist) if world.world_size > 1 else "127.0.0.1"
    if "MASTER_PORT" not in os.environ:
        job = os.environ.get("SLURM_JOB_ID")
        os.environ["MASTER_PORT"] = str(20000 + int(job) % 20000) if job and world.world_size > 1 else str(_free_port())


def degrees(cfg: ParallelismConfig, world_size: int) -> tuple[int, int]:
    """``(replicate, shard)``: the data-parallel degrees of the mesh (``-1`` = the rest of the world)."""
    if cfg.name in ("single", "ddp"):
        return world_size, 1
    replicate, shard = cfg.replicate, cfg.shard
    if cfg.name == "fsdp":
        if replicate not in (1, -1):
            raise ConfigError(f"parallelism.replicate={replicate} is for hsdp: fsdp shards over every rank")
        replicate = 1
    if replicate == -1 and shard == -1:
        raise ConfigError("parallelism.replicate and parallelism.shard cannot both be -1: set one of them")
    for key, value in (("replicate", replicate), ("shard", shard)):
        if value == 0 or value < -1:
            raise ConfigError(f"parallelism.{key}={value} must be a positive degree or -1 (the rest)")
    if replicate == -1:
        replicate = world_size // shard if world_size % shard == 0 else 0
    if shard == -1:
        shard = world_size // replicate if world_size % replicate == 0 else 0
    if replicate * shard != world_size:
        raise ConfigError(
            f"parallelism.replicate={cfg.replicate} x parallelism.shard={cfg.shard} does not multiply to the "
            f"world size {world_size}: choose degrees whose product is {world_size} (-1 takes the rest)"
        )
    return replicate, shard


def check_parallelism(cfg: ParallelismConfig, world_size: int) -> None:
    """Every check of the parallelism config against the launch, before any work."""
    if cfg.name not in MODES:
        raise ConfigError(f"parallelism.name={cfg.name!r} is unknown: choose one of {', '.join(MODES)}")
    if cfg.name == "single" and world_size > 1:
        raise ConfigError(
            f"parallelism=single but {world_size} processes were launched: use parallelism=ddp, fsdp or hsdp"
        )
    if cfg.matrix_update not in MATRIX_UPDATES:
        raise ConfigError(
            f"parallelism.matrix_update={cfg.matrix_update!r} is unknown: owner (each matrix's work on one rank) "
            "or replicated (on every rank, the reference)"
        )
    if cfg.timeout_s <= 0:
        raise ConfigError(f"parallelism.timeout_s={cfg.timeout_s} must be > 0")
    degrees(cfg, world_size)


class Parallel:
    """The job's process group, device and mesh, and the wrapping of the model for ``cfg.name``."""

    def __init__(self, cfg: ParallelismConfig, world: World, device: torch.device) -> None:
        self.cfg, self.world, self.device = cfg, world, device
        self.mesh = None
        if cfg.name in ("fsdp", "hsdp"):
            from torch.distributed.device_mesh import init_device_mesh

            replicate, shard = degrees(cfg, world.world_size)
            if cfg.name == "fsdp":
                self.mesh = init_device_mesh(device.type, (shard,), mesh_dim_names=("shard",))
            else:
                self.mesh = init_device_mesh(device.type, (replicate, shard), mesh_dim_names=("replicate", "shard"))

    @property
    def sharded(self) -> bool:
        return self.cfg.name in ("fsdp", "hsdp")

    def describe(self) -> str:
        """The header-line words for the layout, e.g. ``fsdp 2 ranks`` or ``hsdp 2x2 ranks``."""
        if self.cfg.name == "single":
            return "single"
        replicate, shard = degrees(self.cfg, self.world.world_size)
        size = f"{replicate}x{shard}" if self.cfg.name == "hsdp" else str(self.world.world_size)
        one = " (a one-rank mesh)" if self.world.world_size == 1 else ""
        return f"{self.cfg.name} {size} rank{'s' if self.world.world_size > 1 else ''}{one}"

    def build(self, make: Callable[[], nn.Module], compile: bool) -> tuple[nn.Module, nn.Module]:
        """``(model, forward_model)``: the model for the optimizer, checkpoints and export, and the module to run.

        ``make()`` builds the model with the run's seed (identical on every rank and to one process). Under
        FSDP/HSDP only rank 0 builds it whole (on the host); every rank builds it on the meta device, shards
        it, and receives its shard of rank 0's weights (so even ``llama_8b`` never needs a full copy per GPU).
        """
        if self.sharded:
            model = self._build_sharded(make, compile)
            return model, model
        with self.device:
            model = make()
        forward = model
        if self.cfg.name == "ddp":
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            forward = nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
        return model, torch.compile(forward) if compile else forward

    def _build_sharded(self, make: Callable[[], nn.Module], compile: bool) -> nn.Module:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
        from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

        full = make() if self.world.main else None
        with torch.device("meta"):
            model = make()
        kwargs: dict[str, Any] = {"mesh": self.mesh, "reshard_after_forward": self.cfg.reshard_after_forward}
        if self.device.type == "cuda" and self.cfg.mixed_precision:
            kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        if self.cfg.cpu_offload:
            kwargs["offload_policy"] = CPUOffloadPolicy()
        for block in transformer_blocks(model):
            if compile:
                block.compile()
            fully_shard(block, **kwargs)
        fully_shard(model, **kwargs)
        model.to_empty(device="cpu" if self.cfg.cpu_offload else self.device)
        options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
        set_model_state_dict(model, full.state_dict() if full is not None else {}, options=options)
        # Non-persistent buffers (rotary frequencies) are in no state dict: take rank 0's.
        full_buffers = dict(full.named_buffers()) if full is not None else {}
        for name, buf in model.named_buffers():
            if self.world.main:
                buf.copy_(full_buffers[name])
            dist.broadcast(buf, src=0)
        return model

    def eval_module(self, model: nn.Module, forward: nn.Module) -> nn.Module:
        """The module evaluation runs: the forward module, but under DDP the unwrapped one (no buffer syncs)."""
        return model if self.cfg.name == "ddp" else forward

    def full_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor] | None:
        """The whole model's state dict on rank 0's host (collective) when sharded; None otherwise (use the model's)."""
        if not self.sharded:
            return None
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        # A tied parameter (GPT-2's head is its embedding) is saved once, under its first name, as in one process.
        first = {id(p): name for name, p in reversed(list(model.named_parameters(remove_duplicate=False)))}
        aliases = {name for name, p in model.named_parameters(remove_duplicate=False) if first[id(p)] != name}
        return {k: v for k, v in state.items() if k not in aliases}

    def no_sync(self, module: nn.Module, last: bool) -> contextlib.AbstractContextManager:
        """Context of a micro-batch's backward: under DDP all but the last skip the gradient all-reduce."""
        ddp = getattr(module, "_orig_mod", module)
        if last or not isinstance(ddp, nn.parallel.DistributedDataParallel):
            return contextlib.nullcontext()
        return ddp.no_sync()


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks of a GPT-2 or Llama model (the FSDP units below the root)."""
    if model.config.model_type == "gpt2":
        return list(model.transformer.h)
    return list(model.model.layers)


def init(cfg: ParallelismConfig, device_kind: str, timeout_s: int | None = None) -> Parallel:
    """Join the job's process group (none for ``single``) and build its mesh; ``device_kind``: cpu or cuda."""
    world = world_from_env()
    check_parallelism(cfg, world.world_size)
    device = torch.device(device_kind)
    if device_kind == "cuda":
        device = torch.device("cuda", world.local_rank)
        torch.cuda.set_device(device)
    global _REDUCE_DEVICE, _OWN_GROUP
    _REDUCE_DEVICE = device
    if cfg.name != "single" and not dist.is_initialized():
        _OWN_GROUP = True
        _set_rendezvous_env(world)
        dist.init_process_group(
            "nccl" if device_kind == "cuda" else "gloo",
            rank=world.rank,
            world_size=world.world_size,
            timeout=timedelta(seconds=timeout_s or cfg.timeout_s),
        )
    return Parallel(cfg, world, device)


def destroy() -> None:
    """Leave the process group that :func:`init` created (one that the caller had set up is left to it)."""
    global _OWN_GROUP
    if _OWN_GROUP and dist.is_initialized():
        dist.destroy_process_group()
    _OWN_GROUP = False


# ------------------------------------------------------------------------------------ rank helpers

_OWN_GROUP = False  # whether init() created the process group (and destroy() ends it)
_REDUCE_DEVICE = torch.device("cpu")  # where the helpers' small tensors live: the job's device (NCCL needs CUDA)


def _active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if _active():
        dist.barrier()


def all_reduce(t: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """``t`` reduced over every rank in place (``sum`` or ``max``); unchanged in one process."""
    if _active():
        dist.all_reduce(t, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return t


def broadcast_object(obj: T) -> T:
    """Rank 0's ``obj`` on every rank (a picklable object)."""
    if not _active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def reduced(values: list[float], op: str = "sum") -> list[float]:
    """``values`` reduced over every rank (``sum`` or ``max``), in float64; unchanged in one process."""
    if not _active():
        return list(values)
    return all_reduce(torch.tensor(values, dtype=torch.float64, device=_REDUCE_DEVICE), op).tolist()


def on_every_rank(error: RecipeError) -> RecipeError:
    """Mark ``error`` as raised by every rank together, so that only rank 0 prints it. Returns it."""
    error.all_ranks = True
    return error


def new_gloo_group() -> dist.ProcessGroup | None:
    """A gloo group of every rank (collective: all ranks call it), or None in one process."""
    return dist.new_group(backend="gloo") if _active() else None


def decided_once(fn: Callable[[], T]) -> T:
    """Run ``fn`` on rank 0 only and give its result, or the user error it raised, to every rank.

    For decisions whose failure must be reported once and not hang the other ranks (is there a checkpoint,
    is it from this config, is the data ready).
    """
    result: tuple[bool, Any] = (True, None)
    if is_main():
        try:
            result = (True, fn())
        except RecipeError as e:
            result = (False, e)
    ok, value = broadcast_object(result)
    if not ok:
        raise on_every_rank(value)
    return value


_PEER_LOST = re.compile(r"Connection (closed|reset) by peer|[Tt]imed out|[Tt]imeout|Broken pipe|NCCL communicator")


def peer_failure(error: BaseException) -> str | None:
    """One line for a collective that failed because another rank died or stopped answering (its own output
    has the cause), or None when ``error`` is something else (a bug here, whose traceback must be shown)."""
    message = str(error).strip()
    if not (isinstance(error, dist.DistError) or (isinstance(error, RuntimeError) and _PEER_LOST.search(message))):
        return None
    reason = message.splitlines()[-1] if message else type(error).__name__
    reason = reason.split("] ", 1)[-1].split(". This is typically", 1)[0]
    return f"a collective failed because another rank stopped or died (its output has the cause): {reason}"


def raise_together(error: RecipeError | None) -> None:
    """Raise on every rank if any rank has an ``error`` (one collective), the lowest failing rank's error.

    For steps that run on every rank and may fail on some (loading a checkpoint shard), so that all ranks
    stop together with one message instead of the others waiting in the next collective.
    """
    if not _active():
        if error is not None:
            raise error
        return
    errors: list[RecipeError | None] = [None] * dist.get_world_size()
    dist.all_gather_object(errors, error)
    first = next((e for e in errors if e is not None), None)
    if first is not None:
        raise on_every_rank(first)
