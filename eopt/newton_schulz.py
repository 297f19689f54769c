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

The batched path runs one ``baddbmm`` chain over a stack ``(k, m, n)`` of same-shape matrices, so that
many small matrices cost one set of BLAS calls instead of ``k``. Computing only half of the symmetric
``A`` and ``A A`` (2 x 2 blocks, 3/4 of their FLOPs) was measured slower here (strided block outputs and
more, smaller calls), so each step is the three plain calls.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch

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
# (cheaper in FLOPs above 1.5; 2 leaves room for the smaller products' lower BLAS efficiency).
GRAM_ASPECT = 2.0

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
    polynomial with fewer FLOPs) where it pays, i.e. where the long side is at least :data:`GRAM_ASPECT`
    times the short one and the dtype is float32 or float64; elsewhere the direct iteration.
    """
    if x.ndim not in (2, 3):
        raise ValueError(f"invalid x: newton_schulz takes a matrix or a stack of matrices, got shape {tuple(x.shape)}")
    if method not in ("direct", "gram"):
        raise ValueError(f"invalid method: must be 'direct' or 'gram', got {method!r}")
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
    operand by a flag, so tall matrices need no transposed copies in or out. ``b A + c A A`` and the final
    ``a X + ...`` each fold their scaling into one ``baddbmm``: a step is three BLAS calls.
    """
    if tall:
        A = torch.bmm(X.mT, X)
        B = torch.baddbmm(A, A, A, beta=b, alpha=c)
        return torch.baddbmm(X, X, B, beta=a, alpha=1.0)
    A = torch.bmm(X, X.mT)
    B = torch.baddbmm(A, A, A, beta=b, alpha=c)
    return torch.baddbmm(X, B, X, beta=a, alpha=1.0)


def gram_newton_schulz(X: torch.Tensor, schedule: Sequence[tuple[float, float, float]], tall: bool) -> torch.Tensor:
    """The Newton–Schulz polynomial evaluated on the small Gram matrix, applied to ``X`` once at the end.

    Each step is ``X_{t+1} = P_t X_t`` with ``P_t = a I + b A_t + c A_t^2`` a polynomial in
    ``A_t = X_t X_t^T``, so every ``P_t`` commutes with ``A_t`` and
    ``A_{t+1} = P_t A_t P_t = P_t (P_t A_t)``; the output is ``Q X_0`` with ``Q = P_{T-1} ... P_0``.
    For an m x n matrix (m <= n) that is ``(8T - 6) m^3 + 4 m^2 n`` FLOPs against ``T (2 m^3 + 4 m^2 n)``:
    fewer when ``n > 1.5 m`` (0.73x at n = 2.5 m, 5 steps). It is the same polynomial, but the rounding is
    not: the ``A`` recurrence carries an absolute error ~eps ||A||, which swamps the eigenvalues of tiny
    singular values. Measured in fp32 against a float64 reference: 2e-7 on a well-conditioned input (direct
    5e-7), 5e-5 to 3e-4 when the singular values span 2 to 5 decades (direct 1e-6 to 6e-6). Far below bf16
    NS's few percent, but not bit-faithful, so it is opt-in (``Muon(ns_method="gram")``) and never used in
    bf16, where the recurrence drifts.
    """
    A = torch.bmm(X.mT, X) if tall else torch.bmm(X, X.mT)
    Q = None
    for t, (a, b, c) in enumerate(schedule):
        P = torch.bmm(A, A).mul_(c).add_(A, alpha=b)
        P.diagonal(dim1=-2, dim2=-1).add_(a)
        Q = P if Q is None else torch.bmm(P, Q)
        if t < len(schedule) - 1:
            A = torch.bmm(P, torch.bmm(P, A))
    return torch.bmm(X, Q) if tall else torch.bmm(Q, X)
