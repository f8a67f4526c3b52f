"""The PyTorch path of the fused encoder: forward and hand-written backward.

Forward (DESIGN sections 1-2): a = x W^T + b, h = f(a), and from h alone

    contractive = (1/B) sum_b sum_j f'(a_bj)^2 n_j,   n_j = sum_k W_jk^2
    rho_hat_j   = (1/B) sum_b h_bj
    l1          = (1/B) sum_bj |h_bj|

Backward (DESIGN section 3), with upstream gradients g_h, g_C, g_r, g_A:

    delta = f' * (g_h + g_r / B + g_A sign(h) / B) + (2 g_C / B) f' f'' n
    dL/dx = delta W,   dL/dW = delta^T x + (2 g_C / B) (sum_b f'^2) W_j,   dL/db = sum_b delta

Only x, W (inputs, not copies), h and two (H,) vectors are saved: n, and s = sum_b f'^2,
which the forward computes anyway for the contractive statistic and which is the coefficient of
W_j in dL/dW. delta and f' are recomputed from h. The matmul for dL/dx is skipped when x needs
no gradient. Statistics accumulate in fp32
(fp64 for fp64 inputs) whatever the input dtype. This path serves every machine without a GPU
and is the yardstick for the Triton kernels.

Denoising: with a Noise, the forward encodes x~ (fastae.functional.noise.draw) and drops it; the
backward draws the same x~ again from the generator seeded with the same key, so the saved
tensors are the same as without corruption. dL/dW uses delta^T x~ and dL/dx = (delta W) dx~/dx.

Speed: besides the two matmuls that any encoder pays (x W^T forward, delta^T x backward), the
cost is the number of operator calls and of passes over (B, H) and (H, D) tensors. On a CPU each
PyTorch op costs a dispatch (several microseconds when the matmuls have just evicted the caches)
plus a pass, and each fresh buffer may cost page faults. The code below therefore uses fused ops
(addcmul, addmm_) and in-place updates, allocates two (B, H) temporaries in the backward and one
in the forward, never materialises a (B, H) tensor it can fold into an (H,) vector, and has a
path for sigmoid, the activation of the classic contractive and sparse autoencoders, whose f'
and f'' are each one fused op of h.
`fastae bench` measures the result against eager autograd, torch.compile and the bare matmuls
(README, "Benchmarks").
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastae.activations import Activation
from fastae.functional.checks import as_dtype
from fastae.functional.checks import stats_dtype
from fastae.functional.cpu_linear import linear_activation
from fastae.functional.distributed import finish_stats
from fastae.functional.first_order import first_order_only
from fastae.functional.noise import draw
from fastae.functional.noise import rank_of

# Activations whose f'' is identically zero: the contractive term of delta vanishes for them.
_ZERO_D2 = frozenset({"relu", "identity"})


def _d1(act: Activation, h: Tensor) -> Tensor:
    """f' from h; for sigmoid h - h^2 in one fused op instead of two."""
    if act.name == "sigmoid":
        return torch.addcmul(h, h, h, value=-1.0)
    return act.d1(h)


def _d2(act: Activation, h: Tensor, fp: Tensor) -> Tensor:
    """f'' from h as a fresh tensor, given f' = fp; for sigmoid f' - 2 h f' in one fused op."""
    if act.name == "sigmoid":
        return torch.addcmul(fp, h, fp, value=-2.0)
    return act.d2(h)


def _row_norms_squared(weight: Tensor, acc: torch.dtype) -> Tensor:
    """n_j = sum_k W_jk^2 in the accumulation dtype.

    NOTE: in float64 n is the plain sum of squares, exact wherever that sum is representable
    (the hand-worked values of the tests are). In float32 (and for fp16/bf16 weights, which
    accumulate in it) it is linalg.vector_norm(W, dim=1) squared: that reads W once and writes
    no (H, D) temporary. The temporary is what made the plain form slow in training: on the
    README's 2-core CPU a fresh (512, 784) float32 buffer after the matmuls often had to be
    faulted in page by page, and W.square().sum(1) then took 150-700 us against 60-90 us for
    the norm. The square root and the square round twice, which moves n by at most 2 ulp;
    the float32 sum of squares is itself rounded at every one of its D additions.
    """
    if acc == torch.float64:
        return as_dtype(weight, acc).square().sum(1)
    return torch.linalg.vector_norm(weight, dim=1, dtype=acc).square_()


def _forward(x: Tensor, weight: Tensor, bias: Tensor | None, act: Activation):
    """h, the three local sums, n and s, from one matmul and a few passes over h.

    s_j = sum_b f'(a_bj)^2 gives the contractive sum now and the row-norm term of dL/dW in the
    backward, which therefore needs no pass over f'^2 of its own.
    """
    acc = stats_dtype(x.dtype)
    # n first: its (H, D) temporary is freed before h and the (B, H) temporaries are allocated,
    # so that they can reuse its memory.
    n = _row_norms_squared(weight, acc)
    h = linear_activation(x, weight, bias, act)
    h_acc = as_dtype(h, acc)

    # NOTE: not vector_norm(f', dim=0) squared: reducing along the strided dimension it took
    # 108 us for a (256, 512) fp32 f' on the README's 2-core CPU, against 19 us for square_ and a
    # reduction.
    s = _d1(act, h_acc).square_().sum(0)
    contractive_sum = torch.dot(s, n)
    column_sum = h_acc.sum(0)
    # For activations with h >= 0 the L1 sum is the sum of the column sums: no extra pass.
    l1_sum = column_sum.sum() if act.low >= 0 else h_acc.abs().sum()
    return h, contractive_sum, column_sum, l1_sum, n, s


def _delta(act, h, n, g_h, c2, g_rho_hat, g_l1, scale):
    """delta = f' * (g_h + g_r scale + g_A scale sign(h) + c2 f'' n), in acc dtype.

    c2 = 2 g_C scale (a 0-d tensor), or None when the contractive statistic gets no gradient.
    The bracket is built in as few passes over (B, H), as few (B, H) allocations (on a CPU a
    fresh buffer can cost page faults as well as a pass) and as few operator calls as possible:
    f' and f'' are the only two (B, H) tensors allocated, the other terms are added into f'' in
    place, and f' is multiplied by the bracket in place to become delta. The (H,) and scalar
    parts of the bracket are gathered into one unscaled column vector first, added with the
    scale as alpha. For activations with h >= 0 (sigmoid, relu, softplus), f' sign(h) = f':
    sign(h) is 1 wherever h > 0, and where h = 0 the factor f' is 0 as well (sigmoid and
    softplus reach h = 0 only where f' has underflowed to 0, relu has f' = 0 there), so the L1
    term joins the column vector too.
    """
    acc = n.dtype
    fp = _d1(act, h)  # a fresh tensor of ours: it becomes delta in place

    g_r = None if g_rho_hat is None else as_dtype(g_rho_hat, acc)
    g_a = None if g_l1 is None else as_dtype(g_l1, acc)
    sign_term = None
    if g_a is not None and act.low < 0:
        sign_term = torch.sign(h).mul_(g_a * scale)
        g_a = None
    # column = g_r + g_A, to be scaled: an (H,) or one-element tensor, or None.
    if g_r is not None:
        column = torch.add(g_r, g_a) if g_a is not None else g_r
    else:
        column = g_a

    if g_h is not None:
        g_h = as_dtype(g_h, acc)
    # bracket: a (B, H) tensor, owned (ours to update in place) or not (g_h), or None.
    bracket, owned = None, False
    if c2 is not None and act.name not in _ZERO_D2:
        cn = n * c2
        bracket, owned = _d2(act, h, fp), True
        if g_h is not None:
            torch.addcmul(g_h, bracket, cn, out=bracket)
        else:
            bracket.mul_(cn)
    elif g_h is not None:
        bracket = g_h
    if sign_term is not None:
        bracket = sign_term if bracket is None else sign_term.add_(bracket)
        owned = True
    if column is not None:
        if bracket is None:
            bracket = column * scale
        elif owned:
            bracket.add_(column, alpha=scale)
        else:
            bracket = torch.add(bracket, column, alpha=scale)
    if bracket is None:
        return fp.zero_()
    return fp.mul_(bracket)


class TorchEncodeFunction(torch.autograd.Function):
    """h, contractive, rho_hat, l1 = TorchEncodeFunction.apply(x, weight, bias, act, group, noise).

    noise: a fastae.functional.noise.Noise or None.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, act, process_group, noise=None):
        rank = rank_of(process_group) if noise is not None else 0
        x_in = draw(x, noise, rank)[0] if noise is not None else x
        h, contractive_sum, column_sum, l1_sum, n, s = _forward(x_in, weight, bias, act)
        del x_in
        contractive, rho_hat, l1, scale = finish_stats(
            contractive_sum, l1_sum, column_sum, x.shape[0], process_group
        )

        ctx.save_for_backward(x, weight, h, n, s)
        ctx.act = act
        ctx.noise = noise
        ctx.rank = rank
        ctx.scale = scale
        ctx.set_materialize_grads(False)
        return h, contractive, rho_hat, l1

    @staticmethod
    @first_order_only
    def backward(ctx, g_h, g_contractive, g_rho_hat, g_l1):
        x, weight, h, n, s = ctx.saved_tensors
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

        # 2 g_C scale: the factor of both contractive terms, f' f'' n in delta and s W in dW.
        c2 = None if g_contractive is None else as_dtype(g_contractive, acc) * (2 * scale)
        delta = _delta(act, as_dtype(h, acc), n, g_h, c2, g_rho_hat, g_l1, scale)
        delta = as_dtype(delta, x.dtype)

        grad_x = grad_w = grad_b = None
        # grad w.r.t. input
        if need_x:
            grad_x = delta @ weight
            if keep is not None:
                grad_x = grad_x.mul_(keep)
        # grad w.r.t. weight: delta^T x plus the term through the row norms n_j
        if need_w:
            if c2 is not None:
                # NOTE: the n_j term, W scaled by row, is written first and the matmul adds
                # delta^T x into it in place (beta = 1): one (H, D) pass and no copy. The other
                # orders cost a pass more: addcmul_ on the matmul's output reads that output
                # again, and addmm(W * coef, ...) copies W * coef into a fresh output first.
                grad_w = torch.mul(weight, as_dtype(s * c2, weight.dtype).unsqueeze(1))
                grad_w.addmm_(delta.t(), x)
            else:
                grad_w = torch.mm(delta.t(), x)
        # grad w.r.t. bias
        if need_b:
            grad_b = delta.sum(0)
        return grad_x, grad_w, grad_b, None, None, None
