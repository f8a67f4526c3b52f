"""The activations of the Triton kernels (kernels/activations.py) against torch, element by
element, under the interpreter: tanh, softplus and the derivatives built from exp and log must
keep their relative accuracy near 0 and must not overflow for large |a|."""

import pytest
import torch
import triton
import triton.language as tl

from fastae.activations import ACTIVATIONS
from fastae.kernels.activations import activation_d1
from fastae.kernels.activations import activation_d2
from fastae.kernels.activations import activation_forward
from fastae.kernels.encoder_forward import interpreted

pytestmark = pytest.mark.skipif(
    not interpreted(), reason="interpreter tier: TRITON_INTERPRET=1 (tests/conftest.py sets it)"
)

# Relative error bounds: a few units in the last place of each dtype.
RTOL = {torch.float32: 1e-6, torch.float64: 1e-14}


@triton.jit
def _activation_table_kernel(
    a_ptr,  # (N,) pre-activations
    out_ptr,  # (3, N) f(a), f'(a) and f''(a) from h
    N,  # number of elements
    ACTIVATION: tl.constexpr,
    BLOCK: tl.constexpr,
):
    offsets = tl.arange(0, BLOCK)
    mask = offsets < N
    a = tl.load(a_ptr + offsets, mask=mask, other=0.0)
    h = activation_forward(a, ACTIVATION)
    d1 = activation_d1(h, ACTIVATION)
    d2 = activation_d2(h, d1, ACTIVATION)
    tl.store(out_ptr + offsets, h, mask=mask)
    tl.store(out_ptr + N + offsets, d1, mask=mask)
    tl.store(out_ptr + 2 * N + offsets, d2, mask=mask)


def kernel_table(a: torch.Tensor, name: str) -> torch.Tensor:
    out = torch.empty((3, a.numel()), dtype=a.dtype)
    block = triton.next_power_of_2(a.numel())
    _activation_table_kernel[(1,)](
        a, out, a.numel(), ACTIVATION=ACTIVATIONS[name].code, BLOCK=block
    )
    return out


def points(dtype):
    # Tiny, near the series bounds (|2a| = 0.25 for tanh, e^-|a| = 0.25 for softplus), moderate,
    # and far past where e^|a| overflows.
    special = [0.0, 1e-30, -1e-20, 1e-8, -1e-4, 0.1249, 0.1251, 1.3862, 1.3864, -0.3, 0.5, 3.0]
    special += [-20.0, 20.0, 50.0, -80.0, 1e4, -1e4, 1e30, -1e30]
    return torch.cat(
        [torch.tensor(special, dtype=dtype), torch.linspace(-12, 12, 401, dtype=dtype)]
    )


def relative_error(got, want):
    scale = want.abs().clamp_min(torch.finfo(want.dtype).tiny)
    return ((got - want).abs() / scale).max().item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("name", ["sigmoid", "tanh", "softplus"])
def test_forward_keeps_relative_accuracy_and_never_overflows(name, dtype):
    a = points(dtype)
    h = kernel_table(a, name)[0]
    want = ACTIVATIONS[name].forward(a.double())
    assert torch.isfinite(h).all()
    assert relative_error(h.double(), want) < RTOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("name", list(ACTIVATIONS))
def test_derivatives_from_h_match_the_table(name, dtype):
    # The same h into both: the kernel's f', f'' against fastae.activations in the same dtype
    # (1 - h^2 near saturation cancels in both alike; softplus's e^-h - 1 is where they differ).
    a = points(dtype)
    a = a[a.abs() <= 50]
    table = kernel_table(a, name)
    h = table[0]
    act = ACTIVATIONS[name]
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(table[1], act.d1(h), rtol=8 * RTOL[dtype], atol=eps)
    torch.testing.assert_close(table[2], act.d2(h), rtol=8 * RTOL[dtype], atol=eps)


def test_tanh_of_small_arguments_is_not_cancelled():
    # exp(-2a) - 1 in fp32 would give tanh(1e-4) with four wrong digits.
    a = torch.tensor([1e-4, -3e-6, 2e-3], dtype=torch.float32)
    h = kernel_table(a, "tanh")[0]
    torch.testing.assert_close(h, torch.tanh(a), rtol=2e-7, atol=0)
