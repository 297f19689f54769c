"""Checks every eopt optimizer's tests share: small named parameter sets, seeded gradients, bitwise resume."""

from __future__ import annotations

import io
from collections.abc import Callable

import torch

NamedParams = list[tuple[str, torch.nn.Parameter]]


def named_params(shapes: dict[str, tuple[int, ...]], seed: int = 0) -> NamedParams:
    """``(name, Parameter)`` pairs of the given shapes, seeded normal values."""
    gen = torch.Generator().manual_seed(seed)
    return [(n, torch.nn.Parameter(torch.randn(s, generator=gen))) for n, s in shapes.items()]


def set_grads(named: NamedParams, step: int) -> None:
    """Seeded normal gradients, a pure function of ``step`` (so twins get identical ones)."""
    gen = torch.Generator().manual_seed(100 + step)
    for _, p in named:
        p.grad = torch.randn(p.shape, generator=gen)


def assert_resume_is_bitwise(
    make: Callable[[NamedParams], torch.optim.Optimizer], named: NamedParams, before: int, after: int
) -> None:
    """Step ``before`` times, save the state through bytes (as a checkpoint does), load it into an optimizer over
    cloned parameters, step both ``after`` more times: the parameters must stay bitwise equal."""
    opt = make(named)
    for step in range(before):
        set_grads(named, step)
        opt.step()
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    clone = [(n, torch.nn.Parameter(p.detach().clone())) for n, p in named]
    resumed = make(clone)
    buffer.seek(0)
    resumed.load_state_dict(torch.load(buffer))
    for step in range(before, before + after):
        set_grads(named, step)
        set_grads(clone, step)
        opt.step()
        resumed.step()
    for (name, a), (_, b) in zip(named, clone, strict=True):
        assert torch.equal(a, b), name


def degenerate_gradient(p: torch.Tensor, kind: str, gen: torch.Generator) -> torch.Tensor:
    """A gradient for ``p`` of ``kind``: ``zero``, ``rank1`` (an outer product along dim 0), ``huge`` (N(0, 1e24))
    or ``tiny`` (N(0, 1e-24))."""
    if kind == "zero":
        return torch.zeros_like(p)
    if kind == "rank1":
        u, v = torch.randn(p.shape[0], generator=gen), torch.randn(p.shape[1:], generator=gen)
        return torch.einsum("i,...->i...", u, v)
    return torch.randn(p.shape, generator=gen) * (1e12 if kind == "huge" else 1e-12)


def assert_degenerate_gradients_stay_finite(opt: torch.optim.Optimizer, params: list, kind: str, steps: int) -> None:
    """``steps`` steps on :func:`degenerate_gradient` gradients: the parameters and every state tensor stay finite."""
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        for p in params:
            p.grad = degenerate_gradient(p, kind, gen)
        opt.step()
    for p in params:
        assert torch.isfinite(p).all()
        for value in opt.state[p].values():
            assert torch.isfinite(value).all()
