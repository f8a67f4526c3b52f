"""Global statistics across processes (DESIGN section 4): two gloo processes holding 3 and 5
samples reproduce the one-process run on the 8 samples, after DDP-style gradient averaging."""

import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from cases import encoder_case

import fastae

LOCAL_SIZES = (3, 5)


def penalty_loss(x, weight, bias, process_group=None, backend="torch"):
    _, stats = fastae.encode(
        x, weight, bias, "sigmoid", backend=backend, process_group=process_group
    )
    loss = 0.7 * stats.contractive + 2.0 * fastae.kl_sparsity(stats.rho_hat, 0.1) + 0.3 * stats.l1
    return loss, stats


def _rank_main(rank, world, init_file, out_dir, backend):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        x, weight, bias = encoder_case(sum(LOCAL_SIZES), 6, 4, seed=11)
        start = sum(LOCAL_SIZES[:rank])
        x_local = x[start : start + LOCAL_SIZES[rank]].clone().requires_grad_(True)
        weight.requires_grad_(True)
        bias.requires_grad_(True)

        loss, stats = penalty_loss(x_local, weight, bias, dist.group.WORLD, backend)
        loss.backward()
        # What DistributedDataParallel does to parameter gradients: the mean over ranks.
        for param in (weight, bias):
            dist.all_reduce(param.grad)
            param.grad /= world
        torch.save(
            {
                "rho_hat": stats.rho_hat.detach(),
                "contractive": stats.contractive.detach(),
                "weight_grad": weight.grad,
                "bias_grad": bias.grad,
                "x_grad": x_local.grad,
            },
            os.path.join(out_dir, f"rank{rank}.pt"),
        )
    finally:
        dist.destroy_process_group()


# The Triton backend runs under the interpreter here (the ranks inherit TRITON_INTERPRET=1).
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_two_ranks_of_3_and_5_samples_equal_one_process_on_8(backend):
    with tempfile.TemporaryDirectory() as tmp:
        args = (2, os.path.join(tmp, "init"), tmp, backend)
        mp.spawn(_rank_main, args=args, nprocs=2, join=True)
        ranks = [torch.load(os.path.join(tmp, f"rank{r}.pt")) for r in range(2)]

    x, weight, bias = encoder_case(sum(LOCAL_SIZES), 6, 4, seed=11)
    for t in (x, weight, bias):
        t.requires_grad_(True)
    loss, stats = penalty_loss(x, weight, bias)
    loss.backward()

    for rank in ranks:
        torch.testing.assert_close(rank["rho_hat"], stats.rho_hat.detach(), rtol=0, atol=1e-15)
        torch.testing.assert_close(
            rank["contractive"], stats.contractive.detach(), rtol=0, atol=1e-15
        )
        torch.testing.assert_close(rank["weight_grad"], weight.grad, rtol=0, atol=1e-10)
        torch.testing.assert_close(rank["bias_grad"], bias.grad, rtol=0, atol=1e-10)
    # Each rank's input gradient, scaled by R for DDP's averaging of whatever lies upstream.
    x_grad = torch.cat([ranks[0]["x_grad"], ranks[1]["x_grad"]]) / 2
    torch.testing.assert_close(x_grad, x.grad, rtol=0, atol=1e-10)
