"""Products known to be symmetric, computed from their upper panels (about 3/4 of the FLOPs of a GEMM).

Newton–Schulz (``X X^T``, ``A A`` and, on the Gram path, products of commuting polynomials in ``A``) and the
Kronecker factors of SOAP and Shampoo (``G G^T``) are symmetric by construction. BLAS's ``syrk`` is not
reachable through torch, so :func:`symmetric_matmul_` cuts the rows into k panels and multiplies panel i
with panels i..k-1 in one batched GEMM each (k(k+1)/2 of the k^2 blocks: 3/4 for k = 2, 5/8 for k = 4),
writing straight into the output's upper part, then mirrors it below the diagonal.
"""

from __future__ import annotations

import torch


def symmetric_panels(d: int) -> int:
    """Row panels for a ``d x d`` symmetric product: ``1`` (a plain GEMM) below 384, else 4.

    Measured on this project's 2-core CPU (fp32, 2 threads, ``benchmarks/kernels.py``) against one ``bmm``:
    4 panels take 0.72-0.86x its time at d = 512-1376 and 0.83x at 640; at 256 neither 2 nor 4 panels gain.
    """
    return 1 if d < 384 else 4


def symmetric_matmul_(
    out: torch.Tensor, u: torch.Tensor, v: torch.Tensor, beta: float = 0.0, alpha: float = 1.0
) -> torch.Tensor:
    """``out = beta * out + alpha * u v^T`` for stacks, where ``u v^T`` is known to be symmetric.

    ``u``, ``v``: ``(B, d, n)``; ``out``: ``(B, d, d)``, symmetric on entry unless ``beta == 0`` (then its
    contents are ignored, NaN included). Only the upper panels are multiplied; the part below the diagonal
    panels is copied from its mirror (the diagonal blocks are full GEMM blocks, symmetric to rounding).
    """
    d = out.shape[-1]
    k = symmetric_panels(d)
    if k == 1:
        return out.baddbmm_(u, v.mT, beta=beta, alpha=alpha)
    edges = [d * i // k for i in range(k + 1)]
    for i in range(k):
        rows, upper = slice(edges[i], edges[i + 1]), slice(edges[i], d)
        out[:, rows, upper].baddbmm_(u[:, rows], v[:, upper].mT, beta=beta, alpha=alpha)
    for i in range(k - 1):
        rows, below = slice(edges[i], edges[i + 1]), slice(edges[i + 1], d)
        out[:, below, rows].copy_(out[:, rows, below].mT)
    return out


def symmetric_matmul(u: torch.Tensor, v: torch.Tensor | None = None) -> torch.Tensor:
    """A new tensor ``u v^T`` (``u u^T`` when ``v`` is None), known to be symmetric (see :func:`symmetric_matmul_`)."""
    v = u if v is None else v
    return symmetric_matmul_(u.new_empty(u.shape[0], u.shape[1], v.shape[1]), u, v)
