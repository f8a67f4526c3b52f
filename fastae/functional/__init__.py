"""The functional API: the fused encoder and the penalties built on its statistics.

    h, stats = encode(x, weight, bias, activation, backend="auto", process_group=None, noise=None)
    loss = recon + lam * stats.contractive + beta * kl_sparsity(stats.rho_hat, rho)
           + gamma * stats.l1

Backends: "torch" (the PyTorch path with a hand-written backward, any device), "triton" (the
fused kernels: CUDA tensors, or CPU tensors under TRITON_INTERPRET=1), "auto" (Triton for CUDA
tensors, the PyTorch path elsewhere). The environment variable FASTAE_BACKEND, when set to
"torch" or "triton", overrides "auto".
"""

from __future__ import annotations

import importlib.util
import os

import torch
from torch import Tensor

from fastae.activations import get_activation
from fastae.functional.checks import autocast_inputs
from fastae.functional.checks import check_encode_args
from fastae.functional.checks import check_reduction
from fastae.functional.checks import check_rho
from fastae.functional.checks import check_tensor
from fastae.functional.checks import stats_dtype
from fastae.functional.checks import without_autocast
from fastae.functional.deep import DeepEncodeResult
from fastae.functional.deep import DeepPenalty
from fastae.functional.deep import deep_contractive_penalty
from fastae.functional.deep import deep_encode
from fastae.functional.kl import KLSparsityFunction
from fastae.functional.kl import check_eps
from fastae.functional.noise import Noise
from fastae.functional.noise import check_noise
from fastae.functional.stats import EncodeStats
from fastae.functional.torch_encode import TorchEncodeFunction

__all__ = [
    "DeepEncodeResult",
    "DeepPenalty",
    "EncodeStats",
    "Noise",
    "contractive_penalty",
    "deep_contractive_penalty",
    "deep_encode",
    "encode",
    "kl_sparsity",
    "resolve_backend",
]

BACKENDS = ("auto", "torch", "triton")


def _triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def triton_usable(device: torch.device) -> bool:
    """Whether the Triton backend can run on tensors of this device."""
    if importlib.util.find_spec("triton") is None:
        return False
    return device.type == "cuda" or (device.type == "cpu" and _triton_interpreted())


def resolve_backend(backend: str, device: torch.device) -> str:
    """Turn "auto" (or the FASTAE_BACKEND override) into "torch" or "triton" for a device."""
    if backend not in BACKENDS:
        raise ValueError(f"backend: got {backend!r}, expected one of {', '.join(BACKENDS)}")
    if backend == "auto":
        forced = os.environ.get("FASTAE_BACKEND", "")
        if forced:
            if forced not in ("torch", "triton"):
                raise ValueError(
                    f"FASTAE_BACKEND: got {forced!r}, expected 'torch' or 'triton' (or unset)"
                )
            backend = forced
        else:
            usable = device.type == "cuda" and importlib.util.find_spec("triton") is not None
            backend = "triton" if usable else "torch"
    if backend == "triton" and not triton_usable(device):
        raise ValueError(
            f"backend: got 'triton' for tensors on {device}, expected CUDA tensors (or CPU "
            "tensors with TRITON_INTERPRET=1 set before fastae is imported) and triton installed"
        )
    return backend


def encode(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    activation: str = "sigmoid",
    *,
    backend: str = "auto",
    process_group=None,
    noise: Noise | None = None,
) -> tuple[Tensor, EncodeStats]:
    """One encoder layer h = f(x W^T + b) and its batch statistics in one fused pass.

    Args:
        x: (B, D) inputs, or (*, D): leading dimensions are flattened into the batch.
        weight: (H, D), nn.Linear layout.
        bias: (H,) or None.
        activation: "sigmoid", "tanh", "relu", "softplus" or "identity".
        backend: "auto", "torch" or "triton" (see the module docstring).
        process_group: a torch.distributed group; when given the statistics are means over the
            samples of every rank, with gradients scaled for DDP's averaging (DESIGN section 4).
        noise: a fastae.functional.noise.Noise to encode a corrupted x~ instead of x (denoising):
            h = f(x~ W^T + b) and the statistics of that pass. x~ is drawn from the key of
            (noise.seed, noise.step) and drawn again in the backward, never saved; dL/dW uses
            x~ and dL/dx is multiplied by dx~/dx. None (the default) encodes x itself.

    Returns:
        h of shape (*, H) in the dtype of x, and EncodeStats(contractive, rho_hat, l1) in fp32
        (fp64 for fp64 inputs), each a mean over the batch. Inside torch.autocast, x, weight and
        bias are first cast to autocast's dtype, as F.linear's would be, so h comes out in it.
    """
    act = get_activation(activation)
    x, weight, bias = autocast_inputs(x, weight, bias)
    check_encode_args(x, weight, bias)
    check_noise(noise)
    # (*, D) inputs are flattened into (B, D); a plain (B, D) input skips the two reshapes.
    flat = x.dim() == 2
    x2 = x if flat else x.reshape(-1, x.shape[-1])

    if resolve_backend(backend, x.device) == "triton":
        from fastae.functional.triton_encode import TritonEncodeFunction as Function
    else:
        Function = TorchEncodeFunction
    # Inside torch.autocast the inputs are in its dtype already; the statistics' float32
    # reductions inside are not autocast's to lower.
    with without_autocast(x.device):
        h, contractive, rho_hat, l1 = Function.apply(x2, weight, bias, act, process_group, noise)
    if not flat:
        h = h.reshape(*x.shape[:-1], weight.shape[0])
    return h, EncodeStats(contractive, rho_hat, l1)


def kl_sparsity(rho_hat: Tensor, rho: float, eps: float = 1e-6) -> Tensor:
    """KL sparsity penalty sum_j KL(rho || rho_hat_j) between Bernoulli distributions.

        K = sum_j rho log(rho / r_j) + (1 - rho) log((1 - rho) / (1 - r_j))

    rho_hat must be the mean activation of units whose codes lie in [0, 1] (sigmoid codes).
    Each r_j is clamped into [eps, 1 - eps] so that a unit saturated at exactly 0 or 1 (common in
    float32) gives a finite penalty; such a unit gets no gradient through the clamp. fp16 and
    bf16 values are computed, and the penalty returned, in fp32 (in them 1 - 1e-6 rounds to 1);
    the gradient comes back in the input's dtype, where in fp16 a unit below about
    rho / 65504 has a slope beyond fp16's range (inf): pass fp32 rho_hat (encode's is).

    Args:
        rho_hat: (H,) mean activations, e.g. EncodeStats.rho_hat (any shape is summed over).
        rho: the target mean activation, a number strictly inside (0, 1).
        eps: the clamp margin, in (0, 0.5), with 1 - eps below 1 in the computing dtype.

    Returns:
        A scalar tensor of the dtype of rho_hat, fp32 for fp16 and bf16 (0 for an empty
        rho_hat). Its gradient is computed in closed form (fastae.functional.kl).
    """
    rho = check_rho(rho)
    check_tensor("rho_hat", rho_hat)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0.0 < eps < 0.5:
        raise ValueError(f"eps: got {eps!r}, expected a number in (0, 0.5)")
    check_eps(float(eps), rho_hat.dtype)
    if rho_hat.numel() == 0:
        return rho_hat.sum()
    # The range of rho_hat is checked in the forward (one device sync per call): a wrong
    # activation otherwise gives NaN or a silently wrong penalty.
    return KLSparsityFunction.apply(rho_hat, rho, float(eps))


def contractive_penalty(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    activation: str = "sigmoid",
    reduction: str = "mean",
    *,
    backend: str = "auto",
) -> Tensor:
    """The contractive penalty ||dh/dx||_F^2 of one encoder layer, in closed form.

    Per sample b: sum_j f'(a_bj)^2 n_j with n_j = sum_k W_jk^2.

    Args:
        x: (B, D) inputs; weight: (H, D); bias: (H,) or None; activation as in encode().
        reduction: "mean" (over the batch), "sum", or "none" (the per-sample values, in the
            shape of x without its last dimension).

    Returns:
        A scalar, or (B,) (x.shape[:-1]) for reduction="none", in fp32 (fp64 for fp64 inputs).
    """
    check_reduction(reduction)
    if reduction != "none":
        _, stats = encode(x, weight, bias, activation, backend=backend)
        count = x.reshape(-1, x.shape[-1]).shape[0] if x.dim() >= 1 else 1
        return stats.contractive if reduction == "mean" else stats.contractive * count

    # Per-sample values: plain autograd of the closed form, under autocast as encode is.
    act = get_activation(activation)
    x, weight, bias = autocast_inputs(x, weight, bias)
    check_encode_args(x, weight, bias)
    acc = stats_dtype(x.dtype)
    x2 = x.reshape(-1, x.shape[-1])
    with without_autocast(x.device):
        a = torch.addmm(bias, x2, weight.t()) if bias is not None else x2 @ weight.t()
        fp = act.d1(act.forward(a).to(acc))
        return ((fp * fp) @ weight.to(acc).square().sum(1)).reshape(x.shape[:-1])
