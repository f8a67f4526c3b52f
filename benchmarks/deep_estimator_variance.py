"""Variance of the probe estimate of the deep contractive penalty, against the exact value.

For each probe distribution and k, draws the estimate `--draws` times on one fixed encoder and
batch and prints its mean, how far that mean is from the exact penalty in standard errors, its
variance, the variance the theory predicts, and its relative standard deviation. The theory, per
sample with A = J^T J:

    Rademacher   Var ||J v||^2 = 2 (||A||_F^2 - sum_i A_ii^2)
    Gaussian     Var ||J v||^2 = 2 ||A||_F^2

divided by k, and by B^2 summed over the B samples (independent probes) for the batch mean.

    python benchmarks/deep_estimator_variance.py --widths 64 32 16 --batch 8
"""

from __future__ import annotations

import argparse
import math

import torch

import fastae
from fastae.activations import get_activation
from fastae.functional.deep import deep_contractive_penalty
from fastae.reference import jacobians


def plain_encoder(layers):
    def run(x):
        for weight, bias, activation in layers:
            x = get_activation(activation).forward(x @ weight.t() + bias)
        return x

    return run


def theory(jac: torch.Tensor, k: int, probes: str) -> float:
    gram = jac.transpose(1, 2) @ jac
    per_sample = 2 * gram.square().sum((1, 2))
    if probes == "rademacher":
        per_sample -= 2 * gram.diagonal(dim1=1, dim2=2).square().sum(1)
    return per_sample.sum().item() / (k * jac.shape[0] ** 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--widths", type=int, nargs="+", default=[32, 16, 8], help="D H_1 .. H_L")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--activation", default="sigmoid")
    parser.add_argument("--draws", type=int, default=2000)
    parser.add_argument("--ks", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    widths = args.widths
    layers = [
        (
            torch.randn(fan_out, fan_in, dtype=torch.float64) * (2.0 / math.sqrt(fan_in)),
            torch.randn(fan_out, dtype=torch.float64) * 0.5,
            args.activation,
        )
        for fan_in, fan_out in zip(widths[:-1], widths[1:], strict=True)
    ]
    x = torch.randn(args.batch, widths[0], dtype=torch.float64)
    # The codes h_1 .. h_L once; each draw reruns only the penalty.
    codes = [fastae.deep_encode(x, layers[: i + 1]).h for i in range(len(layers))]
    exact = deep_contractive_penalty(codes, layers, penalty="exact").value.item()
    jac = jacobians(plain_encoder(layers), x)

    print(
        f"encoder {'-'.join(map(str, widths))} {args.activation}, B = {args.batch}, "
        f"{args.draws} draws, exact penalty {exact:.6g}"
    )
    header = (
        f"{'probes':<11}{'k':>4}{'mean':>12}{'(mean-exact)/SE':>17}{'variance':>12}"
        f"{'theory':>12}{'rel. std':>10}"
    )
    print(header)
    print("-" * len(header))
    for probes in ("rademacher", "gaussian"):
        for k in args.ks:
            generator = torch.Generator().manual_seed(args.seed + k)
            samples = torch.stack(
                [
                    deep_contractive_penalty(
                        codes, layers, penalty="estimate", k=k, generator=generator, probes=probes
                    ).value
                    for _ in range(args.draws)
                ]
            )
            mean, var = samples.mean().item(), samples.var().item()
            z = (mean - exact) / math.sqrt(var / args.draws)
            print(
                f"{probes:<11}{k:>4}{mean:>12.6g}{z:>17.2f}{var:>12.4g}"
                f"{theory(jac, k, probes):>12.4g}{math.sqrt(var) / exact:>10.3f}"
            )


if __name__ == "__main__":
    main()
