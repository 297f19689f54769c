"""eopt.SOAP against pytorch_optimizer.SOAP (the authors' algorithm), NVIDIA's SOAP, and per-option definitions."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from optim_checks import (
    assert_degenerate_gradients_stay_finite,
    assert_resume_is_bitwise,
    named_params,
    set_grads,
)
from oracles import allow_nvidia_import

import eopt
from eopt.kronecker import merge_small_dims, update_factor_


def _grads(shapes, steps, seed=1, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    return [[torch.randn(s, generator=gen) * scale for s in shapes] for _ in range(steps)]


def _params(shapes, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen) for s in shapes]


def _run(make, init, grads):
    params = [torch.nn.Parameter(p.clone()) for p in init]
    opt = make(params)
    for step_grads in grads:
        for p, g in zip(params, step_grads, strict=True):
            p.grad = g.clone()
        opt.step()
    return params, opt


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


# ------------------------------------------------------------------ the authors' algorithm (oracle)

ORACLE_CASES = {
    "square, batched": ([(16, 16), (16, 16), (12, 12)], {}),
    "16 x 24 two-sided": ([(16, 24)], {}),
    "one-sided": ([(16, 24), (24, 16)], {"max_precond_dim": 20}),
    "1-D, precondition_1d off": ([(10,)], {}),
    "1-D, precondition_1d on": ([(4,), (4,)], {"precondition_1d": True}),
    "3-D": ([(4, 6, 8)], {}),
    "3-D merge_dims": ([(4, 6, 8)], {"merge_dims": True, "max_precond_dim": 30}),
    "normalize_grads, decay": ([(16, 16)], {"normalize_grads": True, "weight_decay": 0.1, "lr": 1e-2}),
}
ORACLE_NAMES = {"max_precond_dim": "max_precondition_dim", "normalize_grads": "normalize_gradient"}


@pytest.mark.parametrize("case", list(ORACLE_CASES))
def test_matches_pytorch_optimizer_soap(case):
    ref_soap = pytest.importorskip("pytorch_optimizer").SOAP
    shapes, kw = ORACLE_CASES[case]
    init, grads = _params(shapes), _grads(shapes, 30)
    ref_kw = {ORACLE_NAMES.get(k, k): v for k, v in kw.items()}
    ref, _ = _run(lambda ps: ref_soap(ps, precondition_frequency=3, **ref_kw), init, grads)
    ours, _ = _run(lambda ps: eopt.SOAP(ps, precondition_frequency=3, **kw), init, grads)
    for a, b, p0 in zip(ours, ref, init, strict=True):
        assert not torch.equal(b, p0)
        assert _rel(a, b) <= 1e-5, case


def test_first_step_builds_basis_without_update():
    p = torch.nn.Parameter(torch.randn(6, 5))
    before = p.detach().clone()
    opt = eopt.SOAP([p])
    g = torch.randn(6, 5)
    p.grad = g
    opt.step()
    assert torch.equal(p.detach(), before)
    q = opt.state[p]["basis_0"]
    f = (1 - 0.95) * g @ g.T
    rayleigh = torch.diagonal(q.T @ f @ q)
    assert torch.all(rayleigh[:-1] >= rayleigh[1:] - 1e-6)
    torch.testing.assert_close(q.T @ q, torch.eye(6), atol=1e-5, rtol=0)


@pytest.mark.parametrize("weight", [0.05, None])
def test_symmetric_factor_update_equals_the_full_product(weight):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 650, 40, generator=gen)
    start = torch.randn(2, 650, 650, generator=gen)
    start = start + start.mT
    got = start.clone()
    update_factor_(got, x, 1, weight)
    full = x @ x.mT
    expected = start + full if weight is None else torch.lerp(start, full, weight)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(got, got.mT, rtol=1e-6, atol=1e-5)


def test_merge_small_dims():
    assert merge_small_dims([4, 6, 8], 30) == [24, 8]
    assert merge_small_dims([3, 3, 3, 3], 9) == [9, 9]
    assert merge_small_dims([20000, 3], 1000) == [20000, 3]
    assert merge_small_dims([1, 2, 768, 1, 2048], 1024) == [2, 768, 2048]


# ------------------------------------------------------------------------- NVIDIA's SOAP (oracle)


def _nvidia_soap():
    allow_nvidia_import()
    module = pytest.importorskip("emerging_optimizers.soap.soap")
    return module.SOAP


NVIDIA_OURS = {"factor_update_order": "before", "precondition_frequency": 1, "correct_shampoo_beta_bias": True}


@pytest.mark.parametrize("option", ["plain", "nesterov", "eigh", "power_iter_steps"])
def test_matches_nvidia_soap_where_configurations_coincide(option):
    nvidia_soap = _nvidia_soap()
    theirs = {"fp32_matmul_prec": "highest", "qr_fp32_matmul_prec": "highest"}
    ours = dict(NVIDIA_OURS)
    if option == "nesterov":
        theirs["nesterov"], ours["use_nesterov"] = True, True
    if option == "eigh":
        theirs["use_eigh"], ours["use_eigh"] = True, True
    if option == "power_iter_steps":
        theirs["power_iter_steps"], ours["power_iter_steps"] = 2, 2
    # The first basis is the SVD basis of the first gradient, so G' is diagonal up to round-off noise; an
    # eps well above that noise, and no Adam bias correction (NVIDIA adds eps to sqrt(v_hat), the authors to
    # sqrt(v)), make the two definitions coincide exactly.
    theirs["correct_bias"], theirs["correct_shampoo_beta_bias"], ours["correct_bias"] = False, True, False
    shapes = [(12, 12), (10, 10)]
    init, grads = _params(shapes), _grads(shapes, 12)
    common = {"lr": 1e-2, "betas": (0.9, 0.95), "shampoo_beta": 0.9, "eps": 1e-3, "weight_decay": 0.0}
    ref, _ = _run(lambda ps: nvidia_soap(ps, **common, **theirs), init, grads)
    got, _ = _run(lambda ps: eopt.SOAP(ps, **common, **ours), init, grads)
    for a, b in zip(got, ref, strict=True):
        assert _rel(a, b) <= 1e-5, option


# ------------------------------------------------------------------------ NVIDIA options, by definition


def _one_step(shape=(8, 6), seed=3, **kw):
    gen = torch.Generator().manual_seed(seed)
    p = torch.nn.Parameter(torch.randn(shape, generator=gen))
    g = torch.randn(shape, generator=gen)
    before = p.detach().clone()
    opt = eopt.SOAP([p], lr=0.1, weight_decay=0.0, factor_update_order="before", **kw)
    p.grad = g
    opt.step()
    return (p.detach() - before), g, opt, p


def test_factor_update_before_steps_at_once_in_the_current_gradients_eigenbasis():
    eps, b1, b2 = 1e-2, 0.95, 0.95
    delta, g, _, _ = _one_step(eps=eps)
    g64 = g.double()
    q_l = torch.linalg.eigh(g64 @ g64.T).eigenvectors
    q_r = torch.linalg.eigh(g64.T @ g64).eigenvectors
    # t = 1: m = (1-b1) G', v = (1-b2) G'^2 in the eigenbasis of G's own factors (odd in G', so the
    # eigenvectors' signs cancel); eps keeps the round-off entries of G' (zero in exact arithmetic) out.
    gp = q_l.T @ g64 @ q_r
    adam = (1 - b1) * gp / ((1 - b2) ** 0.5 * gp.abs() + eps)
    expected = -0.1 * (1 - b2) ** 0.5 / (1 - b1) * q_l @ adam @ q_r.T
    torch.testing.assert_close(delta.double(), expected, atol=1e-5, rtol=0)


def test_nesterov_first_step_scale():
    plain, _, _, _ = _one_step()
    nesterov, _, _, _ = _one_step(use_nesterov=True)
    b1 = 0.95
    torch.testing.assert_close(nesterov, plain * (1 + b1 / (1 + b1)), atol=1e-6, rtol=1e-5)


def test_trace_normalization_scales_by_sqrt_trace_of_first_factor():
    plain, _, _, _ = _one_step()
    traced, _, opt, p = _one_step(trace_normalization=True)
    trace = torch.trace(opt.state[p]["factor_0"])
    torch.testing.assert_close(traced, plain * trace.sqrt(), atol=1e-6, rtol=1e-5)


def test_normalize_preconditioned_grads_gives_unit_rms_update():
    delta, _, _, _ = _one_step(normalize_preconditioned_grads=True)
    assert math.isclose(delta.square().mean().sqrt().item(), 0.1, rel_tol=1e-5)


def test_max_update_rms_clips_only_above_the_limit():
    plain, _, _, _ = _one_step()
    clipped, _, _, _ = _one_step(max_update_rms=0.5)
    assert math.isclose(clipped.square().mean().sqrt().item(), 0.05, rel_tol=1e-4)
    loose, _, _, _ = _one_step(max_update_rms=100.0)
    torch.testing.assert_close(loose, plain, atol=1e-7, rtol=1e-6)


def test_correct_shampoo_beta_bias_first_factor_is_the_full_product():
    _, g, opt, p = _one_step(correct_shampoo_beta_bias=True)
    torch.testing.assert_close(opt.state[p]["factor_0"], g @ g.T, rtol=1e-5, atol=1e-5)
    _, g, opt, p = _one_step()
    torch.testing.assert_close(opt.state[p]["factor_0"], 0.05 * g @ g.T, rtol=1e-5, atol=1e-6)


def _bases(steps, **kw):
    """The left basis after every step of a fixed random run (authors' order)."""
    shapes = [(8, 8)]
    init, grads = _params(shapes), _grads(shapes, steps)
    params = [torch.nn.Parameter(init[0].clone())]
    opt = eopt.SOAP(params, **kw)
    out = []
    for step_grads in grads:
        params[0].grad = step_grads[0]
        opt.step()
        out.append(opt.state[params[0]]["basis_0"].clone())
    return out, opt, params[0]


def _changed(bases):
    """Adam steps t (1-based, after the first basis-building call) at which the basis changed."""
    return [t for t in range(1, len(bases)) if not torch.equal(bases[t], bases[t - 1])]


def test_precondition_frequency_int_and_callable():
    bases, _, _ = _bases(13, precondition_frequency=4)
    assert _changed(bases) == [4, 8, 12]
    by_call, _, _ = _bases(13, precondition_frequency=lambda t: 4)
    assert all(torch.equal(a, b) for a, b in zip(bases, by_call, strict=True))
    varying, _, _ = _bases(13, precondition_frequency=lambda t: 2 if t < 6 else 5)
    assert _changed(varying) == [2, 4, 10]


def test_precondition_warmup_refreshes_every_step_at_first():
    bases, _, _ = _bases(10, precondition_frequency=100, precondition_warmup_steps=4)
    assert _changed(bases) == [1, 2, 3, 4]


def test_adam_warmup_is_plain_adam_then_eigenbasis():
    shapes = [(6, 5)]
    init, grads = _params(shapes), _grads(shapes, 4)
    kw = {"lr": 1e-2, "betas": (0.9, 0.95), "eps": 1e-8, "weight_decay": 0.0}
    ours, opt = _run(lambda ps: eopt.SOAP(ps, adam_warmup_steps=3, **kw), init, grads[:3])
    adam, _ = _run(lambda ps: torch.optim.Adam(ps, **kw), init, grads[:3])
    torch.testing.assert_close(ours[0], adam[0], rtol=1e-6, atol=1e-6)
    state = opt.state[ours[0]]
    for d in (0, 1):
        q, f = state[f"basis_{d}"], state[f"factor_{d}"]
        rotated = q.T @ f @ q
        off = rotated - torch.diag(torch.diagonal(rotated))
        assert off.norm() <= 1e-5 * rotated.norm()
    # m was rotated into the new basis: rotating it back gives Adam's momentum.
    m_orig = state["basis_0"] @ state["exp_avg"] @ state["basis_1"].T
    torch.testing.assert_close(m_orig, adam_state_exp_avg(init, grads[:3], kw), rtol=1e-5, atol=1e-6)


def adam_state_exp_avg(init, grads, kw):
    p = torch.nn.Parameter(init[0].clone())
    opt = torch.optim.Adam([p], **kw)
    for step_grads in grads:
        p.grad = step_grads[0].clone()
        opt.step()
    return opt.state[p]["exp_avg"]


def _offdiag_after_refresh(**kw):
    _, opt, p = _bases(4, precondition_frequency=3, **kw)
    q, f = opt.state[p]["basis_0"], opt.state[p]["factor_0"]
    rotated = q.T @ f @ q
    return (rotated - torch.diag(torch.diagonal(rotated))).norm() / rotated.norm()


def test_use_eigh_refresh_diagonalizes_and_power_iterations_converge():
    assert _offdiag_after_refresh(use_eigh=True) <= 1e-5
    one = _offdiag_after_refresh(power_iter_steps=1)
    many = _offdiag_after_refresh(power_iter_steps=40)
    assert many < one


def test_adaptive_criteria_skips_or_keeps_refreshes():
    plain, _, _ = _bases(10, precondition_frequency=2)
    never, _, _ = _bases(10, precondition_frequency=2, use_adaptive_criteria=True, adaptive_update_tolerance=1.0)
    assert _changed(never) == []
    always, _, _ = _bases(10, precondition_frequency=2, use_adaptive_criteria=True, adaptive_update_tolerance=0.0)
    assert all(torch.equal(a, b) for a, b in zip(plain, always, strict=True))


def test_matmul_precision_is_validated_and_a_no_op_on_cpu():
    a, _, _, _ = _one_step(matmul_precision="high")
    b, _, _, _ = _one_step()
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="matmul_precision"):
        eopt.SOAP([torch.nn.Parameter(torch.zeros(2, 2))], matmul_precision="bf16")


@pytest.mark.parametrize(
    "kw, name",
    [
        ({"betas": (0.95, 1.0)}, "betas"),
        ({"precondition_frequency": 0}, "precondition_frequency"),
        ({"factor_update_order": "during"}, "factor_update_order"),
        ({"power_iter_steps": 0}, "power_iter_steps"),
        ({"max_update_rms": -1.0}, "max_update_rms"),
        ({"lr": -1.0}, "lr"),
    ],
)
def test_invalid_arguments_name_the_argument(kw, name):
    with pytest.raises(ValueError, match=name):
        eopt.SOAP([torch.nn.Parameter(torch.zeros(2, 2))], **kw)


# ------------------------------------------------------------------------------------- numerics


@pytest.mark.parametrize("kind", ["zero", "rank1", "huge", "tiny"])
def test_degenerate_gradients_stay_finite(kind):
    shapes = [(8, 6), (8, 6), (5,)]
    params = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    opt = eopt.SOAP(params, precondition_frequency=2, precondition_1d=True)
    assert_degenerate_gradients_stay_finite(opt, params, kind, steps=6)


def test_eigh_failure_retries_in_float64_then_keeps_the_previous_basis(monkeypatch):
    real_eigh = torch.linalg.eigh
    p = torch.nn.Parameter(torch.randn(6, 6))
    opt = eopt.SOAP([p], precondition_frequency=1, use_eigh=True)
    p.grad = torch.randn(6, 6)

    def fp32_fails(a, *args, **kwargs):
        if a.dtype == torch.float32:
            raise torch.linalg.LinAlgError("forced fp32 failure")
        return real_eigh(a, *args, **kwargs)

    monkeypatch.setattr(torch.linalg, "eigh", fp32_fails)
    opt.step()
    state = opt.state[p]
    assert state["basis_failures"].item() == 0
    assert not torch.equal(state["basis_0"], torch.eye(6))
    basis = state["basis_0"].clone()

    def always_fails(a, *args, **kwargs):
        raise torch.linalg.LinAlgError("forced failure")

    monkeypatch.setattr(torch.linalg, "eigh", always_fails)
    p.grad = torch.randn(6, 6)
    opt.step()
    assert state["basis_failures"].item() == 2  # both factors kept their (re-sorted) basis
    f = state["factor_0"]
    order = torch.argsort(torch.diagonal(basis.T @ f @ basis), descending=True)
    torch.testing.assert_close(state["basis_0"], basis[:, order], rtol=0, atol=0)
    assert torch.isfinite(p).all()


# ----------------------------------------------------------------------- state, scheduler, groups


def _model_params():
    return named_params({"a.weight": (8, 6), "b.weight": (8, 6), "c.weight": (6, 8), "norm.weight": (6,)})


def test_state_dict_round_trip_is_bitwise():
    assert_resume_is_bitwise(lambda named: eopt.build(named, "soap", precondition_frequency=3), _model_params(), 5, 7)


def test_load_state_dict_keeps_fp32_state_of_low_precision_params():
    p = torch.nn.Parameter(torch.randn(4, 4, dtype=torch.bfloat16))
    opt = eopt.SOAP([p])
    p.grad = torch.randn(4, 4, dtype=torch.bfloat16)
    opt.step()
    state = copy.deepcopy(opt.state_dict())
    other = eopt.SOAP([p])
    other.load_state_dict(state)
    assert other.state[p]["factor_0"].dtype == torch.float32
    assert torch.equal(other.state[p]["factor_0"], opt.state[p]["factor_0"])


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before")
def test_scheduler_scales_every_group():
    named = _model_params()
    opt = eopt.build(named, "soap", backup={"lr": 1e-3}, lr=3e-3)
    assert {g["algorithm"] for g in opt.param_groups} == {"soap", "adamw"}
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5 if step else 1.0)
    sched.step()
    lrs = sorted(g["lr"] for g in opt.param_groups)
    assert lrs == [0.5e-3, 1.5e-3]
    zero = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.0)
    zero.step()
    before = [p.detach().clone() for _, p in named]
    for step in range(3):
        set_grads(named, step)
        opt.step()
    assert all(torch.equal(p, b) for (_, p), b in zip(named, before, strict=True))


def test_missing_gradients_leave_params_and_state_alone():
    named = _model_params()
    single = [(n, torch.nn.Parameter(p.detach().clone())) for n, p in named[:1]]
    opt = eopt.build(named, "soap", precondition_frequency=2)
    ref = eopt.build(single, "soap", precondition_frequency=2)
    frozen = named[1][1].detach().clone()
    for step in range(6):
        set_grads(named, step)
        named[1][1].grad = None
        single[0][1].grad = named[0][1].grad.clone()
        opt.step()
        ref.step()
    assert torch.equal(named[1][1], frozen)
    assert int(opt.state[named[1][1]]["step"]) == 0
    torch.testing.assert_close(named[0][1], single[0][1], rtol=1e-6, atol=1e-6)
