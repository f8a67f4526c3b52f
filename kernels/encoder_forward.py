"""Fused encoder forward: h = f(x W^T + b) and the partial sums of every statistic, one pass.

Math (DESIGN sections 1-2), for x (B, D), W (H, D), b (H,):

    a = x W^T + b,   h = f(a),   n_j = sum_k W_jk^2
    contractive = (1/B) sum_b sum_j f'(a_bj)^2 n_j
    rho_hat_j   = (1/B) sum_b h_bj
    l1          = (1/B) sum_b sum_j |h_bj|

Tiling: program (m, j) owns the output tile of BLOCK_B rows and BLOCK_H columns. Its K loop
streams tiles x[rows, k:k+BLOCK_D] and W[cols, k:k+BLOCK_D] through tl.dot into an accumulator in
fp32 (fp64 for fp64 inputs) and, from the same W tiles already in registers, accumulates n_j for
its columns. The epilogue adds b, applies f, stores h, and while the tile is still in registers
reduces over its rows (padded rows masked out):

    column_partial[m, j]      = sum_{b in rows} h_bj
    contractive_partial[m, j] = sum_{b in rows} f'(a_bj)^2 n_j
    l1_partial[m, j]          = sum_{b in rows} |h_bj|

Every program writes its own entries of these (num_row_blocks, H) buffers, so no two programs
touch the same address and no float atomics are needed; the launcher then sums them over the row
blocks in a fixed order, which makes the statistics bitwise reproducible for a fixed
configuration. Programs of the first row block also store n (H,), which the backward needs.

Denoising (NOISE != 0): each x tile is replaced by its corrupted version x~ right after it loads,
drawn from the counter-based stream of fastae.kernels.noise keyed by (noise_key, r * D + c), so
a = x~ W^T + b and the statistics are those of the corrupted pass; x~ is never stored.
"""

import functools
import os

import torch
import triton
import triton.language as tl

from fastae.kernels.activations import activation_d1
from fastae.kernels.activations import activation_forward
from fastae.kernels.noise import NoiseArgs
from fastae.kernels.noise import corrupt_tile
from fastae.kernels.noise import kernel_noise_args

# Rows per program. Fixed (not tuned) because it sets the number of rows of the partial-sum
# buffers: every configuration then writes every entry, and tuning cannot leave stale rows.
BLOCK_B_GPU = 64
# Under the interpreter every block is 16 (the smallest tl.dot tile) so that small test shapes
# already span several blocks in each dimension.
BLOCK_INTERPRET = 16


def interpreted() -> bool:
    """Whether kernels run on the CPU under Triton's interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def single_config() -> bool:
    """One fixed configuration under the interpreter (its autotuner cannot bench several) and
    when torch deterministic algorithms are on (the tuned choice could differ between runs)."""
    return interpreted() or torch.are_deterministic_algorithms_enabled()


def dot_precision(dtype: torch.dtype, device: torch.device) -> str:
    """IEEE precision ("ieee") for fp32 dots unless the caller opted into tf32 through
    torch.backends.cuda.matmul.allow_tf32; other dtypes ignore the setting."""
    if dtype == torch.float32 and device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation and statistics dtype: fp64 for fp64 inputs, fp32 for everything else."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def triton_dtype(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


@triton.jit(do_not_specialize=["noise_key"])
def _encoder_forward_kernel(
    x_ptr,  # (B, D) input, any strides
    w_ptr,  # (H, D) weight, any strides
    b_ptr,  # (H,) bias (unused when HAS_BIAS is False)
    h_ptr,  # (B, H) output code, dtype of x, strides given
    n_ptr,  # (H,) output squared row norms of W, accumulation dtype
    column_partial_ptr,  # (num_row_blocks, H) partial column sums of h, contiguous
    contractive_partial_ptr,  # (num_row_blocks, H) partial sums of f'^2 n_j, contiguous
    l1_partial_ptr,  # (num_row_blocks, H) partial sums of |h|, contiguous
    B,  # number of samples
    D,  # number of features
    H,  # number of hidden units
    stride_xb,  # x: elements between samples
    stride_xd,  # x: elements between features
    stride_wh,  # W: elements between rows (hidden units)
    stride_wd,  # W: elements between features
    stride_hb,  # h: elements between samples
    stride_hh,  # h: elements between hidden units
    stride_bias,  # b: elements between hidden units
    noise_key,  # int64 key of the corruption stream (unused when NOISE is 0)
    noise_level,  # sigma or nu of the corruption
    noise_low,  # lower end of the data range
    noise_high,  # upper end of the data range
    HAS_BIAS: tl.constexpr,  # whether b_ptr holds a bias
    NOISE: tl.constexpr,  # 0 none, 1 gaussian, 2 masking, 3 salt-and-pepper
    ACTIVATION: tl.constexpr,  # Activation.code: 0 sigmoid ... 4 identity
    ACC_DTYPE: tl.constexpr,  # tl.float32, or tl.float64 for fp64 inputs
    PRECISION: tl.constexpr,  # "ieee", or "tf32" when the caller opted in
    BLOCK_B: tl.constexpr,  # samples per tile
    BLOCK_H: tl.constexpr,  # hidden units per tile
    BLOCK_D: tl.constexpr,  # features per tile
):
    pid_b = tl.program_id(0).to(tl.int64)
    pid_h = tl.program_id(1).to(tl.int64)
    rows = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    cols = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    row_mask = rows < B
    col_mask = cols < H
    feats = tl.arange(0, BLOCK_D).to(tl.int64)

    # K loop: a = x W^T (x~ W^T with a corruption), and n_j from the same W tiles.
    acc = tl.zeros((BLOCK_B, BLOCK_H), dtype=ACC_DTYPE)
    n = tl.zeros((BLOCK_H,), dtype=ACC_DTYPE)
    for k0 in range(0, D, BLOCK_D):
        k = k0 + feats
        k_mask = k < D
        x_mask = row_mask[:, None] & k_mask[None, :]
        x = tl.load(
            x_ptr + rows[:, None] * stride_xb + k[None, :] * stride_xd, mask=x_mask, other=0.0
        )
        if NOISE != 0:
            x = corrupt_tile(
                x,
                noise_key,
                rows,
                k0,
                D,
                x_mask,
                noise_level,
                noise_low,
                noise_high,
                NOISE,
                ACC_DTYPE,
                BLOCK_B,
                BLOCK_D,
            )
        # W^T tile, (BLOCK_D, BLOCK_H).
        w_t = tl.load(
            w_ptr + cols[None, :] * stride_wh + k[:, None] * stride_wd,
            mask=k_mask[:, None] & col_mask[None, :],
            other=0.0,
        )
        acc = tl.dot(x, w_t, acc, input_precision=PRECISION, out_dtype=ACC_DTYPE)
        w_acc = w_t.to(ACC_DTYPE)
        n += tl.sum(w_acc * w_acc, axis=0)

    # Epilogue on the accumulator: bias, activation, store h.
    if HAS_BIAS:
        bias = tl.load(b_ptr + cols * stride_bias, mask=col_mask, other=0.0).to(ACC_DTYPE)
        acc += bias[None, :]
    h = activation_forward(acc, ACTIVATION)
    tile_mask = row_mask[:, None] & col_mask[None, :]
    tl.store(
        h_ptr + rows[:, None] * stride_hb + cols[None, :] * stride_hh,
        h.to(h_ptr.dtype.element_ty),
        mask=tile_mask,
    )

    # Partial statistics over this tile's rows; padded rows must not enter the sums.
    h_valid = tl.where(tile_mask, h, 0.0)
    d1 = activation_d1(h, ACTIVATION)
    d1_sq = tl.where(tile_mask, d1 * d1, 0.0)
    column_sum = tl.sum(h_valid, axis=0)
    contractive_sum = tl.sum(d1_sq, axis=0) * n
    l1_sum = tl.sum(tl.abs(h_valid), axis=0)
    partial = pid_b * H + cols
    tl.store(column_partial_ptr + partial, column_sum, mask=col_mask)
    tl.store(contractive_partial_ptr + partial, contractive_sum, mask=col_mask)
    tl.store(l1_partial_ptr + partial, l1_sum, mask=col_mask)

    # n is the same for every row block: the first one stores it.
    if pid_b == 0:
        tl.store(n_ptr + cols, n, mask=col_mask)


def _gpu_configs() -> list[triton.Config]:
    # A few shapes that cover small and wide H on recent NVIDIA GPUs; BLOCK_B is fixed above.
    configs = []
    for block_h, block_d, warps, stages in (
        (64, 32, 4, 4),
        (128, 32, 4, 4),
        (64, 64, 4, 3),
        (128, 64, 8, 3),
    ):
        configs.append(
            triton.Config(
                {"BLOCK_H": block_h, "BLOCK_D": block_d}, num_warps=warps, num_stages=stages
            )
        )
    return configs


@functools.cache
def _tuned_kernel():
    return triton.autotune(
        configs=_gpu_configs(),
        key=["B", "D", "H", "HAS_BIAS", "NOISE", "ACTIVATION", "PRECISION"],
    )(_encoder_forward_kernel)


def encoder_forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    activation_code: int,
    noise: NoiseArgs | None = None,
):
    """Launch the fused forward.

    Args:
        x: (B, D), weight: (H, D), bias: (H,) or None, all of one float dtype and device; any
            strides.
        activation_code: `Activation.code` (0 sigmoid, 1 tanh, 2 relu, 3 softplus, 4 identity).
        noise: the input corruption drawn in the kernel, or None for the clean x.

    Returns:
        h (B, H) in the dtype of x, and in the accumulation dtype (fp32, fp64 for fp64 inputs):
        the local sums contractive_sum (scalar), column_sum (H,), l1_sum (scalar), and n (H,).
    """
    batch, features = x.shape
    hidden = weight.shape[0]
    acc = acc_dtype(x.dtype)
    block_b = BLOCK_INTERPRET if interpreted() else BLOCK_B_GPU
    row_blocks = triton.cdiv(batch, block_b)

    h = torch.empty((batch, hidden), dtype=x.dtype, device=x.device)
    n = torch.empty((hidden,), dtype=acc, device=x.device)
    partials = torch.empty((3, row_blocks, hidden), dtype=acc, device=x.device)
    column_partial, contractive_partial, l1_partial = partials.unbind(0)
    has_bias = bias is not None
    noise_scalars, noise_code = kernel_noise_args(noise)
    args = (
        x,
        weight,
        bias if has_bias else x,
        h,
        n,
        column_partial,
        contractive_partial,
        l1_partial,
        batch,
        features,
        hidden,
        x.stride(0),
        x.stride(1),
        weight.stride(0),
        weight.stride(1),
        h.stride(0),
        h.stride(1),
        bias.stride(0) if has_bias else 0,
        *noise_scalars,
    )
    meta = {
        "HAS_BIAS": has_bias,
        "NOISE": noise_code,
        "ACTIVATION": activation_code,
        "ACC_DTYPE": triton_dtype(x.dtype),
        "PRECISION": dot_precision(x.dtype, x.device),
        "BLOCK_B": block_b,
    }

    def grid(config):
        return (row_blocks, triton.cdiv(hidden, config["BLOCK_H"]))

    if single_config():
        if interpreted():
            block = {"BLOCK_H": BLOCK_INTERPRET, "BLOCK_D": BLOCK_INTERPRET}
        else:
            config = _gpu_configs()[0]
            block = {**config.kwargs, "num_warps": config.num_warps}
            block["num_stages"] = config.num_stages
        _encoder_forward_kernel[grid(block)](*args, **meta, **block)
    else:
        _tuned_kernel()[grid](*args, **meta)

    # Fixed-order reductions of the partial buffers (deterministic for a fixed shape).
    partial_sums = partials.sum(dim=1)
    column_sum = partial_sums[0]
    contractive_sum = partial_sums[1].sum()
    l1_sum = partial_sums[2].sum()
    return h, contractive_sum, column_sum, l1_sum, n
