"""Slow, obviously correct ground truth for every quantity fastae computes.

Nothing here uses a closed form: the contractive penalty is the squared Frobenius norm of each
sample's Jacobian dh_b/dx_b, built explicitly with torch.func (vmap over samples of jacrev), and
gradients come from plain autograd through it. Use it in tests and to check your own encoders;
it costs B x H x D memory and is not meant for training.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor
from torch.func import jacrev
from torch.func import vmap

from fastae.activations import get_activation
from fastae.functional.checks import autocast_inputs
from fastae.functional.checks import check_encode_args
from fastae.functional.checks import check_reduction
from fastae.functional.checks import stats_dtype
from fastae.functional.checks import without_autocast
from fastae.functional.stats import EncodeStats


def jacobians(encoder: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
    """Per-sample Jacobians (B, H, D) of encoder, which maps (B, D) to (B, H) row by row."""

    def one_sample(x_b: Tensor) -> Tensor:
        return encoder(x_b.unsqueeze(0)).squeeze(0)

    return vmap(jacrev(one_sample))(x)


def jacobian_penalty(
    encoder: Callable[[Tensor], Tensor], x: Tensor, reduction: str = "mean"
) -> Tensor:
    """||dh_b/dx_b||_F^2 for each sample of x, for any encoder built from torch operations.

    Args:
        encoder: maps (B, D) to (B, H), each output row depending only on its input row
            (nn.Linear, activations, nn.Sequential of them, ...).
        x: (B, D).
        reduction: "mean" over the batch, "sum", or "none" for the (B,) values.
    """
    check_reduction(reduction)
    per_sample = jacobians(encoder, x).square().sum(dim=(1, 2))
    if reduction == "none":
        return per_sample
    return per_sample.mean() if reduction == "mean" else per_sample.sum()


def encode(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    activation: str = "sigmoid",
    *,
    backend: str = "reference",
    process_group=None,
) -> tuple[Tensor, EncodeStats]:
    """Same contract as fastae.encode, computed naively: h by autograd-visible torch ops, the
    contractive term from explicit per-sample Jacobians. backend is accepted and ignored;
    process_group is not supported here (the reference is single-process)."""
    if process_group is not None:
        raise ValueError("process_group: got a group, expected None (the reference is local)")
    act = get_activation(activation)
    # Inside torch.autocast: the reference of the cast inputs, with autocast off.
    x, weight, bias = autocast_inputs(x, weight, bias)
    check_encode_args(x, weight, bias)
    acc = stats_dtype(x.dtype)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])

    def layer(inputs: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
        a = inputs @ w.t()
        return act.forward(a + b if b is not None else a)

    with without_autocast(x.device):
        h = layer(x2, weight, bias)
        # The Jacobian is taken in the accumulation dtype (fp32 for half inputs).
        w_acc = weight.to(acc)
        b_acc = bias.to(acc) if bias is not None else None
        contractive = jacobian_penalty(lambda inputs: layer(inputs, w_acc, b_acc), x2.to(acc))
        h_acc = h.to(acc)
        rho_hat = h_acc.mean(0)
        l1 = h_acc.abs().sum(1).mean()
    return h.reshape(*lead, weight.shape[0]), EncodeStats(contractive, rho_hat, l1)


def contractive_penalty(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    activation: str = "sigmoid",
    reduction: str = "mean",
) -> Tensor:
    """The contractive penalty from explicit Jacobians (see fastae.contractive_penalty), in the
    same dtype as the fast path's: fp32 for half inputs, fp64 for fp64."""
    act = get_activation(activation)
    x, weight, bias = autocast_inputs(x, weight, bias)
    check_encode_args(x, weight, bias)
    # As in encode above: the Jacobian is taken in the accumulation dtype.
    acc = stats_dtype(x.dtype)
    w_acc = weight.to(acc)
    b_acc = bias.to(acc) if bias is not None else None

    def layer(inputs: Tensor) -> Tensor:
        a = inputs @ w_acc.t()
        return act.forward(a + b_acc if b_acc is not None else a)

    with without_autocast(x.device):
        penalty = jacobian_penalty(layer, x.reshape(-1, x.shape[-1]).to(acc), reduction)
    # Per-sample values in the shape of x without its last dimension, as the fast path gives.
    return penalty.reshape(x.shape[:-1]) if reduction == "none" else penalty
