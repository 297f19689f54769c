"""Sophia's Hessian estimators (recipes.hessian) against direct computations and closed forms."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from eopt.sophia import Sophia
from recipes.hessian import gnb_hessian_update, hessian_update, hutchinson_estimate, hutchinson_hessian_update

transformers = pytest.importorskip("transformers")


def _tiny_llama() -> torch.nn.Module:
    config = transformers.LlamaConfig(
        vocab_size=32,
        hidden_size=16,
        intermediate_size=24,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
    )
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).float()


@pytest.mark.parametrize("grad_clip", [None, 1e-3])
def test_gnb_equals_direct_computation_with_the_same_sampled_labels(grad_clip: float | None) -> None:
    model = _tiny_llama()
    beta2 = 0.9
    opt = Sophia(model.parameters(), betas=(0.965, beta2))
    ids = torch.randint(0, 32, (3, 10), generator=torch.Generator().manual_seed(1))
    gnb_hessian_update(model, opt, ids, grad_clip=grad_clip, generator=torch.Generator().manual_seed(5))
    assert all(p.grad is None for p in model.parameters())

    # Direct: the authors' sampling (Categorical on the global RNG, same seed), mean CE, clip by total norm.
    params = list(model.parameters())
    torch.manual_seed(5)
    logits = model(input_ids=ids).logits
    labels = torch.distributions.Categorical(logits=logits.detach()).sample()
    loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten())
    grads = torch.autograd.grad(loss, params)
    if grad_clip is not None:
        total = torch.sqrt(sum((g.double() ** 2).sum() for g in grads))
        grads = [g * min(1.0, grad_clip / (float(total) + 1e-6)) for g in grads]
    for p, g in zip(params, grads, strict=True):
        torch.testing.assert_close(opt.state[p]["hessian"], (1 - beta2) * g * g, rtol=1e-4, atol=1e-12)


def test_hutchinson_is_unbiased_on_a_quadratic() -> None:
    gen = torch.Generator().manual_seed(0)
    n = 6
    a = torch.randn(n, n, generator=gen, dtype=torch.float64)
    a = a @ a.T + torch.diag(torch.arange(1.0, n + 1, dtype=torch.float64))  # symmetric, off-diagonal mass
    x = torch.randn(n, generator=gen, dtype=torch.float64, requires_grad=True)
    probes = 3000
    total = torch.zeros(n, dtype=torch.float64)
    for _ in range(probes):
        loss = 0.5 * x @ a @ x
        (estimate,) = hutchinson_estimate(loss, [x], gen)
        total += estimate
    mean = total / probes
    # Var of u_i (A u)_i is sum_j A_ij^2 + A_ii^2: allow 5 standard errors.
    stderr = torch.sqrt(((a**2).sum(1) + a.diag() ** 2) / probes)
    assert ((mean - a.diag()).abs() <= 5 * stderr).all()


class _SoftmaxRegression(torch.nn.Module):
    """logits = W x_t with fixed features x_t of each token: the CE Hessian diagonal has a closed form."""

    def __init__(self, vocab: int, dim: int) -> None:
        super().__init__()
        self.features = torch.nn.Embedding(vocab, dim).requires_grad_(False)
        self.w = torch.nn.Parameter(torch.randn(vocab, dim) * 0.5)

    def forward(self, input_ids: torch.Tensor):
        return transformers.modeling_outputs.CausalLMOutput(logits=self.features(input_ids) @ self.w.T)


def test_hutchinson_update_averages_to_the_closed_form_hessian_diagonal() -> None:
    torch.manual_seed(0)
    vocab, dim = 5, 3
    model = _SoftmaxRegression(vocab, dim)
    opt = Sophia([model.w], betas=(0.9, 0.0), estimator="hutchinson")  # beta2 = 0: h is the latest estimate
    ids = torch.randint(0, vocab, (2, 7))
    labels = torch.randint(0, vocab, (2, 7))
    gen = torch.Generator().manual_seed(1)
    probes = 300
    samples = []
    for _ in range(probes):
        hutchinson_hessian_update(model, opt, ids, labels, generator=gen)
        samples.append(opt.state[model.w]["hessian"].clone())
    assert model.w.grad is None
    samples = torch.stack(samples)
    # d^2 CE / dW_ij^2 = mean over tokens of (p_i - p_i^2) x_j^2
    with torch.no_grad():
        x = model.features(ids).flatten(0, 1)
        p = torch.softmax(x @ model.w.T, dim=-1)
        diag = ((p - p**2).unsqueeze(-1) * (x**2).unsqueeze(1)).mean(0)
    stderr = samples.std(0) / probes**0.5
    assert ((samples.mean(0) - diag).abs() <= 5 * stderr + 1e-7).all()
    assert (samples.mean(0) - diag).abs().max() < 0.2 * diag.abs().max()


def test_hutchinson_runs_on_a_transformer_and_dispatch_picks_the_estimator() -> None:
    model = _tiny_llama()
    opt = Sophia(model.parameters(), betas=(0.965, 0.0), estimator="hutchinson")
    ids = torch.randint(0, 32, (2, 8), generator=torch.Generator().manual_seed(2))
    hessian_update(model, opt, ids, generator=torch.Generator().manual_seed(3))  # labels: ids shifted
    h = [opt.state[p]["hessian"] for p in model.parameters()]
    assert all(torch.isfinite(t).all() for t in h) and any(t.abs().sum() > 0 for t in h)
    assert all(p.grad is None for p in model.parameters())
    gnb = Sophia(model.parameters(), betas=(0.965, 0.0))
    hessian_update(model, gnb, ids, grad_clip=1.0, generator=torch.Generator().manual_seed(3))
    assert all((gnb.state[p]["hessian"] >= 0).all() for p in model.parameters())
