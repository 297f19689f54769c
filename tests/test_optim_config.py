"""recipes.optim.optimizer_kwargs: config values typed by the eopt constructor's defaults and type hints."""

from __future__ import annotations

import pytest

from recipes.errors import ConfigError
from recipes.optim import optimizer_kwargs


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
