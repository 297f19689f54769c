"""Memory-saving and curvature-clipping optimizers: Adam-mini, Sophia, Adafactor vs their reference code.

- ``adam_mini``: eopt.AdamMini (structural blocks from the model's hints, as the recipe builds it; and the
  standalone name-rule mode) vs the authors' ``adam_mini.Adam_mini`` (1.1.1); torch's fused AdamW for the
  state-memory comparison (Adam-mini's state should be about half of AdamW's).
- ``sophia``: eopt.Sophia vs the authors' ``sophia_opt.SophiaG`` (0.2.2); both refresh the Hessian EMA
  every 10 steps outside the timed step, as the training loop does.
- ``adafactor``: eopt.Adafactor vs ``torch.optim.Adafactor`` (its default single-tensor path on CPU, and foreach).
"""

from __future__ import annotations

import torch

from benchmarks.cases import Case


def _eopt(name: str, **hparams):
    def make(named, info) -> torch.optim.Optimizer:
        import eopt

        return eopt.build(named, name, hints=info["hints"], **hparams)

    return make


def _eopt_adam_mini_standalone(named, info) -> torch.optim.Optimizer:
    from eopt import AdamMini

    return AdamMini(
        named, lr=1e-3, weight_decay=0.1, dim=info["hidden"], n_heads=info["n_heads"], n_kv_heads=info["n_kv_heads"]
    )


def _authors_adam_mini(named, info) -> torch.optim.Optimizer:
    from adam_mini import Adam_mini

    return Adam_mini(
        named,
        lr=1e-3,
        weight_decay=0.1,
        dim=info["hidden"],
        n_heads=info["n_heads"],
        n_kv_heads=info["n_kv_heads"],
        verbose=False,
    )


def _torch_adamw(named, info) -> torch.optim.Optimizer:
    return torch.optim.AdamW([p for _, p in named], lr=1e-3, weight_decay=0.1, fused=True)


def _sophiag(named, info) -> torch.optim.Optimizer:
    from sophia_opt import SophiaG

    return SophiaG([p for _, p in named], lr=1e-4, rho=0.04, weight_decay=0.1)


def _refresh_hessian(opt: torch.optim.Optimizer, i: int) -> None:
    if i % 10 == 0:
        opt.update_hessian()


def _torch_adafactor(foreach: bool):
    def make(named, info) -> torch.optim.Optimizer:
        return torch.optim.Adafactor([p for _, p in named], lr=1e-2, foreach=foreach)

    return make


def cases() -> list[Case]:
    return [
        Case("adam_mini.Adam_mini (authors)", "adam_mini", _authors_adam_mini, baseline=True, steps=20),
        Case("eopt.AdamMini (structural hints)", "adam_mini", _eopt("adam_mini", lr=1e-3, weight_decay=0.1), steps=20),
        Case("eopt.AdamMini (authors' names)", "adam_mini", _eopt_adam_mini_standalone, steps=20),
        Case("torch.optim.AdamW (fused)", "adam_mini", _torch_adamw, steps=20),
        Case("sophia_opt.SophiaG (authors)", "sophia", _sophiag, baseline=True, steps=20, before_step=_refresh_hessian),
        Case("eopt.Sophia", "sophia", _eopt("sophia", lr=1e-4), steps=20, before_step=_refresh_hessian),
        Case("torch.optim.Adafactor", "adafactor", _torch_adafactor(False), baseline=True, steps=20),
        Case("torch.optim.Adafactor (foreach)", "adafactor", _torch_adafactor(True), steps=20),
        Case("eopt.Adafactor", "adafactor", _eopt("adafactor"), steps=20),
    ]
