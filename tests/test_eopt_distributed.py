"""eopt.AdamW (and every backup AdamW group) on FSDP2 and HSDP shards equals one process (gloo, CPU ranks).

The other optimizers have their own files: test_distributed_matrix.py, test_distributed_blockwise.py,
test_distributed_sophia.py.
"""

from __future__ import annotations

import pytest

from tests.distributed_utils import optimizer_parity, spawn

pytestmark = pytest.mark.distributed

# Uneven and empty shards at 2 and 4 ranks: (5, 6) splits 3/2, (1, 4) leaves rank 1 with no rows.
SHAPES = {"a.weight": (5, 6), "b.weight": (1, 4), "c.weight": (12, 8), "c.bias": (12,)}


def test_adamw_fsdp_matches_one_process():
    spawn(optimizer_parity, 2, "fsdp", "adamw", SHAPES, {}, {"lr": 1e-2})


def test_adamw_hsdp_matches_one_process():
    spawn(optimizer_parity, 4, "hsdp", "adamw", SHAPES, {}, {"lr": 1e-2, "weight_decay": 0.1})
