"""Multi-process helpers for the ``distributed`` tests: spawn gloo ranks on CPU, shard parameters with FSDP2.

:func:`spawn` runs ``fn(rank, world_size, *args)`` in ``world_size`` fresh processes joined in one gloo
process group and raises if any of them fails (with that rank's traceback). :func:`optimizer_parity` is the
eopt oracle check: every rank runs the optimizer on FSDP2/HSDP shards *and* the same optimizer in plain
one-process form on the full tensors, feeding both the same full gradients, and compares its shard with the
corresponding rows of the one-process result (the one-process run needs no communication, so each rank
holds its own oracle).
"""

from __future__ import annotations

import json
import os
import socket
import tempfile
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import eopt
from eopt.distributed import local, local_slice


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, errors: str, fn: Callable, args: tuple) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        fn(rank, world_size, *args)
        dist.barrier()  # no rank tears down its connections while another is still in its last collective
    except BaseException:
        Path(errors, f"rank{rank}.txt").write_text(traceback.format_exc())
        raise
    finally:
        dist.destroy_process_group()


def spawn(fn: Callable, world_size: int, *args: Any) -> None:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` gloo ranks; raise with the first failure's traceback.

    ``fn`` must be importable (a module-level function of a test module).
    """
    with tempfile.TemporaryDirectory() as errors:
        try:
            mp.start_processes(
                _worker, args=(world_size, free_port(), errors, fn, args), nprocs=world_size, start_method="spawn"
            )
        except Exception as e:
            reports = sorted(Path(errors).glob("rank*.txt"))
            if reports:
                raise AssertionError(f"{reports[0].stem} failed:\n{reports[0].read_text()}") from None
            raise AssertionError(f"a rank failed: {e}") from None


def mesh_for(kind: str, world_size: int):
    """The CPU device mesh of ``kind``: ``fsdp`` (1-D shard mesh) or ``hsdp`` (2 replicas x the rest)."""
    from torch.distributed.device_mesh import init_device_mesh

    if kind == "fsdp":
        return init_device_mesh("cpu", (world_size,), mesh_dim_names=("shard",))
    return init_device_mesh("cpu", (2, world_size // 2), mesh_dim_names=("replicate", "shard"))


class Tensors(nn.Module):
    """A module that just holds named parameters of given shapes (``.`` in names becomes ``__``)."""

    def __init__(self, shapes: dict[str, Sequence[int]], seed: int = 0) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        for name, shape in shapes.items():
            self.register_parameter(name.replace(".", "__"), nn.Parameter(torch.randn(*shape, generator=generator)))


def shard(module: nn.Module, kind: str, world_size: int) -> nn.Module:
    """``fully_shard`` the module on the mesh of ``kind`` (its parameters become ``Shard(0)`` DTensors); ``ddp``
    leaves it whole (DDP's parameters and all-reduced gradients are plain tensors, the same on every rank)."""
    from torch.distributed.fsdp import fully_shard

    if kind != "ddp":
        fully_shard(module, mesh=mesh_for(kind, world_size))
    return module


def _full_grads(shapes: dict[str, Sequence[int]], step: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1000 + step)
    return {name: torch.randn(*shape, generator=generator) for name, shape in shapes.items()}


def named(module: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """``module``'s parameters under the names :class:`Tensors` was given."""
    return [(n.replace("__", "."), p) for n, p in module.named_parameters()]


def set_grads(params: dict[str, torch.Tensor], grads: dict[str, torch.Tensor]) -> None:
    """Give each parameter its (full) gradient: the rows it holds as a DTensor, a copy of the whole otherwise."""
    for key, g in grads.items():
        p = params[key]
        p.grad = (
            torch.distributed.tensor.DTensor.from_local(
                local_slice(g, p).clone(), p.device_mesh, p.placements, shape=p.shape, stride=p.stride()
            )
            if isinstance(p, torch.distributed.tensor.DTensor)
            else g.clone()
        )


def assert_close_rows(
    params: dict[str, torch.Tensor], reference: dict[str, torch.Tensor], rtol: float, what: str
) -> None:
    """Every parameter's local rows equal the same rows of its one-process reference within ``rtol`` of the
    reference's largest magnitude."""
    for key, ref in reference.items():
        got, want = local(params[key]).detach(), local_slice(ref.detach(), params[key])
        if not want.numel():
            continue
        err = ((got - want).abs().max() / ref.detach().abs().max().clamp_min(1e-12)).item()
        assert err <= rtol, f"{what} {key}: relative error {err:.3g} > {rtol}"


def optimizer_parity(
    rank: int,
    world_size: int,
    kind: str,
    name: str,
    shapes: dict[str, Sequence[int]],
    hints: dict[str, dict],
    hparams: dict,
    steps: int = 5,
    rtol: float = 1e-5,
    between_steps: Callable[[torch.optim.Optimizer, int], None] | None = None,
) -> torch.optim.Optimizer:
    """``eopt.build(name)`` on sharded parameters (``kind`` fsdp or hsdp; whole ones for ddp) equals the one-process
    optimizer within ``rtol`` after each step.

    ``shapes``/``hints`` name the parameters (hints as :func:`eopt.build` takes them); the same random full
    gradient is given to both runs at every step (each rank's shard of it to the sharded run), so only the
    optimizer's handling of shards can make them differ. ``between_steps(optimizer, step)`` runs after each step
    on both optimizers (e.g. Sophia's Hessian update, which reads ``.grad``). Returns the distributed optimizer.
    """
    reference = Tensors(shapes)
    sharded = shard(Tensors(shapes), kind, world_size)
    # In a process group, plain tensors would make an owner-computes optimizer act as DDP: the reference replicates.
    one_process = {"matrix_update": "replicated"} if "matrix_update" in eopt.OPTIMIZERS[name].defaults else {}
    ref_opt = eopt.build(named(reference), name, hints=hints, **{**hparams, **one_process})
    opt = eopt.build(named(sharded), name, hints=hints, **hparams)
    ref_params, params = dict(named(reference)), dict(named(sharded))
    for step in range(steps):
        grads = _full_grads(shapes, step)
        set_grads(ref_params, grads)
        set_grads(params, grads)
        ref_opt.step()
        opt.step()
        if between_steps is not None:
            between_steps(ref_opt, step)
            between_steps(opt, step)
        assert_close_rows(params, ref_params, rtol, f"{name} {kind} rank {rank} step {step}")
    # set_state_dict wants an entry per param on every rank: empty where only another rank (the owner) holds state.
    missing = [key for key, p in params.items() if p not in opt.state]
    assert not missing, f"{name} {kind} rank {rank}: no optimizer state entry for {missing}"
    return opt


def losses(run_dir: Path) -> dict[tuple[int, str], float]:
    """``{(step, "train/loss" | "val/loss"): value}`` of a run directory's ``metrics.jsonl``."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {(r["step"], k): r[k] for r in records for k in ("train/loss", "val/loss") if k in r}
