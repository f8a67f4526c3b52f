"""Fused encoder backward: dL/dW, dL/db and dL/dx with delta recomputed from h in each tile.

Math (DESIGN section 3). With upstream gradients g_h (B, H), g_r (H,) for rho_hat, g_A for l1
and g_C for contractive, s the per-sample scale (1/B on one process) and f', f'' from h:

    delta_bj = f'_bj (g_h,bj + s g_r,j + s g_A sign(h_bj)) + 2 s g_C f'_bj f''_bj n_j
    dL/dx = delta W                                            (B, D)
    dL/dW = delta^T x + 2 s g_C (sum_b f'_bj^2) W_j            (H, D)
    dL/db = sum_b delta_bj                                     (H,)

The autograd Function folds the upstream gradients of the statistics into `row_scale` (H,) =
s g_r and `coef` (2,) = [s g_A, 2 s g_C], device tensors that the kernels load, so no value needs
a host sync. delta is never written to memory: it costs a few flops per
element of h, far less than the (B, H) round trip through memory it replaces.

Tiling of the dL/dW kernel: program (j, k) owns the tile W[cols, k:k+BLOCK_D] and loops over the
batch in blocks of BLOCK_B rows: it loads h (and g_h) for (rows, cols), rebuilds delta, loads
x[rows, k:k+BLOCK_D] and accumulates delta^T x with tl.dot. In the same loop it sums delta and
f'^2 over the batch for its columns: the f'^2 sums give the n_j term of its W tile, and the
programs with k = 0 store the delta sums as dL/db, so each entry has exactly one writer.

Tiling of the dL/dx kernel: program (m, k) owns dx[rows, k:k+BLOCK_D] and loops over the hidden
units in blocks of BLOCK_H, rebuilding delta for (rows, cols) and accumulating delta W. It is
launched only when x needs a gradient, the dL/dW kernel only when W or b does.

Denoising (NOISE != 0): x above is the corrupted x~ of the forward. The dL/dW kernel redraws
each tile of x~ as x loads, from the same key and counters (fastae.kernels.noise), so it uses the
numbers the forward used without either kernel storing them; the dL/dx kernel loads x in its
epilogue and multiplies delta W by dx~/dx (0 where the corruption replaced or clipped an entry).

Both kernels accumulate in fp32 (fp64 for fp64 inputs); delta enters tl.dot in the dtype of x,
as the PyTorch path does, so fp16/bf16 use tensor cores.
"""

import functools

import torch
import triton
import triton.language as tl

from fastae.kernels.activations import activation_d1
from fastae.kernels.activations import activation_d2
from fastae.kernels.encoder_forward import BLOCK_INTERPRET
from fastae.kernels.encoder_forward import acc_dtype
from fastae.kernels.encoder_forward import dot_precision
from fastae.kernels.encoder_forward import interpreted
from fastae.kernels.encoder_forward import single_config
from fastae.kernels.encoder_forward import triton_dtype
from fastae.kernels.noise import NoiseArgs
from fastae.kernels.noise import corrupt_derivative_tile
from fastae.kernels.noise import corrupt_tile
from fastae.kernels.noise import kernel_noise_args


@triton.jit
def _delta_tile(
    h_ptr,
    g_h_ptr,
    row_scale_ptr,
    n_ptr,
    coef_l1,
    coef_contractive,
    rows,
    cols,
    row_mask,
    col_mask,
    stride_hb,
    stride_hh,
    stride_gb,
    stride_gh,
    HAS_GRAD_H: tl.constexpr,
    ACTIVATION: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
):
    """delta for the tile (rows, cols), zero outside the valid rows and columns; also f'."""
    tile_mask = row_mask[:, None] & col_mask[None, :]
    h = tl.load(
        h_ptr + rows[:, None] * stride_hb + cols[None, :] * stride_hh, mask=tile_mask, other=0.0
    ).to(ACC_DTYPE)
    row_scale = tl.load(row_scale_ptr + cols, mask=col_mask, other=0.0)
    n = tl.load(n_ptr + cols, mask=col_mask, other=0.0)
    d1 = activation_d1(h, ACTIVATION)
    d2 = activation_d2(h, d1, ACTIVATION)

    sign = tl.where(h > 0, 1.0, tl.where(h < 0, -1.0, 0.0)).to(ACC_DTYPE)
    inner = row_scale[None, :] + coef_l1 * sign
    if HAS_GRAD_H:
        g_h = tl.load(
            g_h_ptr + rows[:, None] * stride_gb + cols[None, :] * stride_gh,
            mask=tile_mask,
            other=0.0,
        ).to(ACC_DTYPE)
        inner += g_h
    delta = d1 * inner + coef_contractive * d1 * d2 * n[None, :]
    delta = tl.where(tile_mask, delta, 0.0)
    d1 = tl.where(tile_mask, d1, 0.0)
    return delta, d1


@triton.jit(do_not_specialize=["noise_key"])
def _encoder_backward_weight_kernel(
    x_ptr,  # (B, D) input, any strides
    w_ptr,  # (H, D) weight, any strides
    h_ptr,  # (B, H) saved code, strides given
    g_h_ptr,  # (B, H) upstream gradient of h, strides given (unused without HAS_GRAD_H)
    row_scale_ptr,  # (H,) s g_r, accumulation dtype, contiguous
    n_ptr,  # (H,) squared row norms of W, accumulation dtype
    coef_ptr,  # (2,) [s g_A, 2 s g_C], accumulation dtype
    grad_w_ptr,  # (H, D) output dL/dW, dtype of W, contiguous
    grad_b_ptr,  # (H,) output dL/db, accumulation dtype
    B,  # number of samples
    D,  # number of features
    H,  # number of hidden units
    stride_xb,  # x: elements between samples
    stride_xd,  # x: elements between features
    stride_wh,  # W: elements between rows (hidden units)
    stride_wd,  # W: elements between features
    stride_hb,  # h: elements between samples
    stride_hh,  # h: elements between hidden units
    stride_gb,  # g_h: elements between samples
    stride_gh,  # g_h: elements between hidden units
    noise_key,  # int64 key of the corruption stream (unused when NOISE is 0)
    noise_level,  # sigma or nu of the corruption
    noise_low,  # lower end of the data range
    noise_high,  # upper end of the data range
    HAS_GRAD_H: tl.constexpr,  # whether g_h_ptr holds g_h
    NOISE: tl.constexpr,  # 0 none, 1 gaussian, 2 masking, 3 salt-and-pepper
    ACTIVATION: tl.constexpr,  # Activation.code: 0 sigmoid ... 4 identity
    ACC_DTYPE: tl.constexpr,  # tl.float32, or tl.float64 for fp64 inputs
    PRECISION: tl.constexpr,  # "ieee", or "tf32" when the caller opted in
    BLOCK_B: tl.constexpr,  # samples per tile
    BLOCK_H: tl.constexpr,  # hidden units per tile
    BLOCK_D: tl.constexpr,  # features per tile
):
    pid_h = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1).to(tl.int64)
    cols = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    feats = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    col_mask = cols < H
    feat_mask = feats < D
    batch = tl.arange(0, BLOCK_B).to(tl.int64)
    coef_l1 = tl.load(coef_ptr)
    coef_contractive = tl.load(coef_ptr + 1)

    # Loop over the batch: delta^T x (x~ with a corruption), and the column sums of delta and f'^2.
    acc = tl.zeros((BLOCK_H, BLOCK_D), dtype=ACC_DTYPE)
    delta_sum = tl.zeros((BLOCK_H,), dtype=ACC_DTYPE)
    d1_sq_sum = tl.zeros((BLOCK_H,), dtype=ACC_DTYPE)
    for b0 in range(0, B, BLOCK_B):
        rows = b0 + batch
        row_mask = rows < B
        delta, d1 = _delta_tile(
            h_ptr,
            g_h_ptr,
            row_scale_ptr,
            n_ptr,
            coef_l1,
            coef_contractive,
            rows,
            cols,
            row_mask,
            col_mask,
            stride_hb,
            stride_hh,
            stride_gb,
            stride_gh,
            HAS_GRAD_H,
            ACTIVATION,
            ACC_DTYPE,
        )
        x_mask = row_mask[:, None] & feat_mask[None, :]
        x = tl.load(
            x_ptr + rows[:, None] * stride_xb + feats[None, :] * stride_xd, mask=x_mask, other=0.0
        )
        if NOISE != 0:
            x = corrupt_tile(
                x,
                noise_key,
                rows,
                pid_d * BLOCK_D,
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
        acc = tl.dot(
            tl.trans(delta.to(x.dtype)), x, acc, input_precision=PRECISION, out_dtype=ACC_DTYPE
        )
        delta_sum += tl.sum(delta, axis=0)
        d1_sq_sum += tl.sum(d1 * d1, axis=0)

    # The term through n_j: 2 s g_C (sum_b f'^2) W_j.
    tile_mask = col_mask[:, None] & feat_mask[None, :]
    w = tl.load(
        w_ptr + cols[:, None] * stride_wh + feats[None, :] * stride_wd, mask=tile_mask, other=0.0
    ).to(ACC_DTYPE)
    acc += (coef_contractive * d1_sq_sum)[:, None] * w
    tl.store(
        grad_w_ptr + cols[:, None] * D + feats[None, :],
        acc.to(grad_w_ptr.dtype.element_ty),
        mask=tile_mask,
    )

    # dL/db: one writer per column, the programs of the first feature block.
    if pid_d == 0:
        tl.store(grad_b_ptr + cols, delta_sum, mask=col_mask)


@triton.jit(do_not_specialize=["noise_key"])
def _encoder_backward_input_kernel(
    x_ptr,  # (B, D) input, any strides (loaded only when NOISE is not 0)
    w_ptr,  # (H, D) weight, any strides
    h_ptr,  # (B, H) saved code, strides given
    g_h_ptr,  # (B, H) upstream gradient of h, strides given (unused without HAS_GRAD_H)
    row_scale_ptr,  # (H,) s g_r, accumulation dtype, contiguous
    n_ptr,  # (H,) squared row norms of W, accumulation dtype
    coef_ptr,  # (2,) [s g_A, 2 s g_C], accumulation dtype
    grad_x_ptr,  # (B, D) output dL/dx, dtype of x, contiguous
    B,  # number of samples
    D,  # number of features
    H,  # number of hidden units
    stride_xb,  # x: elements between samples
    stride_xd,  # x: elements between features
    stride_wh,  # W: elements between rows (hidden units)
    stride_wd,  # W: elements between features
    stride_hb,  # h: elements between samples
    stride_hh,  # h: elements between hidden units
    stride_gb,  # g_h: elements between samples
    stride_gh,  # g_h: elements between hidden units
    noise_key,  # int64 key of the corruption stream (unused when NOISE is 0)
    noise_level,  # sigma or nu of the corruption
    noise_low,  # lower end of the data range
    noise_high,  # upper end of the data range
    HAS_GRAD_H: tl.constexpr,  # whether g_h_ptr holds g_h
    NOISE: tl.constexpr,  # 0 none, 1 gaussian, 2 masking, 3 salt-and-pepper
    ACTIVATION: tl.constexpr,  # Activation.code: 0 sigmoid ... 4 identity
    ACC_DTYPE: tl.constexpr,  # tl.float32, or tl.float64 for fp64 inputs
    PRECISION: tl.constexpr,  # "ieee", or "tf32" when the caller opted in
    BLOCK_B: tl.constexpr,  # samples per tile
    BLOCK_H: tl.constexpr,  # hidden units per tile
    BLOCK_D: tl.constexpr,  # features per tile
):
    pid_b = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1).to(tl.int64)
    rows = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    feats = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    row_mask = rows < B
    feat_mask = feats < D
    hidden = tl.arange(0, BLOCK_H).to(tl.int64)
    coef_l1 = tl.load(coef_ptr)
    coef_contractive = tl.load(coef_ptr + 1)

    # Loop over the hidden units: delta W.
    acc = tl.zeros((BLOCK_B, BLOCK_D), dtype=ACC_DTYPE)
    for j0 in range(0, H, BLOCK_H):
        cols = j0 + hidden
        col_mask = cols < H
        delta, d1 = _delta_tile(
            h_ptr,
            g_h_ptr,
            row_scale_ptr,
            n_ptr,
            coef_l1,
            coef_contractive,
            rows,
            cols,
            row_mask,
            col_mask,
            stride_hb,
            stride_hh,
            stride_gb,
            stride_gh,
            HAS_GRAD_H,
            ACTIVATION,
            ACC_DTYPE,
        )
        w = tl.load(
            w_ptr + cols[:, None] * stride_wh + feats[None, :] * stride_wd,
            mask=col_mask[:, None] & feat_mask[None, :],
            other=0.0,
        )
        acc = tl.dot(delta.to(w.dtype), w, acc, input_precision=PRECISION, out_dtype=ACC_DTYPE)

    # With a corruption, dL/dx = (delta W) * dx~/dx, the derivative redrawn from x.
    tile_mask = row_mask[:, None] & feat_mask[None, :]
    if NOISE != 0:
        x = tl.load(
            x_ptr + rows[:, None] * stride_xb + feats[None, :] * stride_xd,
            mask=tile_mask,
            other=0.0,
        )
        acc *= corrupt_derivative_tile(
            x,
            noise_key,
            rows,
            pid_d * BLOCK_D,
            D,
            noise_level,
            noise_low,
            noise_high,
            NOISE,
            ACC_DTYPE,
            BLOCK_B,
            BLOCK_D,
        )

    # Store dL/dx.
    tl.store(
        grad_x_ptr + rows[:, None] * D + feats[None, :],
        acc.to(grad_x_ptr.dtype.element_ty),
        mask=tile_mask,
    )


def _gpu_configs(outer: str, inner: str) -> list[triton.Config]:
    # `outer` is the block of the output tile besides BLOCK_D, `inner` the reduced dimension.
    configs = []
    for block_outer, block_d, block_inner, warps, stages in (
        (64, 64, 32, 4, 4),
        (128, 64, 32, 8, 3),
        (64, 128, 32, 4, 3),
        (128, 128, 64, 8, 3),
    ):
        configs.append(
            triton.Config(
                {outer: block_outer, "BLOCK_D": block_d, inner: block_inner},
                num_warps=warps,
                num_stages=stages,
            )
        )
    return configs


_KEY = ["B", "D", "H", "HAS_GRAD_H", "NOISE", "ACTIVATION", "PRECISION"]


@functools.cache
def _tuned_weight_kernel():
    # Each configuration writes every entry of its outputs (no accumulation across programs),
    # so benchmarking configurations leaves nothing behind.
    return triton.autotune(configs=_gpu_configs("BLOCK_H", "BLOCK_B"), key=_KEY)(
        _encoder_backward_weight_kernel
    )


@functools.cache
def _tuned_input_kernel():
    return triton.autotune(configs=_gpu_configs("BLOCK_B", "BLOCK_H"), key=_KEY)(
        _encoder_backward_input_kernel
    )


def _fixed_meta(configs: list[triton.Config]) -> dict:
    """The one configuration used under the interpreter or in deterministic mode."""
    if interpreted():
        return {"BLOCK_B": BLOCK_INTERPRET, "BLOCK_H": BLOCK_INTERPRET, "BLOCK_D": BLOCK_INTERPRET}
    config = configs[0]
    return {**config.kwargs, "num_warps": config.num_warps, "num_stages": config.num_stages}


def encoder_backward(
    x: torch.Tensor,
    weight: torch.Tensor,
    h: torch.Tensor,
    n: torch.Tensor,
    grad_h: torch.Tensor | None,
    row_scale: torch.Tensor,
    coef: torch.Tensor,
    activation_code: int,
    need_input_grad: bool,
    need_weight_grad: bool = True,
    noise: NoiseArgs | None = None,
):
    """Launch the fused backward.

    Args:
        x: (B, D), weight: (H, D), h: (B, H) the saved code; any strides.
        n: (H,) squared row norms of W in the accumulation dtype.
        grad_h: (B, H) upstream gradient of h, or None when h itself got no gradient.
        row_scale: (H,) s g_r in the accumulation dtype (zeros when rho_hat got no gradient).
        coef: (2,) [s g_A, 2 s g_C] in the accumulation dtype.
        activation_code: `Activation.code`.
        need_input_grad: whether to launch the dL/dx kernel.
        need_weight_grad: whether to launch the dL/dW kernel (which also yields dL/db).
        noise: the corruption the forward drew (same key), or None for the clean x.

    Returns:
        grad_x (B, D) in the dtype of x, grad_w (H, D) in the dtype of W and grad_b (H,) in the
        accumulation dtype; None for a kernel not launched.
    """
    batch, features = x.shape
    hidden = weight.shape[0]
    acc = acc_dtype(x.dtype)
    row_scale = row_scale.contiguous()
    coef = coef.contiguous()
    has_grad_h = grad_h is not None
    g_h = grad_h if has_grad_h else h
    noise_scalars, noise_code = kernel_noise_args(noise)
    meta = {
        "HAS_GRAD_H": has_grad_h,
        "NOISE": noise_code,
        "ACTIVATION": activation_code,
        "ACC_DTYPE": triton_dtype(x.dtype),
        "PRECISION": dot_precision(x.dtype, x.device),
    }
    fixed = single_config()

    # grad w.r.t. weight and bias
    grad_w = grad_b = None
    if need_weight_grad:
        grad_w = torch.empty((hidden, features), dtype=weight.dtype, device=x.device)
        grad_b = torch.empty((hidden,), dtype=acc, device=x.device)
        args = (x, weight, h, g_h, row_scale, n, coef, grad_w, grad_b, batch, features, hidden)
        args += (x.stride(0), x.stride(1), weight.stride(0), weight.stride(1))
        args += (h.stride(0), h.stride(1), g_h.stride(0), g_h.stride(1), *noise_scalars)

        def weight_grid(config):
            return (
                triton.cdiv(hidden, config["BLOCK_H"]),
                triton.cdiv(features, config["BLOCK_D"]),
            )

        if fixed:
            block = _fixed_meta(_gpu_configs("BLOCK_H", "BLOCK_B"))
            _encoder_backward_weight_kernel[weight_grid(block)](*args, **meta, **block)
        else:
            _tuned_weight_kernel()[weight_grid](*args, **meta)

    # grad w.r.t. input
    grad_x = None
    if need_input_grad:
        grad_x = torch.empty((batch, features), dtype=x.dtype, device=x.device)
        args = (x, weight, h, g_h, row_scale, n, coef, grad_x, batch, features, hidden)
        args += (x.stride(0), x.stride(1), weight.stride(0), weight.stride(1))
        args += (h.stride(0), h.stride(1), g_h.stride(0), g_h.stride(1), *noise_scalars)

        def input_grid(config):
            return (triton.cdiv(batch, config["BLOCK_B"]), triton.cdiv(features, config["BLOCK_D"]))

        if fixed:
            block = _fixed_meta(_gpu_configs("BLOCK_B", "BLOCK_H"))
            _encoder_backward_input_kernel[input_grid(block)](*args, **meta, **block)
        else:
            _tuned_input_kernel()[input_grid](*args, **meta)
    return grad_x, grad_w, grad_b
