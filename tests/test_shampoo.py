"""eopt.Shampoo against closed forms (original Shampoo, grafting norms, blocking) and pytorch_optimizer.Shampoo."""

from __future__ import annotations

import pytest
import torch
from optim_checks import (
    assert_degenerate_gradients_stay_finite,
    assert_resume_is_bitwise,
    named_params,
    set_grads,
)

import eopt
from eopt.kronecker import tensor_blocks

ORIGINAL = {
    "betas": (0.0, 1.0),
    "grafting": "none",
    "use_bias_correction": False,
    "precondition_frequency": 1,
    "start_preconditioning_step": 1,
    "weight_decay": 0.0,
}


def _power(a: torch.Tensor, exponent: float) -> torch.Tensor:
    evals, evecs = torch.linalg.eigh(a)
    return evecs @ torch.diag(evals**exponent) @ evecs.T


def _grads(shape, steps, seed=1, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype) for _ in range(steps)]


# --------------------------------------------------------------------------- original Shampoo


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(6, 6), (6, 4), (3, 4, 5)])
def test_original_configuration_is_closed_form_shampoo(shape, dtype):
    lr, eps, steps = 0.1, 1e-4, 12
    w0 = torch.randn(shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    p = torch.nn.Parameter(w0.to(dtype))
    opt = eopt.Shampoo([p], lr=lr, epsilon=eps, **ORIGINAL)
    w = w0.clone()
    factors = [eps * torch.eye(n, dtype=torch.float64) for n in shape]
    order = len(shape)
    for g in _grads(shape, steps, dtype=torch.float64):
        p.grad = g.to(dtype)
        opt.step()
        direction = g
        for i, n in enumerate(shape):
            unfolded = g.movedim(i, 0).reshape(n, -1)
            factors[i] += unfolded @ unfolded.T
            root = _power(factors[i], -1.0 / (2 * order))
            direction = torch.tensordot(root, direction.movedim(i, 0), dims=1).movedim(0, i)
        w -= lr * direction
    rel = ((p.detach().double() - w).abs().max() / w.abs().max()).item()
    assert rel <= (1e-6 if dtype == torch.float32 else 1e-10)


def test_original_configuration_matches_pytorch_optimizer_shampoo():
    ref_shampoo = pytest.importorskip("pytorch_optimizer").Shampoo
    shape, steps = (8, 5), 10
    w0 = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    a, b = torch.nn.Parameter(w0.clone()), torch.nn.Parameter(w0.clone())
    # pytorch_optimizer starts its factors at matrix_eps * I and takes the SVD root of the factor itself:
    # the same (eps I + sum G G^T)^(-1/4) as epsilon added before the root.
    ref = ref_shampoo([a], lr=0.05, matrix_eps=1e-3)
    ours = eopt.Shampoo([b], lr=0.05, epsilon=1e-3, **ORIGINAL)
    for g in _grads(shape, steps):
        a.grad, b.grad = g.clone(), g.clone()
        ref.step()
        ours.step()
    assert ((a - b).abs().max() / a.abs().max()).item() <= 1e-5


# ------------------------------------------------------------------------------------- grafting


def _graft_reference(kind, grads, beta2=0.999, eps=1e-10, beta1=0.9):
    """The grafting method's own update at the last step, from its formula (momentum of betas[0])."""
    m = torch.zeros_like(grads[0], dtype=torch.float64)
    v = torch.zeros_like(m)
    for t, g in enumerate(grads, start=1):
        g = g.double()
        m = beta1 * m + (1 - beta1) * g
        d = m / (1 - beta1**t)
        if kind == "adam":
            v = beta2 * v + (1 - beta2) * g * g
            out = d / ((v / (1 - beta2**t)).sqrt() + eps)
        elif kind == "rmsprop":
            v = beta2 * v + (1 - beta2) * g * g
            out = d / (v.sqrt() + eps)
        elif kind == "adagrad":
            v = v + g * g
            out = d / (v.sqrt() + eps)
        else:
            out = d
    return out


@pytest.mark.parametrize("kind", ["adam", "adagrad", "rmsprop", "sgd"])
def test_grafting_norms_per_block_equal_the_grafting_methods(kind):
    shape, steps = (20, 6), 4
    p = torch.nn.Parameter(torch.zeros(shape, dtype=torch.float64))
    opt = eopt.Shampoo([p], lr=1.0, grafting=kind, max_preconditioner_dim=8, precondition_frequency=1)
    grads = _grads(shape, steps, dtype=torch.float64)
    for g in grads:
        before = p.detach().clone()
        p.grad = g
        opt.step()
    delta = before - p.detach()
    graft = _graft_reference(kind, grads)
    blocks = tensor_blocks(shape, 8)
    assert len(blocks) == 3
    for block in blocks:
        torch.testing.assert_close(delta[block].norm(), graft[block].norm(), rtol=1e-10, atol=0)
    # The direction is Shampoo's, not the grafting method's.
    assert not torch.allclose(delta, graft, rtol=1e-3)


def test_grafting_alone_before_start_preconditioning_step():
    shape = (6, 5)
    p = torch.nn.Parameter(torch.zeros(shape, dtype=torch.float64))
    opt = eopt.Shampoo([p], lr=1.0, precondition_frequency=10, start_preconditioning_step=10)
    grads = _grads(shape, 5, dtype=torch.float64)
    for g in grads:
        before = p.detach().clone()
        p.grad = g
        opt.step()
    torch.testing.assert_close(before - p.detach(), _graft_reference("adam", grads), rtol=1e-12, atol=1e-12)


def test_one_dimensional_params_get_the_grafting_method():
    p = torch.nn.Parameter(torch.zeros(7, dtype=torch.float64))
    opt = eopt.Shampoo([p], lr=1.0, grafting="adagrad")
    grads = _grads((7,), 3, dtype=torch.float64)
    for g in grads:
        before = p.detach().clone()
        p.grad = g
        opt.step()
    torch.testing.assert_close(before - p.detach(), _graft_reference("adagrad", grads), rtol=1e-12, atol=1e-12)
    assert not any(k.startswith("factor") for k in opt.state[p])


def test_inverse_exponent_override_and_ema_factors_with_bias_correction():
    shape, eps, b2 = (5, 4), 1e-6, 0.9
    p = torch.nn.Parameter(torch.zeros(shape, dtype=torch.float64))
    opt = eopt.Shampoo(
        [p],
        lr=1.0,
        betas=(0.0, b2),
        epsilon=eps,
        grafting="none",
        inverse_exponent_override=2,
        start_preconditioning_step=1,
    )
    grads = _grads(shape, 3, dtype=torch.float64)
    left, right = torch.zeros(5, 5, dtype=torch.float64), torch.zeros(4, 4, dtype=torch.float64)
    for g in grads:
        before = p.detach().clone()
        p.grad = g
        opt.step()
        left = b2 * left + (1 - b2) * g @ g.T
        right = b2 * right + (1 - b2) * g.T @ g
    bias = 1 - b2**3
    expected = _power(left / bias + eps * torch.eye(5), -0.5) @ g @ _power(right / bias + eps * torch.eye(4), -0.5)
    torch.testing.assert_close(before - p.detach(), expected, rtol=1e-8, atol=1e-10)


def test_precondition_frequency_reuses_root_inverses_between_refreshes():
    p = torch.nn.Parameter(torch.zeros(5, 4))
    opt = eopt.Shampoo([p], precondition_frequency=3)
    roots = []
    for g in _grads((5, 4), 7):
        p.grad = g
        opt.step()
        roots.append(opt.state[p]["root_0_0"].clone())
    changed = [t + 1 for t in range(1, 7) if not torch.equal(roots[t], roots[t - 1])]
    assert changed == [3, 6]


# ------------------------------------------------------------------------------------- blocking


def test_blocking_3000_x_100():
    blocks = tensor_blocks((3000, 100), 1024)
    assert blocks == [
        (slice(0, 1024), slice(0, 100)),
        (slice(1024, 2048), slice(0, 100)),
        (slice(2048, 3000), slice(0, 100)),
    ]
    p = torch.nn.Parameter(torch.zeros(3000, 100))
    opt = eopt.Shampoo([p])
    shapes = {
        k: tuple(v.shape) for k, v in opt.state[p].items() if k.startswith(("factor", "root")) and k != "root_failures"
    }
    assert shapes == {
        "factor_0_0": (2, 1024, 1024),
        "root_0_0": (2, 1024, 1024),
        "factor_0_1": (2, 100, 100),
        "root_0_1": (2, 100, 100),
        "factor_1_0": (1, 952, 952),
        "root_1_0": (1, 952, 952),
        "factor_1_1": (1, 100, 100),
        "root_1_1": (1, 100, 100),
    }


def test_blocks_are_preconditioned_independently():
    shape, eps = (11, 3), 1e-6
    g = _grads(shape, 1, dtype=torch.float64)[0]
    p = torch.nn.Parameter(torch.zeros(shape, dtype=torch.float64))
    opt = eopt.Shampoo([p], lr=1.0, epsilon=eps, max_preconditioner_dim=4, **ORIGINAL)
    p.grad = g
    opt.step()
    for block in tensor_blocks(shape, 4):
        gb = g[block]
        left = _power(gb @ gb.T + eps * torch.eye(gb.shape[0]), -0.25)
        right = _power(gb.T @ gb + eps * torch.eye(gb.shape[1]), -0.25)
        torch.testing.assert_close(-p.detach()[block], left @ gb @ right, rtol=1e-8, atol=1e-10)


# ------------------------------------------------------------------------------------- numerics


@pytest.mark.parametrize("kind", ["zero", "rank1", "huge", "tiny"])
@pytest.mark.parametrize("grafting", ["adam", "none"])
def test_degenerate_gradients_stay_finite(kind, grafting):
    params = [torch.nn.Parameter(torch.randn(s)) for s in [(8, 6), (8, 6), (5,), (3, 4, 2)]]
    opt = eopt.Shampoo(params, grafting=grafting, precondition_frequency=2, start_preconditioning_step=2)
    assert_degenerate_gradients_stay_finite(opt, params, kind, steps=5)


def test_eigh_failure_retries_in_float64_then_keeps_the_previous_root(monkeypatch):
    real_eigh = torch.linalg.eigh
    p = torch.nn.Parameter(torch.randn(5, 4))
    opt = eopt.Shampoo([p], precondition_frequency=1)
    p.grad = torch.randn(5, 4)

    def fp32_fails(a, *args, **kwargs):
        if a.dtype == torch.float32:
            raise torch.linalg.LinAlgError("forced fp32 failure")
        return real_eigh(a, *args, **kwargs)

    monkeypatch.setattr(torch.linalg, "eigh", fp32_fails)
    opt.step()
    state = opt.state[p]
    assert state["root_failures"].item() == 0
    root = state["root_0_0"].clone()
    assert not torch.equal(root, torch.eye(5).expand_as(root))

    def always_fails(a, *args, **kwargs):
        raise torch.linalg.LinAlgError("forced failure")

    monkeypatch.setattr(torch.linalg, "eigh", always_fails)
    p.grad = torch.randn(5, 4)
    opt.step()
    assert state["root_failures"].item() == 2
    assert torch.equal(state["root_0_0"], root)
    assert torch.isfinite(p).all()


@pytest.mark.parametrize(
    "kw, name",
    [
        ({"betas": (0.9, 0.0)}, "betas"),
        ({"grafting": "adamw"}, "grafting"),
        ({"precondition_frequency": 0}, "precondition_frequency"),
        ({"start_preconditioning_step": 0}, "start_preconditioning_step"),
        ({"inverse_exponent_override": -2}, "inverse_exponent_override"),
        ({"epsilon": -1.0}, "epsilon"),
    ],
)
def test_invalid_arguments_name_the_argument(kw, name):
    with pytest.raises(ValueError, match=name):
        eopt.Shampoo([torch.nn.Parameter(torch.zeros(2, 2))], **kw)


# ----------------------------------------------------------------------- state, scheduler, build


def _model_params():
    return named_params({"a.weight": (8, 6), "b.weight": (8, 6), "big.weight": (10, 3), "norm.weight": (6,)})


def test_state_dict_round_trip_is_bitwise():
    kw = {"precondition_frequency": 3, "max_preconditioner_dim": 4, "weight_decay": 0.01}
    assert_resume_is_bitwise(lambda named: eopt.build(named, "shampoo", **kw), _model_params(), 4, 6)


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before")
def test_scheduler_scales_every_group():
    named = _model_params()
    opt = eopt.build(named, "shampoo", backup={"lr": 1e-3}, lr=1e-2)
    assert {g["algorithm"] for g in opt.param_groups} == {"shampoo", "adamw"}
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5 if step else 1.0)
    sched.step()
    assert sorted(g["lr"] for g in opt.param_groups) == [0.5e-3, 0.5e-2]


def test_algoperf_configuration_through_build():
    named = _model_params()
    opt = eopt.build(
        named,
        "shampoo",
        lr=1.7486e-3,
        betas=(0.93266, 0.995516),
        epsilon=1e-8,
        weight_decay=0.0812,
        precondition_frequency=2,
        start_preconditioning_step=2,
        grafting_eps=1e-8,
        use_nesterov=True,
    )
    before = [p.detach().clone() for _, p in named]
    for step in range(5):
        set_grads(named, step)
        opt.step()
    for (_, p), b in zip(named, before, strict=True):
        assert torch.isfinite(p).all() and not torch.equal(p, b)
