"""eopt: emerging optimizers for LLM pretraining, faithful to their authors and fast.

Every optimizer is a ``torch.optim.Optimizer`` whose ``"adamw"`` param groups are updated by a backup
AdamW (embeddings, output head, 1-D parameters); :func:`build` routes a model's parameters.
Depends on torch only.
"""

from eopt.adafactor import Adafactor
from eopt.adam_mini import AdamMini
from eopt.adamw import AdamW
from eopt.base import Optimizer, state_bytes
from eopt.muon import Muon
from eopt.registry import OPTIMIZERS, Entry, build, register
from eopt.shampoo import Shampoo
from eopt.soap import SOAP
from eopt.sophia import Sophia

register("adamw", AdamW, "all", "AdamW baseline (torch.optim.AdamW arithmetic, fused kernel)")
register("muon", Muon, "matrices", "Muon: Newton-Schulz-orthogonalized momentum (Jordan et al. 2024), NorMuon, AdaMuon")
register("soap", SOAP, "matrices", "SOAP: Adam in the eigenbasis of Shampoo's Kronecker factors (Vyas et al. 2024)")
register("shampoo", Shampoo, "matrices", "Shampoo: Kronecker-factor root inverses with grafting (DistributedShampoo)")
register("adam_mini", AdamMini, "all", "Adam-mini: one second moment per Hessian block (Zhang et al. 2024)")
register("sophia", Sophia, "all", "Sophia-G/H: clipped diagonal-Hessian preconditioning (Liu et al. 2023)")
register("adafactor", Adafactor, "all", "Adafactor: factored second moments (Shazeer & Stern 2018)")

__all__ = [
    "OPTIMIZERS",
    "Adafactor",
    "AdamMini",
    "AdamW",
    "Entry",
    "Muon",
    "Optimizer",
    "SOAP",
    "Shampoo",
    "Sophia",
    "build",
    "register",
    "state_bytes",
]
