"""Debug path of the in-kernel corruption: write out the x~ the encoder kernels draw.

The encoder kernels never store x~ (fastae.kernels.noise). Tests, and anyone who wants to look at
the corrupted batch, recover it here from the same jit helper and the same key: entry (r, c) of
the result is bit for bit the value the forward fed to tl.dot for that entry.
"""

import torch
import triton
import triton.language as tl

from fastae.kernels.encoder_forward import triton_dtype
from fastae.kernels.noise import NOISE_CODES
from fastae.kernels.noise import NoiseArgs
from fastae.kernels.noise import corrupt_derivative_tile
from fastae.kernels.noise import corrupt_tile
from fastae.kernels.noise import kernel_noise_args

# Tile of the debug kernel: it only streams memory, so one fixed size, never tuned. Also under
# the interpreter, where its cost is per program: 64 x 64 tiles draw 10^5 entries in ~1 s,
# 16 x 16 tiles take ~3 s.
_BLOCK = 64


@triton.jit(do_not_specialize=["noise_key"])
def _materialize_noise_kernel(
    x_ptr,  # (B, D) input, any strides
    x_tilde_ptr,  # (B, D) output x~, dtype of x, contiguous
    keep_ptr,  # (B, D) output dx~/dx, dtype of x, contiguous (unused without STORE_KEEP)
    B,  # number of samples
    D,  # number of features
    stride_xb,  # x: elements between samples
    stride_xd,  # x: elements between features
    noise_key,  # int64 key of the stream (bit 62 set)
    noise_level,  # sigma or nu
    noise_low,  # lower end of the data range
    noise_high,  # upper end of the data range
    NOISE: tl.constexpr,  # 1 gaussian, 2 masking, 3 salt-and-pepper
    STORE_KEEP: tl.constexpr,  # whether to write dx~/dx too
    ACC_DTYPE: tl.constexpr,  # tl.float32, or tl.float64 for fp64 inputs
    BLOCK_B: tl.constexpr,  # samples per tile
    BLOCK_D: tl.constexpr,  # features per tile
):
    pid_b = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1).to(tl.int64)
    rows = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    feats = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mask = (rows < B)[:, None] & (feats < D)[None, :]

    # Load x and draw x~ exactly as the encoder kernels do.
    x = tl.load(
        x_ptr + rows[:, None] * stride_xb + feats[None, :] * stride_xd, mask=mask, other=0.0
    )
    col_start = pid_d * BLOCK_D
    x_tilde = corrupt_tile(
        x,
        noise_key,
        rows,
        col_start,
        D,
        mask,
        noise_level,
        noise_low,
        noise_high,
        NOISE,
        ACC_DTYPE,
        BLOCK_B,
        BLOCK_D,
    )

    # Store x~ (and dx~/dx), contiguous.
    out = rows[:, None] * D + feats[None, :]
    tl.store(x_tilde_ptr + out, x_tilde, mask=mask)
    if STORE_KEEP:
        keep = corrupt_derivative_tile(
            x,
            noise_key,
            rows,
            col_start,
            D,
            noise_level,
            noise_low,
            noise_high,
            NOISE,
            ACC_DTYPE,
            BLOCK_B,
            BLOCK_D,
        )
        tl.store(keep_ptr + out, keep.to(keep_ptr.dtype.element_ty), mask=mask)


def materialize_noise(x: torch.Tensor, noise: NoiseArgs, with_derivative: bool = False):
    """The x~ (B, D) that the encoder kernels draw for x under `noise`, as a tensor.

    Args:
        x: (B, D) input, any strides, any float dtype the kernels take.
        noise: the corruption and its key (fastae.functional.noise.Noise.kernel_args()).
        with_derivative: also return dx~/dx (B, D) in the dtype of x (0 or 1).

    Returns:
        x~ in the dtype of x, contiguous; and dx~/dx when with_derivative is set.
    """
    if noise.code not in NOISE_CODES.values():
        raise ValueError(f"noise.code: got {noise.code!r}, expected one of {NOISE_CODES}")
    batch, features = x.shape
    x_tilde = torch.empty((batch, features), dtype=x.dtype, device=x.device)
    keep = torch.empty_like(x_tilde) if with_derivative else x_tilde
    scalars, code = kernel_noise_args(noise)
    grid = (triton.cdiv(batch, _BLOCK), triton.cdiv(features, _BLOCK))
    _materialize_noise_kernel[grid](
        x,
        x_tilde,
        keep,
        batch,
        features,
        x.stride(0),
        x.stride(1),
        *scalars,
        NOISE=code,
        STORE_KEEP=with_derivative,
        ACC_DTYPE=triton_dtype(x.dtype),
        BLOCK_B=_BLOCK,
        BLOCK_D=_BLOCK,
    )
    return (x_tilde, keep) if with_derivative else x_tilde
