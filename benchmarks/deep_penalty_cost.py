"""Time of the deep contractive penalty (forward + backward): exact from each side, the probe
estimate, and the encoder alone, for a few encoder shapes. Shows what "auto" picks and why.

    python benchmarks/deep_penalty_cost.py --batch 128 --device cpu
"""

from __future__ import annotations

import argparse
import math
import time

import torch

import fastae
from fastae.functional.deep import DEFAULT_K
from fastae.functional.deep import EXACT_BUDGET
from fastae.functional.deep import exact_cost

SHAPES = ([784, 256, 32], [784, 512, 128], [784, 512, 256], [64, 256, 512], [784, 1000, 500, 250])


def timed(device: torch.device, repeats: int, fn, *args, **kwargs) -> float:
    """Milliseconds per call of fn(*args, **kwargs), after one warm-up call."""
    fn(*args, **kwargs)
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn(*args, **kwargs)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats * 1e3


def encoder_only(x, layers) -> None:
    h = x
    for weight, bias, activation in layers:
        h, _ = fastae.encode(h, weight, bias, activation)
    h.sum().backward()


def penalty(x, layers, **kwargs) -> None:
    # The codes' graph is rebuilt every call, so backward through the encoder is included.
    fastae.deep_encode(x, layers, **kwargs).penalty.value.backward()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    device = torch.device(args.device)

    print(f"B = {args.batch}, {device}, float32, ms per forward + backward; k = {DEFAULT_K}")
    header = (
        f"{'widths':<20}{'encoder':>9}{'code':>9}{'input':>9}{'estimate':>10}"
        f"{'min cost / fwd':>16}  auto"
    )
    print(header)
    print("-" * (len(header) + 16))
    for widths in SHAPES:
        layers = [
            (
                (torch.randn(o, i, device=device) / math.sqrt(i)).requires_grad_(True),
                torch.zeros(o, device=device, requires_grad=True),
                "sigmoid",
            )
            for i, o in zip(widths[:-1], widths[1:], strict=True)
        ]
        x = torch.rand(args.batch, widths[0], device=device)

        times = [
            timed(device, args.repeats, encoder_only, x, layers),
            timed(device, args.repeats, penalty, x, layers, penalty="exact", side="code"),
            timed(device, args.repeats, penalty, x, layers, penalty="exact", side="input"),
            timed(device, args.repeats, penalty, x, layers, penalty="estimate"),
        ]
        cost = exact_cost(args.batch, widths)
        ratio = min(cost["code"], cost["input"]) / cost["forward"]
        auto = fastae.deep_encode(x, layers).penalty
        label = f"{auto.method}/{auto.side}" + (f" k={auto.k}" if auto.k else "")
        print(
            f"{'-'.join(map(str, widths)):<20}{times[0]:>9.2f}{times[1]:>9.2f}{times[2]:>9.2f}"
            f"{times[3]:>10.2f}{ratio:>16.1f}  {label}"
        )
    print(f"auto: exact when min cost / fwd <= EXACT_BUDGET = {EXACT_BUDGET}")


if __name__ == "__main__":
    main()
