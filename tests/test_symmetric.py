"""eopt.symmetric: products known to be symmetric, from their upper panels, against a plain matmul."""

from __future__ import annotations

import pytest
import torch

from eopt.symmetric import symmetric_matmul, symmetric_matmul_


@pytest.mark.parametrize("d", [100, 400, 1030])  # one panel (plain GEMM), four panels
def test_symmetric_matmul_equals_the_full_product(d):
    gen = torch.Generator().manual_seed(d)
    u = torch.randn(3, d, 50, generator=gen, dtype=torch.float64)
    got = symmetric_matmul(u)
    assert torch.allclose(got, u @ u.mT, rtol=1e-12, atol=1e-12)
    assert torch.allclose(got, got.mT, rtol=1e-14, atol=1e-12)
    a = u @ u.mT
    p = a @ a + 2.0 * a  # a polynomial in a commutes with a: p a is symmetric
    assert torch.allclose(symmetric_matmul(p, a), p @ a, rtol=1e-10, atol=1e-8)


@pytest.mark.parametrize("d", [100, 400])
def test_symmetric_matmul_fuses_the_ema_and_ignores_garbage_with_beta_zero(d):
    gen = torch.Generator().manual_seed(1)
    u = torch.randn(2, d, 30, generator=gen, dtype=torch.float64)
    start = symmetric_matmul(torch.randn(2, d, 8, generator=gen, dtype=torch.float64))
    out = symmetric_matmul_(start.clone(), u, u, beta=0.9, alpha=0.1)
    assert torch.allclose(out, 0.9 * start + 0.1 * (u @ u.mT), rtol=1e-12, atol=1e-12)
    nan = torch.full_like(start, float("nan"))
    assert torch.allclose(symmetric_matmul_(nan, u, u), u @ u.mT, rtol=1e-12, atol=1e-12)
