"""The statistics that one encoder pass produces (DESIGN section 2)."""

from __future__ import annotations

from typing import NamedTuple

from torch import Tensor


class EncodeStats(NamedTuple):
    """Batch statistics of one encoder layer, all differentiable, all means over the batch.

    With a process group they are global: means over every sample of every rank.
    """

    contractive: Tensor
    """Scalar, fp32 or fp64: (1/B) sum_b ||dh_b/dx_b||_F^2 = (1/B) sum_b sum_j f'(a_bj)^2 n_j."""

    rho_hat: Tensor
    """(H,), fp32 or fp64: the mean activation of each hidden unit, (1/B) sum_b h_bj."""

    l1: Tensor
    """Scalar, fp32 or fp64: the mean over samples of the L1 norm of the code, (1/B) sum |h_bj|."""
