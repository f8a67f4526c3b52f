"""The CPU matmul of the PyTorch path (fastae.functional.cpu_linear): oneDNN's linear with the
activation fused as a post-op, against F.linear plus the activation computed in float64, and the
rules that choose the route. On a torch without a working oneDNN the route tests are skipped
and only the fallback runs; the torch builds CI installs have it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from cases import ACTIVATION_NAMES
from cases import encoder_case

import fastae
from fastae.activations import ACTIVATIONS
from fastae.functional import cpu_linear

needs_onednn = pytest.mark.skipif(
    not cpu_linear._onednn_works(),
    reason="this torch has no working oneDNN linear; the fallback is tested by the other tests",
)

SHAPES = [(1, 1, 1), (3, 8, 5), (7, 19, 13), (64, 33, 17)]


@pytest.fixture
def onednn_at_any_size(monkeypatch):
    """The tests' shapes are far below the size from which fastae takes oneDNN's route."""
    monkeypatch.setattr(cpu_linear, "MIN_ONEDNN_MACS", 1)


def _exact(x, weight, bias, name):
    a = F.linear(x.double(), weight.double(), None if bias is None else bias.double())
    return ACTIVATIONS[name].forward(a)


@needs_onednn
@pytest.mark.parametrize("name", ACTIVATION_NAMES)
@pytest.mark.parametrize("shape", SHAPES)
def test_fused_route_matches_float64(name, shape, onednn_at_any_size):
    x, weight, bias = encoder_case(*shape, dtype=torch.float32)
    assert cpu_linear.onednn_used(x, weight)
    h = cpu_linear.linear_activation(x, weight, bias, ACTIVATIONS[name])
    want = _exact(x, weight, bias, name)
    assert h.dtype == torch.float32 and h.shape == want.shape and h.is_contiguous()
    # float32 rounding of a D-term dot product and of f: a few ulp of the largest term.
    torch.testing.assert_close(h.double(), want, rtol=2e-6, atol=2e-6)


@needs_onednn
def test_relu_and_identity_are_the_plain_matmul(onednn_at_any_size):
    # No approximation in these post-ops: relu of the oneDNN matmul equals relu applied after it.
    x, weight, bias = encoder_case(40, 24, 9, dtype=torch.float32)
    a = cpu_linear.linear_activation(x, weight, bias, ACTIVATIONS["identity"])
    h = cpu_linear.linear_activation(x, weight, bias, ACTIVATIONS["relu"])
    assert torch.equal(h, torch.relu(a))
    assert (h == 0).any() and (h > 0).any()


@needs_onednn
def test_bfloat16_route(onednn_at_any_size):
    x, weight, bias = encoder_case(16, 12, 10, dtype=torch.bfloat16)
    assert cpu_linear.onednn_used(x, weight)
    h = cpu_linear.linear_activation(x, weight, bias, ACTIVATIONS["sigmoid"])
    assert h.dtype == torch.bfloat16
    # bf16 keeps 8 bits: h in (0, 1) is within 2^-8 of the exact value.
    torch.testing.assert_close(h.double(), _exact(x, weight, bias, "sigmoid"), rtol=0, atol=4e-3)


@needs_onednn
def test_non_contiguous_inputs(onednn_at_any_size):
    x, weight, bias = encoder_case(9, 14, 6, dtype=torch.float32)
    x_t = x.t().contiguous().t()  # same values, column-major
    weight_t = weight.t().contiguous().t()
    assert not x_t.is_contiguous() and not weight_t.is_contiguous()
    h = cpu_linear.linear_activation(x_t, weight_t, bias, ACTIVATIONS["tanh"])
    torch.testing.assert_close(h.double(), _exact(x, weight, bias, "tanh"), rtol=2e-6, atol=2e-6)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16])
def test_dtypes_onednn_lacks_take_torch_matmul(dtype):
    x = torch.ones(2, 3, dtype=dtype)
    weight = torch.full((4, 3), 0.5, dtype=dtype)
    assert not cpu_linear.onednn_used(x, weight)
    h = cpu_linear.linear_activation(x, weight, None, ACTIVATIONS["identity"])
    assert h.dtype == dtype and torch.equal(h, torch.full((2, 4), 1.5, dtype=dtype))


@needs_onednn
def test_environment_variable_and_torch_flag_turn_the_route_off(onednn_at_any_size, monkeypatch):
    x, weight = torch.ones(2, 3), torch.ones(4, 3)
    assert cpu_linear.onednn_used(x, weight)
    monkeypatch.setenv("FASTAE_ONEDNN", "0")
    assert not cpu_linear.onednn_used(x, weight)
    monkeypatch.setenv("FASTAE_ONEDNN", "1")
    monkeypatch.setattr(torch.backends.mkldnn, "enabled", False)
    assert not cpu_linear.onednn_used(x, weight)
    monkeypatch.setattr(torch.backends.mkldnn, "enabled", True)
    assert cpu_linear.onednn_used(x, weight)


@needs_onednn
@pytest.mark.parametrize("name", ACTIVATION_NAMES)
def test_encode_agrees_across_routes(name, onednn_at_any_size, monkeypatch):
    # The whole PyTorch path, statistics and gradients, through either matmul: the same up to
    # float32 rounding.
    x, weight, bias = encoder_case(24, 10, 7, dtype=torch.float32)

    def run():
        w = weight.clone().requires_grad_()
        b = bias.clone().requires_grad_()
        h, stats = fastae.encode(x, w, b, name, backend="torch")
        loss = h.square().sum() + stats.contractive + stats.rho_hat.sum() + stats.l1
        loss.backward()
        return h, *stats, w.grad, b.grad

    fused = run()
    monkeypatch.setenv("FASTAE_ONEDNN", "0")
    plain = run()
    for got, want in zip(fused, plain, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_linear_is_the_bare_matmul():
    x, weight, _ = encoder_case(5, 7, 3, dtype=torch.float32)
    torch.testing.assert_close(
        cpu_linear.linear(x, weight).double(), x.double() @ weight.double().t(), rtol=2e-6,
        atol=2e-6,
    )  # fmt: skip


@needs_onednn
def test_small_matmuls_take_torch_matmul():
    # B * D * H below MIN_ONEDNN_MACS: oneDNN's fixed cost per call outweighs its faster GEMM.
    scalar = torch.empty(())
    hidden = cpu_linear.MIN_ONEDNN_MACS // (64 * 64)
    assert cpu_linear.onednn_used(scalar.expand(64, 64), scalar.expand(hidden, 64))
    assert not cpu_linear.onednn_used(scalar.expand(64, 64), scalar.expand(hidden - 1, 64))
    assert not cpu_linear.onednn_used(torch.ones(8, 4), torch.ones(3, 4))
