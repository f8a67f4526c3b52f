"""A marker for the hand-written backwards of the encoder Functions: first order only.

torch.autograd.function.once_differentiable refuses a second derivative only when an upstream
gradient requires grad. Under create_graph=True with a plain upstream gradient (the usual
torch.autograd.grad(stats.contractive, x, create_graph=True)) it returns gradients without a
graph, and a second derivative through them then comes out silently wrong (the terms through
these gradients are missing). Here every gradient returned under create_graph=True carries a
node that raises as soon as anything differentiates through it.
"""

from __future__ import annotations

import functools

import torch
from torch._C import _functions

MESSAGE = (
    b"fastae.encode: the backward is hand-written and first order only, so gradients of its "
    b"gradients (double backward, create_graph=True) are not supported; fastae.reference "
    b"computes the same quantities with plain autograd ops for that"
)


def first_order_only(backward):
    """Decorate the backward of an autograd.Function (below @staticmethod)."""

    @functools.wraps(backward)
    def wrapper(ctx, *grads):
        with torch.no_grad():
            outputs = backward(ctx, *grads)
        if not torch.is_grad_enabled():
            return outputs
        # create_graph=True: hand back aliases made by a node that raises MESSAGE when reached.
        # The node also takes every tensor these gradients depend on that requires grad: the
        # saved x, W and h, and the upstream gradients (which may depend on a decoder's
        # parameters, as in a gradient penalty). So it lies on every path from these gradients
        # back to anything, and a second derivative with respect to any of them reaches it and
        # raises instead of skipping it.
        tensors = [t for t in outputs if isinstance(t, torch.Tensor)]
        if not tensors:
            return outputs
        sources = [
            t
            for t in (*ctx.saved_tensors, *grads)
            if isinstance(t, torch.Tensor) and t.requires_grad
        ]
        raise_on_backward = _functions.DelayedError(MESSAGE, len(tensors) + len(sources))
        aliases = raise_on_backward(*[t.detach().requires_grad_() for t in tensors], *sources)
        aliases = iter(aliases if isinstance(aliases, tuple) else (aliases,))
        return tuple(next(aliases) if isinstance(t, torch.Tensor) else t for t in outputs)

    return wrapper
