"""SOAP: Shampoo with Adam in the preconditioner's eigenbasis."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from eopt.base import ParamGroups, check
from eopt.kronecker import (
    KroneckerOptimizer,
    contract,
    eigh_descending,
    merge_small_dims,
    power_qr,
    sort_basis,
    update_factor_,
)

FACTOR_UPDATE_ORDERS = ("after", "before")
MATMUL_PRECISIONS = ("highest", "high", "medium")


class SOAP(KroneckerOptimizer):
    """SOAP (Vyas et al., "SOAP: Improving and Stabilizing Shampoo using Adam", arXiv 2409.11321).

    Adam run in the eigenbasis of Shampoo's Kronecker factors. For a matrix ``W`` with gradient ``G``, factors
    ``L``, ``R``, eigenbases ``Q_L``, ``Q_R`` and Adam step ``t`` (defaults reproduce the authors' soap.py)::

        first call:  L = (1-sb) G G^T;  R = (1-sb) G^T G;  Q_L, Q_R = eigh(L), eigh(R)   (descending)
                     no parameter update
        then:        G' = Q_L^T G Q_R;  t += 1
                     m = b1 m + (1-b1) G'                      (momentum kept in the eigenbasis)
                     v = b2 v + (1-b2) G'^2
                     W -= lr sqrt(1-b2^t)/(1-b1^t) * Q_L (m / (sqrt(v) + eps)) Q_R^T
                     W *= 1 - lr wd                             (decoupled, after the update)
                     L = sb L + (1-sb) G G^T;  R = sb R + (1-sb) G^T G
                     if t % precondition_frequency == 0, per factor F with basis Q:
                         order Q's columns by diag(Q^T F Q) descending; permute v's axis the same way
                         Q = qr(F Q).Q                          (one power iteration)
                         m is re-expressed in the new basis (rotated back with the old Q, in with the new)

    ``sb = shampoo_beta`` (``betas[1]`` when negative). A dim larger than ``max_precond_dim`` gets no factor
    (identity rotation on that side: one-sided SOAP, e.g. vocabulary-sized dims); 1-D parameters are
    rotated only with ``precondition_1d``; a k-D parameter has one factor per dim (after ``merge_dims``,
    which merges adjacent dims while their product stays ``<= max_precond_dim``).

    Options of NVIDIA's variant (Emerging-Optimizers), all off by default:

    - ``factor_update_order="before"``: factors (and a due refresh) use the current gradient *before* the
      Adam step, so the first call already updates the parameters and a refresh at step ``t`` is used by
      step ``t`` itself.
    - ``precondition_frequency`` may be a callable ``t -> frequency``; ``precondition_warmup_steps``
      refreshes at every step ``t <= precondition_warmup_steps``.
    - ``adam_warmup_steps=k``: steps ``1..k`` are plain Adam on ``G`` (no rotation) while the factors
      accumulate; the basis is then built by ``eigh`` and ``m`` rotated into it.
    - ``use_eigh``: refresh by a full ``eigh`` (descending) instead of power iteration + QR;
      ``power_iter_steps``: power iterations (each followed by QR) per refresh.
    - ``use_adaptive_criteria``: a factor's refresh is skipped when its basis still diagonalizes it,
      ``||diag(Q^T F Q)||_F >= (1 - adaptive_update_tolerance) ||F||_F``.
    - ``use_nesterov``: the numerator is ``b1 m/(1-b1^(t+1)) + (1-b1) G'/(1-b1^t)``.
    - ``correct_shampoo_beta_bias``: the n-th factor update uses ``sb_n = 1 - (1-sb)/(1-sb^n)``.
    - On the bias-corrected update ``U = step/lr * Q_L (...) Q_R^T``: ``trace_normalization`` multiplies it by
      ``sqrt(trace(F_0))`` (first factor), ``normalize_preconditioned_grads`` divides it by its RMS,
      ``max_update_rms > 0`` scales it down to that RMS; then ``W -= lr U``.
    - ``matmul_precision``: ``torch.set_float32_matmul_precision`` for the matrix work on CUDA (tf32 with
      ``"high"``); ignored on CPU, where everything stays fp32.

    ``normalize_grads`` is the authors' option: ``U / RMS(U)`` before the bias-corrected step size.
    Same-shape parameters of a group are updated together: one batched GEMM per rotation and factor, one
    batched QR / eigh per refresh. An eigh failure retries in float64, then keeps the previous basis and
    counts the event in ``state[p]["basis_failures"]`` (their sum is :meth:`metrics`' ``soap_basis_failures``).

    Under DDP, FSDP2 and HSDP, ``matrix_update="owner"`` (the default) runs each matrix's SOAP once, on its
    owner rank, which alone holds the matrix's moments, factors and bases; every rank adds its rows of the
    direction and decays them. ``"replicated"`` runs every matrix on every rank on full, replicated state (the
    reference). See :class:`eopt.kronecker.KroneckerOptimizer`.
    """

    algorithm = "soap"

    def __init__(
        self,
        params: ParamGroups,
        lr: float = 3e-3,
        betas: tuple[float, float] = (0.95, 0.95),
        shampoo_beta: float = -1.0,
        eps: float = 1e-8,
        weight_decay: float = 0.01,
        precondition_frequency: int | Callable[[int], int] = 10,
        max_precond_dim: int = 10000,
        merge_dims: bool = False,
        precondition_1d: bool = False,
        normalize_grads: bool = False,
        correct_bias: bool = True,
        factor_update_order: str = "after",
        precondition_warmup_steps: int = 0,
        adam_warmup_steps: int = 0,
        use_eigh: bool = False,
        power_iter_steps: int = 1,
        use_adaptive_criteria: bool = False,
        adaptive_update_tolerance: float = 1e-7,
        max_update_rms: float = 0.0,
        trace_normalization: bool = False,
        normalize_preconditioned_grads: bool = False,
        use_nesterov: bool = False,
        correct_shampoo_beta_bias: bool = False,
        matmul_precision: str = "highest",
        matrix_update: str = "owner",
    ) -> None:
        defaults = {
            "lr": lr,
            "betas": tuple(betas),
            "shampoo_beta": shampoo_beta,
            "eps": eps,
            "weight_decay": weight_decay,
            "precondition_frequency": precondition_frequency,
            "max_precond_dim": max_precond_dim,
            "merge_dims": merge_dims,
            "precondition_1d": precondition_1d,
            "normalize_grads": normalize_grads,
            "correct_bias": correct_bias,
            "factor_update_order": factor_update_order,
            "precondition_warmup_steps": precondition_warmup_steps,
            "adam_warmup_steps": adam_warmup_steps,
            "use_eigh": use_eigh,
            "power_iter_steps": power_iter_steps,
            "use_adaptive_criteria": use_adaptive_criteria,
            "adaptive_update_tolerance": adaptive_update_tolerance,
            "max_update_rms": max_update_rms,
            "trace_normalization": trace_normalization,
            "normalize_preconditioned_grads": normalize_preconditioned_grads,
            "use_nesterov": use_nesterov,
            "correct_shampoo_beta_bias": correct_shampoo_beta_bias,
            "matmul_precision": matmul_precision,
            "matrix_update": matrix_update,
        }
        super().__init__(params, defaults)

    def _check_group(self, group: dict) -> None:
        check("lr", group["lr"] >= 0.0, f"must be >= 0, got {group['lr']}")
        betas = group["betas"]
        check("betas", len(betas) == 2 and all(0.0 <= b < 1.0 for b in betas), f"each must be in [0, 1), got {betas}")
        sb = group["shampoo_beta"]
        check("shampoo_beta", sb < 1.0, f"must be < 1 (negative means betas[1]), got {sb}")
        check("eps", group["eps"] >= 0.0, f"must be >= 0, got {group['eps']}")
        check("weight_decay", group["weight_decay"] >= 0.0, f"must be >= 0, got {group['weight_decay']}")
        freq = group["precondition_frequency"]
        check(
            "precondition_frequency",
            callable(freq) or (isinstance(freq, int) and freq >= 1),
            f"must be an int >= 1 or a callable of the step, got {freq!r}",
        )
        check("max_precond_dim", group["max_precond_dim"] >= 1, f"must be >= 1, got {group['max_precond_dim']}")
        order = group["factor_update_order"]
        check("factor_update_order", order in FACTOR_UPDATE_ORDERS, f"must be 'after' or 'before', got {order!r}")
        for key in ("precondition_warmup_steps", "adam_warmup_steps"):
            check(key, group[key] >= 0, f"must be >= 0, got {group[key]}")
        check("power_iter_steps", group["power_iter_steps"] >= 1, f"must be >= 1, got {group['power_iter_steps']}")
        tol = group["adaptive_update_tolerance"]
        check("adaptive_update_tolerance", 0.0 <= tol <= 1.0, f"must be in [0, 1], got {tol}")
        rms = group["max_update_rms"]
        check("max_update_rms", rms >= 0.0, f"must be >= 0 (0 = off), got {rms}")
        prec = group["matmul_precision"]
        check("matmul_precision", prec in MATMUL_PRECISIONS, f"must be one of {MATMUL_PRECISIONS}, got {prec!r}")
        super()._check_group(group)

    # ------------------------------------------------------------------------------------ layout

    @staticmethod
    def layout(group: dict, shape: tuple[int, ...]) -> tuple[list[int], list[int]]:
        """``(work_shape, dims)``: the shape the gradient is viewed as and its dims that get a factor."""
        max_dim = group["max_precond_dim"]
        if len(shape) <= 1:
            n = shape[0] if shape else 1
            return [n], ([0] if group["precondition_1d"] and n <= max_dim else [])
        work = merge_small_dims(shape, max_dim) if group["merge_dims"] else list(shape)
        return work, [i for i, n in enumerate(work) if n <= max_dim]

    def _state_spec(self, group: dict, shape: tuple[int, ...], dtype: torch.dtype) -> list[tuple[str, tuple, str]]:
        work, dims = self.layout(group, shape)
        spec = [("exp_avg", shape, "zeros"), ("exp_avg_sq", shape, "zeros")]
        for d in dims:
            spec += [(f"factor_{d}", (work[d], work[d]), "zeros"), (f"basis_{d}", (work[d], work[d]), "eye")]
        return [*spec, ("basis_failures", (), "zeros")]

    # -------------------------------------------------------------------------------------- step

    def metrics(self) -> dict[str, torch.Tensor]:
        """``soap_basis_failures``: eigenbasis computations that failed in float64 too, summed over parameters."""
        return {"soap_basis_failures": self._state_total("basis_failures")}

    def _direction(
        self, group: dict, shape: tuple[int, ...], grads: torch.Tensor, state: dict, calls: int
    ) -> torch.Tensor | None:
        return soap_direction(group, shape, grads, state, calls)

    def _moves(self, group: dict, calls: int) -> bool:
        return soap_step_size(group, calls) is not None

    def _apply(self, group: dict, weights: list[torch.Tensor], directions: list[torch.Tensor], calls: int) -> None:
        step_size = soap_step_size(group, calls)
        torch._foreach_add_(weights, directions, alpha=-step_size)
        if group["weight_decay"] != 0.0:
            torch._foreach_mul_(weights, 1.0 - group["lr"] * group["weight_decay"])

    def _cost(self, group: dict, shape: tuple[int, ...]) -> float:
        """Per step: a factor product and three rotations (in, in, back) along every preconditioned dim; per
        refresh (every ``precondition_frequency`` steps, amortized): the power product, QR and the momentum's
        re-expression."""
        work, dims = self.layout(group, shape)
        numel = math.prod(work)
        every = _frequency(group, 1)  # a callable frequency: its value at the first step
        per_step = sum(2 * numel * work[d] * 4 for d in dims)
        per_refresh = sum(2 * work[d] ** 3 + 4 * work[d] ** 3 + 2 * 2 * numel * work[d] for d in dims)
        return float(per_step + per_refresh / every)


def _frequency(group: dict, t: int) -> int:
    freq = group["precondition_frequency"]
    return int(freq(t)) if callable(freq) else freq


def _refresh_due(group: dict, t: int) -> bool:
    return t <= group["precondition_warmup_steps"] or t % _frequency(group, t) == 0


def _rotate(x: torch.Tensor, state: dict, dims: list[int], into: bool) -> torch.Tensor:
    for d in dims:
        x = contract(x, state[f"basis_{d}"], d + 1, transpose=into)
    return x


def _update_factors(group: dict, state: dict, g: torch.Tensor, dims: list[int], n: int) -> None:
    """EMA of ``G_(d) G_(d)^T`` for every preconditioned dim (``n`` = index of this factor update, 1-based)."""
    sb = group["shampoo_beta"] if group["shampoo_beta"] >= 0 else group["betas"][1]
    if group["correct_shampoo_beta_bias"]:
        sb = 1.0 - (1.0 - sb) / (1.0 - sb**n)
    for d in dims:
        update_factor_(state[f"factor_{d}"], g, d + 1, weight=1.0 - sb, plain=n == 1)


def _build_basis(state: dict, dims: list[int]) -> None:
    """Eigenbases of the factors by ``eigh`` (the first basis, or the end of an Adam warmup)."""
    for d in dims:
        basis = state[f"basis_{d}"]
        _, q = eigh_descending(state[f"factor_{d}"], previous=basis, failures=state["basis_failures"], jitter=1e-30)
        basis.copy_(q)


def _permute_along(x: torch.Tensor, order: torch.Tensor, dim: int) -> torch.Tensor:
    """``x`` (batched) with dim ``dim`` permuted by the per-batch permutation ``order`` (``(B, n)``)."""
    shape = [1] * x.ndim
    shape[0], shape[dim] = order.shape
    return x.gather(dim, order.reshape(shape).expand_as(x))


def _refresh(group: dict, state: dict, dims: list[int], work: list[int], eigen: bool) -> None:
    """Refresh every basis (power iteration + QR, or eigh), permute v, re-express m in the new basis."""
    exp_avg = state["exp_avg"].view(-1, *work)
    exp_avg_sq = state["exp_avg_sq"].view(-1, *work)
    m = _rotate(exp_avg, state, dims, into=False)
    v = exp_avg_sq
    failures = state["basis_failures"]
    for d in dims:
        factor, basis = state[f"factor_{d}"], state[f"basis_{d}"]
        fq, q_sorted, order = sort_basis(factor, basis)
        if eigen:
            _, new = eigh_descending(factor, previous=q_sorted, failures=failures, jitter=1e-30)
        else:
            new = power_qr(fq, factor, group["power_iter_steps"])
            bad = ~torch.isfinite(new).all(dim=-1).all(dim=-1)
            failures.add_(bad.to(failures.dtype))
            new = torch.where(bad[:, None, None], q_sorted, new)
        if group["use_adaptive_criteria"]:
            diag_norm = torch.linalg.vector_norm((q_sorted * fq).sum(dim=-2), dim=-1)
            keep = diag_norm >= (1.0 - group["adaptive_update_tolerance"]) * torch.linalg.matrix_norm(factor)
            new = torch.where(keep[:, None, None], basis, new)
            identity = torch.arange(order.shape[-1], device=order.device).expand_as(order)
            order = torch.where(keep[:, None], identity, order)
        v = _permute_along(v, order, d + 1)
        basis.copy_(new)
    exp_avg_sq.copy_(v)
    exp_avg.copy_(_rotate(m, state, dims, into=True))


def _rms(x: torch.Tensor) -> torch.Tensor:
    """Per-batch-entry RMS, shaped to broadcast against ``x``."""
    return x.square().mean(dim=tuple(range(1, x.ndim)), keepdim=True).sqrt()


def _t(group: dict, calls: int) -> int:
    """The step's index in the authors' count (0: the first step of ``factor_update_order="after"``)."""
    n = calls + 1
    return n if (group["factor_update_order"] == "before" or group["adam_warmup_steps"] > 0) else n - 1


def _bias_corrected_step_size(group: dict, t: int) -> float:
    beta1, beta2 = group["betas"]
    bias1 = 1.0 - beta1**t if group["correct_bias"] else 1.0
    bias2 = 1.0 - beta2**t if group["correct_bias"] else 1.0
    return group["lr"] * math.sqrt(bias2) / (1.0 if group["use_nesterov"] else bias1)


def _nvidia(group: dict) -> bool:
    return group["trace_normalization"] or group["normalize_preconditioned_grads"] or group["max_update_rms"] > 0


def soap_step_size(group: dict, calls: int) -> float | None:
    """``s`` in ``W -= s U`` (then decay) for the step after ``calls`` steps; ``None`` for the first step of
    ``factor_update_order="after"``, which only builds the basis and leaves the weights alone."""
    t = _t(group, calls)
    if group["factor_update_order"] != "before" and t == 0:
        return None
    return group["lr"] if _nvidia(group) else _bias_corrected_step_size(group, t)


@torch.no_grad()
def soap_direction(
    group: dict, shape: tuple[int, ...], grads: torch.Tensor, state: dict, calls: int
) -> torch.Tensor | None:
    """One SOAP step's direction ``U`` for a batch of same-shape parameters (see :class:`SOAP`), with
    ``W -= soap_step_size(group, calls) * U`` and then the decay to follow.

    ``grads``: ``(B, *shape)`` full gradients; ``state``: batched state tensors (``exp_avg``, ``exp_avg_sq``,
    ``factor_d``/``basis_d``, ``basis_failures``), updated in place (factors and bases too); ``calls``: how
    many times these parameters were stepped before. Works for a batch of one too (the single-tensor path).
    Returns ``None`` on a step that only builds the basis.
    """
    work, dims = SOAP.layout(group, shape)
    g = grads.reshape(-1, *work)
    n = calls + 1
    before = group["factor_update_order"] == "before"
    warmup = group["adam_warmup_steps"]
    t = _t(group, calls)

    if before:
        _update_factors(group, state, g, dims, n)
        if t == warmup + 1:
            _build_basis(state, dims)
            if warmup > 0:
                state["exp_avg"].copy_(_rotate(state["exp_avg"].view(-1, *work), state, dims, into=True).view_as(grads))
        elif t > warmup + 1 and dims and _refresh_due(group, t):
            _refresh(group, state, dims, work, group["use_eigh"])
    elif t == 0:
        _update_factors(group, state, g, dims, n)
        _build_basis(state, dims)
        return None

    beta1, beta2 = group["betas"]
    rotate = t > warmup
    gp = _rotate(g, state, dims, into=True) if rotate else g
    exp_avg = state["exp_avg"].view(-1, *work)
    exp_avg_sq = state["exp_avg_sq"].view(-1, *work)
    exp_avg.lerp_(gp, 1.0 - beta1)
    exp_avg_sq.lerp_(gp.square(), 1.0 - beta2)

    lr = group["lr"]
    if group["use_nesterov"]:
        bias1 = 1.0 - beta1**t if group["correct_bias"] else 1.0
        bias1_next = 1.0 - beta1 ** (t + 1) if group["correct_bias"] else 1.0
        numerator = exp_avg.mul(beta1 / bias1_next).add_(gp, alpha=(1.0 - beta1) / bias1)
    else:
        numerator = exp_avg
    update = numerator / exp_avg_sq.sqrt().add_(group["eps"])
    if rotate:
        update = _rotate(update, state, dims, into=False)
    if group["normalize_grads"]:
        update = update / (_rms(update) + 1e-30)

    if _nvidia(group):
        # NVIDIA's options act on the bias-corrected update U with W -= lr * U.
        update = update * (_bias_corrected_step_size(group, t) / lr) if lr > 0 else update
        if group["trace_normalization"] and 0 in dims:
            trace = state["factor_0"].diagonal(dim1=-2, dim2=-1).sum(-1)
            update = update * trace.sqrt().reshape(-1, *[1] * len(work))
        if group["normalize_preconditioned_grads"]:
            update = update / (_rms(update) + 1e-30)
        if group["max_update_rms"] > 0:
            update = update * (group["max_update_rms"] / (_rms(update) + 1e-7)).clamp(max=1.0)

    if not before:
        _update_factors(group, state, g, dims, n)
        if warmup > 0 and t == warmup:
            _build_basis(state, dims)
            exp_avg.copy_(_rotate(exp_avg, state, dims, into=True))
        elif t > warmup and dims and _refresh_due(group, t):
            _refresh(group, state, dims, work, group["use_eigh"])
    return update.reshape(grads.shape)
