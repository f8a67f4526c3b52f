"""The CPU matmul of the PyTorch path (fastae.functional.cpu_linear): oneDNN's linear with the
activation fused as a post-op, against F.linear plus the activation computed in float64, and the
rules that choose the route. On a torch without a working oneDNN the route tests are skipped
and only the fallback runs; the torch builds CI installs have it."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from cases import ACTIVATION_NAMES
from cases import encoder_case

import fastae
from fastae.activations import ACTIVATIONS
from fastae.functional import cpu_linear

needs_onednn = pytest.mark.skipif(
    not cpu_linear._onednn_works(torch.float32),
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
    # identity is the bare oneDNN matmul, and relu is torch.relu applied after it.
    x, weight, bias = encoder_case(40, 24, 9, dtype=torch.float32)
    a = cpu_linear.linear_activation(x, weight, bias, ACTIVATIONS["identity"])
    h = cpu_linear.linear_activation(x, weight, bias, ACTIVATIONS["relu"])
    assert torch.equal(h, torch.relu(a))
    assert (h == 0).any() and (h > 0).any()


@needs_onednn
@pytest.mark.skipif(
    not cpu_linear._onednn_works(torch.bfloat16),
    reason="this CPU has no bfloat16 matmul in oneDNN; test_bfloat16_where_the_cpu_lacks_it "
    "covers the fallback",
)
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


@needs_onednn
@pytest.mark.parametrize("route", ["onednn", "torch.matmul"])
@pytest.mark.parametrize("name", ACTIVATION_NAMES)
def test_nan_in_x_gives_nan_codes(name, route, onednn_at_any_size, monkeypatch):
    # A NaN input (a diverged run) must show in h on every route: oneDNN's relu post-op would
    # have made it 0.
    if route == "torch.matmul":
        monkeypatch.setenv("FASTAE_ONEDNN", "0")
    x, weight, bias = encoder_case(6, 10, 8, dtype=torch.float32)
    x[2, 3] = float("nan")
    assert cpu_linear.onednn_used(x, weight) == (route == "onednn")
    h = cpu_linear.linear_activation(x, weight, bias, ACTIVATIONS[name])
    assert h[2].isnan().all()
    assert h[torch.arange(6) != 2].isfinite().all()
    _, stats = fastae.encode(x, weight, bias, name, backend="torch")
    assert stats.rho_hat.isnan().all() and stats.l1.isnan()
    # f' of relu and identity is read off the sign of h (no term at all for identity), as
    # torch's own relu backward does: their penalty stays finite, the rest of the loss does not.
    assert stats.contractive.isnan() == (name not in ("relu", "identity"))


def test_bfloat16_where_the_cpu_lacks_it(tmp_path):
    # oneDNN limited to AVX2, which has no bfloat16 matmul on most CPUs: the probe in bfloat16
    # fails and encode takes torch's matmul instead of raising oneDNN's "could not create a
    # primitive descriptor". float32 keeps the oneDNN route.
    script = tmp_path / "avx2.py"
    script.write_text(
        "import os, torch, fastae\n"
        "from fastae.functional import cpu_linear\n"
        "gen = torch.Generator().manual_seed(0)\n"
        "x = torch.rand(64, 512, generator=gen).bfloat16()\n"
        "w = (torch.randn(512, 512, generator=gen) / 23).bfloat16()\n"
        "h, stats = fastae.encode(x, w, None, backend='torch')\n"
        "os.environ['FASTAE_ONEDNN'] = '0'\n"
        "h0, stats0 = fastae.encode(x, w, None, backend='torch')\n"
        "torch.testing.assert_close(h, h0, rtol=0, atol=4e-3)\n"
        "torch.testing.assert_close(stats.contractive, stats0.contractive, rtol=1e-2, atol=0)\n"
        "bf16 = cpu_linear._onednn_works(torch.bfloat16)\n"
        "# Where the probe failed both calls took torch's matmul: the very same h.\n"
        "assert bf16 or torch.equal(h, h0)\n"
        "print(bf16, cpu_linear._onednn_works(torch.float32))\n"
    )
    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2", "FASTAE_ONEDNN": "1"}
    done = subprocess.run(
        [sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    _bf16, fp32 = done.stdout.split()
    assert fp32 == str(cpu_linear._onednn_works(torch.float32))


@pytest.mark.parametrize("value", ["off", "false", "2", " 0"])
@pytest.mark.parametrize("shape", [(2, 3, 4), (64, 512, 512)], ids=["small", "onednn-size"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_environment_variable_takes_only_0_or_1(value, shape, dtype, monkeypatch):
    # Refused whatever route the call would have taken, not only where it matters.
    monkeypatch.setenv("FASTAE_ONEDNN", value)
    batch, features, hidden = shape
    x, weight = torch.ones(batch, features, dtype=dtype), torch.ones(hidden, features, dtype=dtype)
    with pytest.raises(ValueError, match=rf"FASTAE_ONEDNN: got {value!r}, expected '0' or '1'"):
        fastae.encode(x, weight, backend="torch")


@needs_onednn
# Inductor's own use of torch.jit, not fastae's.
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
def test_compiled_encode_matches_eager(onednn_at_any_size):
    # Inductor cannot lower oneDNN's op inside a training graph: under torch.compile the PyTorch
    # path gives F.linear and the activation to Inductor to fuse, and the result is the eager one.
    x, weight, bias = encoder_case(32, 24, 16, dtype=torch.float32)

    def loss(w, b):
        h, stats = fastae.encode(x, w, b, "sigmoid", backend="torch")
        return h.square().sum() + stats.contractive + stats.rho_hat.sum() + stats.l1

    def run(fn):
        w, b = weight.clone().requires_grad_(), bias.clone().requires_grad_()
        value = fn(w, b)
        value.backward()
        return value, w.grad, b.grad

    assert cpu_linear.onednn_used(x, weight)
    compiled = run(torch.compile(loss))
    eager = run(loss)
    for got, want in zip(compiled, eager, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
