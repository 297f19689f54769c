"""recipes.optim: config values typed by the eopt constructor's defaults and type hints; the parallelism's
``matrix_update`` passed to the optimizers that take it."""

from __future__ import annotations

import pytest

from recipes.config import ModelConfig
from recipes.errors import ConfigError
from recipes.models import build_model
from recipes.optim import build_optimizer, optimizer_kwargs


def test_custom_muon_coefficients_come_through_as_nested_tuples():
    name, kwargs = optimizer_kwargs({"name": "muon", "lr": 0.02, "coefficients": [[3.4445, -4.775, 2.0315]]})
    assert name == "muon"
    assert kwargs["coefficients"] == ((3.4445, -4.775, 2.0315),)
    _, kwargs = optimizer_kwargs({"name": "muon", "lr": 0.02, "coefficients": "polar_express"})
    assert kwargs["coefficients"] == "polar_express"


def test_lists_and_wrong_types_are_refused_where_the_constructor_takes_none():
    with pytest.raises(ConfigError, match=r"optimizer.factor_update_order=.*expected str"):
        optimizer_kwargs({"name": "soap", "lr": 3e-3, "factor_update_order": ["after"]})
    with pytest.raises(ConfigError, match=r"optimizer.ns_steps=.*expected int"):
        optimizer_kwargs({"name": "muon", "lr": 0.02, "ns_steps": "five"})
    _, kwargs = optimizer_kwargs({"name": "soap", "lr": 3e-3, "betas": [0.9, 0.95]})
    assert kwargs["betas"] == (0.9, 0.95)


@pytest.mark.parametrize("name", ["muon", "soap", "shampoo"])
@pytest.mark.parametrize("mode", ["owner", "replicated"])
def test_the_parallelism_matrix_update_reaches_the_matrix_optimizers(name, mode):
    model = build_model(ModelConfig(name="tiny", family="llama", n_layer=1, hidden_size=16, n_head=2), vocab_size=64)
    optimizer = build_optimizer(model, {"name": name, "lr": 1e-3}, tokens_per_step=64, matrix_update=mode)
    matrix_groups = [g for g in optimizer.param_groups if g["algorithm"] == name]
    assert matrix_groups and all(g["matrix_update"] == mode for g in matrix_groups)
    assert optimizer.plan() == {}  # one process: no owner plan whatever the mode
