"""Adafactor: adaptive learning rates with sublinear memory cost (Shazeer & Stern 2018, arXiv 1804.04235).

With ``torch.optim.Adafactor``'s exact semantics for the same arguments. For a parameter ``p`` with
gradient ``g`` at step ``t`` (``eps1`` defaults to the dtype's machine epsilon)::

    beta2_t = 1 - t^beta2_decay
    alpha   = min(lr, 1/sqrt(t)) * max(eps2, RMS(p))        (relative_step=True; else alpha = lr)
    p      *= 1 - lr * weight_decay
    matrices (factored over the last two dims):
        R = beta2_t R + (1 - beta2_t) mean_cols(g^2)        (one value per row)
        C = beta2_t C + (1 - beta2_t) mean_rows(g^2)        (one value per column)
        V = R C / max(mean(R), eps1)
    vectors:  V = beta2_t V + (1 - beta2_t) g^2
    U  = g / max(sqrt(V), eps1)
    U /= max(1, RMS(U) / d)                                 (update clipping)
    m  = beta1 m + (1 - beta1) U;  U = m                    (only with beta1: momentum on the clipped update)
    p -= alpha U

``relative_step=False`` makes ``lr`` the absolute step size (what learning-rate sweeps need); the paper's
parameter-scale and ``1/sqrt(t)`` factors then drop out.

On FSDP2/HSDP shards (``DTensor`` parameters cut along dim 0, see :mod:`eopt.distributed`) the elementwise
state (``variance``, ``exp_avg``) and ``R`` (one value per row, which each rank holds whole) are sharded like
the parameter and updated on the local rows, and so is ``C`` of a tensor of 3 or more dims (dim 0 is then a
batch dim). What spans shards is reduced as partial sums over the shard groups, in two all-reduces per param
group: first ``sum(p^2)`` (relative step), and for a matrix ``sum(R)`` and the column sums of ``g^2``, so
that ``C`` (a plain tensor, the same on every rank) and ``mean(R)`` use the global row count; then, once
every tensor's ``U`` is known, ``sum(U^2)`` for the clip. The step is therefore two-phase: the group's
updates are held (one local-size buffer) until the clip factors arrive.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from eopt.base import Optimizer, ParamGroups, check, params_with_grad
from eopt.distributed import all_reduce_sum_, is_sharded, local


def _relative_alpha(step: Tensor, lr: float, rms_p: Tensor) -> Tensor:
    """``min(lr, 1/sqrt(t)) * rms_p`` (``rms_p`` already floored at ``eps2``)."""
    return step.rsqrt().clamp_(max=lr).mul_(rms_p)


def _factored_inverse_root(row_var: Tensor, col_var: Tensor, row_mean: Tensor, tiny: float, out: Tensor) -> None:
    """``out = 1 / max(sqrt(R C / max(mean(R), eps1)), eps1)`` as ``min(rsqrt(R / max(mean(R), eps1)) rsqrt(C),
    1 / eps1)``: the factors' inverse roots are small, the full-size work is one outer product and one clamp."""
    row_rsqrt = row_var.div(row_mean.clamp_(min=tiny)).rsqrt_()
    torch.mul(row_rsqrt, col_var.rsqrt(), out=out).clamp_(max=1 / tiny)


def _apply_update(
    p: Tensor, update: Tensor, clip: Tensor, alpha: Tensor | float, beta1: float | None, exp_avg: Tensor | None
) -> None:
    """``p -= alpha * U / clip``, or with momentum ``m = lerp(m, U / clip, 1 - beta1)``, ``p -= alpha * m``."""
    if beta1 is not None:
        exp_avg.lerp_(update.div_(clip), 1 - beta1)
        scale, update = -alpha, exp_avg
    else:
        scale = clip.reciprocal_().mul_(-alpha)
    if isinstance(scale, Tensor):
        p.addcmul_(update, scale)
    else:
        p.add_(update, alpha=scale)


def _single_tensor_adafactor(
    params: list[Tensor],
    grads: list[Tensor],
    states: list[dict],
    *,
    lr: float,
    beta1: float | None,
    beta2_decay: float,
    eps1: float | None,
    eps2: float,
    d: float,
    weight_decay: float,
    relative_step: bool,
) -> None:
    """One Adafactor step, tensor by tensor; step-dependent scalars stay on the device (no ``.item()``)."""
    # One scratch buffer for every update: a fresh full-size allocation per tensor costs page faults on CPU.
    scratch = torch.empty(max(p.numel() for p in params), dtype=params[0].dtype, device=params[0].device)
    for p, g, state in zip(params, grads, states, strict=True):
        step = state["step"]
        step += 1
        tiny = torch.finfo(p.dtype).eps if eps1 is None else eps1
        one_minus_beta2 = step.pow(beta2_decay)
        if relative_step:
            alpha = _relative_alpha(step, lr, torch.linalg.vector_norm(p).div_(math.sqrt(p.numel())).clamp_(min=eps2))
        else:
            alpha = lr
        if weight_decay != 0:
            p.mul_(1 - lr * weight_decay)
        update = scratch[: p.numel()].view_as(p)
        if g.ndim > 1:
            row_var, col_var = state["row_var"], state["col_var"]
            # g^2 in the scratch buffer, then two plain sums (a norm over dim -2 is ~10x slower on CPU)
            g2 = torch.mul(g, g, out=update)
            row_mean = g2.sum(dim=-1, keepdim=True).div_(g.shape[-1])
            col_mean = g2.sum(dim=-2, keepdim=True).div_(g.shape[-2])
            row_var.lerp_(row_mean, one_minus_beta2)
            col_var.lerp_(col_mean, one_minus_beta2)
            _factored_inverse_root(row_var, col_var, row_var.mean(dim=-2, keepdim=True), tiny, update)
        else:
            variance = state["variance"]
            variance.lerp_(g * g, one_minus_beta2)
            torch.rsqrt(variance, out=update).clamp_(max=1 / tiny)  # 1 / max(sqrt(V), eps1)
        update.mul_(g)
        clip = torch.linalg.vector_norm(update).div_(math.sqrt(update.numel()) * d).clamp_(min=1.0)
        _apply_update(p, update, clip, alpha, beta1, state.get("exp_avg"))


def _sharded_adafactor(
    params: list[Tensor],
    grads: list[Tensor],
    states: list[dict],
    *,
    lr: float,
    beta1: float | None,
    beta2_decay: float,
    eps1: float | None,
    eps2: float,
    d: float,
    weight_decay: float,
    relative_step: bool,
) -> None:
    """The same step on ``DTensor`` shards, in two phases with one all-reduce each (module doc).

    Phase 1 updates the local factors (``R``, and ``C`` of a 3+-D tensor) and the vectors' ``V``, and reduces
    ``sum(p^2)`` (before decay, as in one process) and, per matrix, ``sum(R)`` and the column sums of ``g^2``.
    Phase 2 updates ``C``, forms every local ``U`` in one buffer and reduces ``sum(U^2)``; then the clipped
    updates are applied on the local rows.
    """
    ps, gs = [local(p) for p in params], [local(g) for g in grads]
    steps = [state["step"] for state in states]
    torch._foreach_add_(steps, 1)
    one_minus_beta2 = torch._foreach_pow(steps, beta2_decay)
    matrices = [i for i, p in enumerate(params) if p.ndim == 2]
    pieces = [torch.stack(torch._foreach_norm(ps)).square_()] if relative_step else []
    flat = torch.empty(sum(g.numel() for g in gs), dtype=gs[0].dtype, device=gs[0].device)
    updates = [u.view_as(g) for u, g in zip(flat.split([g.numel() for g in gs]), gs, strict=True)]
    for p, g, update, state, w in zip(params, gs, updates, states, one_minus_beta2, strict=True):
        if g.ndim > 1:
            g2 = torch.mul(g, g, out=update)
            row_var = local(state["row_var"])
            row_var.lerp_(g2.sum(dim=-1, keepdim=True).div_(p.shape[-1]), w)
            if p.ndim == 2:  # the shards cut the rows: C and mean(R) need every rank's rows
                pieces += [row_var.sum().view(1), g2.sum(dim=0)]
            else:
                local(state["col_var"]).lerp_(g2.sum(dim=-2, keepdim=True).div_(p.shape[-2]), w)
        else:
            local(state["variance"]).lerp_(g * g, w)
    alphas: list[Tensor | float] = [lr] * len(params)
    matrix_sums: dict[int, tuple[Tensor, Tensor]] = {}
    if pieces:
        sums = all_reduce_sum_(torch.cat(pieces), params[0])
        if relative_step:
            p_sq, sums = sums[: len(params)], sums[len(params) :]
            alphas = [
                _relative_alpha(step, lr, s.sqrt().div_(math.sqrt(p.numel())).clamp_(min=eps2))
                for step, s, p in zip(steps, p_sq.unbind(), params, strict=True)
            ]
        split = sums.split([n for i in matrices for n in (1, params[i].shape[1])])
        matrix_sums = {i: split[2 * k : 2 * k + 2] for k, i in enumerate(matrices)}
    for i, (p, g, update, state, w) in enumerate(zip(params, gs, updates, states, one_minus_beta2, strict=True)):
        tiny = torch.finfo(p.dtype).eps if eps1 is None else eps1
        if g.ndim > 1:
            row_var, col_var = local(state["row_var"]), local(state["col_var"])
            if i in matrix_sums:
                row_sum, col_sum = matrix_sums[i]
                col_var.lerp_(col_sum.view_as(col_var).div_(p.shape[0]), w)
                row_mean = row_sum.div_(p.shape[0])
            else:
                row_mean = row_var.mean(dim=-2, keepdim=True)
            _factored_inverse_root(row_var, col_var, row_mean, tiny, update)
        else:
            torch.rsqrt(local(state["variance"]), out=update).clamp_(max=1 / tiny)
        update.mul_(g)
    update_sq = all_reduce_sum_(torch.stack(torch._foreach_norm(updates)).square_(), params[0])
    if weight_decay != 0:
        torch._foreach_mul_(ps, 1 - lr * weight_decay)
    for p, local_p, update, state, alpha, u_sq in zip(
        params, ps, updates, states, alphas, update_sq.unbind(), strict=True
    ):
        clip = u_sq.sqrt().div_(math.sqrt(p.numel()) * d).clamp_(min=1.0)
        exp_avg = state.get("exp_avg")
        _apply_update(local_p, update, clip, alpha, beta1, None if exp_avg is None else local(exp_avg))


class Adafactor(Optimizer):
    """Adafactor (Shazeer & Stern 2018, arXiv 1804.04235) with ``torch.optim.Adafactor``'s semantics.

    For a parameter with gradient ``g`` at step ``t``, ``beta2_t = 1 - t^beta2_decay``::

        alpha = min(lr, 1/sqrt(t)) * max(eps2, RMS(p))   if relative_step else lr
        p    *= 1 - lr * weight_decay
        V     = R C / max(mean(R), eps1)  with row/column EMAs R, C of g^2  (>= 2-D; full EMA for 1-D)
        U     = g / max(sqrt(V), eps1);  U /= max(1, RMS(U) / d)
        p    -= alpha * U                 (with beta1: p -= alpha * m,  m = beta1 m + (1 - beta1) U)

    Args:
        params: parameters or param groups (groups with ``"algorithm": "adamw"`` use the backup AdamW).
        lr: relative step cap (``relative_step=True``, as torch: 1e-2) or absolute step size.
        beta1: momentum on the clipped update; ``None`` (default) keeps no first moment.
        beta2_decay: ``beta2_t = 1 - t^beta2_decay`` (-0.8 in the paper).
        eps: ``(eps1, eps2)``: regularizer of the second moment (``None``: the dtype's epsilon) and the
            floor of the parameter scale.
        d: update-clipping threshold on RMS(U).
        weight_decay: decoupled, scaled by ``lr``.
        relative_step: the paper's (and torch's) relative step size; ``False`` uses ``lr`` as is.
    """

    algorithm = "adafactor"

    def __init__(
        self,
        params: ParamGroups,
        lr: float = 1e-2,
        beta1: float | None = None,
        beta2_decay: float = -0.8,
        eps: tuple[float | None, float] = (None, 1e-3),
        d: float = 1.0,
        weight_decay: float = 0.0,
        relative_step: bool = True,
    ) -> None:
        defaults = {
            "lr": lr,
            "beta1": beta1,
            "beta2_decay": beta2_decay,
            "eps": tuple(eps),
            "d": d,
            "weight_decay": weight_decay,
            "relative_step": relative_step,
        }
        super().__init__(params, defaults)

    def _check_group(self, group: dict) -> None:
        check("lr", group["lr"] >= 0.0, f"must be >= 0, got {group['lr']}")
        beta1 = group["beta1"]
        check("beta1", beta1 is None or 0.0 <= beta1 < 1.0, f"must be None or in [0, 1), got {beta1}")
        check("beta2_decay", group["beta2_decay"] <= 0.0, f"must be <= 0, got {group['beta2_decay']}")
        eps = group["eps"]
        check(
            "eps",
            len(eps) == 2 and (eps[0] is None or eps[0] >= 0.0) and eps[1] >= 0.0,
            f"must be (eps1 >= 0 or None, eps2 >= 0), got {eps}",
        )
        check("d", group["d"] >= 1.0, f"must be >= 1, got {group['d']}")
        check("weight_decay", group["weight_decay"] >= 0.0, f"must be >= 0, got {group['weight_decay']}")

    def _init_state(self, group: dict) -> None:
        for p in group["params"]:
            state = self.state[p]
            if state:
                continue
            state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
            if p.ndim > 1 and is_sharded(p):
                # Slices along dims other than 0 keep the parameter's sharding (a local op, no communication):
                # R is cut into the same rows as p; a matrix's C is reduced and the same on every rank.
                state["row_var"] = torch.zeros_like(p[..., :1])
                if p.ndim == 2:
                    state["col_var"] = torch.zeros((1, p.shape[-1]), dtype=p.dtype, device=p.device)
                else:
                    state["col_var"] = torch.zeros_like(p[..., :1, :])
            elif p.ndim > 1:
                state["row_var"] = p.new_zeros((*p.shape[:-1], 1))
                state["col_var"] = p.new_zeros((*p.shape[:-2], 1, p.shape[-1]))
            else:
                state["variance"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            if group["beta1"] is not None:
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)

    def _step_group(self, group: dict) -> None:
        params = params_with_grad(group)
        if not params:
            return
        if any(p.is_complex() for p in params):
            raise RuntimeError("Adafactor does not support complex parameters")
        eps1, eps2 = group["eps"]
        hparams = {
            "lr": group["lr"],
            "beta1": group["beta1"],
            "beta2_decay": group["beta2_decay"],
            "eps1": eps1,
            "eps2": eps2,
            "d": group["d"],
            "weight_decay": group["weight_decay"],
            "relative_step": group["relative_step"],
        }
        plain = [p for p in params if not is_sharded(p)]
        if plain:
            _single_tensor_adafactor(plain, [p.grad for p in plain], [self.state[p] for p in plain], **hparams)
        if len(plain) < len(params):
            # Plain tensors are whole on every rank: only the shards' partial sums may be reduced.
            sharded = [p for p in params if is_sharded(p)]
            _sharded_adafactor(sharded, [p.grad for p in sharded], [self.state[p] for p in sharded], **hparams)
