"""The closed form of the torch path against the reference's explicit Jacobians, and values
worked out by hand."""

import pytest
import torch
from cases import ACTIVATION_NAMES
from cases import encoder_case

import fastae
from fastae import reference

f64 = torch.float64


@pytest.mark.parametrize("activation", ACTIVATION_NAMES)
@pytest.mark.parametrize("shape", [(1, 1, 1), (3, 8, 5), (7, 19, 13)])
def test_closed_form_equals_reference(activation, shape):
    x, weight, bias = encoder_case(*shape, activation)

    h, stats = fastae.encode(x, weight, bias, activation, backend="torch")
    h_ref, stats_ref = reference.encode(x, weight, bias, activation)

    torch.testing.assert_close(h, h_ref, rtol=1e-10, atol=1e-10)
    for got, want in zip(stats, stats_ref, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("activation", ACTIVATION_NAMES)
def test_per_sample_penalty_equals_reference(activation):
    x, weight, bias = encoder_case(7, 19, 13, activation)
    for reduction in ("none", "sum", "mean"):
        got = fastae.contractive_penalty(x, weight, bias, activation, reduction)
        want = reference.contractive_penalty(x, weight, bias, activation, reduction)
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


W_FIRST = torch.tensor([[1.0, -1.0, 2.0], [0.5, 0.5, -1.0]], dtype=f64)


def test_sigmoid_by_hand():
    # a = 0, h = 1/2, f' = 1/4, n = [6, 1.5]: C = (1/16)(6 + 1.5) = 0.46875.
    _, stats = fastae.encode(torch.zeros(1, 3, dtype=f64), W_FIRST, activation="sigmoid")
    assert stats.contractive.item() == 0.46875
    # The bugs: summing a row before squaring gives (1/16)(4 + 0) = 0.25; averaging over the
    # Jacobian's six entries gives 0.46875 / 6 = 0.078125.
    assert stats.contractive.item() not in (0.25, 0.078125)


def test_relu_by_hand():
    # a = [2, -0.5]: only unit 0 is active, n_0 = 5, so C = 5; sigmoid's f' would give 20.
    weight = torch.tensor([[1.0, 2.0], [-1.0, 1.0]], dtype=f64)
    x = torch.tensor([[1.0, 0.5]], dtype=f64)
    _, stats = fastae.encode(x, weight, activation="relu")
    assert stats.contractive.item() == 5.0


def test_tanh_by_hand():
    # a = 0, f' = 1: C = n_0 + n_1 = 6 + 1.5 = 7.5.
    _, stats = fastae.encode(torch.zeros(1, 3, dtype=f64), W_FIRST, activation="tanh")
    assert stats.contractive.item() == 7.5


def test_identity_by_hand_and_its_gradient_is_exactly_2w():
    # f' = 1: C = ||W||_F^2 = 1 + 4 + 9 + 16 = 30, and dC/dW = 2W through n_j alone.
    weight = torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=f64, requires_grad=True)
    x = torch.tensor([[0.3, -0.7]], dtype=f64)
    penalty = fastae.contractive_penalty(x, weight, activation="identity")
    assert penalty.item() == 30.0

    penalty.backward()
    assert torch.equal(weight.grad, 2 * weight.detach())


def test_batch_values_by_hand():
    x = torch.tensor([[0.0, 0.0, 0.0], [1.0, 0.0, 0.0]], dtype=f64)
    # Sample 2: a = [1, 0.5], f' = s(1 - s), C = 6 f'(1)^2 + 1.5 f'(0.5)^2.
    s = torch.sigmoid(torch.tensor([1.0, 0.5], dtype=f64))
    fp = s * (1 - s)
    second = (6 * fp[0] ** 2 + 1.5 * fp[1] ** 2).item()
    assert second == pytest.approx(0.3147776, abs=5e-8)

    per_sample = fastae.contractive_penalty(x, W_FIRST, reduction="none")
    torch.testing.assert_close(per_sample, torch.tensor([0.46875, second], dtype=f64))
    mean = fastae.contractive_penalty(x, W_FIRST, reduction="mean")
    total = fastae.contractive_penalty(x, W_FIRST, reduction="sum")
    assert mean.item() == pytest.approx(0.3917638, abs=5e-8)
    assert total.item() == pytest.approx(0.7835276, abs=5e-8)

    doubled = fastae.contractive_penalty(torch.cat([x, x]), W_FIRST, reduction="mean")
    torch.testing.assert_close(doubled, mean, rtol=1e-15, atol=0)


def test_weight_gradient_includes_the_row_norm_term():
    # Central finite differences of C(W) at x = [1, 0, 0]: a gradient without the term through
    # n_j (only delta^T x) differs from them.
    x = torch.tensor([[1.0, 0.0, 0.0]], dtype=f64)
    weight = W_FIRST.clone().requires_grad_(True)
    fastae.contractive_penalty(x, weight).backward()

    eps = 1e-6
    numeric = torch.zeros_like(W_FIRST)
    for j in range(2):
        for k in range(3):
            step = torch.zeros_like(W_FIRST)
            step[j, k] = eps
            up = fastae.contractive_penalty(x, W_FIRST + step)
            down = fastae.contractive_penalty(x, W_FIRST - step)
            numeric[j, k] = (up - down) / (2 * eps)
    torch.testing.assert_close(weight.grad, numeric, rtol=1e-7, atol=1e-9)

    # Without the n_j term: delta^T x only, which leaves out 2 f'^2 W_j.
    a = x @ W_FIRST.t()
    s = torch.sigmoid(a)
    fp = s * (1 - s)
    row_norm_term = 2 * (fp**2).sum(0)[:, None] * W_FIRST
    assert (weight.grad - row_norm_term - numeric).abs().max() > 0.1


def test_leading_dimensions_are_flattened_into_the_batch():
    x, weight, bias = encoder_case(6, 5, 4)
    h, stats = fastae.encode(x.reshape(2, 3, 5), weight, bias)
    h_flat, stats_flat = fastae.encode(x, weight, bias)
    assert h.shape == (2, 3, 4)
    torch.testing.assert_close(h.reshape(6, 4), h_flat, rtol=0, atol=0)
    torch.testing.assert_close(stats.contractive, stats_flat.contractive, rtol=0, atol=0)


def test_per_sample_penalty_keeps_the_leading_dimensions():
    x, weight, bias = encoder_case(6, 5, 4)
    per_sample = fastae.contractive_penalty(x.reshape(2, 3, 5), weight, bias, reduction="none")
    flat = fastae.contractive_penalty(x, weight, bias, reduction="none")
    assert per_sample.shape == (2, 3)
    torch.testing.assert_close(per_sample.reshape(6), flat, rtol=0, atol=0)
    # The reference keeps them too, and agrees value for value.
    want = reference.contractive_penalty(x.reshape(2, 3, 5), weight, bias, reduction="none")
    assert want.shape == (2, 3)
    torch.testing.assert_close(per_sample, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_reference_penalty_of_half_inputs_is_fp32_like_the_fast_path(dtype):
    x, weight, bias = (t.to(dtype) for t in encoder_case(5, 6, 4))
    for reduction in ("none", "sum", "mean"):
        got = fastae.contractive_penalty(x, weight, bias, reduction=reduction)
        want = reference.contractive_penalty(x, weight, bias, reduction=reduction)
        assert got.dtype == want.dtype == torch.float32
        # The reference takes the whole layer in fp32; the fast path rounds a = x W^T + b to
        # the input dtype first (2^-8 relative for bf16, 2^-11 for fp16), and that rounding
        # of a, carried through f'^2, is the whole difference: 2e-3 and 6e-4 measured.
        torch.testing.assert_close(got, want, rtol=1e-2, atol=0)
    # The mean agrees with reference.encode's statistic, which computes it the same way.
    _, stats = reference.encode(x, weight, bias)
    torch.testing.assert_close(
        reference.contractive_penalty(x, weight, bias), stats.contractive, rtol=0, atol=0
    )
