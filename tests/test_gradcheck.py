"""gradcheck of the hand-written backward of the torch path, with h and all three statistics in
one loss, and the gradients against autograd through the reference."""

import pytest
import torch
from cases import ACTIVATION_NAMES
from cases import encoder_case

import fastae
from fastae import reference


def combined_loss(encode_fn, activation, g_h, g_r):
    """A loss that gives every output of encode a different, non-trivial upstream gradient."""

    def loss(x, weight, bias):
        h, stats = encode_fn(x, weight, bias, activation)
        return (
            (h * g_h).sum()
            + 0.7 * stats.contractive
            + (stats.rho_hat * g_r).sum()
            + (0.3 * stats.l1)
        )

    return loss


def torch_encode(x, weight, bias, activation):
    return fastae.encode(x, weight, bias, activation, backend="torch")


@pytest.mark.parametrize("activation", ACTIVATION_NAMES)
@pytest.mark.parametrize("x_grad", [True, False], ids=["x-grad", "no-x-grad"])
def test_gradcheck_all_outputs(activation, x_grad):
    x, weight, bias = encoder_case(4, 5, 3, activation, seed=1)
    gen = torch.Generator().manual_seed(2)
    g_h = torch.randn(4, 3, generator=gen, dtype=torch.float64)
    g_r = torch.randn(3, generator=gen, dtype=torch.float64)
    loss = combined_loss(torch_encode, activation, g_h, g_r)

    x.requires_grad_(x_grad)
    weight.requires_grad_(True)
    bias.requires_grad_(True)
    assert torch.autograd.gradcheck(loss, (x, weight, bias), eps=1e-6, atol=1e-8, rtol=1e-6)


@pytest.mark.parametrize("activation", ACTIVATION_NAMES)
def test_gradients_equal_autograd_through_the_reference(activation):
    x, weight, bias = encoder_case(7, 19, 13, activation, seed=3)
    gen = torch.Generator().manual_seed(4)
    g_h = torch.randn(7, 13, generator=gen, dtype=torch.float64)
    g_r = torch.randn(13, generator=gen, dtype=torch.float64)

    grads = []
    for encode_fn in (torch_encode, reference.encode):
        inputs = [t.clone().requires_grad_(True) for t in (x, weight, bias)]
        combined_loss(encode_fn, activation, g_h, g_r)(*inputs).backward()
        grads.append([t.grad for t in inputs])
    for got, want in zip(*grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_no_input_gradient_is_computed_for_x_without_requires_grad():
    x, weight, bias = encoder_case(4, 5, 3)
    weight.requires_grad_(True)
    h, stats = fastae.encode(x, weight, bias, backend="torch")
    (h.sum() + stats.contractive).backward()
    assert x.grad is None and weight.grad is not None


def test_statistics_alone_backpropagate():
    # Only one statistic in the loss: the other upstream gradients arrive as None.
    x, weight, bias = encoder_case(4, 5, 3, seed=5)
    for pick in ("contractive", "rho_hat", "l1"):
        w = weight.clone().requires_grad_(True)
        _, stats = fastae.encode(x, w, bias, backend="torch")
        getattr(stats, pick).sum().backward()

        w_ref = weight.clone().requires_grad_(True)
        _, stats_ref = reference.encode(x, w_ref, bias)
        getattr(stats_ref, pick).sum().backward()
        torch.testing.assert_close(w.grad, w_ref.grad, rtol=1e-10, atol=1e-12)


def backward_matmuls(x_requires_grad):
    """The matrix products the backward runs, recorded at the aten level."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Record(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    x, weight, bias = encoder_case(6, 5, 4)
    x.requires_grad_(x_requires_grad)
    weight.requires_grad_(True)
    h, stats = fastae.encode(x, weight, bias, backend="torch")
    loss = h.sum() + stats.contractive
    with Record() as record:
        loss.backward()
    return [op for op in record.ops if op in ("mm", "addmm", "addmm_", "matmul", "bmm")]


def test_the_input_gradient_matmul_is_skipped_when_x_needs_no_gradient():
    assert len(backward_matmuls(x_requires_grad=True)) == 2
    assert len(backward_matmuls(x_requires_grad=False)) == 1


def test_double_backward_is_refused_clearly():
    # The backward is hand-written and first-order only; a second derivative must say so rather
    # than fail somewhere inside it.
    x, weight, bias = encoder_case(4, 5, 3)
    x.requires_grad_(True)
    _, stats = fastae.encode(x, weight, bias, backend="torch")
    upstream = torch.ones((), dtype=torch.float64, requires_grad=True)
    (grad_x,) = torch.autograd.grad(stats.contractive, x, upstream, create_graph=True)
    with pytest.raises(RuntimeError, match="first order only.*double backward"):
        grad_x.sum().backward()


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_double_backward_with_a_plain_upstream_gradient_is_refused(backend):
    # torch.autograd.grad(C, x, create_graph=True) with the default upstream gradient: the
    # gradient must carry the refusal too, not come back without a graph (which made the
    # second derivative silently miss every term through it).
    x, weight, bias = encoder_case(4, 5, 3)
    x.requires_grad_(True)
    weight.requires_grad_(True)
    _, stats = fastae.encode(x, weight, bias, backend=backend)
    (grad_x,) = torch.autograd.grad(stats.contractive, x, create_graph=True)
    assert grad_x.requires_grad
    with pytest.raises(RuntimeError, match="first order only.*double backward"):
        torch.autograd.grad(grad_x.square().sum() + weight.square().sum(), weight)
    # Without create_graph nothing changes.
    _, stats = fastae.encode(x, weight, bias, backend=backend)
    (plain,) = torch.autograd.grad(stats.contractive, x)
    assert not plain.requires_grad


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_double_backward_through_a_decoder_parameter_is_refused(backend):
    # A gradient penalty with a decoder: the upstream gradient of h depends on V, so a second
    # derivative with respect to V passes through the encoder's backward and must refuse, not
    # leave the penalty's share out.
    x, weight, _ = encoder_case(5, 4, 3)
    x.requires_grad_(True)
    weight.requires_grad_(True)
    decoder = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    h, _ = fastae.encode(x, weight, None, backend=backend)
    reconstruction = (h @ decoder.t() - 1).square().sum()
    (grad_x,) = torch.autograd.grad(reconstruction, x, create_graph=True)
    with pytest.raises(RuntimeError, match="first order only.*double backward"):
        torch.autograd.grad(reconstruction + grad_x.square().sum(), decoder)
