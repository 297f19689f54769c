"""Sophia's Hessian estimators and trainer hook (recipes.hessian) against direct computations and closed forms."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import eopt
from eopt.sophia import Sophia
from recipes.config import Config, ParallelismConfig, TrainConfig
from recipes.data import TrainBatches
from recipes.errors import ConfigError
from recipes.hessian import (
    _sample_labels,
    _sequence_seed,
    check_hessian_config,
    gnb_hessian_update,
    hessian_hook,
    hessian_update,
    hutchinson_estimate,
    hutchinson_hessian_update,
)

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


def test_labels_drawn_per_sequence_do_not_depend_on_the_batch_split() -> None:
    logits = torch.randn(4, 5, 32, generator=torch.Generator().manual_seed(0))

    def generators(seeds):
        return [torch.Generator().manual_seed(s) for s in seeds]

    whole = _sample_labels(logits, generators(range(4)))
    halves = torch.cat(
        [_sample_labels(logits[:2], generators(range(2))), _sample_labels(logits[2:], generators([2, 3]))]
    )
    assert torch.equal(whole, halves)
    for i in range(4):  # each sequence is the authors' draw (Categorical on the global RNG) from its own seed
        torch.manual_seed(i)
        assert torch.equal(whole[i], torch.distributions.Categorical(logits=logits[i]).sample())


def _fresh_batches(make_dataset, micro_batch_size: int = 3) -> TrainBatches:
    tokens = np.random.default_rng(0).integers(0, 32, 4000)
    data = make_dataset([tokens], [tokens[:200]], vocab_size=32)
    return TrainBatches(data, seq_len=8, batch_size=micro_batch_size, micro_batch_size=micro_batch_size, seed=4)


def test_hook_estimates_on_due_steps_on_the_fresh_batch_seeded_by_step(make_dataset) -> None:
    batches = _fresh_batches(make_dataset)
    cfg = Config(seed=4, train=TrainConfig(grad_clip=0.05))
    model = _tiny_llama()
    params = list(model.parameters())
    assert hessian_hook(model, eopt.AdamW(params), batches, cfg, torch.device("cpu"), None) is None
    beta2 = 0.9
    opt = Sophia(params, betas=(0.965, beta2), hessian_interval=3)
    hook = hessian_hook(model, opt, batches, cfg, torch.device("cpu"), None)
    hook(0)
    hook(1)
    assert all(not opt.state[p]["hessian"].any() for p in params)
    hook(5)  # step % 3 == 2: due

    # Direct: step 5's fresh batch, each sequence's labels from its (seed, step, position) seed, mean CE, clip.
    inputs, _ = batches.fresh_micro_batch(5)
    logits = model(input_ids=inputs).logits
    labels = []
    for i in range(inputs.shape[0]):
        torch.manual_seed(_sequence_seed(4, 5, i))
        labels.append(torch.distributions.Categorical(logits=logits[i].detach()).sample())
    loss = F.cross_entropy(logits.flatten(0, 1), torch.stack(labels).flatten())
    grads = torch.autograd.grad(loss, params)
    total = torch.sqrt(sum((g.double() ** 2).sum() for g in grads))
    grads = [g * min(1.0, 0.05 / (float(total) + 1e-6)) for g in grads]
    for p, g in zip(params, grads, strict=True):
        torch.testing.assert_close(opt.state[p]["hessian"], (1 - beta2) * g * g, rtol=1e-4, atol=1e-12)

    resumed = Sophia(params, betas=(0.965, beta2), hessian_interval=3)  # a restarted run draws the same
    hessian_hook(model, resumed, batches, cfg, torch.device("cpu"), None)(5)
    assert all(torch.equal(opt.state[p]["hessian"], resumed.state[p]["hessian"]) for p in params)
    assert all(p.grad is None for p in params)


def test_hutchinson_hook_seeds_its_probe_by_step(make_dataset) -> None:
    batches = _fresh_batches(make_dataset)
    model = _tiny_llama()
    opts = [Sophia(model.parameters(), betas=(0.965, 0.0), estimator="hutchinson", hessian_interval=1) for _ in "ab"]
    for opt in opts:
        hessian_hook(model, opt, batches, Config(seed=2), torch.device("cpu"), None)(7)
    a, b = ([o.state[p]["hessian"] for p in model.parameters()] for o in opts)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True)) and any(x.abs().sum() > 0 for x in a)


def _config(name: str = "sophia", estimator: str | None = None, parallelism: str = "single", mbs: int = 4) -> Config:
    optimizer = {"name": name} if estimator is None else {"name": name, "estimator": estimator}
    return Config(
        optimizer=optimizer, parallelism=ParallelismConfig(name=parallelism), train=TrainConfig(micro_batch_size=mbs)
    )


def test_start_up_check_refuses_uneven_hessian_shares_and_hutchinson_on_shards() -> None:
    check_hessian_config(_config(mbs=4), 4)
    check_hessian_config(_config(estimator="hutchinson", parallelism="ddp"), 2)
    check_hessian_config(_config(name="adamw", mbs=3), 2)  # no Hessian estimate: nothing to check
    with pytest.raises(ConfigError, match=r"train.micro_batch_size=3 is not divisible by 2 ranks"):
        check_hessian_config(_config(mbs=3), 2)
    for parallelism in ("fsdp", "hsdp"):
        with pytest.raises(ConfigError, match=rf"optimizer.estimator=hutchinson .* parallelism={parallelism}"):
            check_hessian_config(_config(estimator="hutchinson", parallelism=parallelism), 2)
    check_hessian_config(_config(estimator="gnb", parallelism="fsdp"), 2)
