"""Time one optimizer ``step()`` for every benchmark case, side by side in one process.

    python benchmarks/optimizer_step.py [--family adamw,muon] [--sizes small,large] [--threads 2] [--clock wall]

Parameter sets are Llama-style models built with transformers (CPU, fp32, no weights downloaded):
``small`` is the 5.1M-parameter 4 x 256 Llama with a 4096 vocabulary (MLP 640, untied head), ``large`` is
8 x 512 (MLP 1376, 29.5M parameters). Gradients are random (fixed seed) and stay fixed across steps, so a
step costs exactly what the optimizer does. Cases of one family are built together and timed
interleaved (one step of each in turn) after their warm-up, so slow drifts of the machine hit every row
alike; the table reports the median. Case modules live in ``benchmarks/cases/<family>.py``.

With the ``muon`` family the runner also prints eopt's batched Newton–Schulz FLOP rate next to a plain
fp32 ``bmm`` rate at the same shapes (nominal FLOPs: ``2*(2*m*m*n + m^3)`` per NS step of an m x n matrix,
m <= n).

``--clock cpu`` times with the calling thread's CPU time instead of wall time. With ``--threads 1`` all of
torch's work runs on that thread, so the numbers stay meaningful on a machine shared with other jobs
(wall time there measures the other jobs as much as the optimizer).
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.cases import Case  # noqa: E402
from recipes.models import param_hints  # noqa: E402

CLOCKS = {"wall": time.perf_counter, "cpu": time.thread_time}
clock = time.perf_counter

SIZES = {
    "small": {"hidden": 256, "layers": 4, "mlp": 640, "heads": 4, "kv_heads": 4, "vocab": 4096},
    "large": {"hidden": 512, "layers": 8, "mlp": 1376, "heads": 8, "kv_heads": 8, "vocab": 4096},
}


def llama(size: str) -> torch.nn.Module:
    """The Llama of ``size`` (transformers, fp32, seed 0)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    s = SIZES[size]
    config = LlamaConfig(
        vocab_size=s["vocab"],
        hidden_size=s["hidden"],
        intermediate_size=s["mlp"],
        num_hidden_layers=s["layers"],
        num_attention_heads=s["heads"],
        num_key_value_heads=s["kv_heads"],
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config).float()


def build_model(size: str) -> tuple[list[tuple[str, torch.nn.Parameter]], dict]:
    """The named parameters of a Llama of ``size`` and the info dict handed to ``Case.make``."""
    s = SIZES[size]
    model = llama(size)
    named = list(model.named_parameters())
    hints = param_hints(model)
    info = {"n_heads": s["heads"], "n_kv_heads": s["kv_heads"], "hidden": s["hidden"], "hints": hints}
    return named, info


def fresh_params(named: list[tuple[str, torch.nn.Parameter]], seed: int) -> list[tuple[str, torch.nn.Parameter]]:
    """Copies of the model's parameters with random gradients (same for every case)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for name, p in named:
        q = torch.nn.Parameter(p.detach().clone())
        q.grad = torch.randn(p.shape, generator=gen) * 1e-2
        out.append((name, q))
    return out


def discover(families: list[str] | None) -> dict[str, list[Case]]:
    """``{family: cases}`` from every module in ``benchmarks/cases`` (or the named ones)."""
    import benchmarks.cases as pkg

    names = families or sorted(m.name for m in pkgutil.iter_modules(pkg.__path__))
    by_family: dict[str, list[Case]] = {}
    for module_name in names:
        module = importlib.import_module(f"benchmarks.cases.{module_name}")
        for case in module.cases():
            by_family.setdefault(case.family, []).append(case)
    return by_family


def time_family(cases: list[Case], named: list, info: dict, seed: int) -> list[dict]:
    """Build every case, warm each up, then time their steps interleaved; one result row per case."""
    from eopt import state_bytes

    rows = []
    for case in cases:
        row = {"case": case, "opt": None, "times": [], "note": ""}
        try:
            row["opt"] = case.make(fresh_params(named, seed), info)
        except ImportError as e:
            row["note"] = f"n/a ({e.__class__.__name__}: {e})"
        rows.append(row)
    live = [r for r in rows if r["opt"] is not None]
    for r in live:
        for i in range(r["case"].warmup):
            if r["case"].before_step is not None:
                r["case"].before_step(r["opt"], i)
            r["opt"].step()
    for i in range(max((r["case"].steps for r in live), default=0)):
        for r in live:
            case, opt = r["case"], r["opt"]
            if i >= case.steps:
                continue
            if case.before_step is not None:
                case.before_step(opt, case.warmup + i)
            t0 = clock()
            opt.step()
            r["times"].append(clock() - t0)
    for r in live:
        r["ms"] = 1e3 * statistics.median(r["times"])
        r["state"] = state_bytes(r["opt"])
        r["opt"] = None
    return rows


def format_table(rows: list[dict]) -> str:
    base = next((r for r in rows if r["case"].baseline and "ms" in r), None)
    lines = [
        "| optimizer | ms/step (median) | vs baseline | state MiB | timed steps |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        name = r["case"].name + (" (baseline)" if r["case"].baseline else "")
        if "ms" not in r:
            lines.append(f"| {name} | {r['note']} | | | |")
            continue
        ratio = f"{r['ms'] / base['ms']:.2f}x" if base else "-"
        lines.append(f"| {name} | {r['ms']:.2f} | {ratio} | {r['state'] / 2**20:.2f} | {len(r['times'])} |")
    return "\n".join(lines)


def _median_time(fn, reps: int) -> float:
    fn()
    fn()
    times = []
    for _ in range(reps):
        t0 = clock()
        fn()
        times.append(clock() - t0)
    return statistics.median(times)


def ns_rates(named: list, info: dict, reps: int = 7) -> str:
    """eopt's batched Newton–Schulz GFLOP/s vs plain fp32 ``bmm`` GFLOP/s, per stack of same-shape matrices.

    Stacks are eopt.Muon's: hidden matrices grouped by stored shape (a tall stack iterates ``X^T X``). The
    plain rate runs the same three products per step with ``bmm`` (no scaling, no normalization).
    """
    from benchmarks.cases import split_params
    from eopt.newton_schulz import newton_schulz

    matrices, _ = split_params(named, info)
    stacks: dict[tuple[int, int], int] = {}
    for _, p in matrices:
        shape = tuple(p.reshape(p.shape[0], -1).shape)
        stacks[shape] = stacks.get(shape, 0) + 1
    steps = 5
    lines = [
        "| stack (k x rows x cols) | NS ms | NS GFLOP/s | bmm GFLOP/s | NS / bmm |",
        "|---|---:|---:|---:|---:|",
    ]
    gen = torch.Generator().manual_seed(1)
    for (rows, cols), k in stacks.items():
        m, n = min(rows, cols), max(rows, cols)
        x = torch.randn(k, rows, cols, generator=gen)
        a = torch.randn(k, m, m, generator=gen)
        flops = steps * k * 2 * (2 * m * m * n + m**3)
        t_ns = _median_time(lambda x=x: newton_schulz(x, steps=steps, coefficients="quintic"), reps)

        def plain(x=x, a=a, tall=rows > cols) -> None:
            for _ in range(steps):
                torch.bmm(x.mT, x) if tall else torch.bmm(x, x.mT)
                torch.bmm(a, a)
                torch.bmm(x, a) if tall else torch.bmm(a, x)

        t_mm = _median_time(plain, reps)
        ns_rate, mm_rate = flops / t_ns / 1e9, flops / t_mm / 1e9
        row = f"| {k} x {rows} x {cols} | {1e3 * t_ns:.2f} | {ns_rate:.1f} | {mm_rate:.1f} | {ns_rate / mm_rate:.0%} |"
        lines.append(row)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--family", default=None, help="comma-separated case modules (default: all)")
    parser.add_argument("--sizes", default="small,large", help=f"comma-separated, from {', '.join(SIZES)}")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall", help="wall time or this thread's CPU time")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    global clock
    clock = CLOCKS[args.clock]
    if args.clock == "cpu" and args.threads != 1:
        parser.error("--clock cpu counts the calling thread only: use it with --threads 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    families = args.family.split(",") if args.family else None
    sizes = args.sizes.split(",")
    bad = [s for s in sizes if s not in SIZES]
    if bad:
        parser.error(f"unknown size {bad[0]!r}: choose from {', '.join(SIZES)}")
    by_family = discover(families)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32, CPU, {args.clock} clock")
    for size in sizes:
        named, info = build_model(size)
        n_params = sum(p.numel() for _, p in named)
        s = SIZES[size]
        print(f"\n### {size}: Llama {s['layers']} x {s['hidden']}, vocab {s['vocab']}, {n_params / 1e6:.2f}M params\n")
        for family, cases in by_family.items():
            print(f"#### {family}\n")
            print(format_table(time_family(cases, named, info, args.seed)), "\n", flush=True)
        if "muon" in by_family:
            print("#### Newton-Schulz (quintic, 5 steps, fp32) vs plain bmm at the same shapes\n")
            print(ns_rates(named, info), "\n", flush=True)


if __name__ == "__main__":
    main()
