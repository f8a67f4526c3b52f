"""Input corruption drawn inside the encoder kernels: x~ is made as each tile of x loads.

A denoising autoencoder encodes a corrupted copy x~ of its batch x (B, D). Instead of writing
x~ to memory, the kernels draw it from a counter-based random stream: the random numbers of entry
(r, c) are Philox4x32-10 (tl.randint4x) of the 64-bit counter r * D + c under a 64-bit key. Any
program that loads a tile of x can therefore rebuild the same tile of x~: the forward (a = x~ W^T
+ b), the dL/dW kernel (delta^T x~) and the dL/dx kernel (the mask dx~/dx) all call the jit
helpers below, and x~ never exists as a (B, D) tensor.

The corruptions (NOISE codes), with u0, u1 uniform in [0, 1) from the first two Philox words:

    1 gaussian          y = x + level * n,  n = sqrt(-2 log u0) cos(2 pi u1)   (Box-Muller)
                        x~ = clamp(y, low, high),     dx~/dx = 1[low <= y <= high]
    2 masking           x~ = 0 where u0 < level, x elsewhere,     dx~/dx = 1[u0 >= level]
    3 salt-and-pepper   x~ = (high if u1 < 1/2 else low) where u0 < level, x elsewhere,
                        dx~/dx = 1[u0 >= level]

The counter is the logical index r * D + c (int64, whatever the strides of x), passed whole to
tl.randint4x, which since triton 3.0 feeds its low and high 32 bits into two counter words: no
limit at 2^31 entries. The key is made on the host from (seed, step) (and the rank in a process
group) by fastae.functional.noise; it always has bit 62 set so that Triton types it int64 on every
call (one compiled kernel, not an int32 and an int64 variant), and kernels do not specialize on
its value.

fastae.kernels.materialize_noise is the debug path: a small kernel that writes the x~ (and
optionally dx~/dx) that the encoder kernels use for a key, from the same helpers.
"""

from typing import NamedTuple

import triton
import triton.language as tl

# NOISE constexpr codes; 0 means no corruption (the kernels then draw nothing).
NOISE_NONE = 0
NOISE_CODES = {"gaussian": 1, "masking": 2, "salt-and-pepper": 3}


@triton.jit
def _uniform_pair(key, offsets):
    """Two independent uniforms in [0, 1) (fp32) for each counter in `offsets` (int64)."""
    r0, r1, _, _ = tl.randint4x(key, offsets)
    u0 = tl.random.uint_to_uniform_float(r0)
    u1 = tl.random.uint_to_uniform_float(r1)
    return u0, u1


@triton.jit
def corrupt_tile(
    x,  # tile of x as loaded, any float dtype
    key,  # int64 key of the stream
    offsets,  # int64 tile of logical indices r * D + c, broadcastable to x
    mask,  # bool tile: the valid entries (x~ is 0 elsewhere, like the padding of x)
    level,  # sigma (gaussian) or the fraction nu (masking, salt-and-pepper)
    low,  # lower end of the data range
    high,  # upper end of the data range
    NOISE: tl.constexpr,  # 1 gaussian, 2 masking, 3 salt-and-pepper
    ACC_DTYPE: tl.constexpr,  # dtype the gaussian sum is formed in
):
    """x~ for the tile, in the dtype of x (what tl.dot consumes)."""
    u0, u1 = _uniform_pair(key, offsets)
    if NOISE == 1:
        normal, _ = tl.random.pair_uniform_to_normal(u0, u1)
        y = x.to(ACC_DTYPE) + level * normal.to(ACC_DTYPE)
        x_tilde = tl.minimum(tl.maximum(y, low), high).to(x.dtype)
    elif NOISE == 2:
        x_tilde = tl.where(u0 < level, 0.0, x).to(x.dtype)
    else:
        value = tl.where(u1 < 0.5, high, low)
        x_tilde = tl.where(u0 < level, value, x).to(x.dtype)
    return tl.where(mask, x_tilde, 0.0).to(x.dtype)


@triton.jit
def corrupt_derivative_tile(
    x,  # tile of x as loaded, any float dtype
    key,  # int64 key of the stream
    offsets,  # int64 tile of logical indices r * D + c, broadcastable to x
    level,  # sigma (gaussian) or the fraction nu (masking, salt-and-pepper)
    low,  # lower end of the data range
    high,  # upper end of the data range
    NOISE: tl.constexpr,  # 1 gaussian, 2 masking, 3 salt-and-pepper
    ACC_DTYPE: tl.constexpr,  # dtype of the result
):
    """dx~/dx for the tile: 1 where x~ follows x, 0 where it was clipped or replaced."""
    u0, u1 = _uniform_pair(key, offsets)
    if NOISE == 1:
        normal, _ = tl.random.pair_uniform_to_normal(u0, u1)
        y = x.to(ACC_DTYPE) + level * normal.to(ACC_DTYPE)
        keep = (y >= low) & (y <= high)
    else:
        keep = u0 >= level
    return tl.where(keep, 1.0, 0.0).to(ACC_DTYPE)


class NoiseArgs(NamedTuple):
    """What the launchers pass to a kernel about the corruption (built by
    fastae.functional.noise.Noise.kernel_args)."""

    code: int
    """A value of NOISE_CODES."""

    key: int
    """The int64 key of the stream, bit 62 set."""

    level: float
    """sigma (gaussian) or the fraction nu (masking, salt-and-pepper)."""

    low: float
    """Lower end of the data range."""

    high: float
    """Upper end of the data range."""


def kernel_noise_args(noise: NoiseArgs | None) -> tuple[tuple, int]:
    """The four scalar kernel arguments (key, level, low, high) and the NOISE constexpr; dummies
    of the same types and NOISE_NONE when there is no corruption."""
    if noise is None:
        return (1 << 62, 0.0, 0.0, 1.0), NOISE_NONE
    return (noise.key, float(noise.level), float(noise.low), float(noise.high)), noise.code
