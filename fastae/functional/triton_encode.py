"""The Triton path of the fused encoder: an autograd.Function around the kernels in
fastae.kernels (the top-level kernels/ folder).

Forward: one kernel computes h = f(x W^T + b) and, in the same pass, the local sums of the
statistics (DESIGN section 2) and n_j = sum_k W_jk^2. Backward: two kernels rebuild delta from h
tile by tile (DESIGN section 3) inside the matmuls for dL/dW (with dL/db and the n_j term) and
dL/dx; the second is skipped when x needs no gradient.

Only x, W (inputs, not copies), h and the (H,) vector n are saved. With a process group the
local sums are all-reduced here, as in the PyTorch path (fastae.functional.distributed), and
the statistic gradients are scaled by stat_grad_scale.

Runs on CUDA tensors (fp16, bf16, fp32, fp64), or on CPU tensors under TRITON_INTERPRET=1
(fp16, fp32 and fp64 there: the interpreter computes bf16 dots wrongly, so bf16 is refused with
an error). fp64 accumulates in fp64, so gradcheck can run through this Function; every other
dtype accumulates in fp32. fp32 dots use IEEE precision unless the caller opted into tf32 through
torch.backends.cuda.matmul.allow_tf32.

Denoising: with a Noise the kernels draw x~ as x loads, in the forward and again in the dL/dW
kernel, from the key Noise.kernel_args() (fastae.kernels.noise); the dL/dx kernel applies
dx~/dx. Nothing more is saved than without corruption.
"""

from __future__ import annotations

import torch

from fastae.functional.distributed import finish_stats
from fastae.functional.first_order import first_order_only
from fastae.functional.noise import rank_of
from fastae.kernels.encoder_backward import encoder_backward
from fastae.kernels.encoder_forward import encoder_forward
from fastae.kernels.encoder_forward import interpreted


def _check_interpretable(x: torch.Tensor) -> None:
    # Triton's interpreter multiplies the raw bit patterns of bf16 operands in tl.dot
    # (triton-lang/triton#11584), which would give silently wrong numbers.
    if x.dtype == torch.bfloat16 and interpreted():
        raise TypeError(
            "x: got dtype torch.bfloat16 under TRITON_INTERPRET=1, expected float16, float32 or "
            "float64: Triton's interpreter computes bf16 dots wrongly; use a CUDA device or "
            "backend='torch' for bf16 on the CPU"
        )


class TritonEncodeFunction(torch.autograd.Function):
    """h, contractive, rho_hat, l1 = TritonEncodeFunction.apply(x, weight, bias, act, group, noise).

    noise: a fastae.functional.noise.Noise or None.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, act, process_group, noise=None):
        _check_interpretable(x)
        noise_args = noise.kernel_args(rank_of(process_group)) if noise is not None else None
        h, contractive_sum, column_sum, l1_sum, n = encoder_forward(
            x, weight, bias, act.code, noise_args
        )
        contractive, rho_hat, l1, scale = finish_stats(
            contractive_sum, l1_sum, column_sum, x.shape[0], process_group
        )

        ctx.save_for_backward(x, weight, h, n)
        ctx.act = act
        ctx.noise_args = noise_args
        ctx.has_bias = bias is not None
        ctx.scale = scale
        ctx.set_materialize_grads(False)
        return h, contractive, rho_hat, l1

    @staticmethod
    @first_order_only
    def backward(ctx, g_h, g_contractive, g_rho_hat, g_l1):
        x, weight, h, n = ctx.saved_tensors
        scale = ctx.scale
        acc = n.dtype
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        if not (need_x or need_w or need_b):
            return None, None, None, None, None, None

        # The small vectors and scalars delta needs, already scaled (no host sync).
        if g_rho_hat is not None:
            row_scale = g_rho_hat.to(acc) * scale
        else:
            row_scale = torch.zeros_like(n)
        zero = torch.zeros((), dtype=acc, device=n.device)
        coef_l1 = g_l1.to(acc) * scale if g_l1 is not None else zero
        coef_contractive = 2 * scale * g_contractive.to(acc) if g_contractive is not None else zero
        coef = torch.stack([coef_l1.reshape(()), coef_contractive.reshape(())])

        grad_x, grad_w, grad_b = encoder_backward(
            x,
            weight,
            h,
            n,
            g_h,
            row_scale,
            coef,
            ctx.act.code,
            need_input_grad=need_x,
            need_weight_grad=need_w or (need_b and ctx.has_bias),
            noise=ctx.noise_args,
        )
        grad_w = grad_w if need_w else None
        grad_b = grad_b.to(weight.dtype) if grad_b is not None and need_b else None
        return grad_x, grad_w, grad_b, None, None, None
