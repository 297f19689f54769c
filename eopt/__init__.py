"""eopt: emerging optimizers for LLM pretraining, faithful to their authors and fast.

Every optimizer is a ``torch.optim.Optimizer`` whose ``"adamw"`` param groups are updated by a backup
AdamW (embeddings, output head, 1-D parameters); :func:`build` routes a model's parameters.
Depends on torch only.
"""

from eopt.adamw import AdamW
from eopt.base import Optimizer, state_bytes
from eopt.muon import Muon
from eopt.registry import OPTIMIZERS, Entry, build, register

register("adamw", AdamW, "all", "AdamW baseline (torch.optim.AdamW arithmetic, fused kernel)")
register("muon", Muon, "matrices", "Muon: Newton-Schulz-orthogonalized momentum (Jordan et al. 2024), NorMuon, AdaMuon")

__all__ = ["OPTIMIZERS", "AdamW", "Entry", "Muon", "Optimizer", "build", "register", "state_bytes"]
