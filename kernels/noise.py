"""Input corruption drawn inside the encoder kernels: x~ is made as each tile of x loads.

A denoising autoencoder encodes a corrupted copy x~ of its batch x (B, D). Instead of writing
x~ to memory, the kernels draw it from a counter-based random stream: Philox4x32-10
(tl.randint4x) under a 64-bit key. Any program that loads a tile of x can rebuild the same tile
of x~: the forward (a = x~ W^T + b), the dL/dW kernel (delta^T x~) and the dL/dx kernel (the
mask dx~/dx) all call the jit helpers below, and x~ never exists as a (B, D) tensor.

Counters: one Philox call gives four 32-bit words, and each word serves one entry: entries
(r, 4g), ..., (r, 4g + 3) take the words of counter r * ceil(D / 4) + g, in order. The counter
is the logical index (int64, whatever the strides of x), passed whole to tl.randint4x, which
since triton 3.0 feeds its low and high 32 bits into two counter words: no limit at 2^31
entries. Tiles start at multiples of 4 columns (BLOCK_D is a multiple of 4), so a tile draws
BLOCK_B x BLOCK_D / 4 counters and interleaves the four words with tl.join.

NOTE: the kernels draw every tile of x~ once per program that loads it, i.e. H / BLOCK_H times
in the forward and again H / BLOCK_H times in the dL/dW kernel, so the generator's cost is
multiplied by that; one Philox call per four entries (not one per entry) divides it by four.
Counted, not yet measured: at (B, D, H) = (4096, 1024, 4096) with BLOCK_H = 128 that is 32 draws
of x~ per kernel, about 2^27 Philox calls (10 rounds each) per training step, of the order of
the step's own time on an H200 unless it overlaps the tensor-core work;
tests/test_gpu.py::test_denoising_step_costs_at_most_1_1_times_a_clean_step measures the ratio.

The corruptions (NOISE codes), with u uniform in [0, 1) from the entry's word:

    1 gaussian          y = x + level * n,  n from Box-Muller on the words (0, 1) and (2, 3)
                        (cos for the first entry of the pair, sin for the second),
                        x~ = clamp(y, low, high),       dx~/dx = 1[low <= y <= high]
    2 masking           x~ = 0 where u < level, x elsewhere,       dx~/dx = 1[u >= level]
    3 salt-and-pepper   x~ = high where u < level / 2, low where level / 2 <= u < level, x
                        elsewhere (given a hit, u / level is uniform: salt or pepper with
                        probability 1/2 each),          dx~/dx = 1[u >= level]

The key is made on the host from (seed, step) (and the rank in a process group) by
fastae.functional.noise; it always has bit 62 set so that Triton types it int64 on every call
(one compiled kernel, not an int32 and an int64 variant), and kernels do not specialize on its
value.

fastae.kernels.materialize_noise is the debug path: a small kernel that writes the x~ (and
optionally dx~/dx) that the encoder kernels use for a key, from the same helpers.
"""

from typing import NamedTuple

import triton
import triton.language as tl

# NOISE constexpr codes; 0 means no corruption (the kernels then draw nothing).
NOISE_NONE = 0
NOISE_CODES = {"gaussian": 1, "masking": 2, "salt-and-pepper": 3}
# Entries per Philox call (its four output words).
WORDS = tl.constexpr(4)


@triton.jit
def _interleave(w0, w1, w2, w3, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr):
    """(BLOCK_B, BLOCK_D / 4) tiles -> (BLOCK_B, BLOCK_D) with column 4g + i from w_i[:, g]."""
    # join(join(w0, w2), join(w1, w3))[..., i, j] is w_(2i + j): row-major flattening of the two
    # new dimensions puts w0, w1, w2, w3 in order.
    words = tl.join(tl.join(w0, w2), tl.join(w1, w3))
    return tl.reshape(words, (BLOCK_B, BLOCK_D))


@triton.jit
def draw_tile(
    key,  # int64 key of the stream
    rows,  # (BLOCK_B,) int64 row indices
    col_start,  # first column of the tile, a multiple of 4
    D,  # number of features (columns of x)
    GAUSSIAN: tl.constexpr,  # standard normals if True, else uniforms in [0, 1)
    BLOCK_B: tl.constexpr,  # rows of the tile
    BLOCK_D: tl.constexpr,  # columns of the tile, a multiple of 4
):
    """One fp32 random number per entry of the tile (rows, col_start + [0, BLOCK_D))."""
    tl.static_assert(BLOCK_D % 4 == 0, "BLOCK_D must be a multiple of 4 (one Philox call)")
    groups = (D + WORDS - 1) // WORDS
    group = col_start // WORDS + tl.arange(0, BLOCK_D // WORDS)
    counters = rows.to(tl.int64)[:, None] * groups + group[None, :]
    r0, r1, r2, r3 = tl.randint4x(key, counters)
    u0 = tl.random.uint_to_uniform_float(r0)
    u1 = tl.random.uint_to_uniform_float(r1)
    u2 = tl.random.uint_to_uniform_float(r2)
    u3 = tl.random.uint_to_uniform_float(r3)
    if GAUSSIAN:
        n0, n1 = tl.random.pair_uniform_to_normal(u0, u1)
        n2, n3 = tl.random.pair_uniform_to_normal(u2, u3)
        return _interleave(n0, n1, n2, n3, BLOCK_B, BLOCK_D)
    else:
        return _interleave(u0, u1, u2, u3, BLOCK_B, BLOCK_D)


@triton.jit
def corrupt_tile(
    x,  # (BLOCK_B, BLOCK_D) tile of x as loaded, any float dtype
    key,  # int64 key of the stream
    rows,  # (BLOCK_B,) int64 row indices of the tile
    col_start,  # first column of the tile, a multiple of 4
    D,  # number of features
    mask,  # bool tile: the valid entries (x~ is 0 elsewhere, like the padding of x)
    level,  # sigma (gaussian) or the fraction nu (masking, salt-and-pepper)
    low,  # lower end of the data range
    high,  # upper end of the data range
    NOISE: tl.constexpr,  # 1 gaussian, 2 masking, 3 salt-and-pepper
    ACC_DTYPE: tl.constexpr,  # dtype the gaussian sum is formed in
    BLOCK_B: tl.constexpr,  # rows of the tile
    BLOCK_D: tl.constexpr,  # columns of the tile, a multiple of 4
):
    """x~ for the tile, in the dtype of x (what tl.dot consumes)."""
    draw = draw_tile(key, rows, col_start, D, NOISE == 1, BLOCK_B, BLOCK_D)
    if NOISE == 1:
        y = x.to(ACC_DTYPE) + level * draw.to(ACC_DTYPE)
        x_tilde = tl.minimum(tl.maximum(y, low), high).to(x.dtype)
    elif NOISE == 2:
        x_tilde = tl.where(draw < level, 0.0, x).to(x.dtype)
    else:
        value = tl.where(draw < 0.5 * level, high, low)
        x_tilde = tl.where(draw < level, value, x).to(x.dtype)
    return tl.where(mask, x_tilde, 0.0).to(x.dtype)


@triton.jit
def corrupt_derivative_tile(
    x,  # (BLOCK_B, BLOCK_D) tile of x as loaded, any float dtype
    key,  # int64 key of the stream
    rows,  # (BLOCK_B,) int64 row indices of the tile
    col_start,  # first column of the tile, a multiple of 4
    D,  # number of features
    level,  # sigma (gaussian) or the fraction nu (masking, salt-and-pepper)
    low,  # lower end of the data range
    high,  # upper end of the data range
    NOISE: tl.constexpr,  # 1 gaussian, 2 masking, 3 salt-and-pepper
    ACC_DTYPE: tl.constexpr,  # dtype of the result
    BLOCK_B: tl.constexpr,  # rows of the tile
    BLOCK_D: tl.constexpr,  # columns of the tile, a multiple of 4
):
    """dx~/dx for the tile: 1 where x~ follows x, 0 where it was clipped or replaced."""
    draw = draw_tile(key, rows, col_start, D, NOISE == 1, BLOCK_B, BLOCK_D)
    if NOISE == 1:
        y = x.to(ACC_DTYPE) + level * draw.to(ACC_DTYPE)
        keep = (y >= low) & (y <= high)
    else:
        keep = draw >= level
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
