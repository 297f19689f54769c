"""AdamW rows: eopt.AdamW (torch's fused kernel underneath) vs torch.optim.AdamW fused and foreach."""

from __future__ import annotations

import torch

from benchmarks.cases import Case


def _eopt(named, info) -> torch.optim.Optimizer:
    import eopt

    return eopt.AdamW([p for _, p in named], lr=1e-3, weight_decay=0.01)


def _eopt_routed(named, info) -> torch.optim.Optimizer:
    import eopt

    return eopt.build(named, "adamw", hints=info["hints"], lr=1e-3, weight_decay=0.01)


def _torch(fused: bool):
    def make(named, info) -> torch.optim.Optimizer:
        return torch.optim.AdamW([p for _, p in named], lr=1e-3, weight_decay=0.01, fused=fused, foreach=not fused)

    return make


def cases() -> list[Case]:
    return [
        Case("torch.optim.AdamW (fused)", "adamw", _torch(True), baseline=True, steps=20),
        Case("torch.optim.AdamW (foreach)", "adamw", _torch(False), steps=20),
        Case("eopt.AdamW", "adamw", _eopt, steps=20),
        Case("eopt.build(adamw) (1-D params undecayed: 2 kernel calls)", "adamw", _eopt_routed, steps=20),
    ]
