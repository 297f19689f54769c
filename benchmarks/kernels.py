"""The matrix kernels behind Muon, SOAP and Shampoo, variant against variant, side by side in one process.

    python benchmarks/kernels.py [--threads 2] [--rounds 15]

Two tables, at the matrix shapes of ``benchmarks/optimizer_step.py``'s Llama parameter sets (fp32, CPU):

- symmetric products (``eopt.symmetric.symmetric_matmul``: upper panels only, mirrored) against one plain
  ``bmm`` computing the whole ``U U^T``;
- Newton–Schulz (``simple``, 5 steps) on eopt's stacks: the plain three-``bmm`` iteration on the whole
  stack (the implementation before panels and chunks), ``eopt.newton_schulz`` with ``method="direct"``
  (symmetric panels, cache-sized chunks) and with ``method="gram"`` (restarted Gram iteration where the
  matrix is at least twice as long as wide).

Variants of one row are timed interleaved, ``--rounds`` times each after a warm-up; the table gives medians
and the ratio to the first column.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from eopt.newton_schulz import coefficient_schedule, newton_schulz  # noqa: E402
from eopt.symmetric import symmetric_matmul  # noqa: E402

# (batch, rows, cols) of U in U U^T: Kronecker factors and NS Gram matrices of the small and large Llama sets.
SYMMETRIC_SHAPES = [(16, 256, 256), (8, 256, 640), (8, 640, 256), (32, 512, 512), (8, 512, 1376), (8, 1376, 512)]
# eopt.Muon's stacks (k same-shape matrices) on the small and large Llama sets.
NS_STACKS = [(16, 256, 256), (8, 640, 256), (4, 256, 640), (32, 512, 512), (16, 1376, 512), (8, 512, 1376)]


def interleaved(variants: dict[str, Callable[[], object]], rounds: int) -> dict[str, float]:
    """Median seconds of each variant, one call of each in turn per round, after one warm-up call each."""
    for fn in variants.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(rounds):
        for name, fn in variants.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


def plain_newton_schulz(x: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """The iteration as three plain ``bmm``-family calls per step on the whole stack."""
    X = x / (torch.linalg.vector_norm(x, dim=(-2, -1), keepdim=True) + 1e-7)
    tall = X.shape[-2] > X.shape[-1]
    for a, b, c in coefficient_schedule("simple", steps):
        A = torch.bmm(X.mT, X) if tall else torch.bmm(X, X.mT)
        B = torch.baddbmm(A, A, A, beta=b, alpha=c)
        X = torch.baddbmm(X, X, B, beta=a) if tall else torch.baddbmm(X, B, X, beta=a)
    return X


def table(title: str, columns: list[str], rows: list[tuple[str, dict[str, float]]]) -> str:
    head = " | ".join(f"{c} ms" if i == 0 else f"{c} ms (ratio)" for i, c in enumerate(columns))
    lines = [f"#### {title}\n", f"| shape | {head} |", "|---|" + "---:|" * len(columns)]
    for shape, t in rows:
        base = t[columns[0]]
        cells = [f"{1e3 * base:.2f}"] + [f"{1e3 * t[c]:.2f} ({t[c] / base:.2f}x)" for c in columns[1:]]
        lines.append(f"| {shape} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    parser.add_argument("--rounds", type=int, default=15, help="timed calls per variant (default 15)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    print(f"torch {torch.__version__}, {args.threads} threads, fp32, CPU, wall clock, median of {args.rounds}\n")

    rows = []
    for k, d, n in SYMMETRIC_SHAPES:
        u = torch.randn(k, d, n, generator=gen)
        variants = {"bmm": lambda u=u: torch.bmm(u, u.mT), "symmetric": lambda u=u: symmetric_matmul(u)}
        rows.append((f"{k} x {d} x {n}", interleaved(variants, args.rounds)))
    print(table("U U^T: plain bmm vs symmetric panels", ["bmm", "symmetric"], rows), "\n", flush=True)

    rows = []
    for k, m, n in NS_STACKS:
        x = torch.randn(k, m, n, generator=gen)
        variants = {
            "plain": lambda x=x: plain_newton_schulz(x),
            "direct": lambda x=x: newton_schulz(x, 5, method="direct"),
            "gram": lambda x=x: newton_schulz(x, 5, method="gram"),
        }
        rounds = max(3, args.rounds // 2) if k * m * n > 2**22 else args.rounds
        rows.append((f"{k} x {m} x {n}", interleaved(variants, rounds)))
    print(table("Newton-Schulz (simple, 5 steps) on a stack", ["plain", "direct", "gram"], rows), flush=True)


if __name__ == "__main__":
    main()
