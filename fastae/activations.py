"""Activations and their derivatives, written in terms of the output h.

One table serves every module of fastae (reference, torch path, Triton kernels, nn layers): the
backward passes save only h, so f'(a) and f''(a) must be recoverable from h alone
(DESIGN section 1):

    activation   f'(a)          f''(a)            h range
    sigmoid      h (1 - h)      f' (1 - 2h)       (0, 1)
    tanh         1 - h^2        -2 h f'           (-1, 1)
    relu         1[h > 0]       0                 [0, inf)
    softplus     1 - exp(-h)    f' exp(-h)        (0, inf)
    identity     1              0                 R
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class Activation:
    """One row of the activation table.

    Attributes:
        name: the public name ("sigmoid", ...).
        code: the integer that selects this activation in the Triton kernels (a constexpr).
        forward: f(a), elementwise.
        d1: f'(a) computed from h = f(a).
        d2: f''(a) computed from h = f(a).
        low, high: the range of h (KL sparsity needs [0, 1]).
    """

    name: str
    code: int
    forward: Callable[[Tensor], Tensor]
    d1: Callable[[Tensor], Tensor]
    d2: Callable[[Tensor], Tensor]
    low: float
    high: float


def _sigmoid_d1(h: Tensor) -> Tensor:
    return h * (1 - h)


def _sigmoid_d2(h: Tensor) -> Tensor:
    return h * (1 - h) * (1 - 2 * h)


def _tanh_d1(h: Tensor) -> Tensor:
    return 1 - h * h


def _tanh_d2(h: Tensor) -> Tensor:
    return -2 * h * (1 - h * h)


def _relu_d1(h: Tensor) -> Tensor:
    return (h > 0).to(h.dtype)


def _zero(h: Tensor) -> Tensor:
    return torch.zeros_like(h)


def _one(h: Tensor) -> Tensor:
    return torch.ones_like(h)


def _softplus_d1(h: Tensor) -> Tensor:
    # sigmoid(a) = 1 - exp(-softplus(a)); -expm1 keeps precision for small h.
    return -torch.expm1(-h)


def _softplus_d2(h: Tensor) -> Tensor:
    return -torch.expm1(-h) * torch.exp(-h)


def _softplus_exact(a: Tensor) -> Tensor:
    # log(1 + e^a) without overflow and without the switch to `a` that F.softplus makes past its
    # threshold, so that f' = 1 - exp(-h) holds exactly.
    return torch.logaddexp(a, torch.zeros((), dtype=a.dtype, device=a.device))


ACTIVATIONS: dict[str, Activation] = {
    act.name: act
    for act in (
        Activation("sigmoid", 0, torch.sigmoid, _sigmoid_d1, _sigmoid_d2, 0.0, 1.0),
        Activation("tanh", 1, torch.tanh, _tanh_d1, _tanh_d2, -1.0, 1.0),
        Activation("relu", 2, torch.relu, _relu_d1, _zero, 0.0, math.inf),
        Activation("softplus", 3, _softplus_exact, _softplus_d1, _softplus_d2, 0.0, math.inf),
        Activation("identity", 4, lambda a: a, _one, _zero, -math.inf, math.inf),
    )
}


def get_activation(name: str | Activation) -> Activation:
    """Look an activation up by name; unknown names get an error listing the known ones."""
    if isinstance(name, Activation):
        return name
    if not isinstance(name, str) or name not in ACTIVATIONS:
        raise ValueError(
            f"activation: got {name!r}, expected one of {', '.join(sorted(ACTIVATIONS))}"
        )
    return ACTIVATIONS[name]
