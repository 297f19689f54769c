"""Checkpointer: exact round trip, atomic naming, keep-last-K, clear errors for a wrong or corrupt checkpoint."""

import pytest
import torch

import eopt
from recipes.checkpoint import Checkpointer
from recipes.errors import CheckpointError


def model_and_optimizer(width: int = 8, seed: int = 0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, width), torch.nn.Linear(width, 2))
    optimizer = eopt.build(model.named_parameters(), "adamw", lr=1e-2)
    model(torch.randn(3, 4)).square().sum().backward()
    optimizer.step()
    return model, optimizer


def test_round_trip_restores_model_and_optimizer_exactly(tmp_path):
    model, optimizer = model_and_optimizer()
    ckpt = Checkpointer(tmp_path, keep=2)
    ckpt.save(1, model, optimizer, {"state": {"step": 1}})
    other_model, other_optimizer = model_and_optimizer(seed=1)
    ckpt.load(ckpt.latest(), other_model, other_optimizer)
    assert ckpt.read_trainer_state(ckpt.latest()) == {"state": {"step": 1}}
    for p, q in zip(model.parameters(), other_model.parameters(), strict=True):
        assert torch.equal(p, q)
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(optimizer.state[p][key], other_optimizer.state[q][key])


def test_keeps_the_newest_k_and_ignores_unfinished_writes(tmp_path):
    model, optimizer = model_and_optimizer()
    ckpt = Checkpointer(tmp_path, keep=2)
    (tmp_path / "step_00000009.tmp").mkdir(parents=True)  # a write cut short by a crash
    for step in (1, 2, 3):
        ckpt.save(step, model, optimizer, {})
    assert [p.name for p in ckpt.complete()] == ["step_00000002", "step_00000003"]
    assert ckpt.latest().name == "step_00000003"


def test_checkpoint_of_another_shape_is_a_checkpoint_error(tmp_path):
    ckpt = Checkpointer(tmp_path, keep=1)
    ckpt.save(1, *model_and_optimizer(width=8), {})
    with pytest.raises(CheckpointError, match="does not fit"):
        ckpt.load(ckpt.latest(), *model_and_optimizer(width=16))


def test_corrupt_trainer_state_is_a_checkpoint_error(tmp_path):
    ckpt = Checkpointer(tmp_path, keep=1)
    path = ckpt.save(1, *model_and_optimizer(), {})
    (path / "trainer_state.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="unreadable"):
        ckpt.read_trainer_state(path)
