"""Evaluation on the fixed validation set, and the target loss that ends a run.

Every rank evaluates its contiguous block of the validation sequences (:func:`recipes.data.val_batches`)
and the loss is reduced as ``(sum of loss x tokens, tokens)`` over ranks, so the value is the one a single
process computes on the whole set. Under FSDP every forward is a collective, so ranks whose block has fewer
micro-batches run zero-weight padding forwards until all have made the same number.
"""

from __future__ import annotations

import torch
from torch import nn

from recipes import parallel
from recipes.models import autocast, cross_entropy


class Evaluator:
    """Evaluates ``model`` on ``batches`` every ``every`` steps and at the last, and tracks ``target``."""

    def __init__(
        self,
        model: nn.Module,
        batches: list[tuple[torch.Tensor, torch.Tensor]],
        *,
        every: int,
        target: float | None,
        device: torch.device,
        amp_dtype: torch.dtype | None,
        seq_len: int,
    ) -> None:
        self.model, self.every, self.target = model, every, target
        self.device, self.amp_dtype = device, amp_dtype
        count = parallel.all_reduce(torch.tensor([len(batches)], device=device), "max").item()
        pad = torch.zeros(1, seq_len, dtype=torch.long)
        self.batches = [(inputs, targets, True) for inputs, targets in batches]
        self.batches += [(pad, pad, False)] * (int(count) - len(batches))

    def due(self, step: int, last: bool = False) -> bool:
        return last or step % self.every == 0

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean loss over the whole validation set (every rank gets the same value)."""
        self.model.eval()
        totals = torch.zeros(2, device=self.device)  # sum of loss x tokens, tokens
        for inputs, targets, real in self.batches:
            with autocast(self.device, self.amp_dtype):
                loss = cross_entropy(self.model, inputs.to(self.device), targets.to(self.device))
            if real:
                totals += torch.stack([loss * targets.numel(), torch.tensor(targets.numel(), device=self.device)])
        self.model.train()
        loss_sum, tokens = parallel.all_reduce(totals).tolist()
        return loss_sum / tokens

    def reached(self, val_loss: float) -> bool:
        """Whether ``val_loss`` (the same on every rank) meets the target."""
        return self.target is not None and val_loss <= self.target
