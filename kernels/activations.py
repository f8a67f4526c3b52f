"""Activations for the Triton kernels: f(a) in the forward epilogue, f'(a) and f''(a) from h.

The kernels save only h, so the derivatives are written in terms of h exactly as in
fastae/activations.py (DESIGN section 1). ACTIVATION is the constexpr `Activation.code`:

    code  activation  f(a)                             f'(a) from h   f''(a) from h
    0     sigmoid     1 / (1 + e^-a)                   h (1 - h)      f' (1 - 2h)
    1     tanh        sign(a) (-m) / (2 + m)           1 - h^2        -2 h f'
    2     relu        max(a, 0)                        1[h > 0]       0
    3     softplus    max(a, 0) + log(1 + e^-|a|)      -(e^-h - 1)    f' e^-h
    4     identity    a                                1              0

with m = e^(-2|a|) - 1 in (-1, 0].

Triton has no tanh, expm1 or log1p that the interpreter also runs, so they are built here from
exp and log. Near 0, `exp(x) - 1` and `log(1 + t)` cancel catastrophically (tanh(1e-4) would
lose four digits), so small arguments take a short series instead; large |a| only ever meets
exp of a non-positive number, which cannot overflow.
"""

import triton
import triton.language as tl

# Below this |x| the series for e^x - 1 is used: 0.25^14 / 14! < 1e-19, so thirteen terms are
# exact in fp64, while above it e^x - 1 loses at most a factor 1 / (1 - e^-0.25) ~ 4.5 in
# relative error, i.e. about two bits.
_EXPM1_SERIES_BOUND = tl.constexpr(0.25)
# Below this t the series for log(1 + t) is used: with s = t / (2 + t) < 1/9, nine terms of
# 2 (s + s^3/3 + ...) reach 1e-19; above it 1 + t >= 1.25 and log(1 + t) has no cancellation.
_LOG1P_SERIES_BOUND = tl.constexpr(0.25)


@triton.jit
def _expm1(x):
    """e^x - 1, accurate in relative terms for every x <= 0 (and small positive x)."""
    # Horner form of sum_{k=1..13} x^k / k!, fed 0 where it is not used so it cannot overflow.
    small = tl.abs(x) < _EXPM1_SERIES_BOUND
    xs = tl.where(small, x, 0.0)
    p = xs * 1.6059043836821613e-10 + 2.08767569878681e-09
    p = p * xs + 2.505210838544172e-08
    p = p * xs + 2.755731922398589e-07
    p = p * xs + 2.7557319223985893e-06
    p = p * xs + 2.48015873015873e-05
    p = p * xs + 0.0001984126984126984
    p = p * xs + 0.001388888888888889
    p = p * xs + 0.008333333333333333
    p = p * xs + 0.041666666666666664
    p = p * xs + 0.16666666666666666
    p = p * xs + 0.5
    p = p * xs + 1.0
    return tl.where(small, p * xs, tl.exp(x) - 1.0)


@triton.jit
def _log1p(t):
    """log(1 + t) for t >= 0, accurate in relative terms also for tiny t."""
    # log(1 + t) = 2 atanh(s) = 2 sum_k s^(2k+1) / (2k + 1) with s = t / (2 + t), Horner in s^2.
    s = t / (2.0 + t)
    s2 = s * s
    p = s2 * 0.058823529411764705 + 0.06666666666666667
    p = p * s2 + 0.07692307692307693
    p = p * s2 + 0.09090909090909091
    p = p * s2 + 0.1111111111111111
    p = p * s2 + 0.14285714285714285
    p = p * s2 + 0.2
    p = p * s2 + 0.3333333333333333
    p = p * s2 + 1.0
    return tl.where(t < _LOG1P_SERIES_BOUND, 2.0 * s * p, tl.log(1.0 + t))


@triton.jit
def tanh(a):
    """tanh(a) = sign(a) (1 - e^-2|a|) / (1 + e^-2|a|): no overflow, exact sign, and relative
    accuracy near 0 through the e^x - 1 series."""
    m = _expm1(-2.0 * tl.abs(a))
    t = -m / (2.0 + m)
    return tl.where(a < 0, -t, t)


@triton.jit
def activation_forward(a, ACTIVATION: tl.constexpr):
    """h = f(a) for the activation code ACTIVATION (a in the accumulation dtype)."""
    if ACTIVATION == 0:
        # sigmoid: e^-|a| <= 1 never overflows.
        e = tl.exp(-tl.abs(a))
        h = tl.where(a >= 0, 1.0 / (1.0 + e), e / (1.0 + e))
    elif ACTIVATION == 1:
        h = tanh(a)
    elif ACTIVATION == 2:
        h = tl.maximum(a, 0.0)
    elif ACTIVATION == 3:
        h = tl.maximum(a, 0.0) + _log1p(tl.exp(-tl.abs(a)))
    else:
        h = a
    return h


@triton.jit
def activation_d1(h, ACTIVATION: tl.constexpr):
    """f'(a) written in terms of h = f(a)."""
    if ACTIVATION == 0:
        d1 = h * (1.0 - h)
    elif ACTIVATION == 1:
        d1 = 1.0 - h * h
    elif ACTIVATION == 2:
        d1 = tl.where(h > 0, 1.0, 0.0).to(h.dtype)
    elif ACTIVATION == 3:
        d1 = -_expm1(-h)
    else:
        d1 = tl.full(h.shape, 1.0, h.dtype)
    return d1


@triton.jit
def activation_d2(h, d1, ACTIVATION: tl.constexpr):
    """f''(a) written in terms of h = f(a) and d1 = f'(a)."""
    if ACTIVATION == 0:
        d2 = d1 * (1.0 - 2.0 * h)
    elif ACTIVATION == 1:
        d2 = -2.0 * h * d1
    elif ACTIVATION == 3:
        d2 = d1 * tl.exp(-h)
    else:
        d2 = tl.zeros(h.shape, h.dtype)
    return d2
