"""eopt.Sophia against the authors' SophiaG (sophia_opt 0.2.2) and Sophia-H against its formula."""

from __future__ import annotations

import copy

import pytest
import torch

import eopt
from eopt.sophia import Sophia


def _params(seed: int = 0) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    shapes = [(16, 8), (8,), (5, 3, 4), (1, 1)]
    return [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]


def _grads(params: list[torch.Tensor], gen: torch.Generator) -> list[torch.Tensor]:
    return [torch.randn(p.shape, generator=gen) * 0.1 for p in params]


def _set(params: list[torch.Tensor], grads: list[torch.Tensor]) -> None:
    for p, g in zip(params, grads, strict=True):
        p.grad = g.clone()


@pytest.mark.parametrize("foreach", [False, True])
def test_matches_sophiag_with_interleaved_hessian_updates(foreach: bool) -> None:
    sophia_opt = pytest.importorskip("sophia_opt")
    ours, ref = _params(), _params()
    kw = dict(lr=1e-2, betas=(0.965, 0.99), rho=0.04, weight_decay=0.1)
    bs = 64
    # The foreach run takes bs per call, as SophiaG's step(bs=...), over a different constructor value.
    opt = Sophia(ours, **kw, bs=1 if foreach else bs, foreach=foreach)
    oracle = sophia_opt.SophiaG(ref, **kw)
    gen = torch.Generator().manual_seed(1)
    win_rates = []
    for step in range(1, 31):
        grads = _grads(ours, gen)
        _set(ours, grads)
        _set(ref, grads)
        opt.step(bs=bs) if foreach else opt.step()
        oracle.step(bs=bs)
        win_rates.append(float(opt.metrics()["sophia_win_rate"]))
        if step % 3 == 0:  # the estimator's gradient on a fresh batch, after the step
            h_grads = _grads(ours, gen)
            _set(ours, h_grads)
            _set(ref, h_grads)
            opt.update_hessian()
            oracle.update_hessian()
    for a, b in zip(ours, ref, strict=True):
        assert (a - b).norm() <= 1e-6 * b.norm()
    # Before the first Hessian update every coordinate is clipped (sign step); later some are not.
    assert win_rates[0] == 0.0 and max(win_rates) > 0.0


def test_win_rate_is_the_unclipped_fraction() -> None:
    p = torch.nn.Parameter(torch.zeros(4))
    opt = Sophia([p], lr=1.0, betas=(0.0, 0.0), rho=1.0, weight_decay=0.0, bs=1)
    assert opt.metrics() == {}  # no step yet
    p.grad = torch.tensor([1.0, 1.0, 1.0, 1.0])
    opt.update_hessian()  # h = g^2 = 1
    p.grad = torch.tensor([0.5, -0.25, 2.0, -3.0])  # m = g; |m| / h: 0.5, 0.25, 2, 3
    opt.step()
    torch.testing.assert_close(p.detach(), -torch.tensor([0.5, -0.25, 1.0, -1.0]))
    p.grad = torch.full((4,), 100.0)
    opt.update_hessian()  # a new h after the step does not change the step's win rate
    assert float(opt.metrics()["sophia_win_rate"]) == 0.5


def test_hutchinson_uses_rho_h_without_bs_and_floors_negative_curvature() -> None:
    p = torch.nn.Parameter(torch.zeros(3))
    opt = Sophia([p], lr=1.0, betas=(0.0, 0.5), rho=0.5, weight_decay=0.0, bs=1000, estimator="hutchinson")
    p.grad = torch.tensor([4.0, -2.0, 8.0])  # u * (H u) samples, may be negative
    opt.update_hessian()  # h = 0.5 * h_hat = (2, -1, 4)
    p.grad = torch.tensor([0.5, 0.5, -1.0])
    opt.step()
    # D = max(rho * h, 1e-15) = (1, 1e-15, 2): ratios 0.5, clipped 1, -0.5
    torch.testing.assert_close(p.detach(), -torch.tensor([0.5, 1.0, -0.5]))


def test_backup_groups_and_build_routing() -> None:
    emb = torch.nn.Parameter(torch.randn(10, 4))
    w = torch.nn.Parameter(torch.randn(4, 4))
    opt = eopt.build([("emb", emb), ("w", w)], "sophia", hints={"emb": {"role": "embedding"}})
    assert {g["algorithm"] for g in opt.param_groups} == {"sophia"}  # "all", as the authors
    opt = eopt.build(
        [("emb", emb), ("w", w)], "sophia", hints={"emb": {"role": "embedding"}}, routing="matrices", bs=128
    )
    algos = {g["param_names"][0]: g["algorithm"] for g in opt.param_groups}
    assert algos == {"emb": "adamw", "w": "sophia"}
    emb.grad, w.grad = torch.randn(10, 4), torch.randn(4, 4)
    before = emb.detach().clone()
    opt.step()
    opt.update_hessian()  # skips the AdamW group
    assert not torch.equal(before, emb) and "hessian" not in opt.state[emb]
    opt.set_bs(256)
    assert [g["bs"] for g in opt.param_groups if g["algorithm"] == "sophia"] == [256]
    assert opt.hessian_interval == 10


def test_state_dict_round_trip_and_scheduler() -> None:
    params = _params()
    opt = Sophia(params, lr=1e-2, bs=32)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5**s)
    gen = torch.Generator().manual_seed(2)
    for _ in range(3):
        _set(params, _grads(params, gen))
        opt.step()
        opt.update_hessian()
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-2 * 0.125)
    twin = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt2 = Sophia(twin, lr=1e-2, bs=32)
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
    grads = _grads(params, gen)
    _set(params, grads)
    _set(twin, grads)
    opt.step()
    opt2.step()
    for a, b in zip(params, twin, strict=True):
        assert torch.equal(a, b)


def test_zero_gradient_stays_finite_and_bad_args_raise() -> None:
    p = torch.nn.Parameter(torch.randn(4, 4))
    opt = Sophia([p])
    p.grad = torch.zeros_like(p)
    opt.update_hessian()
    opt.step()
    assert torch.isfinite(p).all() and float(opt.metrics()["sophia_win_rate"]) == 1.0
    with pytest.raises(ValueError, match="estimator"):
        Sophia([p], estimator="newton")
    with pytest.raises(ValueError, match="bs"):
        Sophia([p], bs=0)
