"""AdamW as an eopt optimizer: the baseline every comparison is made against."""

from __future__ import annotations

from eopt._adamw import ADAMW_DEFAULTS
from eopt.base import Optimizer, ParamGroups


class AdamW(Optimizer):
    """AdamW (Loshchilov & Hutter, arXiv 1711.05101) with ``torch.optim.AdamW``'s exact arithmetic.

    For every parameter with gradient ``g`` at step ``t``::

        p *= 1 - lr * weight_decay
        m  = beta1 * m + (1 - beta1) * g
        v  = beta2 * v + (1 - beta2) * g^2
        p -= lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)

    Every group is an ``"adamw"`` group, so this class is the backup AdamW of the other eopt optimizers
    used on its own. It runs torch's fused kernel where the device has one.
    """

    algorithm = "adamw"

    def __init__(
        self,
        params: ParamGroups,
        lr: float = ADAMW_DEFAULTS["lr"],
        betas: tuple[float, float] = ADAMW_DEFAULTS["betas"],
        eps: float = ADAMW_DEFAULTS["eps"],
        weight_decay: float = ADAMW_DEFAULTS["weight_decay"],
    ) -> None:
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay})

    def _init_state(self, group: dict) -> None:
        """Never called: every AdamW group is an ``"adamw"`` group, initialized by the base."""

    def _step_group(self, group: dict) -> None:
        """Never called: every AdamW group is an ``"adamw"`` group, stepped by the base."""
