"""Global batch statistics over a torch.distributed process group (DESIGN section 4).

Every rank holds B_r samples. The statistics are sums over all N = sum_r B_r samples divided by
N, so each rank all-reduces its local sums and its count in one packed fp64 vector.

In the backward, a global statistic s = S / N gives each local sample the gradient g_s / N of the
global loss. DistributedDataParallel then averages parameter gradients over the R ranks, which
would divide that share by R; the backward therefore scales it by R, so that after the average
the parameters hold exactly the gradient of one process on the concatenated batch (the problem
SyncBatchNorm solves for batch norm).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def is_distributed(process_group: object) -> bool:
    """True when statistics must be reduced over more than one process."""
    if process_group is None:
        return False
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            "process_group: got a group, expected torch.distributed to be initialized first "
            "(torch.distributed.init_process_group)"
        )
    return dist.get_world_size(process_group) > 1


def all_reduce_sums(
    contractive_sum: Tensor, l1_sum: Tensor, column_sum: Tensor, count: int, process_group
) -> tuple[Tensor, Tensor, Tensor, int, int]:
    """All-reduce (SUM) the local sums and the local sample count in one collective.

    Returns the global sums, the global count N and the world size R.
    """
    packed = torch.cat(
        [
            contractive_sum.reshape(1).double(),
            l1_sum.reshape(1).double(),
            torch.tensor([float(count)], dtype=torch.float64, device=column_sum.device),
            column_sum.double(),
        ]
    )
    dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=process_group)
    dtype = column_sum.dtype
    world = dist.get_world_size(process_group)
    total = int(round(packed[2].item()))
    return packed[0].to(dtype), packed[1].to(dtype), packed[3:].to(dtype), total, world


def finish_stats(
    contractive_sum: Tensor, l1_sum: Tensor, column_sum: Tensor, count: int, process_group
) -> tuple[Tensor, Tensor, Tensor, float]:
    """The statistics of a batch from its local sums, global over the group when there is one.

    Both backends call this after their forward pass. Returns (contractive, rho_hat, l1) as
    means over every sample of every rank, and the factor stat_grad_scale gives for backward.
    """
    total, world = count, 1
    if is_distributed(process_group):
        contractive_sum, l1_sum, column_sum, total, world = all_reduce_sums(
            contractive_sum, l1_sum, column_sum, count, process_group
        )
    scale = stat_grad_scale(count, total, world)
    return contractive_sum / total, column_sum / total, l1_sum / total, scale


def stat_grad_scale(count: int, total: int, world: int) -> float:
    """The factor that turns an upstream statistic gradient into a per-sample one: 1 / B on one
    process, R / N across R processes (see the module docstring)."""
    return world / total if world > 1 else 1.0 / count


class _GlobalMean(torch.autograd.Function):
    """value = (sum over the ranks of local_sum) / N; d value / d local_sum = R / N."""

    @staticmethod
    def forward(ctx, local_sum, count, process_group):
        packed = torch.stack(
            [local_sum.detach().double(), local_sum.new_tensor(float(count), dtype=torch.float64)]
        )
        dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=process_group)
        total = int(round(packed[1].item()))
        ctx.scale = stat_grad_scale(count, total, dist.get_world_size(process_group))
        return (packed[0] / total).to(local_sum.dtype)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.scale, None, None


def global_mean(local_sum: Tensor, count: int, process_group=None) -> Tensor:
    """The mean over every rank of a quantity summed over this rank's samples.

    Args:
        local_sum: scalar, the sum over this rank's ``count`` terms (e.g. squared errors).
        count: the number of terms in local_sum on this rank (may differ between ranks).
        process_group: a torch.distributed group, or None for one process.

    Returns:
        A scalar equal on every rank to (sum of local_sum) / (sum of count). Its gradient with
        respect to local_sum is R / N (1 / count on one process): after DDP averages parameter
        gradients over the R ranks they are the gradients of the mean over all N terms.
    """
    if not is_distributed(process_group):
        return local_sum / count
    return _GlobalMean.apply(local_sum, count, process_group)
