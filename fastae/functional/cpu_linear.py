"""The encoder matmul of the PyTorch path, h = f(x W^T + b), with f fused into it on the CPU.

On a CPU, PyTorch runs x W^T + b for float32 through MKL's GEMM, and the activation afterwards
as a separate pass over (B, H). PyTorch's CPU build also carries oneDNN, whose matmul takes the
activation as a post-op: f is applied to each tile of a while it is still in registers, in the
same pass, which is the fusion the Triton kernel does on a GPU. torch.compile uses the same
oneDNN op (``torch.ops.mkldnn._linear_pointwise``) when it fuses a linear layer with its
activation on a CPU for inference; fastae calls it in the forward of its autograd.Function, so
autograd never sees it and the backward stays the hand-written one.

It is used when all of these hold, and F.linear plus the activation otherwise:

- the tensors are on the CPU, in float32 or bfloat16 (oneDNN refuses float64, and float16 is
  not supported on most CPUs), and oneDNN's linear answered a probe call in that dtype
  correctly the first time it was needed (bfloat16 needs AVX-512 BF16 or AMX, or oneDNN
  refuses to build the primitive);
- torch was built with oneDNN and ``torch.backends.mkldnn`` is enabled;
- the matmul has at least MIN_ONEDNN_MACS multiply-adds (see the NOTE at that constant);
- torch.compile is not tracing the call: Inductor cannot lower this op inside a training graph
  (it does its own fusion of F.linear and the activation instead);
- the environment variable FASTAE_ONEDNN is not "0".

The activation is fused as a post-op for sigmoid, tanh and identity. relu and softplus are
applied afterwards, in place: oneDNN's relu post-op is max(a, 0), which turns a NaN into 0 and
would hide a diverging run that torch.relu (and every other route of fastae) shows.

NOTE: on the README's 2-core AMD EPYC (torch 2.13.0, float32), linear + sigmoid took 1.41 ms
through MKL and 1.10 ms fused through oneDNN at (B, D, H) = (256, 784, 512), 11.6 against
9.6 ms at (1024, 784, 1024), 1.27 against 1.22 ms at (4096, 64, 256), and the same within
5 % at (64, 784, 128) and (8, 784, 512). The backward's matmuls stay with torch's matmul:
oneDNN's linear wants both operands of delta^T x transposed in memory, and copying them cost
more than it saved at (4096, 64, 256) (2.5 against 1.2 ms).

Both GEMMs accumulate in float32 in their own order, so h differs between the two routes by
float32 rounding (a few ulp), as it does between any two BLAS libraries.
"""

from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F
from torch import Tensor

from fastae.activations import Activation

# The activations oneDNN applies as a post-op of its matmul, by fastae name; not relu, whose
# post-op maps NaN to 0 (see the module docstring).
_POST_OPS = {"sigmoid": "sigmoid", "tanh": "tanh", "identity": "none"}

# Activations whose torch op exists in place on a fresh pre-activation tensor.
_IN_PLACE = {"sigmoid": Tensor.sigmoid_, "tanh": Tensor.tanh_, "relu": Tensor.relu_}

# The dtypes oneDNN's CPU matmul can take: float32 everywhere, bfloat16 where the CPU has it
# (the probe tells).
_ONEDNN_DTYPES = (torch.float32, torch.bfloat16)

# NOTE: oneDNN's call costs about 15 us more than addmm's whatever the size (primitive lookup
# and weight reorder), which its faster GEMM repays only on larger matmuls. Linear + sigmoid on
# the README's 2-core CPU, float32, addmm + sigmoid_ against oneDNN: (128, 64, 32) 10 against
# 22 us, (256, 64, 64) 35 against 40 us, (64, 784, 128) 95 against 99 us, (128, 784, 256) 312
# against 277 us, (32, 512, 2048) 592 against 460 us. B * D * H = 2^24 lies between the last
# two sizes that tie and the first that gains.
MIN_ONEDNN_MACS = 2**24


@functools.cache
def _onednn_works(dtype: torch.dtype) -> bool:
    """Whether torch has oneDNN's fused linear for dtype and it gives the right answer (probed
    once per dtype)."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        op = torch.ops.mkldnn._linear_pointwise
        x = torch.tensor([[1.0, 2.0]], dtype=dtype)
        weight = torch.tensor([[0.5, -0.25], [1.0, 1.0]], dtype=dtype)
        bias = torch.tensor([0.0, -4.0], dtype=dtype)
        h = op(x, weight, bias, "sigmoid", [], "")
    except (AttributeError, RuntimeError, TypeError):
        return False
    # sigmoid(0) and sigmoid(-1), each within a bfloat16 ulp.
    want = [[0.5, 0.2689414213699951]]
    return h.shape == (1, 2) and torch.allclose(h.float(), torch.tensor(want), atol=4e-3)


def enabled_by_environment() -> bool:
    """FASTAE_ONEDNN: "0" turns the route off, "1" or unset leaves it on, anything else is a
    ValueError (raised by every call of the PyTorch path, whatever its size, and by the
    commands before they start)."""
    value = os.environ.get("FASTAE_ONEDNN", "")
    if value not in ("", "0", "1"):
        raise ValueError(f"FASTAE_ONEDNN: got {value!r}, expected '0' or '1' (or unset)")
    return value != "0"


def onednn_used(x: Tensor, weight: Tensor) -> bool:
    """Whether linear_activation and linear take oneDNN's route for x (B, D) and W (H, D)."""
    return (
        enabled_by_environment()
        and x.device.type == "cpu"
        and x.dtype in _ONEDNN_DTYPES
        and x.shape[0] * x.shape[1] * weight.shape[0] >= MIN_ONEDNN_MACS
        and not torch.compiler.is_compiling()
        and torch.backends.mkldnn.enabled
        and _onednn_works(x.dtype)
    )


def linear_activation(x: Tensor, weight: Tensor, bias: Tensor | None, act: Activation) -> Tensor:
    """h = f(x W^T + b) as a fresh (B, H) tensor, under no_grad (an autograd.Function forward).

    Args:
        x: (B, D); weight: (H, D); bias: (H,) or None; act: the activation f.
    """
    if onednn_used(x, weight):
        post_op = _POST_OPS.get(act.name)
        a = torch.ops.mkldnn._linear_pointwise(x, weight, bias, post_op or "none", [], "")
        if post_op is not None:
            return a  # f(x W^T + b) already
    else:
        a = F.linear(x, weight, bias)
    # a is a fresh tensor of ours: apply f in place rather than allocating h next to it.
    in_place = _IN_PLACE.get(act.name)
    return in_place(a) if in_place is not None else act.forward(a)


def linear(x: Tensor, weight: Tensor) -> Tensor:
    """x W^T by the route linear_activation takes for x, without bias or activation: the bare
    matmul that the benchmark's floor times."""
    if onednn_used(x, weight):
        return torch.ops.mkldnn._linear_pointwise(x, weight, None, "none", [], "")
    return x @ weight.t()
