"""Sophia's diagonal-Hessian estimators, run by the trainer every ``optimizer.hessian_interval`` steps.

Liu et al. 2023 (arXiv 2305.14342), as the authors' training loop does it: after the normal optimizer step,
on a fresh micro-batch, estimate the diagonal of the Hessian of the language-model loss and fold it into
the optimizer's EMA with ``optimizer.update_hessian()``. The extra forward/backward is real compute (it
counts in train time) but its tokens are not training tokens.

- Gauss-Newton-Bartlett (Sophia-G, :func:`gnb_hessian_update`): labels ``y_hat ~ Categorical(logits)``
  sampled from the model's own predictions, ``g_hat = grad of mean CE(logits, y_hat)``, clipped like the
  training gradient; the optimizer uses ``h_hat = g_hat * g_hat`` (times ``bs`` in the step).
- Hutchinson (Sophia-H, :func:`hutchinson_hessian_update`): ``u ~ N(0, I)``, ``h_hat = u * (H u)`` with
  ``H u`` a Hessian-vector product of the training loss (double backward); ``E[h_hat] = diag(H)``.

The model is any ``nn.Module`` whose forward takes ``input_ids`` and returns an object with ``.logits``
of shape (batch, seq, vocab) (Hugging Face causal LMs do). Call inside the training step's autocast
context. Both functions leave every ``.grad`` at ``None``. The trainer calls :func:`hessian_hook`'s hook after
every optimizer step, and :func:`check_hessian_config` at start-up.

Distributed runs (DDP, FSDP2, HSDP) estimate exactly what one process does. The Hessian batch of step ``s`` is
one global micro-batch (``train.micro_batch_size`` sequences of the fresh stream, ``train.batch_size`` when that
is null; :meth:`recipes.data.TrainBatches.fresh_micro_batch`) split evenly over the ranks, and GNB draws the
labels of each sequence from its own generator, seeded by ``(seed, s, position of the sequence in the global
batch)``, so that R ranks draw what one process draws. Each rank's loss is the mean over its equal share, so the
data-parallel mean of the ranks' gradients (DDP's all-reduce, FSDP2's reduce-scatter and HSDP's all-reduce) is
``g_hat`` of the mean loss over the global batch, clipped by its global norm. Hutchinson draws the probe ``u``
from one generator seeded by ``(seed, s)``, the same on every rank, and averages ``u * (H_r u)`` over the ranks,
which is ``u * (H u)`` of the global mean loss; its double backward does not run through FSDP2, so it is refused
on sharded runs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

import eopt
from eopt.distributed import is_sharded
from recipes.config import Config
from recipes.data import TrainBatches
from recipes.errors import ConfigError
from recipes.models import autocast
from recipes.optim import clip_grad_norm_

SHARDED_PARALLELISMS = ("fsdp", "hsdp")
Generators = torch.Generator | Sequence[torch.Generator] | None


def _lm_loss(logits: Tensor, labels: Tensor) -> Tensor:
    return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten())


def _sample_labels(logits: Tensor, generator: Generators) -> Tensor:
    """``Categorical(logits=logits).sample()``; with a generator, the same draw from that generator; with one
    generator per sequence (dim 0 of ``logits``), each sequence's draw from its own, so that the labels of a
    sequence do not depend on the batch it is in."""
    logits = logits.detach().float()
    if generator is None:
        return torch.distributions.Categorical(logits=logits).sample()
    if isinstance(generator, torch.Generator):
        return _multinomial(logits, generator)
    return torch.stack([_multinomial(row, g) for row, g in zip(logits, generator, strict=True)])


def _multinomial(logits: Tensor, generator: torch.Generator) -> Tensor:
    probs = torch.distributions.Categorical(logits=logits).probs.flatten(0, -2)
    if probs.device != generator.device:
        probs = probs.to(generator.device)
    return torch.multinomial(probs, 1, True, generator=generator).view(logits.shape[:-1]).to(logits.device)


def sophia_params(optimizer: torch.optim.Optimizer) -> list[Tensor]:
    """The parameters of the optimizer's own (non-backup) groups: the ones whose Hessian is estimated."""
    algorithm = getattr(optimizer, "algorithm", None)
    return [p for g in optimizer.param_groups if g.get("algorithm", algorithm) == algorithm for p in g["params"]]


def gnb_hessian_update(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    input_ids: Tensor,
    grad_clip: float | None = None,
    generator: Generators = None,
) -> None:
    """One Gauss-Newton-Bartlett estimate on ``input_ids`` (one micro-batch), folded into ``optimizer``.

    Forward, labels sampled from the model's own logits (from ``generator``: one, or one per sequence),
    mean cross-entropy backward, gradient-norm clip to ``grad_clip`` (as training),
    ``optimizer.update_hessian()``. Under DDP and FSDP2 the backward averages ``g_hat`` across ranks, as in
    the authors' loop, and the clip uses the global norm.
    """
    optimizer.zero_grad(set_to_none=True)
    logits = model(input_ids=input_ids).logits
    _lm_loss(logits, _sample_labels(logits, generator)).backward()
    if grad_clip:
        clip_grad_norm_([p for p in model.parameters() if p.grad is not None], grad_clip)
    optimizer.update_hessian()
    optimizer.zero_grad(set_to_none=True)


def hutchinson_hessian_update(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    input_ids: Tensor,
    labels: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> None:
    """One Hutchinson estimate ``u * (H u)`` of the training loss on ``input_ids``, folded into ``optimizer``.

    ``labels`` are the next-token targets aligned with ``input_ids`` (the trainer's ``targets``); without
    them the loss is on ``input_ids`` shifted by one. ``u ~ N(0, I)`` is drawn from ``generator`` (or the
    global RNG) for every parameter of the optimizer's own groups; the estimate goes to ``.grad`` and
    ``optimizer.update_hessian()`` reads it. Attention runs in SDPA's math kernel, which supports the
    double backward. Under ``torch.distributed`` the estimate is averaged across ranks (replicated
    parameters only: sharded DTensor parameters are not supported).
    """
    params = [p for p in sophia_params(optimizer) if p.requires_grad]
    if any(is_sharded(p) for p in params):
        raise RuntimeError(
            "Sophia's Hutchinson estimator does not support sharded (FSDP) parameters: use estimator=gnb"
        )
    optimizer.zero_grad(set_to_none=True)
    if labels is None:
        input_ids, labels = input_ids[:, :-1], input_ids[:, 1:]
    with sdpa_kernel(SDPBackend.MATH):
        loss = _lm_loss(model(input_ids=input_ids).logits, labels)
        estimates = hutchinson_estimate(loss, params, generator)
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    world = torch.distributed.get_world_size() if distributed else 1
    with torch.no_grad():
        for p, estimate in zip(params, estimates, strict=True):
            if world > 1:
                torch.distributed.all_reduce(estimate)
                estimate /= world
            p.grad = estimate
    optimizer.update_hessian()
    optimizer.zero_grad(set_to_none=True)


def hutchinson_estimate(loss: Tensor, params: list[Tensor], generator: torch.Generator | None = None) -> list[Tensor]:
    """``u * (H u)`` per parameter for one Gaussian probe ``u ~ N(0, I)``; ``H`` is the Hessian of ``loss``.

    ``E[u * (H u)] = diag(H)`` (Hutchinson's estimator); parameters the loss does not reach get zeros.
    """
    grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
    # A gradient that does not depend on the parameters (a loss linear in them) has a zero Hessian block.
    used = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]
    probes = [_gaussian_like(params[i], generator) for i in used]
    hvps = torch.autograd.grad([grads[i] for i in used], [params[i] for i in used], probes, allow_unused=True)
    estimates = [torch.zeros_like(p) for p in params]
    for i, u, hv in zip(used, probes, hvps, strict=True):
        if hv is not None:
            estimates[i] = (u * hv).detach()
    return estimates


def _gaussian_like(p: Tensor, generator: torch.Generator | None) -> Tensor:
    device = p.device if generator is None else generator.device
    return torch.randn(p.shape, generator=generator, device=device, dtype=p.dtype).to(p.device)


def _estimator(optimizer: torch.optim.Optimizer) -> str:
    """The one estimator (``"gnb"`` or ``"hutchinson"``) that the optimizer's own groups name."""
    algorithm = getattr(optimizer, "algorithm", None)
    estimators = {
        g["estimator"] for g in optimizer.param_groups if g.get("algorithm") == algorithm and "estimator" in g
    }
    if len(estimators) != 1:
        raise ValueError(f"expected one Sophia estimator across the optimizer's groups, got {sorted(estimators)}")
    return estimators.pop()


def hessian_update(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    input_ids: Tensor,
    labels: Tensor | None = None,
    *,
    grad_clip: float | None = None,
    generator: Generators = None,
) -> None:
    """The estimator the optimizer's groups name (``estimator="gnb"`` or ``"hutchinson"``): one estimate.

    ``input_ids``/``labels``: one fresh micro-batch (the trainer's inputs and targets); ``grad_clip``: the
    training clip (GNB only); ``generator``: GNB's label sampler (one, or one per sequence), Hutchinson's
    probe sampler (one).
    """
    if _estimator(optimizer) == "gnb":
        gnb_hessian_update(model, optimizer, input_ids, grad_clip=grad_clip, generator=generator)
    else:
        hutchinson_hessian_update(model, optimizer, input_ids, labels, generator=generator)


def _sequence_seed(seed: int, step: int, position: int) -> int:
    """The seed of the labels of sequence ``position`` of step ``step``'s global Hessian batch."""
    return int(np.random.SeedSequence([seed % 2**64, step, position]).generate_state(1, np.uint64)[0])


def hessian_hook(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: TrainBatches,
    cfg: Config,
    device: torch.device,
    amp_dtype: torch.dtype | None,
) -> Callable[[int], None] | None:
    """The trainer's Hessian refresh: ``hook(step)``, called on every rank after optimizer step ``step``
    (0-based), or ``None`` when the optimizer has no ``update_hessian``.

    The hook estimates when ``step % k == k - 1`` with ``k = optimizer.hessian_interval`` (the config's
    ``optimizer.hessian_interval``), as the authors' loop does after its step. It runs the optimizer's estimator
    on this rank's rows of ``batches.fresh_micro_batch(step)`` (moved to ``device``), inside autocast to
    ``amp_dtype`` (``None``: fp32), clipped like training to ``cfg.train.grad_clip``, with GNB's labels drawn
    per sequence from ``(cfg.seed, step, position)`` and Hutchinson's probes from ``(cfg.seed, step)``: a resumed
    run draws what an uninterrupted one does, and R ranks what one process does (see the module docstring).
    """
    if not hasattr(optimizer, "update_hessian"):
        return None
    interval = optimizer.hessian_interval
    estimator = _estimator(optimizer)
    rows = batches.fresh_rows()

    def refresh(step: int) -> None:
        if step % interval != interval - 1:
            return
        inputs, targets = (x.to(device) for x in batches.fresh_micro_batch(step))
        if estimator == "gnb":
            generator = [torch.Generator(device).manual_seed(_sequence_seed(cfg.seed, step, i)) for i in rows]
        else:
            generator = torch.Generator(device).manual_seed(cfg.seed * 1_000_003 + step)
        with autocast(device, amp_dtype):
            hessian_update(model, optimizer, inputs, targets, grad_clip=cfg.train.grad_clip, generator=generator)

    return refresh


def check_hessian_config(cfg: Config, world_size: int) -> None:
    """Start-up checks of an optimizer with a Hessian estimate on ``world_size`` ranks (nothing for others).

    The global Hessian batch of ``train.micro_batch_size`` sequences must split evenly over the ranks, and
    the Hutchinson estimator's double backward cannot run through FSDP2's sharded parameters.
    """
    name = cfg.optimizer.get("name")
    entry = eopt.OPTIMIZERS.get(name)
    if entry is None or not hasattr(entry.cls, "update_hessian"):
        return
    estimator = cfg.optimizer.get("estimator", entry.defaults.get("estimator"))
    if estimator == "hutchinson" and cfg.parallelism.name in SHARDED_PARALLELISMS:
        raise ConfigError(
            f"optimizer.estimator=hutchinson cannot run with parallelism={cfg.parallelism.name}: its double "
            "backward does not go through FSDP2's sharded parameters; use optimizer.estimator=gnb or parallelism=ddp"
        )
    fresh = cfg.train.fresh_batch
    if fresh % world_size:
        key = "micro_batch_size" if cfg.train.micro_batch_size else "batch_size"
        raise ConfigError(
            f"train.{key}={fresh} is not divisible by {world_size} ranks: {name}'s Hessian estimate splits one "
            f"micro-batch of train.micro_batch_size sequences (train.batch_size when it is null) over the ranks; "
            f"make it a multiple of {world_size}"
        )
