"""The PyTorch path (backend="torch") against fastae.reference, for every activation and for the
shortcuts its backward takes: the sigmoid path, the L1 term folded into a column vector for
activations with h >= 0, and upstream gradients that are absent (None) because the loss does not
use that output. Values and gradients are compared in float64; one float32 case checks that the
accumulation dtype is handled."""

from __future__ import annotations

import pytest
import torch

import fastae
from fastae.activations import ACTIVATIONS
from fastae.functional import torch_encode

SHAPES = [(5, 7, 3), (33, 17, 12)]


def _inputs(shape, dtype, x_grad=True, bias=True, spread=1.0):
    batch, features, hidden = shape
    x = (torch.randn(batch, features, dtype=torch.float64) * spread).to(dtype)
    weight = (torch.randn(hidden, features, dtype=torch.float64) * spread).to(dtype)
    b = (torch.randn(hidden, dtype=torch.float64) * spread).to(dtype) if bias else None
    leaves = [x.requires_grad_()] if x_grad else []
    leaves.append(weight.requires_grad_())
    if b is not None:
        leaves.append(b.requires_grad_())
    return x, weight, b, leaves


def _loss(h, stats, coefficients, terms):
    """A weighted sum of the outputs named in terms, with fixed random weights."""
    g_h, g_c, g_r, g_a = coefficients
    loss = h.sum() * 0.0
    if "h" in terms:
        loss = loss + (h.to(g_h.dtype) * g_h).sum()
    if "contractive" in terms:
        loss = loss + g_c * stats.contractive
    if "rho_hat" in terms:
        loss = loss + (stats.rho_hat * g_r).sum()
    if "l1" in terms:
        loss = loss + g_a * stats.l1
    return loss


def _compare(activation, shape, terms, x_grad=True, bias=True, spread=1.0):
    x, weight, b, leaves = _inputs(shape, torch.float64, x_grad, bias, spread)
    batch, _, hidden = shape
    coefficients = (
        torch.randn(batch, hidden, dtype=torch.float64),
        1.7,
        torch.randn(hidden, dtype=torch.float64),
        -0.6,
    )

    h, stats = fastae.encode(x, weight, b, activation, backend="torch")
    h_ref, stats_ref = fastae.reference.encode(x, weight, b, activation)
    torch.testing.assert_close(h, h_ref, rtol=1e-12, atol=1e-12)
    for got, want in zip(stats, stats_ref, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)

    grads = torch.autograd.grad(_loss(h, stats, coefficients, terms), leaves, allow_unused=True)
    grads_ref = torch.autograd.grad(
        _loss(h_ref, stats_ref, coefficients, terms), leaves, allow_unused=True
    )
    for got, want in zip(grads, grads_ref, strict=True):
        want = torch.zeros_like(got) if want is None and got is not None else want
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
@pytest.mark.parametrize("shape", SHAPES)
def test_every_output_in_the_loss(activation, shape):
    _compare(activation, shape, {"h", "contractive", "rho_hat", "l1"})


@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
@pytest.mark.parametrize(
    "terms",
    [{"h"}, {"contractive"}, {"rho_hat"}, {"l1"}, {"contractive", "l1"}, {"h", "rho_hat"}],
)
def test_some_outputs_unused(activation, terms):
    _compare(activation, (9, 6, 5), terms)


@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
def test_x_without_grad_and_no_bias(activation):
    # The benchmark's case: x is data, only the parameters learn.
    _compare(activation, (17, 11, 8), {"h", "contractive", "rho_hat", "l1"}, x_grad=False)
    _compare(activation, (17, 11, 8), {"h", "contractive", "l1"}, bias=False)


@pytest.mark.parametrize("activation", ["sigmoid", "relu"])
def test_saturated_units(activation):
    # Pre-activations of size ~ +-300: sigmoid gives h == 0 or 1 exactly and relu 0, where sign(h)
    # and f' both vanish; the folded L1 term must agree there too. (Softplus is left out: the
    # reference's double backward through logaddexp gives NaN at a ~ -300.)
    _compare(activation, (12, 5, 6), {"h", "contractive", "rho_hat", "l1"}, spread=12.0)


def test_float32_sigmoid_against_float64():
    x, weight, b, leaves = _inputs((64, 40, 24), torch.float32)
    g_h = torch.randn(64, 24)

    h, stats = fastae.encode(x, weight, b, "sigmoid", backend="torch")
    loss = (h * g_h).sum() + stats.contractive + fastae.kl_sparsity(stats.rho_hat, 0.1) + stats.l1
    grads = torch.autograd.grad(loss, leaves)

    wide = [t.detach().double().requires_grad_() for t in leaves]
    h64, stats64 = fastae.reference.encode(*wide, "sigmoid")
    loss64 = (
        (h64 * g_h.double()).sum()
        + stats64.contractive
        + fastae.kl_sparsity(stats64.rho_hat, 0.1)
        + stats64.l1
    )
    grads64 = torch.autograd.grad(loss64, wide)
    assert stats.contractive.dtype == torch.float32
    # float32 rounding of sums over 40 features and 64 samples: 1e-4 relative is loose but
    # far below any wrong term (each term here is of order 1e-2 to 1).
    torch.testing.assert_close(h, h64.float(), rtol=1e-5, atol=1e-6)
    for got, want in zip(stats, stats64, strict=True):
        torch.testing.assert_close(got, want.float(), rtol=1e-4, atol=1e-5)
    for got, want in zip(grads, grads64, strict=True):
        torch.testing.assert_close(got, want.float(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("activation", ["sigmoid", "tanh"])
def test_saves_only_h_n_and_s_besides_the_inputs(activation):
    # h (B, H), the row norms n (H,) and the column sums of f'^2 s (H,).
    x, weight, b, _ = _inputs((16, 10, 7), torch.float32, x_grad=False)
    inputs = {x.data_ptr(), weight.data_ptr(), b.data_ptr()}
    saved = []

    def pack(tensor):
        if tensor.data_ptr() not in inputs:
            saved.append(tuple(tensor.shape))
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        fastae.encode(x, weight, b, activation, backend="torch")
    assert sorted(saved) == [(7,), (7,), (16, 7)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_row_norms_of_half_and_single_weights(dtype):
    # Below float64, n_j is the squared vector norm of row j (no (H, D) temporary): within a
    # few float32 ulp of the float64 sum of squares of the same weights.
    weight = torch.randn(37, 301, dtype=torch.float64).to(dtype)
    n = torch_encode._row_norms_squared(weight, torch.float32)
    exact = weight.double().square().sum(1)
    assert n.dtype == torch.float32
    torch.testing.assert_close(n.double(), exact, rtol=4 * 2**-23, atol=0)
    # Exact sums stay exact: 3^2 + 4^2 = 25, 0.5^2 * 4 = 1.
    small = torch.tensor([[3.0, 4.0, 0.0, 0.0], [0.5, 0.5, 0.5, 0.5]], dtype=dtype)
    assert torch_encode._row_norms_squared(small, torch.float32).tolist() == [25.0, 1.0]
