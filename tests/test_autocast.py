"""Inside torch.autocast, fastae.encode does what autocast does to F.linear: x, weight and bias
are cast to autocast's dtype and h comes out in it, whichever GEMM route the size takes; the
statistics stay in float32, their reductions not lowered by autocast."""

from __future__ import annotations

import pytest
import torch
from cases import encoder_case

import fastae
from fastae.functional import cpu_linear

LOW = torch.bfloat16

# (64, 512, 512) reaches cpu_linear.MIN_ONEDNN_MACS (oneDNN's route on a CPU that has it in
# bfloat16), (8, 40, 24) does not.
SHAPES = [(8, 40, 24), (64, 512, 512)]


def _encode_and_grads(x, weight, bias, autocast, backend="torch", low=LOW):
    weight = weight.clone().requires_grad_()
    bias = bias.clone().requires_grad_()
    with torch.autocast("cpu", dtype=low, enabled=autocast):
        h, stats = fastae.encode(x, weight, bias, "sigmoid", backend=backend)
    (h.float().square().sum() + stats.contractive + stats.rho_hat.sum() + stats.l1).backward()
    return h, stats, weight.grad, bias.grad


@pytest.mark.parametrize(
    ("shape", "backend", "low"),
    # The Triton kernels under the interpreter (conftest.py), which refuses bfloat16, in
    # float16 and at the small shape only: it is slow.
    [
        (SHAPES[0], "torch", LOW),
        (SHAPES[1], "torch", LOW),
        (SHAPES[0], "torch", torch.float16),
        (SHAPES[0], "triton", torch.float16),
    ],
)
def test_encode_under_autocast_is_encode_of_the_cast_inputs(shape, backend, low):
    assert cpu_linear.MIN_ONEDNN_MACS == 2**24
    x, weight, bias = encoder_case(*shape, dtype=torch.float32)
    h, stats, grad_w, grad_b = _encode_and_grads(x, weight, bias, True, backend, low)
    want_h, want_stats, want_w, want_b = _encode_and_grads(
        x.to(low), weight.to(low), bias.to(low), False, backend, low
    )
    assert h.dtype == low
    assert torch.equal(h, want_h)
    for got, want in zip(stats, want_stats, strict=True):
        # float32, and equal: nothing inside was lowered to bfloat16 by autocast.
        assert got.dtype == torch.float32
        assert torch.equal(got, want)
    # The casts are differentiable: float32 parameters get float32 gradients, the low ones.
    assert grad_w.dtype == torch.float32 and grad_b.dtype == torch.float32
    assert torch.equal(grad_w, want_w.float()) and torch.equal(grad_b, want_b.float())


def test_float64_is_left_alone_by_autocast():
    x, weight, bias = encoder_case(5, 7, 3, dtype=torch.float64)
    with torch.autocast("cpu", dtype=LOW):
        h, stats = fastae.encode(x, weight, bias, backend="torch")
    want_h, want_stats = fastae.encode(x, weight, bias, backend="torch")
    assert h.dtype == torch.float64 and torch.equal(h, want_h)
    assert torch.equal(stats.contractive, want_stats.contractive)


def test_fused_encoder_under_autocast_matches_linear_and_sigmoid():
    torch.manual_seed(0)
    layer = fastae.nn.FusedEncoder(40, 24)
    x = torch.randn(8, 40)
    with torch.autocast("cpu", dtype=LOW):
        h = layer(x)
        want = torch.sigmoid(torch.nn.functional.linear(x, layer.weight, layer.bias))
    assert h.dtype == want.dtype == LOW
    torch.testing.assert_close(h, want, rtol=0, atol=4e-3)
    assert layer.last_stats.contractive.dtype == torch.float32


def test_deep_encode_under_autocast_takes_the_lowered_codes():
    # Layer 2 gets layer 1's bfloat16 code with its float32 weight, as nn.Linear would under
    # autocast; the whole-encoder penalty is computed in float32 from the bfloat16 codes.
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(16, 30, generator=gen)
    w1, w2 = (
        torch.randn(20, 30, generator=gen) / 30**0.5,
        torch.randn(10, 20, generator=gen) / 20**0.5,
    )
    layers = [(w1, None, "sigmoid"), (w2, None, "tanh")]
    with torch.autocast("cpu", dtype=LOW):
        result = fastae.deep_encode(x, layers, penalty="exact")
    want = fastae.deep_encode(x, layers, penalty="exact")
    assert result.h.dtype == LOW
    assert result.penalty.value.dtype == torch.float32
    assert all(stats.contractive.dtype == torch.float32 for stats in result.stats)
    # bfloat16 codes: about 2^-8 relative in each factor of the Jacobian.
    torch.testing.assert_close(result.penalty.value, want.penalty.value, rtol=2e-2, atol=0)
    torch.testing.assert_close(result.h.float(), want.h, rtol=0, atol=2e-2)


@pytest.mark.parametrize("low", [LOW, torch.float16])
def test_per_sample_contractive_penalty_under_autocast(low):
    x, weight, bias = encoder_case(12, 10, 6, dtype=torch.float32)
    with torch.autocast("cpu", dtype=low):
        per_sample = fastae.contractive_penalty(x, weight, bias, reduction="none")
        mean = fastae.contractive_penalty(x, weight, bias)
    want = fastae.contractive_penalty(x.to(low), weight.to(low), bias.to(low), reduction="none")
    assert per_sample.dtype == torch.float32 and per_sample.shape == (12,)
    assert torch.equal(per_sample, want)
    torch.testing.assert_close(per_sample.mean(), mean, rtol=1e-6, atol=0)


def test_reference_under_autocast_is_the_reference_of_the_cast_inputs():
    x, weight, bias = encoder_case(6, 5, 4, dtype=torch.float32)
    with torch.autocast("cpu", dtype=LOW):
        h, stats = fastae.reference.encode(x, weight, bias, "tanh")
        penalty = fastae.reference.contractive_penalty(x, weight, bias, "tanh", reduction="none")
    want_h, want_stats = fastae.reference.encode(x.to(LOW), weight.to(LOW), bias.to(LOW), "tanh")
    assert h.dtype == LOW and torch.equal(h, want_h)
    for got, want in zip(stats, want_stats, strict=True):
        assert got.dtype == torch.float32 and torch.equal(got, want)
    want_penalty = fastae.reference.contractive_penalty(
        x.to(LOW), weight.to(LOW), bias.to(LOW), "tanh", reduction="none"
    )
    assert torch.equal(penalty, want_penalty)


def test_float64_beside_float32_under_autocast_names_the_dtypes_passed():
    x, weight, bias = encoder_case(4, 3, 2, dtype=torch.float32)
    with torch.autocast("cpu", dtype=LOW):
        with pytest.raises(
            TypeError,
            match=r"weight: got dtype torch.float32, expected the dtype of x, "
            r"torch.float64",
        ):
            fastae.encode(x.double(), weight, bias)
