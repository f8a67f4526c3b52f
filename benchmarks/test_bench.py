"""pytest-benchmark cases for the candidates of fastae/bench.py, forward + backward.

    pytest benchmarks/ --benchmark-only

Not part of the default test run (pyproject.toml sets testpaths to tests/). Each case first
checks that the candidate's loss agrees with the eager closed form, so that a fast but wrong
candidate fails instead of winning. Shapes: the CPU shapes of the suite, plus the GPU shapes when
CUDA is available; the per-sample Jacobian only where fastae.bench runs it.
"""

from __future__ import annotations

import pytest
import torch

from fastae import bench

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SHAPES = bench.GPU_SHAPES if DEVICE == "cuda" else bench.CPU_SHAPES
DTYPES = ["fp32", "bf16"] if DEVICE == "cuda" else ["fp32"]

CASES = [
    pytest.param(name, shape, dtype, id=f"{name}-{'x'.join(map(str, shape))}-{dtype}")
    for dtype in DTYPES
    for shape in SHAPES
    for name in bench.available_candidates(DEVICE, shape)
]


def _synchronized(fn):
    if DEVICE != "cuda":
        return fn

    def run():
        fn()
        torch.cuda.synchronize()

    return run


@pytest.mark.parametrize(("name", "shape", "dtype"), CASES)
def test_forward_backward(benchmark, name, shape, dtype):
    case = bench.make_case(shape, bench.DTYPES[dtype], DEVICE)
    forward, forward_backward = bench.build(name, case, DEVICE)
    if not name.startswith("floor"):
        want = bench.eager_loss(*case.inputs[:4]).item()
        got = forward().item()
        # fp32 sums over B x H terms agree to ~1e-6 relative; bf16 codes to ~1e-2.
        rel = 1e-4 if dtype == "fp32" else 3e-2
        assert got == pytest.approx(want, rel=rel)
    benchmark.extra_info.update({"B": shape[0], "D": shape[1], "H": shape[2], "dtype": dtype})
    benchmark.pedantic(
        _synchronized(forward_backward), warmup_rounds=3, rounds=20 if name != "jacobian" else 3
    )
