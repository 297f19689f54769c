"""Newton–Schulz orthogonalization: the matrix kernel of Muon.

For a matrix ``G`` with SVD ``U S V^T`` the iteration drives every singular value towards 1, giving an
approximation of the polar factor ``U V^T`` (Bernstein & Newhouse, arXiv 2409.20325; Jordan et al.,
"Muon", 2024). With ``X`` oriented wide (``m <= n``) and normalized so that its spectral norm is at
most 1, each step applies the odd quintic ``p(x) = a x + b x^3 + c x^5`` to the singular values::

    A = X X^T                  (m x m, symmetric)
    B = b A + c A A
    X = a X + B X

(a tall matrix runs the transposed form ``A = X^T X``, ``X = a X + X B``). Every step costs
``2 * (2 m^2 n + m^3)`` FLOPs. Coefficient schedules (:data:`COEFFICIENTS`) are those of
NVIDIA Emerging-Optimizers 0.3.0; ``polar_express`` and ``cans`` repeat their last triple when more steps
are asked for, the others cycle.

The batched path runs one chain of batched GEMMs over a stack ``(k, m, n)`` of same-shape matrices, so that
many small matrices cost one set of BLAS calls instead of ``k`` (on CPU in chunks that stay in cache, see
:data:`CPU_CHUNK_ELEMENTS`). ``A`` and ``A A`` are symmetric, so they are computed from their upper panels
(:func:`eopt.symmetric.symmetric_matmul`).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch

from eopt.symmetric import symmetric_matmul

Coefficients = str | Sequence[Sequence[float]]

COEFFICIENTS: dict[str, tuple[tuple[float, float, float], ...]] = {
    # Keller Jordan's Muon: one triple, cycled (fast growth near 0, singular values end in ~[0.7, 1.2]).
    "simple": ((3.4445, -4.7750, 2.0315),),
    # modded-nanogpt's per-step quintic (NVIDIA's default), cycled.
    "quintic": (
        (4.0848, -6.8946, 2.9270),
        (3.9505, -6.3029, 2.6377),
        (3.7418, -5.5913, 2.3037),
        (2.8769, -3.1427, 1.2046),
        (2.8366, -3.0525, 1.2012),
    ),
    # Polar Express (Amsel et al., arXiv 2505.16932, Alg. 1) with its 1.01 safety factor folded in; last repeats.
    "polar_express": (
        (8.2051, -22.9019, 16.4607),
        (4.0664, -2.8612, 0.5184),
        (3.9096, -2.8234, 0.5250),
        (3.2856, -2.4153, 0.4853),
        (2.2779, -1.6198, 0.3985),
        (1.8726, -1.2307, 0.3585),
        (1.8564, -1.2132, 0.3568),
        (1.8750, -1.2500, 0.3750),
    ),
    # CANS (Grishina et al., arXiv 2506.10935), Remez polynomials on an adaptive interval; last repeats.
    "cans": (
        (8.4703, -25.1081, 18.6293),
        (4.1828, -3.1087, 0.5806),
        (3.9619, -2.9541, 0.5630),
        (3.2866, -2.4647, 0.5074),
        (2.2737, -1.6447, 0.4162),
    ),
    # flash-newton-schulz's schedule (Boissin et al.), cycled. It assumes AOL preconditioning of the input: with
    # plain Frobenius normalization (as NVIDIA 0.3.0 runs it) p(1) < 0, so singular values between ~0.01 and ~0.7
    # of the input's norm come out negative. Kept for parity with NVIDIA; prefer another set.
    "aol": (
        (4.0098, -7.0585, 2.4635),
        (3.4585, -5.5479, 2.5959),
        (2.7573, -3.2939, 1.4254),
        (2.7215, -3.0494, 1.3169),
    ),
}

REPEAT_LAST = ("polar_express", "cans")

# Long/short side ratio from which newton_schulz(method="gram") evaluates the polynomial on the Gram matrix
# (cheaper in FLOPs above 1.5 with restarts every GRAM_RESTART steps; 2 leaves room for the m x m products'
# lower BLAS efficiency).
GRAM_ASPECT = 2.0

# Steps between restarts of the Gram iteration (X and its Gram matrix recomputed from the current iterate).
# Measured in fp32 against a float64 reference, 5 steps, 64-640 wide matrices with singular values spanning
# 2 to 6 decades, every coefficient set: restarting every 3 steps keeps the relative error within 6x of the
# direct iteration's and below 6e-5; every 2 steps within 2x (but up to 10% slower); never, up to 50x and 4e-4.
GRAM_RESTART = 3

# Largest stack (in elements, but at least 2 matrices, one per thread of this 2-core CPU) that one batched CPU
# iteration runs on: a longer stack is iterated in chunks so that X, A, B and the new X of a chunk stay in
# cache (2 MiB L2 per core). Measured with 2 threads, 5 steps (benchmarks/kernels.py): with the symmetric
# panels, 32 x 512 x 512 takes 0.77x and 16 x 256 x 256 0.90x the time of the plain whole-stack iteration.
CPU_CHUNK_ELEMENTS = 2**18

# Band the singular values land in after 5 steps, for an input whose singular values span two decades
# (checked in tests). "aol" has none under plain normalization (see above).
EXPECTED_BAND: dict[str, tuple[float, float]] = {
    "simple": (0.6, 1.25),
    "quintic": (0.6, 1.25),
    "polar_express": (0.8, 1.2),
    "cans": (0.8, 1.2),
}


def check_coefficients(coefficients: Coefficients) -> str | None:
    """``None`` if ``coefficients`` is a known name or a non-empty list of (a, b, c) triples, else why not."""
    if isinstance(coefficients, str):
        if coefficients not in COEFFICIENTS:
            return f"must be one of {', '.join(COEFFICIENTS)} or a list of (a, b, c), got {coefficients!r}"
        return None
    try:
        triples = [tuple(float(v) for v in t) for t in coefficients]
    except (TypeError, ValueError):
        return f"must be a name or a list of (a, b, c) numbers, got {coefficients!r}"
    if not triples or any(len(t) != 3 for t in triples):
        return f"a custom list needs at least one triple and exactly 3 numbers per triple, got {coefficients!r}"
    return None


def coefficient_schedule(coefficients: Coefficients, steps: int) -> list[tuple[float, float, float]]:
    """The ``steps`` (a, b, c) triples to apply: named sets cycle or repeat their last; custom lists cycle."""
    if isinstance(coefficients, str):
        triples = COEFFICIENTS[coefficients]
        if coefficients in REPEAT_LAST:
            source = itertools.chain(triples, itertools.repeat(triples[-1]))
            return list(itertools.islice(source, steps))
    else:
        triples = tuple(tuple(float(v) for v in t) for t in coefficients)
    return list(itertools.islice(itertools.cycle(triples), steps))


def newton_schulz(
    x: torch.Tensor,
    steps: int = 5,
    coefficients: Coefficients = "simple",
    eps: float = 1e-7,
    dtype: torch.dtype | None = None,
    method: str = "direct",
) -> torch.Tensor:
    """Orthogonalize ``x`` (``(m, n)`` or a stack ``(k, m, n)``) with ``steps`` Newton–Schulz steps.

    Each matrix is divided by ``||x||_F + eps`` (so a zero matrix stays zero), iterated in ``dtype``
    (default: ``x.dtype``) and returned in ``x``'s dtype and shape. A tall matrix is iterated as the
    transpose of a wide one without materializing the transpose (see :func:`newton_schulz_step`).

    ``method``: ``"direct"`` (the iteration as written) or ``"gram"``: :func:`gram_newton_schulz` (the same
    polynomial with fewer FLOPs, as accurate) where it pays, i.e. where the long side is at least
    :data:`GRAM_ASPECT` times the short one and the dtype is float32 or float64; elsewhere the direct iteration.
    """
    if x.ndim not in (2, 3):
        raise ValueError(f"invalid x: newton_schulz takes a matrix or a stack of matrices, got shape {tuple(x.shape)}")
    if method not in ("direct", "gram"):
        raise ValueError(f"invalid method: must be 'direct' or 'gram', got {method!r}")
    chunk = max(2, CPU_CHUNK_ELEMENTS // (x.shape[-2] * x.shape[-1]))
    if x.ndim == 3 and x.device.type == "cpu" and x.shape[0] > chunk:
        out = torch.empty_like(x)
        for part, dst in zip(x.split(chunk), out.split(chunk), strict=True):
            dst.copy_(newton_schulz(part, steps, coefficients, eps, dtype, method))
        return out
    norm = torch.linalg.vector_norm(x, dim=(-2, -1), keepdim=True, dtype=torch.promote_types(x.dtype, torch.float32))
    X = (x / norm.add_(eps)).to(dtype or x.dtype)
    X = X.unsqueeze(0) if X.ndim == 2 else X
    tall = X.size(-2) > X.size(-1)
    schedule = coefficient_schedule(coefficients, steps)
    short, long = sorted(X.shape[-2:])
    if method == "gram" and long >= GRAM_ASPECT * short and steps > 1 and X.dtype in (torch.float32, torch.float64):
        X = gram_newton_schulz(X, schedule, tall)
    else:
        for a, b, c in schedule:
            X = newton_schulz_step(X, a, b, c, tall)
    return X.to(x.dtype).reshape(x.shape)


def newton_schulz_step(X: torch.Tensor, a: float, b: float, c: float, tall: bool = False) -> torch.Tensor:
    """One step on a stack ``X`` (k, m, n): ``X <- a X + (b A + c A A) X`` with ``A = X X^T`` (wide, m <= n).

    A tall stack is the transpose ``W^T`` of a wide one, and the same step on ``W`` reads
    ``X <- a X + X (b A + c A A)`` with ``A = X^T X`` (``B`` is symmetric): BLAS takes the transposed
    operand by a flag, so tall matrices need no transposed copies in or out. ``A`` and ``A A = A A^T`` are
    symmetric products (upper panels only); the final ``a X + B X`` is one ``baddbmm``.
    """
    A = symmetric_matmul(X.mT if tall else X)
    B = symmetric_matmul(A).mul_(c).add_(A, alpha=b)
    if tall:
        return torch.baddbmm(X, X, B, beta=a, alpha=1.0)
    return torch.baddbmm(X, B, X, beta=a, alpha=1.0)


def gram_newton_schulz(X: torch.Tensor, schedule: Sequence[tuple[float, float, float]], tall: bool) -> torch.Tensor:
    """The Newton–Schulz polynomial evaluated on the small Gram matrix, restarted every :data:`GRAM_RESTART` steps.

    Each step is ``X_{t+1} = P_t X_t`` with ``P_t = a I + b A_t + c A_t^2`` a polynomial in
    ``A_t = X_t X_t^T``, so every ``P_t`` commutes with ``A_t`` and ``A_{t+1} = P_t A_t P_t``; a run of steps
    is ``Q X_s`` with ``Q = P_{t} ... P_s``, computed on m x m matrices only (Dao AI Lab, "Gram Newton-Schulz",
    2026). The ``A`` recurrence accumulates an absolute rounding error ~eps ||A|| that swamps the eigenvalues
    of small singular values (up to 50x the direct iteration's error over 5 steps), so every
    :data:`GRAM_RESTART` steps ``X`` is formed and its Gram matrix recomputed (then within 6x of the direct
    iteration's fp32 error, below 6e-5 relative, in tests against float64). For an m x n matrix (m <= n), 5
    steps cost ``8 m^2 n + 28 m^3`` FLOPs against ``20 m^2 n + 10 m^3`` (0.8x at n = 2.5 m), and every m x m
    product is symmetric (upper panels only).
    """
    for start in range(0, len(schedule), GRAM_RESTART):
        X = _gram_run(X, schedule[start : start + GRAM_RESTART], tall)
    return X


def _gram_run(X: torch.Tensor, schedule: Sequence[tuple[float, float, float]], tall: bool) -> torch.Tensor:
    """``Q X`` (``X Q`` if tall) for one run of steps from ``X``; all m x m products commute, so are symmetric."""
    A = symmetric_matmul(X.mT if tall else X)
    Q = None
    for t, (a, b, c) in enumerate(schedule):
        P = symmetric_matmul(A).mul_(c).add_(A, alpha=b)
        P.diagonal(dim1=-2, dim2=-1).add_(a)
        Q = P if Q is None else symmetric_matmul(P, Q)
        if t < len(schedule) - 1:
            A = symmetric_matmul(P, symmetric_matmul(P, A))
    return torch.bmm(X, Q) if tall else torch.bmm(Q, X)
