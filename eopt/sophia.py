"""Sophia: a scalable stochastic second-order optimizer (Liu et al. 2023, arXiv 2305.14342).

The update is exactly the authors' ``SophiaG`` (``sophia.py`` of github.com/Liuhong99/Sophia)::

    p *= 1 - lr * weight_decay
    m  = beta1 * m + (1 - beta1) * g
    p -= lr * sign(m) * min(|m| / (rho * bs * h + 1e-15), 1)          (no bias correction)

and every ``hessian_interval`` steps the training loop refreshes the diagonal Hessian estimate ``h`` with
:meth:`Sophia.update_hessian` (see :mod:`recipes.hessian` for the estimators)::

    h = beta2 * h + (1 - beta2) * h_hat

- ``estimator="gnb"`` (Sophia-G, Gauss-Newton-Bartlett): ``.grad`` holds the gradient ``g_hat`` of the mean
  cross-entropy against labels sampled from the model's own logits; ``h_hat = g_hat^2`` and the step uses
  ``rho * bs * h`` (``bs`` tokens per step turns the mean-loss ``g_hat^2`` into the Gauss-Newton diagonal).
- ``estimator="hutchinson"`` (Sophia-H): ``.grad`` holds ``u * (H u)`` for a Gaussian probe ``u``, already a
  diagonal-Hessian estimate of the mean loss, so the step uses ``max(rho * h, 1e-15)`` (the paper's
  ``max(gamma * h, eps)``: Hutchinson estimates can be negative, and a non-positive curvature gives a
  sign step).

While ``h = 0`` the update is ``lr * sign(m)``. ``Sophia.metrics()["sophia_win_rate"]`` is the fraction of
coordinates of the last step whose ratio was not clipped (healthy runs: 0.1 to 0.5).

On FSDP2/HSDP shards (``DTensor`` parameters) every op is elementwise, so each rank runs the same kernels on
the rows it holds (:func:`eopt.distributed.local`): ``exp_avg`` and ``hessian`` are sharded like their
parameter and ``step`` is the same on every rank. The win rate counts the unclipped coordinates of each
rank's rows and sums the counts and sizes over the shard groups in one all-reduce.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from eopt.base import Optimizer, ParamGroups, check, params_with_grad, use_foreach
from eopt.distributed import all_reduce_sum_, is_sharded, local

ESTIMATORS = ("gnb", "hutchinson")
_TINY = 1e-15  # the authors' guard against h = 0


def _denominator(hess: Tensor, rho: float, bs: float, estimator: str, out: Tensor) -> Tensor:
    """``rho * bs * h + 1e-15`` (GNB, the authors' form) or ``max(rho * h, 1e-15)`` (Hutchinson), into ``out``."""
    if estimator == "gnb":
        return torch.add(hess.new_tensor(_TINY), hess, alpha=rho * bs, out=out)  # one kernel
    return torch.mul(hess, rho, out=out).clamp_(min=_TINY)


def _single_tensor_sophia(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    hessians: list[Tensor],
    steps: list[Tensor],
    *,
    lr: float,
    beta1: float,
    rho: float,
    bs: float,
    weight_decay: float,
    estimator: str,
) -> None:
    """One Sophia step, tensor by tensor (every op of a tensor runs while it is hot in cache)."""
    # One scratch buffer for all tensors: a fresh allocation per tensor costs page faults on CPU.
    scratch = torch.empty(max(p.numel() for p in params), dtype=params[0].dtype, device=params[0].device)
    for p, g, m, h, step in zip(params, grads, exp_avgs, hessians, steps, strict=True):
        step += 1
        if weight_decay != 0:
            p.mul_(1 - lr * weight_decay)
        m.lerp_(g, 1 - beta1)
        # sign(m) * min(|m| / d, 1) == clamp(m / d, -1, 1) for d > 0, with one buffer instead of four.
        ratio = _denominator(h, rho, bs, estimator, out=scratch[: h.numel()].view_as(h))
        torch.div(m, ratio, out=ratio)
        p.add_(ratio.clamp_(-1.0, 1.0), alpha=-lr)


def _multi_tensor_sophia(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    hessians: list[Tensor],
    steps: list[Tensor],
    *,
    lr: float,
    beta1: float,
    rho: float,
    bs: float,
    weight_decay: float,
    estimator: str,
) -> None:
    """The same step with ``torch._foreach_*`` kernels (one launch per op for all tensors: the GPU path)."""
    torch._foreach_add_(steps, 1)
    if weight_decay != 0:
        torch._foreach_mul_(params, 1 - lr * weight_decay)
    torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
    if estimator == "gnb":
        ratios = torch._foreach_mul(hessians, rho * bs)
        torch._foreach_add_(ratios, _TINY)
    else:
        ratios = torch._foreach_mul(hessians, rho)
        torch._foreach_clamp_min_(ratios, _TINY)
    ratios = torch._foreach_div(exp_avgs, ratios)
    torch._foreach_clamp_min_(ratios, -1.0)
    torch._foreach_clamp_max_(ratios, 1.0)
    torch._foreach_add_(params, ratios, alpha=-lr)


class Sophia(Optimizer):
    """Sophia-G / Sophia-H (Liu et al. 2023, arXiv 2305.14342), the authors' ``SophiaG`` update.

    For each parameter with gradient ``g`` (no bias correction)::

        p *= 1 - lr * weight_decay
        m  = beta1 * m + (1 - beta1) * g
        p -= lr * clamp(m / D, -1, 1),   D = rho * bs * h + 1e-15      (estimator "gnb")
                                         D = max(rho * h, 1e-15)       (estimator "hutchinson")

    and, called by the training loop every ``hessian_interval`` steps after the step, on a fresh batch,
    :meth:`update_hessian`: ``h = beta2 * h + (1 - beta2) * h_hat`` with ``h_hat = g_hat^2`` (GNB; ``.grad``
    holds the gradient of the loss on labels sampled from the model) or ``h_hat = .grad`` (Hutchinson;
    ``.grad`` holds ``u * (H u)``). :mod:`recipes.hessian` computes both.

    Args:
        params: parameters or param groups (groups with ``"algorithm": "adamw"`` use the backup AdamW).
        lr: learning rate (the authors: 6e-4 for GPT-2 125M, 3e-4 for 770M).
        betas: (beta1 of the momentum, beta2 of the Hessian EMA).
        rho: clipping scale (gamma in the paper); 0.03 to 0.05 for GPT-2 with GNB.
        weight_decay: decoupled weight decay (0.2 in the authors' GPT-2 runs).
        bs: tokens per optimizer step (the trainer sets it); scales the GNB estimate.
        estimator: ``"gnb"`` (Sophia-G) or ``"hutchinson"`` (Sophia-H).
        hessian_interval: steps between Hessian refreshes (k = 10 in the paper); read by the trainer.
        foreach: use ``torch._foreach`` kernels (default: on CUDA only; on CPU the tensor-by-tensor path is
            faster because each tensor stays in cache across its ops).
    """

    algorithm = "sophia"

    def __init__(
        self,
        params: ParamGroups,
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.965, 0.99),
        rho: float = 0.04,
        weight_decay: float = 0.1,
        bs: int = 5120,
        estimator: str = "gnb",
        hessian_interval: int = 10,
        foreach: bool | None = None,
    ) -> None:
        check("hessian_interval", hessian_interval >= 1, f"must be >= 1, got {hessian_interval}")
        self.hessian_interval = hessian_interval
        self._stepped: list[tuple[dict, float, list[Tensor]]] = []  # (group, bs, params) of the last step
        self._win_rate: Tensor | None = None
        self._bs_override: int | None = None
        defaults = {
            "lr": lr,
            "betas": tuple(betas),
            "rho": rho,
            "weight_decay": weight_decay,
            "bs": bs,
            "estimator": estimator,
            "foreach": foreach,
        }
        super().__init__(params, defaults)

    def _check_group(self, group: dict) -> None:
        check("lr", group["lr"] >= 0.0, f"must be >= 0, got {group['lr']}")
        betas = group["betas"]
        check("betas", len(betas) == 2 and all(0.0 <= b < 1.0 for b in betas), f"each must be in [0, 1), got {betas}")
        check("rho", group["rho"] >= 0.0, f"must be >= 0, got {group['rho']}")
        check("weight_decay", group["weight_decay"] >= 0.0, f"must be >= 0, got {group['weight_decay']}")
        check("bs", group["bs"] > 0, f"must be > 0 (tokens per optimizer step), got {group['bs']}")
        check("estimator", group["estimator"] in ESTIMATORS, f"must be one of {ESTIMATORS}, got {group['estimator']!r}")

    def _init_state(self, group: dict) -> None:
        for p in group["params"]:
            state = self.state[p]
            if not state:
                state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["hessian"] = torch.zeros_like(p, memory_format=torch.preserve_format)

    def set_bs(self, bs: int) -> None:
        """Set the tokens per optimizer step of every Sophia group (the trainer calls it once)."""
        check("bs", bs > 0, f"must be > 0 (tokens per optimizer step), got {bs}")
        for group in self.param_groups:
            if group["algorithm"] == self.algorithm:
                group["bs"] = bs

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None, bs: int | None = None) -> float | None:
        """One step; ``bs`` (tokens per step) overrides the groups' value for this call, as in ``SophiaG``."""
        self._bs_override = bs
        self._stepped = []
        self._win_rate = None
        try:
            return super().step(closure)
        finally:
            self._bs_override = None

    def metrics(self) -> dict[str, Tensor]:
        """``{"sophia_win_rate": w}``: the fraction of the last step's coordinates whose ratio ``|m| / D`` was
        below 1 (not clipped), a 0-d tensor; empty before a step.

        Computed on first call (or by :meth:`update_hessian`, before it changes ``h``) from the state the step
        left, with the step's own arithmetic, so :meth:`step` pays nothing for it. On shards it is one
        all-reduce, so every rank must call it at the same steps.
        """
        self._settle_win_rate()
        return {} if self._win_rate is None else {"sophia_win_rate": self._win_rate}

    def _settle_win_rate(self) -> None:
        if self._win_rate is None and self._stepped:
            self._win_rate = self._unclipped_fraction()

    @torch.no_grad()
    def _unclipped_fraction(self) -> Tensor:
        params = [p for _, _, ps in self._stepped for p in ps]
        device = params[0].device
        scratch = torch.empty(max(local(p).numel() for p in params), dtype=params[0].dtype, device=device)
        # Plain parameters are whole on every rank (one process, DDP); the rows of sharded ones are counted
        # apart and summed over the shard groups, so nothing is counted twice.
        unclipped = torch.zeros((), dtype=torch.int64, device=device)
        numel = 0
        shard_unclipped = torch.zeros((), dtype=torch.int64, device=device)
        shard_numel, like = 0, None
        for group, bs, ps in self._stepped:
            for p in ps:
                state = self.state[p]
                h = local(state["hessian"])
                ratio = _denominator(h, group["rho"], bs, group["estimator"], out=scratch[: h.numel()].view_as(h))
                torch.div(local(state["exp_avg"]), ratio, out=ratio)
                if is_sharded(p):
                    shard_unclipped += torch.count_nonzero(ratio.abs_() < 1)
                    shard_numel, like = shard_numel + h.numel(), p
                else:
                    unclipped += torch.count_nonzero(ratio.abs_() < 1)
                    numel += h.numel()
        if like is None:
            return unclipped / numel
        counts = torch.stack([shard_unclipped, torch.tensor(shard_numel, device=device)])
        all_reduce_sum_(counts, like)  # one collective for count and size
        return (unclipped + counts[0]) / (numel + counts[1])

    def _step_group(self, group: dict) -> None:
        params = params_with_grad(group)
        if not params:
            return
        states = [self.state[p] for p in params]
        fn = _multi_tensor_sophia if use_foreach(group, params) else _single_tensor_sophia
        bs = group["bs"] if self._bs_override is None else self._bs_override
        self._stepped.append((group, bs, params))
        weights, grads = params, [p.grad for p in params]
        exp_avgs, hessians = [s["exp_avg"] for s in states], [s["hessian"] for s in states]
        if is_sharded(params[0]):
            # Elementwise: each rank updates the rows it holds, with the one-process kernels.
            weights, grads, exp_avgs, hessians = ([local(t) for t in ts] for ts in (weights, grads, exp_avgs, hessians))
        fn(
            weights,
            grads,
            exp_avgs,
            hessians,
            [s["step"] for s in states],
            lr=group["lr"],
            beta1=group["betas"][0],
            rho=group["rho"],
            bs=bs,
            weight_decay=group["weight_decay"],
            estimator=group["estimator"],
        )

    @torch.no_grad()
    def update_hessian(self) -> None:
        """``h = beta2 * h + (1 - beta2) * h_hat`` from each Sophia parameter's ``.grad`` (see the class)."""
        self._settle_win_rate()  # the last step's win rate needs the h that step used
        for group in self.param_groups:
            if group["algorithm"] != self.algorithm:
                continue
            params = params_with_grad(group)
            if not params:
                continue
            beta2 = group["betas"][1]
            hessians = [local(self.state[p]["hessian"]) for p in params]
            grads = [local(p.grad) for p in params]
            if group["estimator"] == "gnb":
                torch._foreach_mul_(hessians, beta2)
                torch._foreach_addcmul_(hessians, grads, grads, value=1 - beta2)
            else:
                torch._foreach_lerp_(hessians, grads, 1 - beta2)
