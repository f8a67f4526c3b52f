"""The KL sparsity penalty as one autograd node with its derivative in closed form.

    r_j = clamp(rho_hat_j, eps, 1 - eps)
    K   = sum_j rho log(rho / r_j) + (1 - rho) log((1 - rho) / (1 - r_j))
    dK/d rho_hat_j = -rho / r_j + (1 - rho) / (1 - r_j)   where rho_hat_j is in [eps, 1 - eps],
                     0                                     where the clamp is active

Written as plain autograd code the formula records about a dozen nodes, and on a CPU each costs
a dispatch in the forward and another in the backward, which at H = 512 is most of the penalty's
time. Here the forward runs without recording, computes the (H,) derivative from the same two
ratios as the value, and the backward is one multiply. Under create_graph the backward
recomputes the derivative from rho_hat with autograd ops instead, so that second derivatives are
right too.
"""

from __future__ import annotations

import functools
import struct

import torch
from torch import Tensor

from fastae.functional.checks import as_dtype


class KLSparsityFunction(torch.autograd.Function):
    """K = KLSparsityFunction.apply(rho_hat, rho, eps); rho and eps are Python floats.

    The forward also checks the range of rho_hat (one device sync): values outside [0, 1], or
    NaN, raise a ValueError. When every value lies in [eps, 1 - eps], as it does for all but
    saturated units, the clamp and its gradient mask are skipped.
    """

    @staticmethod
    def forward(ctx, rho_hat: Tensor, rho: float, eps: float) -> Tensor:
        dtype = _computing_dtype(rho_hat.dtype)
        targets, offset, sign = _constants(rho, dtype, rho_hat.device)
        # Any shape is taken, (H,) in practice, which needs no reshape.
        flat = as_dtype(rho_hat if rho_hat.dim() == 1 else rho_hat.reshape(-1), dtype)
        # Both Bernoulli terms at once: row 0 holds (rho, r), row 1 (1 - rho, 1 - r), the
        # latter made in one operation as offset + r * sign.
        rows = torch.addcmul(offset, flat, sign)
        # min(rho_hat, 1 - rho_hat) >= eps says no clamp is needed; NaN fails the comparison.
        clamped = not rows.min().item() >= eps
        if clamped:
            _check_range(flat)
            r = flat.clamp(eps, 1.0 - eps)
            rows = torch.addcmul(offset, r, sign)
        ratio = torch.div(targets, rows)
        if ctx.needs_input_grad[0]:
            # -rho / r + (1 - rho) / (1 - r): exactly 0 at r = rho, where both ratios are 1.
            # NOTE: unbind and sub rather than ratio.diff(dim=0), which narrows twice before
            # subtracting: after the encoder's matmul it took 66 us at H = 512 on the README's
            # CPU, several times the two ops here.
            low, high = ratio.unbind()
            slope = torch.sub(high, low)
            if rho_hat.dim() != 1:
                slope = slope.view(rho_hat.shape)
            if clamped:
                # The clamp passes no gradient where it changed the value; where rho_hat sits
                # exactly on a bound r equals rho_hat and the gradient passes, as torch.clamp's.
                slope.masked_fill_((r != flat).view(rho_hat.shape), 0.0)
            ctx.save_for_backward(slope, rho_hat)
            ctx.rho, ctx.eps = rho, eps
        # In the computing dtype: fp32 for fp16 and bf16 inputs, like encode's statistics (a
        # sum over thousands of units can pass fp16's range).
        return ratio.log_().mul_(targets).sum()

    @staticmethod
    def backward(ctx, grad: Tensor):
        slope, rho_hat = ctx.saved_tensors
        if torch.is_grad_enabled():
            slope = _slope(rho_hat, ctx.rho, ctx.eps)
        return as_dtype(slope * grad, rho_hat.dtype), None, None


def _computing_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp16 and bf16 are computed in fp32: in them 1 - eps rounds to 1 for the default eps."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _rounded(value: float, dtype: torch.dtype) -> float:
    """value rounded to float32 or float64 (Python's float), as torch.tensor(value, dtype)
    rounds it, in plain Python: no tensor, no .item() to break a torch.compile graph."""
    return struct.unpack("f", struct.pack("f", value))[0] if dtype == torch.float32 else value


def check_eps(eps: float, dtype: torch.dtype) -> None:
    """eps must leave 1 - eps below 1 in the dtype the penalty is computed in."""
    computing = _computing_dtype(dtype)
    if not _rounded(1.0 - eps, computing) < 1.0:
        least = torch.finfo(computing).eps / 2
        raise ValueError(
            f"eps: got {eps!r}, expected a margin that keeps 1 - eps below 1 in {computing}, "
            f"in which rho_hat of {dtype} is computed (at least {least:.3g})"
        )


def _check_range(rho_hat: Tensor) -> None:
    low, high = (bound.item() for bound in torch.aminmax(rho_hat.detach()))
    if not (0.0 <= low and high <= 1.0):  # NaN fails both comparisons
        # The shortest repr, not a rounded format: 1 + 1e-9 must not print as 1.
        low, high = (repr(bound).removesuffix(".0") for bound in (low, high))
        raise ValueError(
            f"rho_hat: got values in [{low}, {high}], expected values in [0, 1]: the KL "
            "penalty needs codes in [0, 1] (sigmoid), not an unbounded activation"
        )


@functools.lru_cache(maxsize=64)
def _constants(rho: float, dtype: torch.dtype, device: torch.device) -> tuple[Tensor, ...]:
    """The (2, 1) columns (rho, 1 - rho), (0, 1) and (1, -1), made once per target, dtype and
    device (on a GPU each new tensor is a host-to-device copy). Read only."""
    columns = ([[rho], [1.0 - rho]], [[0.0], [1.0]], [[1.0], [-1.0]])
    return tuple(torch.tensor(c, dtype=dtype, device=device) for c in columns)


def _slope(rho_hat: Tensor, rho: float, eps: float) -> Tensor:
    """dK/d rho_hat with autograd ops (the create_graph path of the backward)."""
    rho_hat = as_dtype(rho_hat, _computing_dtype(rho_hat.dtype))
    r = rho_hat.clamp(eps, 1.0 - eps)
    return (-rho / r + (1.0 - rho) / (1.0 - r)).masked_fill(r != rho_hat, 0.0)
