"""The AdamW arithmetic shared by :class:`eopt.AdamW` and every backup-AdamW param group.

Loshchilov & Hutter, "Decoupled Weight Decay Regularization" (ICLR 2019), with exactly
``torch.optim.AdamW``'s order of operations::

    p *= 1 - lr * weight_decay
    m  = beta1 * m + (1 - beta1) * g
    v  = beta2 * v + (1 - beta2) * g^2
    p -= lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)

The update itself is delegated to torch's functional Adam kernel (fused where the device supports
it, foreach otherwise), so the numbers are torch's, bit for bit, at torch's speed.
"""

from __future__ import annotations

import torch
from torch.optim.adam import adam as _torch_adam

ADAMW_DEFAULTS: dict = {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.01}

_FUSED_DEVICES = ("cpu", "cuda", "xpu", "mps")


def init_adamw_state(state: dict, p: torch.Tensor) -> None:
    """Create AdamW state for ``p`` (step counter as a device tensor, as torch's fused path keeps it)."""
    state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)


def _fusable(params: list[torch.Tensor]) -> bool:
    return all(p.device.type in _FUSED_DEVICES and p.dtype.is_floating_point for p in params)


@torch.no_grad()
def adamw_step(group: dict, state: dict) -> None:
    """Apply one AdamW step to every parameter of ``group`` that has a gradient."""
    params, grads, exp_avgs, exp_avg_sqs, steps = [], [], [], [], []
    for p in group["params"]:
        if p.grad is None:
            continue
        if p.grad.is_sparse:
            raise RuntimeError("eopt's AdamW does not support sparse gradients")
        st = state[p]
        if not st:
            init_adamw_state(st, p)
        params.append(p)
        grads.append(p.grad)
        exp_avgs.append(st["exp_avg"])
        exp_avg_sqs.append(st["exp_avg_sq"])
        steps.append(st["step"])
    if not params:
        return
    fused = _fusable(params)
    beta1, beta2 = group["betas"]
    _torch_adam(
        params,
        grads,
        exp_avgs,
        exp_avg_sqs,
        [],
        steps,
        foreach=not fused,
        fused=fused,
        decoupled_weight_decay=True,
        amsgrad=False,
        beta1=beta1,
        beta2=beta2,
        lr=group["lr"],
        weight_decay=group["weight_decay"],
        eps=group["eps"],
        maximize=False,
    )


def adamw_step_groups(groups: list[dict], state: dict) -> None:
    """One AdamW step for several groups: one kernel call per set of groups with equal hyperparameters.

    ``build()`` splits parameters into groups by hints that AdamW ignores (role, heads), and each kernel
    call has a fixed cost (~0.1 ms on a CPU), so merging them keeps eopt's AdamW at torch's speed.
    """
    buckets: dict[tuple, list[dict]] = {}
    for group in groups:
        key = (group["lr"], tuple(group["betas"]), group["eps"], group["weight_decay"])
        buckets.setdefault(key, []).append(group)
    for same in buckets.values():
        merged = same[0] if len(same) == 1 else {**same[0], "params": [p for g in same for p in g["params"]]}
        adamw_step(merged, state)
