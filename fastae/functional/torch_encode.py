"""The PyTorch path of the fused encoder: forward and hand-written backward.

Forward (DESIGN sections 1-2): a = x W^T + b, h = f(a), and from h alone

    contractive = (1/B) sum_b sum_j f'(a_bj)^2 n_j,   n_j = sum_k W_jk^2
    rho_hat_j   = (1/B) sum_b h_bj
    l1          = (1/B) sum_bj |h_bj|

Backward (DESIGN section 3), with upstream gradients g_h, g_C, g_r, g_A:

    delta = f' * (g_h + g_r / B + g_A sign(h) / B) + (2 g_C / B) f' f'' n
    dL/dx = delta W,   dL/dW = delta^T x + (2 g_C / B) (sum_b f'^2) W_j,   dL/db = sum_b delta

Only x, W (inputs, not copies), h and the (H,) vector n are saved; delta and f' are recomputed
from h. The matmul for dL/dx is skipped when x needs no gradient. Statistics accumulate in fp32
(fp64 for fp64 inputs) whatever the input dtype. This path serves every machine without a GPU
and is the yardstick for the Triton kernels.

Denoising: with a Noise, the forward encodes x~ (fastae.functional.noise.draw) and drops it; the
backward draws the same x~ again from the generator seeded with the same key, so the saved
tensors are the same as without corruption. dL/dW uses delta^T x~ and dL/dx = (delta W) dx~/dx.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastae.activations import Activation
from fastae.functional.checks import stats_dtype
from fastae.functional.distributed import all_reduce_sums
from fastae.functional.distributed import is_distributed
from fastae.functional.distributed import stat_grad_scale
from fastae.functional.noise import draw
from fastae.functional.noise import rank_of


def _forward(x: Tensor, weight: Tensor, bias: Tensor | None, act: Activation):
    """h, the three local sums and n, all from one matmul and a few passes over h."""
    acc = stats_dtype(x.dtype)
    a = torch.addmm(bias, x, weight.t()) if bias is not None else x @ weight.t()
    h = act.forward(a)
    h_acc = h if h.dtype == acc else h.to(acc)

    n = weight.to(acc).square().sum(1)
    fp = act.d1(h_acc)
    contractive_sum = torch.mv(fp.square_(), n).sum()
    column_sum = h_acc.sum(0)
    # For activations with h >= 0 the L1 sum is the sum of the column sums: no extra pass.
    l1_sum = column_sum.sum() if act.low >= 0 else h_acc.abs().sum()
    return h, contractive_sum, column_sum, l1_sum, n


class TorchEncodeFunction(torch.autograd.Function):
    """h, contractive, rho_hat, l1 = TorchEncodeFunction.apply(x, weight, bias, act, group, noise).

    noise: a fastae.functional.noise.Noise or None.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, act, process_group, noise=None):
        rank = rank_of(process_group) if noise is not None else 0
        x_in = draw(x, noise, rank)[0] if noise is not None else x
        h, contractive_sum, column_sum, l1_sum, n = _forward(x_in, weight, bias, act)
        del x_in
        count = x.shape[0]
        total, world = count, 1
        if is_distributed(process_group):
            contractive_sum, l1_sum, column_sum, total, world = all_reduce_sums(
                contractive_sum, l1_sum, column_sum, count, process_group
            )

        ctx.save_for_backward(x, weight, h, n)
        ctx.act = act
        ctx.noise = noise
        ctx.rank = rank
        ctx.scale = stat_grad_scale(count, total, world)
        ctx.set_materialize_grads(False)
        return h, contractive_sum / total, column_sum / total, l1_sum / total

    @staticmethod
    def backward(ctx, g_h, g_contractive, g_rho_hat, g_l1):
        x, weight, h, n = ctx.saved_tensors
        act = ctx.act
        scale = ctx.scale
        acc = n.dtype
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        if not (need_x or need_w or need_b):
            return None, None, None, None, None, None

        # x~ of the forward, drawn again from the same key (not saved).
        keep = None
        if ctx.noise is not None:
            x, keep = draw(x, ctx.noise, ctx.rank)

        h_acc = h if h.dtype == acc else h.to(acc)
        fp = act.d1(h_acc)

        # delta = f' * (g_h + g_r * scale + g_A * scale * sign(h)) + 2 g_C scale f' f'' n
        inner = None
        if g_h is not None:
            inner = g_h.to(acc) if g_h.dtype != acc else g_h.clone()
        if g_rho_hat is not None:
            g_r = g_rho_hat.to(acc) * scale
            inner = g_r.expand_as(h_acc).clone() if inner is None else inner.add_(g_r)
        if g_l1 is not None:
            term = torch.sign(h_acc).mul_(g_l1.to(acc) * scale)
            inner = term if inner is None else inner.add_(term)
        delta = fp * inner if inner is not None else None
        if g_contractive is not None:
            term = act.d2(h_acc).mul_(fp).mul_(n).mul_(2 * scale * g_contractive.to(acc))
            delta = term if delta is None else delta.add_(term)
        if delta is None:
            delta = torch.zeros_like(h_acc)
        delta = delta.to(x.dtype)

        grad_x = grad_w = grad_b = None
        # grad w.r.t. input
        if need_x:
            grad_x = delta @ weight
            if keep is not None:
                grad_x = grad_x.mul_(keep)
        # grad w.r.t. weight: delta^T x plus the term through the row norms n_j
        if need_w:
            if g_contractive is not None:
                coef = fp.square_().sum(0).mul_(2 * scale * g_contractive.to(acc))
                grad_w = torch.addmm(weight * coef.to(weight.dtype)[:, None], delta.t(), x)
            else:
                grad_w = delta.t() @ x
        # grad w.r.t. bias
        if need_b:
            grad_b = delta.sum(0)
        return grad_x, grad_w, grad_b, None, None, None
