"""The Triton backend against the reference, run by Triton's interpreter on the CPU.

tests/conftest.py sets TRITON_INTERPRET=1 before any kernel module is imported, so the kernels
here run as exact fp32/fp64 numpy with one configuration and 16-wide blocks
(fastae.kernels.encoder_forward.BLOCK_INTERPRET). bf16, fp16, tf32 and real parallel programs
belong to the GPU tier (tests/test_gpu.py, run by benchmarks/gpu_check.sh).
"""

import os
import subprocess
import sys

import pytest
import torch
import triton
from cases import ACTIVATION_NAMES
from cases import encoder_case

import fastae
from fastae.kernels import encoder_backward as backward_module
from fastae.kernels.encoder_forward import BLOCK_INTERPRET
from fastae.kernels.encoder_forward import dot_precision
from fastae.kernels.encoder_forward import interpreted
from fastae.kernels.encoder_forward import single_config

pytestmark = pytest.mark.skipif(
    not interpreted(), reason="interpreter tier: TRITON_INTERPRET=1 (tests/conftest.py sets it)"
)

# (B, D, H). (40, 40, 40) spans three 16-wide blocks in every dimension.
SHAPES = [(1, 1, 1), (3, 8, 5), (5, 19, 7), (37, 45, 53), (33, 17, 65), (40, 40, 40)]
NAMES = ("h", "contractive", "rho_hat", "l1", "grad_x", "grad_w", "grad_b")


def run(x, weight, bias, activation, backend, grad_h=None, grad_r=None, inputs=None):
    """h, the three statistics and the gradients of a loss that uses all four outputs."""
    if backend == "reference":
        h, stats = fastae.reference.encode(x, weight, bias, activation)
    else:
        h, stats = fastae.encode(x, weight, bias, activation, backend=backend)
    hidden = weight.shape[0]
    if grad_h is None:
        grad_h = torch.linspace(-1.0, 1.0, h.numel(), dtype=h.dtype).reshape(h.shape)
    if grad_r is None:
        grad_r = torch.linspace(0.5, -1.5, hidden, dtype=stats.rho_hat.dtype)
    loss = (h * grad_h).sum() + 0.7 * stats.contractive + (stats.rho_hat * grad_r).sum()
    loss = loss + 0.3 * stats.l1
    inputs = inputs if inputs is not None else [t for t in (x, weight, bias) if t is not None]
    grads = torch.autograd.grad(loss, inputs)
    return (h.detach(), *(s.detach() for s in stats), *grads)


def leaves(batch, features, hidden, activation, dtype=torch.float32, seed=0):
    """Seeded x, W, b that require gradients. For relu, |a| >= 1e-4 everywhere, so that fp32
    rounding of a cannot put the two backends on different sides of the kink."""
    for attempt in range(100):
        x, weight, bias = encoder_case(batch, features, hidden, dtype=dtype, seed=seed + attempt)
        a = x.double() @ weight.double().t() + bias.double()
        if activation != "relu" or a.abs().min() >= 1e-4:
            return [t.requires_grad_(True) for t in (x, weight, bias)]
    raise RuntimeError("no relu case away from the kink in 100 seeds")


def assert_matches(got, want, rtol=1e-5):
    # rtol on every element, plus an atol of rtol times the largest |value| of the tensor: an
    # element that is a sum with cancellation (a near 0, a gradient near 0) only keeps the
    # absolute rounding error of the terms it sums.
    for name, a, b in zip(NAMES[: len(want)], got, want, strict=True):
        atol = rtol * max(b.abs().max().item(), 1e-30)
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("activation", ACTIVATION_NAMES)
def test_matches_reference_fp32(activation, shape):
    x, weight, bias = leaves(*shape, activation)
    got = run(x, weight, bias, activation, "triton")
    want = run(x, weight, bias, activation, "reference")
    assert_matches(got, want)
    assert got[1].dtype == got[2].dtype == got[3].dtype == torch.float32


def test_largest_shape_spans_more_than_two_blocks_per_dimension():
    assert BLOCK_INTERPRET == 16
    assert all(triton.cdiv(size, BLOCK_INTERPRET) > 2 for size in SHAPES[-1])


@pytest.mark.parametrize("activation", ACTIVATION_NAMES)
def test_matches_torch_backend_without_bias(activation):
    x, weight, _ = leaves(37, 45, 53, activation, seed=3)
    got = run(x, weight, None, activation, "triton")
    want = run(x, weight, None, activation, "torch")
    assert_matches(got[:6], want[:6])


def test_statistics_only_loss_has_no_grad_h():
    # Only the statistics enter the loss: g_h is None and the kernels skip loading it.
    x, weight, bias = leaves(19, 21, 18, "sigmoid", seed=4)
    results = []
    for backend in ("triton", "reference"):
        h, stats = (
            fastae.reference.encode(x, weight, bias)
            if backend == "reference"
            else fastae.encode(x, weight, bias, backend=backend)
        )
        loss = 0.7 * stats.contractive + 2.0 * fastae.kl_sparsity(stats.rho_hat, 0.1)
        results.append(torch.autograd.grad(loss, (x, weight, bias)))
    for got, want in zip(*results, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


def test_ragged_tiles_hand_worked_values():
    # B = 5, D = 19, H = 7: every block is ragged; padded rows let into a reduction would add
    # f(b_j) to the column sums and f'(b_j)^2 n_j to the contractive term.
    i = torch.arange(5.0)[:, None]
    k = torch.arange(19.0)[None, :]
    j = torch.arange(7.0)[:, None]
    x = (((7 * i + 3 * k) % 5) - 2) / 2
    weight = (((5 * j + 2 * k + 1) % 7) - 3) / 4
    bias = (torch.arange(7.0) - 3) / 8
    _, stats = fastae.encode(x, weight, bias, "sigmoid", backend="triton")
    column_sums = torch.tensor(
        [2.13899348, 2.26838126, 2.34864514, 2.48520883, 2.63890788, 2.76929124, 2.84243531]
    )
    torch.testing.assert_close(5 * stats.rho_hat, column_sums, rtol=0, atol=5e-7)
    torch.testing.assert_close(stats.contractive, torch.tensor(1.17669347), rtol=0, atol=5e-7)


def test_non_contiguous_inputs_equal_contiguous_copies():
    x_base, w_base, bias = encoder_case(60, 33, 22, seed=5, dtype=torch.float32)
    # x (30, 30): column-major storage, every other row, a column slice.
    x_strided = x_base.t().contiguous().t()[::2, :30]
    # W (22, 30): stored transposed, inside every other row of a larger buffer.
    storage = torch.zeros(60, 22)
    storage[::2] = w_base[:, :30].t()
    w_strided = storage[::2].t()
    # The upstream gradient of h (30, 22) is transposed too.
    grad_h = torch.randn(22, 30).t()
    assert x_strided.stride() == (2, 60) and w_strided.stride() == (1, 44)

    results = []
    for xx, ww, gg in (
        (x_strided, w_strided, grad_h),
        (x_strided.contiguous(), w_strided.contiguous(), grad_h.contiguous()),
    ):
        xx = xx.detach().requires_grad_(True)
        ww = ww.detach().requires_grad_(True)
        bb = bias.clone().requires_grad_(True)
        results.append(run(xx, ww, bb, "tanh", "triton", grad_h=gg))
    for name, got, want in zip(NAMES, *results, strict=True):
        assert torch.equal(got, want), name


@pytest.mark.parametrize("activation", ["sigmoid", "tanh", "softplus"])
def test_gradcheck_fp64_through_the_triton_function(activation):
    x, weight, bias = leaves(5, 7, 3, activation, dtype=torch.float64, seed=6)

    def outputs(x, weight, bias):
        h, stats = fastae.encode(x, weight, bias, activation, backend="triton")
        return h, stats.contractive, stats.rho_hat, stats.l1

    assert outputs(x, weight, bias)[1].dtype == torch.float64
    assert torch.autograd.gradcheck(outputs, (x, weight, bias))


def test_two_runs_are_bitwise_equal():
    x, weight, bias = leaves(40, 40, 40, "softplus", seed=7)
    first = run(x, weight, bias, "softplus", "triton")
    second = run(x, weight, bias, "softplus", "triton")
    for name, a, b in zip(NAMES, first, second, strict=True):
        assert torch.equal(a, b), name


def test_first_call_with_a_new_shape_is_right():
    # An earlier call with another shape must leave nothing behind in buffers or configs.
    x, weight, bias = leaves(40, 40, 40, "sigmoid", seed=8)
    run(x, weight, bias, "sigmoid", "triton")
    x, weight, bias = leaves(23, 29, 31, "sigmoid", seed=9)
    assert_matches(
        run(x, weight, bias, "sigmoid", "triton"), run(x, weight, bias, "sigmoid", "reference")
    )


def test_input_kernel_skipped_when_x_needs_no_gradient(monkeypatch):
    class Forbidden:
        def __getitem__(self, grid):
            raise AssertionError("the dL/dx kernel was launched for an x that needs no gradient")

    monkeypatch.setattr(backward_module, "_encoder_backward_input_kernel", Forbidden())
    monkeypatch.setattr(backward_module, "_tuned_input_kernel", Forbidden)
    x, weight, bias = encoder_case(9, 18, 17, seed=10, dtype=torch.float32)
    weight.requires_grad_(True)
    bias.requires_grad_(True)
    got = run(x, weight, bias, "tanh", "triton", inputs=[weight, bias])
    want = run(x, weight, bias, "tanh", "reference", inputs=[weight, bias])
    for a, b in zip(got[4:], want[4:], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * b.abs().max().item())


def test_one_configuration_under_interpreter_and_deterministic_mode():
    assert single_config()
    previous = torch.are_deterministic_algorithms_enabled()
    try:
        torch.use_deterministic_algorithms(True)
        assert single_config()
    finally:
        torch.use_deterministic_algorithms(previous)


def test_fp32_dots_are_ieee_unless_the_caller_opts_into_tf32():
    previous = torch.backends.cuda.matmul.allow_tf32
    cuda = torch.device("cuda")
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        assert dot_precision(torch.float32, cuda) == "ieee"
        torch.backends.cuda.matmul.allow_tf32 = True
        assert dot_precision(torch.float32, cuda) == "tf32"
        assert dot_precision(torch.bfloat16, cuda) == "ieee"
        assert dot_precision(torch.float32, torch.device("cpu")) == "ieee"
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous


def test_triton_backend_on_cpu_without_the_interpreter_is_a_clear_error():
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "FASTAE_BACKEND")}
    code = (
        "import torch, fastae\n"
        "try:\n"
        "    fastae.encode(torch.ones(2, 3), torch.ones(4, 3), backend='triton')\n"
        "except ValueError as e:\n"
        "    print(e)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    ).stdout
    assert "backend: got 'triton' for tensors on cpu" in out


def test_weight_kernel_skipped_when_only_x_needs_a_gradient(monkeypatch):
    class Forbidden:
        def __getitem__(self, grid):
            raise AssertionError("the dL/dW kernel was launched for a frozen W and b")

    monkeypatch.setattr(backward_module, "_encoder_backward_weight_kernel", Forbidden())
    monkeypatch.setattr(backward_module, "_tuned_weight_kernel", Forbidden)
    x, weight, bias = encoder_case(9, 18, 17, seed=12, dtype=torch.float32)
    x.requires_grad_(True)
    got = run(x, weight, bias, "softplus", "triton", inputs=[x])
    want = run(x, weight, bias, "softplus", "reference", inputs=[x])
    torch.testing.assert_close(got[4], want[4], rtol=1e-5, atol=1e-5 * want[4].abs().max().item())


def test_saves_x_w_h_and_n_only():
    x, weight, bias = leaves(24, 20, 18, "sigmoid", seed=13)
    saved = []

    def pack(tensor):
        saved.append(tensor)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        h, _ = fastae.encode(x, weight, bias, backend="triton")

    assert len(saved) == 4
    assert saved[0].data_ptr() == x.data_ptr() and saved[1].data_ptr() == weight.data_ptr()
    assert saved[2].data_ptr() == h.data_ptr()
    assert saved[3].shape == (18,)
    torch.testing.assert_close(saved[3], weight.detach().square().sum(1), rtol=1e-6, atol=0)


@pytest.mark.parametrize("activation", ["sigmoid", "tanh"])
def test_fp16_within_the_gpu_tier_tolerance(activation):
    # Normwise relative error against the fp32 reference on the same fp16 inputs; h and delta
    # are rounded to fp16 (2^-11) on the way, hence the loose bound (the GPU tier's).
    x, weight, bias = leaves(40, 40, 40, activation, dtype=torch.float16, seed=14)
    got = run(x, weight, bias, activation, "triton")
    inputs = [t.detach().float().requires_grad_(True) for t in (x, weight, bias)]
    want = run(*inputs, activation, "reference")
    for name, a, b in zip(NAMES, got, want, strict=True):
        error = ((a.float() - b).norm() / b.norm()).item()
        assert error < 4e-3, f"{name}: normwise error {error:.3g}"


def test_bf16_under_the_interpreter_is_refused():
    x, weight, bias = encoder_case(4, 16, 3, dtype=torch.bfloat16)
    with pytest.raises(TypeError, match=r"x: got dtype torch.bfloat16 under TRITON_INTERPRET"):
        fastae.encode(x, weight, bias, backend="triton")
