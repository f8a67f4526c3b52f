"""The kernels compile for a GPU target even on a machine without one (tests/compile_kernels.py):
the interpreter tier alone would let GPU-only compile errors through."""

import os
import pathlib
import shutil
import subprocess
import sys

import pytest
import triton

PTXAS = pathlib.Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"


@pytest.mark.skipif(
    not PTXAS.exists() and shutil.which("ptxas") is None,
    reason="no ptxas: triton's NVIDIA backend is not installed; the GPU tier "
    "(benchmarks/gpu_check.sh) compiles the kernels for real",
)
def test_kernels_compile_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    script = pathlib.Path(__file__).with_name("compile_kernels.py")
    result = subprocess.run(
        [sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("compiled ") == 13
