"""Test configuration shared by every tier.

TRITON_INTERPRET=1 must be set before any Triton kernel module is imported: on machines without
a GPU the Triton tier then runs the kernels on the CPU with Triton's interpreter. On a machine with
a GPU, set FASTAE_GPU_TESTS=1 to run the real kernels instead (benchmarks/gpu_check.sh does).
"""

import os

import pytest
import torch

if os.environ.get("FASTAE_GPU_TESTS") != "1":
    os.environ.setdefault("TRITON_INTERPRET", "1")

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
