"""Compile the Triton kernels for an NVIDIA target without a GPU (ahead of time, to a cubin).

The interpreter runs kernels as Python and so accepts code that the compiler rejects (a global
that is not a tl.constexpr, a dot shape or dtype the GPU lowering refuses). Compiling for sm_90
with the ptxas that ships with triton catches those errors on a CPU-only machine. Run by
tests/test_kernel_compile.py in a process without TRITON_INTERPRET:

    python tests/compile_kernels.py
"""

import os
import sys

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from fastae.activations import ACTIVATIONS
from fastae.kernels import encoder_backward
from fastae.kernels import encoder_forward
from fastae.kernels import materialize_noise
from fastae.kernels.noise import NOISE_CODES

TARGET = GPUTarget("cuda", 90, 32)
# Pointer arguments that hold data in the input dtype; all others hold accumulation-dtype data.
INPUT_DTYPE_POINTERS = {"x_ptr", "w_ptr", "b_ptr", "h_ptr", "g_h_ptr", "grad_w_ptr", "grad_x_ptr"}
INPUT_DTYPE_POINTERS |= {"x_tilde_ptr", "keep_ptr"}
# Scalar arguments that are not int32: the corruption's key (bit 62 set) and its float levels.
SCALAR_TYPES = {
    "noise_key": "i64",
    "noise_level": "fp32",
    "noise_low": "fp32",
    "noise_high": "fp32",
}


def compile_kernel(kernel, constexprs, input_dtype, acc_dtype, config):
    signature = {}
    for name in kernel.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            signature[name] = "*" + (input_dtype if name in INPUT_DTYPE_POINTERS else acc_dtype)
        else:
            signature[name] = SCALAR_TYPES.get(name, "i32")
    source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
    options = {"num_warps": config.num_warps, "num_stages": config.num_stages}
    triton.compile(source, target=TARGET, options=options)


def main() -> int:
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("unset TRITON_INTERPRET: the interpreter does not compile", file=sys.stderr)
        return 2
    forward_config = encoder_forward._gpu_configs()[0]
    weight_config = encoder_backward._gpu_configs("BLOCK_H", "BLOCK_B")[0]
    input_config = encoder_backward._gpu_configs("BLOCK_B", "BLOCK_H")[0]
    # (activation, dtype, precision, corruption): every activation clean, the other dtypes and
    # each corruption once.
    cases = [(name, "fp32", "ieee", 0) for name in ACTIVATIONS]
    cases += [("tanh", "fp32", "tf32", 0), ("softplus", "bf16", "ieee", 0)]
    cases += [("sigmoid", "fp16", "ieee", 0), ("tanh", "fp64", "ieee", 0)]
    cases += [("sigmoid", "bf16", "ieee", code) for code in NOISE_CODES.values()]
    cases += [("relu", "fp64", "ieee", NOISE_CODES["gaussian"])]
    for name, dtype, precision, noise in cases:
        acc = "fp64" if dtype == "fp64" else "fp32"
        common = {
            "ACTIVATION": ACTIVATIONS[name].code,
            "ACC_DTYPE": tl.float64 if dtype == "fp64" else tl.float32,
            "PRECISION": precision,
            "NOISE": noise,
        }
        compile_kernel(
            encoder_forward._encoder_forward_kernel,
            {**common, "HAS_BIAS": True, "BLOCK_B": encoder_forward.BLOCK_B_GPU}
            | forward_config.kwargs,
            dtype,
            acc,
            forward_config,
        )
        for kernel, config in (
            (encoder_backward._encoder_backward_weight_kernel, weight_config),
            (encoder_backward._encoder_backward_input_kernel, input_config),
        ):
            constexprs = {**common, "HAS_GRAD_H": True} | config.kwargs
            compile_kernel(kernel, constexprs, dtype, acc, config)
        if noise:
            compile_kernel(
                materialize_noise._materialize_noise_kernel,
                {"NOISE": noise, "STORE_KEEP": True, "ACC_DTYPE": common["ACC_DTYPE"]}
                | {
                    "BLOCK_B": materialize_noise._BLOCK,
                    "BLOCK_D": materialize_noise._BLOCK,
                },
                dtype,
                acc,
                input_config,
            )
        print(f"compiled {name} {dtype} {precision} noise={noise}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
