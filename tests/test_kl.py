"""KL sparsity on rho_hat: values by hand, the documented clamp, and the errors."""

import math

import pytest
import torch

import fastae

f64 = torch.float64


def identity_codes(codes):
    """Encode with W = I and the identity activation, so that h equals the given codes and
    rho_hat comes from fastae.encode itself."""
    codes = torch.as_tensor(codes, dtype=f64).clone().requires_grad_(True)
    eye = torch.eye(codes.shape[1], dtype=f64)
    _, stats = fastae.encode(codes, eye, activation="identity")
    return codes, stats


def test_rho_hat_is_the_mean_over_the_batch():
    # Each unit averages to 0.1 over the batch: K = 0. Averaging over units instead would give
    # 0.15 and 0.05 per sample, and a positive K.
    _, stats = identity_codes([[0.15, 0.15], [0.05, 0.05]])
    torch.testing.assert_close(stats.rho_hat, torch.tensor([0.1, 0.1], dtype=f64))
    assert fastae.kl_sparsity(stats.rho_hat, 0.1).item() == 0.0


def test_gradient_by_hand():
    # rho_hat = 0.2; dK/dr = 0.9 / 0.8 - 0.1 / 0.2 = 0.625; each of the 2 codes gets 0.625 / 2.
    codes, stats = identity_codes([[0.3], [0.1]])
    assert stats.rho_hat.item() == pytest.approx(0.2, abs=1e-15)
    fastae.kl_sparsity(stats.rho_hat, 0.1).backward()
    torch.testing.assert_close(codes.grad, torch.tensor([[0.3125], [0.3125]], dtype=f64))


def test_value_by_hand():
    rho_hat = torch.tensor([0.2, 0.5], dtype=f64)
    want = sum(0.1 * math.log(0.1 / r) + 0.9 * math.log(0.9 / (1 - r)) for r in (0.2, 0.5))
    assert fastae.kl_sparsity(rho_hat, 0.1).item() == pytest.approx(want, rel=1e-14)


def test_saturated_float32_codes_give_a_finite_value():
    # Sigmoid codes saturate at exactly 1.0 (and 0.0) in float32; the clamp to
    # [eps, 1 - eps] keeps log(1 - r) finite.
    rho_hat = torch.tensor([1.0, 0.0, 0.5], dtype=torch.float32, requires_grad=True)
    value = fastae.kl_sparsity(rho_hat, 0.05)
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(rho_hat.grad).all()
    # The saturated unit costs what a unit at 1 - eps does (eps = 1e-6 by default).
    r = torch.tensor(1 - 1e-6, dtype=torch.float32)
    want = 0.05 * torch.log(0.05 / r) + 0.95 * torch.log(0.95 / (1 - r))
    assert value.item() > want.item()


def test_unbounded_codes_are_refused():
    # relu codes whose mean passes 1 cannot be Bernoulli means.
    x = torch.tensor([[3.0], [1.0]], dtype=f64)
    _, stats = fastae.encode(x, torch.eye(1, dtype=f64), activation="relu")
    with pytest.raises(ValueError, match=r"rho_hat: got values in \[2, 2\].*sigmoid"):
        fastae.kl_sparsity(stats.rho_hat, 0.1)


@pytest.mark.parametrize("rho", [0.0, 1.0, -0.1, 1.5, float("nan"), "0.1"])
def test_rho_outside_the_open_interval_is_refused(rho):
    with pytest.raises(ValueError, match=r"rho: got .*expected a number strictly between 0 and 1"):
        fastae.kl_sparsity(torch.tensor([0.5], dtype=f64), rho)


def test_nan_rho_hat_is_refused():
    with pytest.raises(ValueError, match=r"rho_hat: got values in \[nan, nan\]"):
        fastae.kl_sparsity(torch.tensor([float("nan")], dtype=f64), 0.05)
