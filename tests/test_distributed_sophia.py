"""Sophia on FSDP2/HSDP shards and its Hessian hook on 2 ranks equal one process (gloo, CPU ranks)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch.distributed.tensor import DTensor

from eopt.distributed import is_sharded, local, local_slice
from eopt.sophia import Sophia
from recipes.config import Config, TrainConfig
from recipes.data import TrainBatches
from recipes.hessian import hessian_hook
from tests.distributed_utils import mesh_for, optimizer_parity, spawn

pytestmark = pytest.mark.distributed

# Uneven and empty shards at 2 and 4 ranks: (5, 6) splits 3/2, (1, 4) leaves rank 1 with no rows.
SHAPES = {"a.weight": (5, 6), "b.weight": (1, 4), "c.weight": (12, 8), "c.bias": (12,)}
# bs = 1 and a large rho put the ratios |m| / (rho * bs * h) on both sides of 1, so the win rate is informative.
HPARAMS = {"lr": 1e-2, "betas": (0.9, 0.9), "rho": 0.5, "bs": 1, "weight_decay": 0.1}
SEQ_LEN, MICRO_BATCH, VOCAB = 8, 4, 32


def _like(full: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """``full`` (a global-shape tensor) laid out like parameter ``p``: its shard for a DTensor."""
    if not is_sharded(p):
        return full
    return DTensor.from_local(
        local_slice(full, p).clone(), p.device_mesh, p.placements, shape=p.shape, stride=p.stride()
    )


def _hessian_recorder(win_rates: dict[tuple[int, bool], float]):
    """``between_steps``: records the step's win rate, then folds a fake estimator gradient into ``h``."""

    def between(optimizer: torch.optim.Optimizer, step: int) -> None:
        sharded = is_sharded(optimizer.param_groups[0]["params"][0])
        win_rates[step, sharded] = float(optimizer.metrics()["sophia_win_rate"])
        generator = torch.Generator().manual_seed(2000 + step)  # the same full g_hat for both optimizers
        for group in optimizer.param_groups:
            for p in group["params"]:
                p.grad = _like(torch.randn(p.shape, generator=generator), p)
        optimizer.update_hessian()

    return between


def _sophia_parity(rank: int, world_size: int, kind: str) -> None:
    for foreach in (False, True):
        win_rates: dict[tuple[int, bool], float] = {}
        hparams = {**HPARAMS, "foreach": foreach}
        optimizer_parity(
            rank, world_size, kind, "sophia", SHAPES, {}, hparams, steps=6, between_steps=_hessian_recorder(win_rates)
        )
        one_process = [win_rates[step, False] for step in range(6)]
        assert [win_rates[step, True] for step in range(6)] == one_process, f"{kind} foreach={foreach}"
        assert one_process[0] == 0.0 and any(0.0 < w < 1.0 for w in one_process)  # h = 0 at step 0: all clipped


def test_sophia_fsdp_matches_one_process():
    spawn(_sophia_parity, 2, "fsdp")


def test_sophia_hsdp_2x2_matches_one_process():
    spawn(_sophia_parity, 4, "hsdp")


def _tiny_llama() -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        intermediate_size=24,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config).float()


def _wrap(model: torch.nn.Module, kind: str, world_size: int) -> torch.nn.Module:
    if kind == "ddp":
        return torch.nn.parallel.DistributedDataParallel(model)
    from torch.distributed.fsdp import fully_shard

    mesh = mesh_for("fsdp", world_size)
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def _hook_parity(rank: int, world_size: int, data_dir: str) -> None:
    cfg = Config(seed=3, train=TrainConfig(grad_clip=0.05))  # a clip below the norm: the global norm matters
    cpu = torch.device("cpu")

    def batches(rank: int, world_size: int) -> TrainBatches:
        return TrainBatches(
            data_dir,
            seq_len=SEQ_LEN,
            batch_size=MICRO_BATCH * world_size,
            micro_batch_size=MICRO_BATCH,
            rank=rank,
            world_size=world_size,
            seed=cfg.seed,
        )

    for kind, estimator in (("fsdp", "gnb"), ("ddp", "gnb"), ("ddp", "hutchinson")):
        reference = _tiny_llama()
        model = _wrap(copy.deepcopy(reference), kind, world_size)
        opts = [Sophia(m.parameters(), estimator=estimator, hessian_interval=2) for m in (reference, model)]
        hooks = [
            hessian_hook(reference, opts[0], batches(0, 1), cfg, cpu, None),
            hessian_hook(model, opts[1], batches(rank, world_size), cfg, cpu, None),
        ]
        for step in range(4):  # estimates after steps 1 and 3, each on its own batch and draws
            for hook in hooks:
                hook(step)
            for i, (want, p) in enumerate(zip(reference.parameters(), model.parameters(), strict=True)):
                ref_h = opts[0].state[want]["hessian"]
                got, expected = local(opts[1].state[p]["hessian"]), local_slice(ref_h, p)
                err = ((got - expected).abs().max() / ref_h.abs().max().clamp_min(1e-30)).item() if got.numel() else 0
                assert err <= 1e-5, f"{kind} {estimator} rank {rank} step {step} param {i}: relative error {err:.3g}"
            assert step < 1 or any(opts[0].state[p]["hessian"].any() for p in reference.parameters())


def test_hessian_hook_on_two_ranks_matches_one_process(make_dataset):
    tokens = np.random.default_rng(0).integers(0, VOCAB, 4000)
    data_dir = make_dataset([tokens], [tokens[:200]], vocab_size=VOCAB)
    spawn(_hook_parity, 2, str(data_dir))
