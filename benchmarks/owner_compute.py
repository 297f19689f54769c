"""Owner-computes against replicated Muon, SOAP and Shampoo on 2 CPU ranks: optimizer step time, state and traffic.

    python benchmarks/owner_compute.py [--optimizers muon,soap,shampoo] [--sizes small,large] [--layouts fsdp,ddp]
                                       [--steps 10]

The parameters are ``benchmarks/optimizer_step.py``'s Llamas (``small`` 5.1M, ``large`` 29.5M) with fixed random
gradients. ``one process`` times ``optimizer.step()`` on the whole model with one thread; then 2 gloo ranks with one
thread each (``torch.multiprocessing``) run the same step on FSDP2 shards (``fully_shard`` per decoder layer and
the root, as the recipe) or on whole parameters (DDP), with ``matrix_update`` ``replicated`` and ``owner``, the
cases timed interleaved. A step's time is the slowest rank's (the ranks meet at a barrier before and after it);
the table gives the median over ``--steps`` steps after one warm-up step and the mean (SOAP refreshes its bases
every 10 steps by default: the mean of 10 steps carries one refresh, the median none; Shampoo's default
computes its root inverses at every step), and:

- ``state/rank``: the largest rank's bytes of the matrix groups' state (Muon: NorMuon, whose second moment is
  owner-only, and its momentum sharded under FSDP2 and owner-only under DDP; SOAP, Shampoo: all of it but the
  step counters is owner-only);
- ``sent/step``: bytes all ranks send per step in eopt's collectives, counted at ``all_to_all_single`` and
  ``all_gather`` (``replicated`` gathers each full ``u`` through DTensor: ``(W - 1) x`` the matrix bytes,
  computed); ``minimum`` is what owner-computes cannot avoid: under FSDP2 every matrix's shards go to its owner
  and its update comes back, ``2 (W - 1) / W x`` the matrix bytes; under DDP the updates reach the other ranks,
  ``(W - 1) x``.

Run it with nothing else on the machine: the ranks' threads and the one-process thread share its 2 cores.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import eopt  # noqa: E402
from benchmarks.optimizer_step import SIZES, build_model, fresh_params, llama  # noqa: E402
from eopt.distributed import local, local_slice  # noqa: E402
from recipes.models import param_hints  # noqa: E402

MODES = ("replicated", "owner")
HPARAMS = {"muon": {"second_moment": "normuon"}, "soap": {}, "shampoo": {}}
WORLD = 2


def matrix_params(opt: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [p for g in opt.param_groups if g["algorithm"] == opt.algorithm for p in g["params"]]


def matrix_state_bytes(opt: torch.optim.Optimizer) -> int:
    return sum(
        local(v).numel() * v.element_size()
        for p in matrix_params(opt)
        for v in opt.state[p].values()
        if isinstance(v, torch.Tensor)
    )


def matrix_bytes(opt: torch.optim.Optimizer) -> int:
    return sum(p.numel() * p.element_size() for p in matrix_params(opt))


class Traffic:
    """Counts the bytes this rank sends to other ranks in ``all_to_all_single`` and ``all_gather``."""

    def __init__(self) -> None:
        self.sent = 0
        self._a2a, self._ag = dist.all_to_all_single, dist.all_gather

    def __enter__(self) -> Traffic:
        def a2a(out, inp, out_splits, in_splits, group=None, async_op=False):
            self.sent += (inp.numel() - in_splits[dist.get_rank(group)]) * inp.element_size()
            return self._a2a(out, inp, out_splits, in_splits, group=group, async_op=async_op)

        def ag(outs, inp, group=None, async_op=False):
            self.sent += (len(outs) - 1) * inp.numel() * inp.element_size()
            return self._ag(outs, inp, group=group, async_op=async_op)

        dist.all_to_all_single, dist.all_gather = a2a, ag
        return self

    def __exit__(self, *exc) -> None:
        dist.all_to_all_single, dist.all_gather = self._a2a, self._ag


def build(name: str, size: str, layout: str, mode: str, world: int) -> torch.optim.Optimizer:
    """Optimizer ``name`` over the model's parameters (sharded for fsdp) with the benchmark's fixed gradients."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    model = llama(size)
    hints = param_hints(model)
    grads = {key: p.grad for key, p in fresh_params(list(model.named_parameters()), seed=0)}
    if layout == "fsdp":
        mesh = init_device_mesh("cpu", (world,))
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
    named = list(model.named_parameters())
    for key, p in named:
        g = grads[key]
        p.grad = (
            DTensor.from_local(local_slice(g, p).clone(), p.device_mesh, p.placements, shape=p.shape, stride=p.stride())
            if layout == "fsdp"
            else g.clone()
        )
    return eopt.build(named, name, hints=hints, matrix_update=mode, **HPARAMS[name])


def _rank(rank: int, world: int, port: int, cases: list[tuple[str, str, str]], steps: int, out: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        for name, size, layout in cases:
            opts = {mode: build(name, size, layout, mode, world) for mode in MODES}
            times = {mode: [] for mode in MODES}
            sent = dict.fromkeys(MODES, 0)
            for step in range(steps + 1):
                for mode, opt in opts.items():
                    dist.barrier()
                    start = time.perf_counter()
                    with Traffic() as traffic:
                        opt.step()
                    dist.barrier()
                    elapsed = torch.tensor(time.perf_counter() - start)
                    dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
                    if step:
                        times[mode].append(elapsed.item())
                        sent[mode] = traffic.sent
            for mode, opt in opts.items():
                state = torch.tensor(matrix_state_bytes(opt))
                dist.all_reduce(state, op=dist.ReduceOp.MAX)
                total = torch.tensor(sent[mode])
                dist.all_reduce(total)
                if rank == 0:
                    out[(name, size, layout, mode)] = {
                        "ms": statistics.median(times[mode]) * 1e3,
                        "mean_ms": statistics.mean(times[mode]) * 1e3,
                        "state": state.item(),
                        "sent": total.item(),
                        "matrix_bytes": matrix_bytes(opt),
                    }
            dist.barrier()
    finally:
        dist.destroy_process_group()


def one_process(name: str, size: str, steps: int) -> dict:
    torch.set_num_threads(1)
    named, info = build_model(size)
    opt = eopt.build(fresh_params(named, seed=0), name, hints=info["hints"], **HPARAMS[name])
    times = []
    for step in range(steps + 1):
        start = time.perf_counter()
        opt.step()
        if step:
            times.append(time.perf_counter() - start)
    return {
        "ms": statistics.median(times) * 1e3,
        "mean_ms": statistics.mean(times) * 1e3,
        "state": matrix_state_bytes(opt),
        "matrix_bytes": matrix_bytes(opt),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--optimizers", default="muon,soap,shampoo", help="comma-separated: muon, soap, shampoo")
    parser.add_argument("--sizes", default="small,large", help=f"comma-separated: {', '.join(SIZES)}")
    parser.add_argument("--layouts", default="fsdp,ddp", help="comma-separated: fsdp, ddp")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per case (after one warm-up)")
    args = parser.parse_args(argv)
    names, sizes, layouts = args.optimizers.split(","), args.sizes.split(","), args.layouts.split(",")
    for name in names:
        if name not in HPARAMS:
            parser.error(f"--optimizers: unknown optimizer {name!r}; choose from {', '.join(HPARAMS)}")
    for name in sizes:
        if name not in SIZES:
            parser.error(f"--sizes: unknown size {name!r}; choose from {', '.join(SIZES)}")
    for name in layouts:
        if name not in ("fsdp", "ddp"):
            parser.error(f"--layouts: unknown layout {name!r}; choose fsdp or ddp")

    from tests.distributed_utils import free_port

    cases = [(name, size, layout) for name in names for size in sizes for layout in layouts]
    results = mp.Manager().dict()
    mp.start_processes(_rank, args=(WORLD, free_port(), cases, args.steps, results), nprocs=WORLD, start_method="spawn")
    print(f"{WORLD} ranks x 1 thread vs one process x 1 thread; {args.steps} steps after a warm-up; {HPARAMS}\n")
    print(
        "| optimizer | model | layout | matrix_update | step ms median (mean), slowest rank | vs replicated | "
        "vs one process | state/rank MiB | vs one process | sent/step MiB | vs minimum |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    mib = 2.0**20
    for name in names:
        for size in sizes:
            one = one_process(name, size, args.steps)
            print(
                f"| {name} | {size} | one process | - | {one['ms']:.1f} ({one['mean_ms']:.1f}) | | 1.00x | "
                f"{one['state'] / mib:.2f} | 1.00x | 0 | |"
            )
            for layout in layouts:
                report(name, size, layout, one, results)


def report(name: str, size: str, layout: str, one: dict, results: dict) -> None:
    """The table rows of one optimizer, model and layout: replicated, then owner."""
    mib = 2.0**20
    replicated = results[(name, size, layout, "replicated")]
    for mode in MODES:
        r = results[(name, size, layout, mode)]
        matrix = r["matrix_bytes"]
        if mode == "replicated":
            sent = (WORLD - 1) * matrix if layout == "fsdp" else 0
        else:
            sent = r["sent"]
        minimum = 2 * (WORLD - 1) / WORLD * matrix if layout == "fsdp" else (WORLD - 1) * matrix
        print(
            f"| {name} | {size} | {layout} | {mode} | {r['ms']:.1f} ({r['mean_ms']:.1f}) | "
            f"{r['ms'] / replicated['ms']:.2f}x ({r['mean_ms'] / replicated['mean_ms']:.2f}x) | "
            f"{r['ms'] / one['ms']:.2f}x ({r['mean_ms'] / one['mean_ms']:.2f}x) | {r['state'] / mib:.2f} | "
            f"{r['state'] / one['state']:.2f}x | {sent / mib:.2f} | {f'{sent / minimum:.2f}x' if sent else ''} |"
        )


if __name__ == "__main__":
    main()
