"""eopt.Adafactor against torch.optim.Adafactor, and its absolute-step and momentum options by formula."""

from __future__ import annotations

import copy

import pytest
import torch

import eopt
from eopt.adafactor import Adafactor


def _params(seed: int = 0) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    shapes = [(16, 8), (8,), (3, 5, 4), (1, 6), (7, 1)]
    return [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]


def _run(opt: torch.optim.Optimizer, params: list[torch.Tensor], steps: int, seed: int = 1) -> None:
    gen = torch.Generator().manual_seed(seed)
    for t in range(steps):
        for i, p in enumerate(params):
            g = torch.randn(p.shape, generator=gen)
            if t == 2 and i == 0:
                g = torch.zeros_like(g)  # a zero gradient: clamps of eps1 engage
            if t == 3 and i == 0:
                g = torch.outer(torch.randn(16, generator=gen), torch.randn(8, generator=gen))  # rank one
            p.grad = g
        opt.step()


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"lr": 0.05, "weight_decay": 0.1, "d": 1.5},
        {"lr": 1e-3, "beta2_decay": -0.5, "eps": (1e-20, 1e-2)},
    ],
)
def test_matches_torch_adafactor(kw: dict) -> None:
    ours, ref = _params(), _params()
    _run(Adafactor(ours, **kw), ours, 25)
    _run(torch.optim.Adafactor(ref, foreach=False, **kw), ref, 25)
    for a, b in zip(ours, ref, strict=True):
        assert (a - b).norm() <= 1e-6 * b.norm()


def _reference(
    p: torch.Tensor, grads: list[torch.Tensor], lr: float, beta1: float | None, relative: bool
) -> torch.Tensor:
    """The update of the class docstring, written out in float64 with explicit outer products."""
    p = p.double().clone()
    r = c = v = m = None
    eps1, eps2 = torch.finfo(torch.float32).eps, 1e-3
    for t, g in enumerate(grads, start=1):
        g = g.double()
        w = t**-0.8
        alpha = min(lr, t**-0.5) * max(eps2, p.pow(2).mean().sqrt().item()) if relative else lr
        if p.ndim > 1:
            r = (g * g).mean(1) * w + (0 if r is None else r * (1 - w))
            c = (g * g).mean(0) * w + (0 if c is None else c * (1 - w))
            var = torch.outer(r, c) / max(r.mean().item(), eps1)
        else:
            v = (g * g) * w + (0 if v is None else v * (1 - w))
            var = v
        u = g / var.sqrt().clamp(min=eps1)
        u = u / max(1.0, u.pow(2).mean().sqrt().item())
        if beta1 is not None:
            m = (1 - beta1) * u + (0 if m is None else beta1 * m)
            u = m
        p -= alpha * u
    return p.float()


@pytest.mark.parametrize("relative", [True, False])
@pytest.mark.parametrize("beta1", [None, 0.9])
def test_absolute_step_and_momentum_match_formula(relative: bool, beta1: float | None) -> None:
    gen = torch.Generator().manual_seed(4)
    for shape in [(6, 5), (7,)]:
        p = torch.nn.Parameter(torch.randn(shape, generator=gen))
        grads = [torch.randn(shape, generator=gen) for _ in range(8)]
        expected = _reference(p.detach(), grads, 0.02, beta1, relative)
        opt = Adafactor([p], lr=0.02, beta1=beta1, relative_step=relative)
        for g in grads:
            p.grad = g
            opt.step()
        torch.testing.assert_close(p.detach(), expected, rtol=1e-5, atol=1e-6)


def test_state_is_factored_and_round_trips_with_scheduler() -> None:
    params = _params()
    opt = Adafactor(params, lr=0.05, relative_step=False, beta1=0.9)
    assert opt.state[params[0]]["row_var"].shape == (16, 1) and opt.state[params[0]]["col_var"].shape == (1, 8)
    assert opt.state[params[2]]["row_var"].shape == (3, 5, 1) and opt.state[params[1]]["variance"].shape == (8,)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    _run(opt, params, 3)
    sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.025)
    twin = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt2 = Adafactor(twin, lr=0.05, relative_step=False, beta1=0.9)
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
    _run(opt, params, 2, seed=9)
    _run(opt2, twin, 2, seed=9)
    for a, b in zip(params, twin, strict=True):
        assert torch.equal(a, b)


def test_build_and_bad_args() -> None:
    emb = torch.nn.Parameter(torch.randn(10, 4))
    w = torch.nn.Parameter(torch.randn(4, 4))
    opt = eopt.build([("emb", emb), ("w", w)], "adafactor", hints={"emb": {"role": "embedding"}})
    assert {g["algorithm"] for g in opt.param_groups} == {"adafactor"}
    emb.grad, w.grad = torch.zeros(10, 4), torch.randn(4, 4)
    opt.step()
    assert torch.isfinite(emb).all() and torch.isfinite(w).all()
    with pytest.raises(ValueError, match="d"):
        Adafactor([w], d=0.5)
    with pytest.raises(ValueError, match="beta1"):
        Adafactor([w], beta1=1.0)
