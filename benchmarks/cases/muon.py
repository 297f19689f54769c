"""Muon rows: eopt.Muon (batched and single-tensor paths, NorMuon, AdaMuon) vs NVIDIA Emerging-Optimizers' Muon.

Every row runs the same Muon configuration on the hidden matrices (Keller's ``simple`` coefficients, 5
steps, Nesterov, ``shape_scaling``, fp32 Newton–Schulz) and a fused AdamW on embeddings, head and norms,
so the rows differ only in how the Muon part is computed. NVIDIA's Muon runs in fp32
(``fp32_matmul_prec="highest"``); its default ``"medium"`` casts to bf16, ~300x slower on a CPU.
``torch.optim.Muon`` is left out: its Newton–Schulz is always bf16 (minutes per step here).
"""

from __future__ import annotations

import torch

from benchmarks.cases import Case, Chain, backup_adamw, split_params
from tests.oracles import allow_nvidia_import

MUON = {"lr": 0.02, "momentum": 0.95, "weight_decay": 0.0}
BACKUP = {"lr": 8e-3, "betas": (0.9, 0.95), "eps": 1e-8, "weight_decay": 0.0}


def _nvidia(named, info) -> torch.optim.Optimizer:
    allow_nvidia_import()
    from emerging_optimizers.orthogonalized_optimizers import Muon

    matrices, others = split_params(named, info)
    muon = Muon(
        [p for _, p in matrices],
        nesterov=True,
        fp32_matmul_prec="highest",
        coefficient_type="simple",
        num_ns_steps=5,
        scale_mode="shape_scaling",
        **MUON,
    )
    return Chain(muon, backup_adamw(others, **BACKUP))


def _eopt(**hparams):
    def make(named, info) -> torch.optim.Optimizer:
        import eopt

        kw = {**MUON, "ns_dtype": "float32", **hparams}
        return eopt.build(named, "muon", hints=info["hints"], backup=BACKUP, **kw)

    return make


def cases() -> list[Case]:
    return [
        Case("emerging_optimizers.Muon (fp32)", "muon", _nvidia, baseline=True),
        Case("eopt.Muon", "muon", _eopt()),
        Case("eopt.Muon (ns_method=direct)", "muon", _eopt(ns_method="direct")),
        Case("eopt.Muon (foreach=False)", "muon", _eopt(foreach=False)),
        Case("eopt.Muon (normuon)", "muon", _eopt(second_moment="normuon", scale="spectral", lr=2e-3)),
        Case("eopt.Muon (adamuon)", "muon", _eopt(second_moment="adamuon", scale="match_rms_adamw", lr=2e-3)),
    ]
