"""Shampoo: Kronecker-factored preconditioning with grafting (the practical DistributedShampoo form)."""

from __future__ import annotations

import math

import torch

from eopt.base import ParamGroups, check
from eopt.kronecker import (
    KroneckerOptimizer,
    contract,
    inverse_root,
    tensor_blocks,
    update_factor_,
)

GRAFTINGS = ("adam", "adagrad", "rmsprop", "sgd", "none")
MATMUL_PRECISIONS = ("highest", "high", "medium")


class Shampoo(KroneckerOptimizer):
    """Shampoo (Gupta et al., arXiv 1802.09568) in the practical form of Anil et al. (arXiv 2002.09018) and
    Meta's DistributedShampoo (Shi et al., arXiv 2309.06497): EMA factors, blocking, grafting, root inverses by
    eigendecomposition every ``precondition_frequency`` steps.

    A tensor is cut into blocks of at most ``max_preconditioner_dim`` along every dim. For a block ``G`` of a
    k-D parameter at step ``t`` (``b1, b2 = betas``; the factors and grafting state see the raw gradient)::

        m = b1 m + (1-b1) G;  D = m / (1 - b1^t)              (D = G when b1 = 0; Nesterov: b1 m + (1-b1) G)
        F_i = b2 F_i + (1-b2) G_(i) G_(i)^T                   (F_i += G_(i) G_(i)^T when b2 = 1)
        every precondition_frequency steps:
            P_i = (F_i / (1 - b2^t) + epsilon I)^(-1/r)       (r = 2k, or inverse_exponent_override)
        S = D x_1 P_1 ... x_k P_k                              (each P_i applied along dim i)
        grafting: A = the grafting method's update from D (adam: D / (sqrt(v/(1-g2^t)) + grafting_eps),
                  adagrad: D / (sqrt(sum G^2) + grafting_eps), rmsprop: D / (sqrt(v) + grafting_eps),
                  sgd: D), v = g2 v + (1-g2) G^2 with g2 = grafting_beta2
        direction = S * ||A|| / ||S||   (per block; S itself with grafting="none")
                  = A                   before start_preconditioning_step (D with grafting="none")
        W *= 1 - lr wd;  W -= lr * direction

    Bias corrections apply with ``use_bias_correction`` (and only when the beta is below 1). 1-D parameters
    get the grafting method alone. With ``betas=(0.0, 1.0), grafting="none", use_bias_correction=False,
    precondition_frequency=1, start_preconditioning_step=1`` this is the original Shampoo,
    ``W -= lr (eps I + sum G G^T)^(-1/4) G (eps I + sum G^T G)^(-1/4)``.

    ``start_preconditioning_step=-1`` means ``precondition_frequency``. Root inverses clamp eigenvalues at
    ``epsilon``; an eigh failure retries in float64, then keeps the previous root inverse and counts the event
    in ``state[p]["root_failures"]`` (their sum is :meth:`metrics`' ``shampoo_root_failures``). Same-size
    factors (across blocks and same-shape parameters) are updated and eigendecomposed in one batched call.

    Under DDP, FSDP2 and HSDP, ``matrix_update="owner"`` (the default) runs each parameter's Shampoo once, on
    its owner rank, which gets the full gradient (a block may straddle shards) and alone holds the momentum,
    grafting state, factors and roots; every rank decays its rows and adds its rows of the direction.
    ``"replicated"`` runs every parameter on every rank on full, replicated state (the reference). See
    :class:`eopt.kronecker.KroneckerOptimizer`.
    """

    algorithm = "shampoo"

    def __init__(
        self,
        params: ParamGroups,
        lr: float = 1e-2,
        betas: tuple[float, float] = (0.9, 1.0),
        epsilon: float = 1e-12,
        weight_decay: float = 0.0,
        precondition_frequency: int = 1,
        start_preconditioning_step: int = -1,
        max_preconditioner_dim: int = 1024,
        grafting: str = "adam",
        grafting_beta2: float = 0.999,
        grafting_eps: float = 1e-10,
        use_bias_correction: bool = True,
        inverse_exponent_override: int | None = None,
        use_nesterov: bool = False,
        matmul_precision: str = "highest",
        matrix_update: str = "owner",
    ) -> None:
        defaults = {
            "lr": lr,
            "betas": tuple(betas),
            "epsilon": epsilon,
            "weight_decay": weight_decay,
            "precondition_frequency": precondition_frequency,
            "start_preconditioning_step": start_preconditioning_step,
            "max_preconditioner_dim": max_preconditioner_dim,
            "grafting": grafting,
            "grafting_beta2": grafting_beta2,
            "grafting_eps": grafting_eps,
            "use_bias_correction": use_bias_correction,
            "inverse_exponent_override": inverse_exponent_override,
            "use_nesterov": use_nesterov,
            "matmul_precision": matmul_precision,
            "matrix_update": matrix_update,
        }
        super().__init__(params, defaults)

    def _check_group(self, group: dict) -> None:
        check("lr", group["lr"] >= 0.0, f"must be >= 0, got {group['lr']}")
        b1, b2 = group["betas"]
        check("betas", 0.0 <= b1 < 1.0 and 0.0 < b2 <= 1.0, f"need 0 <= b1 < 1 and 0 < b2 <= 1, got {group['betas']}")
        check("epsilon", group["epsilon"] >= 0.0, f"must be >= 0, got {group['epsilon']}")
        check("weight_decay", group["weight_decay"] >= 0.0, f"must be >= 0, got {group['weight_decay']}")
        freq = group["precondition_frequency"]
        check("precondition_frequency", isinstance(freq, int) and freq >= 1, f"must be an int >= 1, got {freq!r}")
        start = group["start_preconditioning_step"]
        check("start_preconditioning_step", start == -1 or start >= 1, f"must be >= 1 or -1, got {start}")
        dim = group["max_preconditioner_dim"]
        check("max_preconditioner_dim", dim >= 1, f"must be >= 1, got {dim}")
        check("grafting", group["grafting"] in GRAFTINGS, f"must be one of {GRAFTINGS}, got {group['grafting']!r}")
        gb2 = group["grafting_beta2"]
        check("grafting_beta2", 0.0 < gb2 <= 1.0, f"must be in (0, 1], got {gb2}")
        check("grafting_eps", group["grafting_eps"] >= 0.0, f"must be >= 0, got {group['grafting_eps']}")
        root = group["inverse_exponent_override"]
        check("inverse_exponent_override", root is None or root > 0, f"must be None or > 0, got {root}")
        prec = group["matmul_precision"]
        check("matmul_precision", prec in MATMUL_PRECISIONS, f"must be one of {MATMUL_PRECISIONS}, got {prec!r}")
        super()._check_group(group)

    # ------------------------------------------------------------------------------------ layout

    @staticmethod
    def block_classes(group: dict, shape: tuple[int, ...]) -> list[tuple[tuple[int, ...], list[tuple[slice, ...]]]]:
        """``[(block shape, [block slices])]``: a >= 2-D parameter's blocks grouped by shape (none for 1-D)."""
        if len(shape) < 2:
            return []
        classes: dict[tuple[int, ...], list[tuple[slice, ...]]] = {}
        for block in tensor_blocks(shape, group["max_preconditioner_dim"]):
            classes.setdefault(tuple(s.stop - s.start for s in block), []).append(block)
        return list(classes.items())

    def _state_spec(self, group: dict, shape: tuple[int, ...], dtype: torch.dtype) -> list[tuple[str, tuple, str]]:
        spec = []
        if group["betas"][0] > 0:
            spec.append(("exp_avg", shape, "zeros"))
        if group["grafting"] in ("adam", "adagrad", "rmsprop"):
            spec.append(("graft_sq", shape, "zeros"))
        for k, (block_shape, blocks) in enumerate(self.block_classes(group, shape)):
            for d, n in enumerate(block_shape):
                spec.append((f"factor_{k}_{d}", (len(blocks), n, n), "zeros"))
                spec.append((f"root_{k}_{d}", (len(blocks), n, n), "eye"))
        if len(shape) >= 2:
            spec.append(("root_failures", (), "zeros"))
        return spec

    # -------------------------------------------------------------------------------------- step

    def metrics(self) -> dict[str, torch.Tensor]:
        """``shampoo_root_failures``: root-inverse computations that failed in float64 too, summed over parameters."""
        return {"shampoo_root_failures": self._state_total("root_failures")}

    def _direction(
        self, group: dict, shape: tuple[int, ...], grads: torch.Tensor, state: dict, calls: int
    ) -> torch.Tensor | None:
        return shampoo_direction(group, grads, state, calls, self.block_classes(group, shape))

    def _apply(self, group: dict, weights: list[torch.Tensor], directions: list[torch.Tensor], calls: int) -> None:
        lr, wd = group["lr"], group["weight_decay"]
        if wd != 0.0:
            torch._foreach_mul_(weights, 1.0 - lr * wd)
        torch._foreach_add_(weights, directions, alpha=-lr)

    def _cost(self, group: dict, shape: tuple[int, ...]) -> float:
        """Per step: a factor product and a contraction along every dim of every block; per refresh (every
        ``precondition_frequency`` steps, amortized): an eigendecomposition and the root's product per factor."""
        numel = math.prod(shape)
        per_step, per_refresh = 0.0, 0.0
        for block_shape, blocks in self.block_classes(group, shape):
            block_numel = math.prod(block_shape)
            for n in block_shape:
                per_step += len(blocks) * 2 * 2 * block_numel * n
                per_refresh += len(blocks) * (9 + 2) * n**3
        per_step += 8 * numel  # grafting, norms, momentum
        return per_step + per_refresh / group["precondition_frequency"]


def _blocks(x: torch.Tensor, blocks: list[tuple[slice, ...]]) -> torch.Tensor:
    """``(B, *shape)`` -> ``(B * n_blocks, *block)``; a view when the only block is the whole tensor."""
    if len(blocks) == 1 and all(s.start == 0 and s.stop == n for s, n in zip(blocks[0], x.shape[1:], strict=True)):
        return x
    return torch.stack([x[(slice(None), *b)] for b in blocks], dim=1).flatten(0, 1)


def _unblock_(out: torch.Tensor, values: torch.Tensor, blocks: list[tuple[slice, ...]]) -> None:
    """Write ``(B * n_blocks, *block)`` ``values`` into their places in ``out`` (``(B, *shape)``)."""
    values = values.unflatten(0, (out.shape[0], len(blocks)))
    for j, b in enumerate(blocks):
        out[(slice(None), *b)] = values[:, j]


def _norms(x: torch.Tensor) -> torch.Tensor:
    """Frobenius norm of every leading entry, shaped to broadcast against ``x``."""
    return torch.linalg.vector_norm(x.flatten(1), dim=1).reshape(-1, *[1] * (x.ndim - 1))


def _grafting_direction(group: dict, state: dict, g: torch.Tensor, d: torch.Tensor, t: int) -> torch.Tensor | None:
    """Update the grafting state with ``g`` and return the grafting method's update of ``d`` (None: no grafting)."""
    kind = group["grafting"]
    if kind == "none":
        return None
    if kind == "sgd":
        return d
    v, beta2, eps = state["graft_sq"], group["grafting_beta2"], group["grafting_eps"]
    if kind == "adagrad":
        v.addcmul_(g, g)
        return d / v.sqrt().add_(eps)
    v.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
    if kind == "adam" and group["use_bias_correction"] and beta2 < 1.0:
        return d / (v / (1.0 - beta2**t)).sqrt_().add_(eps)
    return d / v.sqrt().add_(eps)


@torch.no_grad()
def shampoo_direction(
    group: dict,
    grads: torch.Tensor,
    state: dict,
    calls: int,
    classes: list[tuple[tuple[int, ...], list[tuple[slice, ...]]]],
) -> torch.Tensor:
    """One Shampoo step's direction ``D`` for a batch of same-shape parameters (see :class:`Shampoo`): the step
    is ``W <- (1 - lr wd) W - lr D``.

    ``grads``: ``(B, *shape)`` full gradients; ``state``: batched state tensors, updated in place; ``calls``:
    steps taken before; ``classes``: :meth:`Shampoo.block_classes` of the shape.
    """
    t = calls + 1
    beta1, beta2 = group["betas"]
    correct = group["use_bias_correction"]
    g = grads
    if beta1 > 0:
        m = state["exp_avg"]
        m.lerp_(g, 1.0 - beta1)
        if group["use_nesterov"]:
            bias1_next = 1.0 - beta1 ** (t + 1) if correct else 1.0
            bias1 = 1.0 - beta1**t if correct else 1.0
            d = m.mul(beta1 / bias1_next).add_(g, alpha=(1.0 - beta1) / bias1)
        else:
            d = m / (1.0 - beta1**t) if correct else m
    else:
        d = g
    graft = _grafting_direction(group, state, g, d, t)

    freq = group["precondition_frequency"]
    start = group["start_preconditioning_step"] if group["start_preconditioning_step"] > 0 else freq
    refresh = t % freq == 0 or t == start
    precondition = bool(classes) and t >= start
    direction = (graft if graft is not None else d) if not precondition else torch.empty_like(g)

    for k, (block_shape, blocks) in enumerate(classes):
        order = len(block_shape)
        root = group["inverse_exponent_override"] or 2 * order
        gb = _blocks(g, blocks)
        for i in range(order):
            factor = state[f"factor_{k}_{i}"].flatten(0, 1)
            update_factor_(factor, gb, i + 1, weight=None if beta2 == 1.0 else 1.0 - beta2)
        if refresh:
            bias2 = 1.0 - beta2**t if correct and beta2 < 1.0 else 1.0
            failures = torch.zeros(gb.shape[0], dtype=state["root_failures"].dtype, device=g.device)
            for i in range(order):
                factor = state[f"factor_{k}_{i}"].flatten(0, 1)
                roots = state[f"root_{k}_{i}"].flatten(0, 1)
                scaled = factor / bias2 if bias2 != 1.0 else factor
                roots.copy_(inverse_root(scaled, root, group["epsilon"], previous=roots, failures=failures))
            state["root_failures"].add_(failures.view(g.shape[0], -1).sum(1))
        if not precondition:
            continue
        s = _blocks(d, blocks)
        for i in range(order):
            s = contract(s, state[f"root_{k}_{i}"].flatten(0, 1), i + 1, transpose=False)
        if graft is not None:
            shampoo_norm = _norms(s)
            scale = _norms(_blocks(graft, blocks)) / shampoo_norm
            s = s * torch.where(shampoo_norm > 0, scale, torch.zeros_like(scale))
        if s.shape == direction.shape:
            direction = s
        else:
            _unblock_(direction, s, blocks)
    return direction
