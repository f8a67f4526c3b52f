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


def formula(rho_hat, rho, eps):
    """The penalty written out as plain autograd code: what the closed-form backward must match."""
    r = rho_hat.clamp(eps, 1.0 - eps)
    return (rho * torch.log(rho / r) + (1.0 - rho) * torch.log((1.0 - rho) / (1.0 - r))).sum()


def test_value_and_gradient_equal_autograd_of_the_formula():
    # Interior values, values the clamp moves (below eps, above 1 - eps) and values exactly on
    # the bounds, where torch.clamp still passes the gradient.
    eps = 1e-3
    values = [0.3, 0.05, 0.9, 1e-5, 0.0, 0.9999, 1.0, eps, 1.0 - eps, 0.5]
    rho_hat = torch.tensor(values, dtype=f64, requires_grad=True)
    want_rho_hat = rho_hat.detach().clone().requires_grad_(True)
    value = fastae.kl_sparsity(rho_hat, 0.05, eps)
    want = formula(want_rho_hat, 0.05, eps)
    assert value.item() == pytest.approx(want.item(), rel=1e-14)
    (value * 1.7).backward()
    (want * 1.7).backward()
    # atol: at rho_hat = rho the formula's two terms cancel to 2e-16 instead of 0.
    torch.testing.assert_close(rho_hat.grad, want_rho_hat.grad, rtol=1e-12, atol=1e-15)
    assert rho_hat.grad[1].item() == 0.0
    # The clamped entries get exactly zero; the ones on a bound do not.
    assert rho_hat.grad[[3, 4, 5, 6]].eq(0).all()
    assert rho_hat.grad[[7, 8]].ne(0).all()


def test_gradcheck():
    rho_hat = torch.tensor([0.02, 0.1, 0.4, 0.75], dtype=f64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda r: fastae.kl_sparsity(r, 0.1), (rho_hat,))


def test_no_gradient_is_prepared_without_requires_grad():
    value = fastae.kl_sparsity(torch.tensor([0.2, 0.5], dtype=f64), 0.1)
    assert value.grad_fn is None


def test_double_backward_equals_autograd_of_the_formula():
    eps = 1e-3
    rho_hat = torch.tensor([0.2, 0.5, 1e-4, 0.9995, eps], dtype=f64, requires_grad=True)
    want_rho_hat = rho_hat.detach().clone().requires_grad_(True)
    weights = torch.tensor([0.3, -1.1, 0.7, 2.0, 0.4], dtype=f64)
    (grad,) = torch.autograd.grad(fastae.kl_sparsity(rho_hat, 0.1, eps), rho_hat, create_graph=True)
    (want,) = torch.autograd.grad(formula(want_rho_hat, 0.1, eps), want_rho_hat, create_graph=True)
    torch.testing.assert_close(grad, want, rtol=1e-12, atol=1e-15)
    (second,) = torch.autograd.grad((grad * weights).sum(), rho_hat)
    (want_second,) = torch.autograd.grad((want * weights).sum(), want_rho_hat)
    torch.testing.assert_close(second, want_second, rtol=1e-12, atol=1e-15)
    # d2K/dr2 = rho / r^2 + (1 - rho) / (1 - r)^2 at r = 0.2, by hand: 2.5 + 1.40625.
    assert second[0].item() == pytest.approx(0.3 * 3.90625, rel=1e-14)
    assert second[2].item() == 0.0 and second[3].item() == 0.0


def test_the_unclamped_shortcut_equals_the_clamped_path():
    # Inside [eps, 1 - eps] the clamp and its mask are skipped; one value just outside sends
    # the whole vector through the clamped path. The values inside must not notice.
    inside = [0.01, 0.05, 0.3, 0.999]
    results = []
    for values in (inside, inside + [1.0]):
        rho_hat = torch.tensor(values, dtype=torch.float32, requires_grad=True)
        value = fastae.kl_sparsity(rho_hat, 0.05)
        value.backward()
        results.append((value.item(), rho_hat.grad[:4]))
    r = torch.tensor(1 - 1e-6, dtype=torch.float32)
    saturated = (0.05 * torch.log(0.05 / r) + 0.95 * torch.log(0.95 / (1 - r))).item()
    assert results[1][0] == pytest.approx(results[0][0] + saturated, rel=1e-6)
    assert torch.equal(results[0][1], results[1][1])


@pytest.mark.parametrize("shape", [(), (2, 3)])
def test_any_shape_of_rho_hat(shape):
    values = torch.tensor([0.2, 0.01, 0.7, 0.5, 1e-9, 0.33], dtype=f64)[: max(1, math.prod(shape))]
    rho_hat = values.reshape(shape).clone().requires_grad_(True)
    want_rho_hat = rho_hat.detach().clone().requires_grad_(True)
    value = fastae.kl_sparsity(rho_hat, 0.1)
    want = formula(want_rho_hat, 0.1, 1e-6)
    assert value.item() == pytest.approx(want.item(), rel=1e-14)
    value.backward()
    want.backward()
    assert rho_hat.grad.shape == rho_hat.shape
    torch.testing.assert_close(rho_hat.grad, want_rho_hat.grad, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_saturated_units_stay_finite(dtype):
    # 1 - 1e-6 rounds to 1 in fp16 and bf16: the penalty is computed in fp32 instead.
    rho_hat = torch.tensor([0.3, 1.0, 0.0], dtype=dtype, requires_grad=True)
    value = fastae.kl_sparsity(rho_hat, 0.05)
    value.backward()
    # The penalty in fp32, like encode's statistics; the gradient in the input's dtype.
    assert value.dtype == torch.float32 and rho_hat.grad.dtype == dtype
    assert torch.isfinite(value) and torch.isfinite(rho_hat.grad).all()
    assert rho_hat.grad[1].item() == 0.0 and rho_hat.grad[2].item() == 0.0
    want = fastae.kl_sparsity(rho_hat.detach().float(), 0.05)
    assert value.item() == pytest.approx(want.item(), rel=1e-2)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"eps": "x"}, r"eps: got 'x', expected a number in \(0, 0.5\)"),
        ({"eps": None}, r"eps: got None, expected a number in \(0, 0.5\)"),
        ({"eps": 1e-9}, r"eps: got 1e-09, expected a margin that keeps 1 - eps below 1 in "),
        ({"rho": torch.tensor([0.1, 0.2])}, r"rho: got a tensor that has shape \(2,\), expected"),
        ({"rho": torch.tensor(0.1, requires_grad=True)}, r"rho: got a tensor that requires grad"),
    ],
)
def test_bad_arguments_name_themselves(kwargs, message):
    args = {"rho": 0.1, **kwargs}
    with pytest.raises(ValueError, match=message):
        fastae.kl_sparsity(torch.tensor([0.2, 0.5], dtype=torch.float32), **args)


def test_a_value_just_outside_the_range_is_printed_in_full():
    with pytest.raises(ValueError, match=r"got values in \[0.1, 1.000000001\]"):
        fastae.kl_sparsity(torch.tensor([0.1, 1 + 1e-9], dtype=f64), 0.05)


def test_many_saturated_fp16_units_do_not_overflow_the_sum():
    # 6000 units at 1.0 cost about 6000 x 13.8, beyond fp16's largest finite value.
    value = fastae.kl_sparsity(torch.ones(6000, dtype=torch.float16), 0.05)
    assert value.dtype == torch.float32 and torch.isfinite(value)


def test_empty_rho_hat_gives_zero():
    rho_hat = torch.zeros(0, dtype=f64, requires_grad=True)
    value = fastae.kl_sparsity(rho_hat, 0.05)
    value.backward()
    assert value.item() == 0.0 and rho_hat.grad.shape == (0,)


def test_eps_is_checked_whatever_the_data():
    with pytest.raises(ValueError, match="eps: got 1e-09"):
        fastae.kl_sparsity(torch.zeros(0), 0.05, eps=1e-9)
