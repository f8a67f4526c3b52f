"""Input corruption for denoising, applied by fastae.encode(..., noise=Noise(...)).

    h = f(x~ W^T + b),   dL/dW = delta^T x~,   dL/dx = (delta W) * dx~/dx

with x~ drawn fresh for every (seed, step) and never saved for the backward: both backends draw
it again there from the same key. The corruptions (DESIGN section 7), for data in [low, high]:

    gaussian(sigma)        x~ = clamp(x + sigma n, low, high),  n ~ N(0, 1);
                           dx~/dx = 1 where the sum was inside [low, high], 0 where clipped
    masking(nu)            each entry is set to 0 with probability nu, the others are unchanged
                           (no 1 / (1 - nu) rescaling); dx~/dx = 1 for survivors, 0 for masked
    salt-and-pepper(nu)    each entry is replaced with probability nu, by high or low with equal
                           probability; dx~/dx = 1 for untouched entries, 0 for replaced ones

Both backends draw from the same distributions but not the same numbers: the Triton kernels use
Philox keyed by Noise.key() and the entry's index r * D + c (fastae.kernels.noise); the PyTorch
path uses a torch.Generator seeded with the same key. `corrupt(x, noise, backend)` returns the x~
that encode() on that backend uses, which is how tests compare the two.

The caller owns the step counter: bump `step` (Noise.at(step)) every training step so that each
step sees fresh noise; the same (seed, step) always gives the same x~. In a process group the
rank enters the key too, so that ranks do not corrupt their local batches identically.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.distributed as dist
from torch import Tensor

from fastae.functional.checks import check_tensor
from fastae.functional.distributed import is_distributed

__all__ = ["KINDS", "Noise", "corrupt", "draw"]

KINDS = ("gaussian", "masking", "salt-and-pepper")
# Same codes as fastae.kernels.noise.NOISE_CODES (kept here so that this module does not import
# triton; tests check that the two agree).
_CODES = {"gaussian": 1, "masking": 2, "salt-and-pepper": 3}
_INT63 = 1 << 63
_MASK64 = (1 << 64) - 1


def _splitmix64(z: int) -> int:
    """One step of the SplitMix64 finalizer: a bijection of 64-bit integers that mixes well."""
    z = (z + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def _check_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < _INT63:
        raise ValueError(f"{name}: got {value!r}, expected an integer in [0, 2**63)")
    return value


def _check_float(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name}: got {value!r}, expected a finite number")
    return float(value)


@dataclasses.dataclass(frozen=True)
class Noise:
    """An input corruption and the key of its random stream.

    Args:
        kind: "gaussian", "masking" or "salt-and-pepper".
        level: sigma > 0 for gaussian (in data units); the fraction nu in (0, 1) of entries hit
            for masking and salt-and-pepper.
        low, high: the data range; x~ stays inside it (gaussian clips, salt-and-pepper writes its
            ends). Masking writes 0 whatever the range.
        seed: the seed of the run, an integer in [0, 2**63).
        step: the training step, an integer in [0, 2**63); bump it every step (Noise.at).
    """

    kind: str
    level: float
    low: float = 0.0
    high: float = 1.0
    seed: int = 0
    step: int = 0

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"noise kind: got {self.kind!r}, expected one of {', '.join(KINDS)}")
        level = _check_float("noise level", self.level)
        if self.kind == "gaussian" and not level > 0.0:
            raise ValueError(f"noise level (gaussian sigma): got {level!r}, expected a number > 0")
        if self.kind != "gaussian" and not 0.0 < level < 1.0:
            raise ValueError(
                f"noise level ({self.kind} fraction): got {level!r}, expected a number strictly "
                "between 0 and 1"
            )
        low = _check_float("noise low", self.low)
        high = _check_float("noise high", self.high)
        if not low < high:
            raise ValueError(f"noise low, high: got [{low!r}, {high!r}], expected low < high")
        _check_int("noise seed", self.seed)
        _check_int("noise step", self.step)
        object.__setattr__(self, "level", level)
        object.__setattr__(self, "low", low)
        object.__setattr__(self, "high", high)

    def at(self, step: int) -> Noise:
        """The same corruption at another training step."""
        return dataclasses.replace(self, step=step)

    def key(self, rank: int = 0) -> int:
        """The 64-bit key of the stream for (seed, step, rank), with bit 62 set and bit 63 clear
        (an int64 that Triton types the same way on every call)."""
        z = _splitmix64(_splitmix64(_splitmix64(self.seed) ^ self.step) ^ rank)
        return (z & ((1 << 62) - 1)) | (1 << 62)

    def kernel_args(self, rank: int = 0):
        """The corruption as the Triton launchers take it (fastae.kernels.noise.NoiseArgs)."""
        from fastae.kernels.noise import NoiseArgs

        return NoiseArgs(_CODES[self.kind], self.key(rank), self.level, self.low, self.high)


def check_noise(noise: object) -> Noise | None:
    if noise is not None and not isinstance(noise, Noise):
        raise TypeError(
            f"noise: got {type(noise).__name__}, expected None or fastae.functional.noise.Noise"
        )
    return noise


def rank_of(process_group) -> int:
    """This process's rank in the group whose statistics are reduced (0 without one)."""
    return dist.get_rank(process_group) if is_distributed(process_group) else 0


def draw(x: Tensor, noise: Noise, rank: int = 0) -> tuple[Tensor, Tensor]:
    """The PyTorch path's x~ and dx~/dx (a bool mask) for x (B, D), from a torch.Generator
    seeded with noise.key(rank) on the device of x: the same (x, noise, rank) gives the same x~.

    The noise is drawn in fp32 (fp64 for fp64 x), row-major over the logical (B, D) shape, so
    the strides of x do not change it.
    """
    gen = torch.Generator(device=x.device)
    gen.manual_seed(noise.key(rank))
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    if noise.kind == "gaussian":
        normal = torch.randn(x.shape, generator=gen, device=x.device, dtype=dtype)
        y = normal.mul_(noise.level).add_(x)
        keep = (y >= noise.low) & (y <= noise.high)
        return y.clamp_(noise.low, noise.high).to(x.dtype), keep

    uniform = torch.rand(x.shape, generator=gen, device=x.device, dtype=dtype)
    hit = uniform < noise.level
    if noise.kind == "masking":
        return x.masked_fill(hit, 0.0), ~hit

    # salt-and-pepper: given a hit, u / nu is uniform, so u < nu / 2 picks high (salt) or low
    # (pepper) with probability 1/2 each, as in the kernels.
    value = torch.where(uniform < 0.5 * noise.level, noise.high, noise.low).to(x.dtype)
    return torch.where(hit, value, x), ~hit


def corrupt(
    x: Tensor, noise: Noise, backend: str = "auto", *, rank: int = 0, with_derivative: bool = False
):
    """The x~ that fastae.encode(x, ..., noise=noise, backend=backend) encodes (a debug path).

    Args:
        x: (B, D) or (*, D) inputs.
        noise: the corruption and its (seed, step).
        backend: "auto", "torch" or "triton", resolved as in encode().
        rank: the rank in the process group (0 without one).
        with_derivative: also return dx~/dx in the dtype of x (0 or 1).

    Returns:
        x~ of the shape and dtype of x (and dx~/dx when asked).
    """
    from fastae.functional import resolve_backend

    check_tensor("x", x)
    if x.dim() < 1:
        raise ValueError(f"x: got shape {tuple(x.shape)}, expected (B, D)")
    check_noise(noise)
    x2 = x.detach().reshape(-1, x.shape[-1])
    if resolve_backend(backend, x.device) == "triton":
        from fastae.kernels.materialize_noise import materialize_noise

        out = materialize_noise(x2, noise.kernel_args(rank), with_derivative=with_derivative)
        x_tilde, keep = out if with_derivative else (out, None)
    else:
        x_tilde, keep = draw(x2, noise, rank)
        keep = keep.to(x.dtype)
    x_tilde = x_tilde.reshape(x.shape)
    return (x_tilde, keep.reshape(x.shape)) if with_derivative else x_tilde
