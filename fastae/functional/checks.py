"""Argument checks shared by every backend: each error names the argument, what was received
and what was expected."""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_tensor(name: str, value: object) -> Tensor:
    if not isinstance(value, Tensor):
        raise TypeError(f"{name}: got {type(value).__name__}, expected a torch.Tensor")
    if value.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{name}: got dtype {value.dtype}, expected one of float16, bfloat16, float32, float64"
        )
    # Sparse and nested tensors would pass some forwards and fail deep inside torch later.
    if value.is_nested:
        raise TypeError(f"{name}: got a nested tensor, expected a dense (strided) tensor")
    if value.layout != torch.strided:
        raise TypeError(
            f"{name}: got layout {value.layout}, expected a dense (strided) tensor: call "
            ".to_dense() first"
        )
    return value


# The dtypes torch.autocast casts to its own for a matmul (float64 it leaves alone).
_AUTOCAST_ELIGIBLE = (torch.float16, torch.bfloat16, torch.float32)


def _autocast_dtype(kind: str) -> torch.dtype | None:
    """torch.autocast's dtype where it is on for this device type, else None."""
    if not torch.amp.is_autocast_available(kind) or not torch.is_autocast_enabled(kind):
        return None
    return torch.get_autocast_dtype(kind)


def autocast_inputs(
    x: Tensor, weight: Tensor, bias: Tensor | None
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Inside torch.autocast for x's device, x, weight and bias cast to autocast's dtype, as
    autocast casts the arguments of F.linear; unchanged outside it.

    The casts are differentiable: gradients reach float32 weights in float32. Unless all three
    are float16, bfloat16 or float32 tensors (bias may be None), nothing is cast: float64 is
    not autocast's to lower, and check_encode_args then names the dtypes that were passed.
    """
    dtype = _autocast_dtype(x.device.type) if isinstance(x, Tensor) else None
    if dtype is None:
        return x, weight, bias
    given = (x, weight) if bias is None else (x, weight, bias)
    if not all(isinstance(t, Tensor) and t.dtype in _AUTOCAST_ELIGIBLE for t in given):
        return x, weight, bias
    return x.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype)


def without_autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """A context with torch.autocast off for device, for computations that keep the dtypes they
    chose (statistics accumulated in float32 must not have their matmuls lowered to autocast's
    dtype); a no-op where autocast is off already."""
    if _autocast_dtype(device.type) is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, enabled=False)


def check_encode_args(x: Tensor, weight: Tensor, bias: Tensor | None) -> None:
    """Shapes, dtypes and devices of x (*, D), weight (H, D) and bias (H,)."""
    check_tensor("x", x)
    check_tensor("weight", weight)
    if weight.dim() != 2:
        raise ValueError(f"weight: got shape {tuple(weight.shape)}, expected (H, D)")
    hidden, features = weight.shape
    if x.dim() < 1 or x.shape[-1] != features:
        raise ValueError(
            f"x: got shape {tuple(x.shape)}, expected (B, {features}) to match weight of shape "
            f"{tuple(weight.shape)}"
        )
    if x.numel() == 0 or hidden == 0 or features == 0:
        raise ValueError(
            f"x, weight: got shapes {tuple(x.shape)} and {tuple(weight.shape)}, expected at least "
            "one sample, one feature and one hidden unit"
        )
    if x.dtype != weight.dtype:
        raise TypeError(f"weight: got dtype {weight.dtype}, expected the dtype of x, {x.dtype}")
    if x.device != weight.device:
        raise ValueError(
            f"weight: got device {weight.device}, expected the device of x, {x.device}"
        )
    if bias is not None:
        check_tensor("bias", bias)
        if tuple(bias.shape) != (hidden,):
            raise ValueError(f"bias: got shape {tuple(bias.shape)}, expected ({hidden},)")
        if bias.dtype != x.dtype:
            raise TypeError(f"bias: got dtype {bias.dtype}, expected the dtype of x, {x.dtype}")
        if bias.device != x.device:
            raise ValueError(
                f"bias: got device {bias.device}, expected the device of x, {x.device}"
            )


def check_rho(rho: object) -> float:
    """The KL target rho must be a number strictly inside (0, 1) (a one-element tensor that needs
    no gradient is read as its number: the target is a constant)."""
    if isinstance(rho, Tensor):
        if rho.numel() != 1 or rho.requires_grad:
            what = "requires grad" if rho.requires_grad else f"has shape {tuple(rho.shape)}"
            raise ValueError(
                f"rho: got a tensor that {what}, expected a number strictly between 0 and 1"
            )
        rho = rho.item()
    if isinstance(rho, bool) or not isinstance(rho, (int, float)) or not 0.0 < float(rho) < 1.0:
        raise ValueError(f"rho: got {rho!r}, expected a number strictly between 0 and 1")
    return float(rho)


def check_reduction(reduction: object) -> str:
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction: got {reduction!r}, expected 'mean', 'sum' or 'none'")
    return reduction


def stats_dtype(dtype: torch.dtype) -> torch.dtype:
    """Statistics accumulate in fp32 at least, fp64 for fp64 inputs."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def as_dtype(t: Tensor, dtype: torch.dtype) -> Tensor:
    """t in dtype, without an operator call when it already is (a call costs a dispatch)."""
    return t if t.dtype == dtype else t.to(dtype)
