"""The contractive penalty of a deep encoder: the Frobenius norm of the whole encoder's Jacobian.

An encoder of L fastae layers, h_0 = x and h_l = f_l(h_{l-1} W_l^T + b_l) with W_l of shape
(H_l, H_{l-1}) (H_0 = D), has for each sample b the Jacobian

    J_b = dh_L/dx = D_L W_L D_{L-1} W_{L-1} ... D_1 W_1        (H_L, D),  D_l = diag(f'_l(a_l))

and the penalty is C = (1/B) sum_b ||J_b||_F^2. The one-layer closed form sum_j f'_j^2 n_j holds
for L = 1 only; neither one layer's closed form nor the product of the raw weights is C.

Exact (penalty="exact"). J_b is multiplied out from whichever end is cheaper:

    code side   q = D_L W_L, then q <- (q D_l) W_l for l = L-1 .. 2: a (B, H_L, H_{l-1}) block;
                the last factor may use the Gram matrix G = W_1 W_1^T (H_1, H_1), shared by all
                samples:  ||q D_1 W_1||_F^2 = sum (q D_1 G) * (q D_1), cheaper than forming
                q D_1 W_1 when H_1 < D and the batch pays for building G.
                Cost ~ B H_L sum_l H_l H_{l-1}: right for undercomplete encoders (H_L < D).
    input side  t = D_1 W_1, then t <- D_l (W_l t) for l = 2 .. L: a (B, H_l, D) block
                (kept transposed, so that each step is one GEMM over B D rows).
                Cost ~ B D sum_l H_l H_{l-1}: right when D < H_L.

Both count their multiply-adds with exact_cost() and the cheaper side runs, so the cost grows
with min(D, H_L). For L = 1 the code side is the closed form itself.

Estimate (penalty="estimate"). For v with E[v v^T] = I, E ||J v||^2 = trace(J^T J) = ||J||_F^2,
so averaging ||J_b v_bi||^2 over k probes v_bi drawn independently for each sample is unbiased.
J v = D_L W_L ... D_1 W_1 v is k forward passes of the encoder's linear part: cost
B k sum_l H_l H_{l-1}, whatever D and H_L. Probes are Rademacher (entries +-1, the lower
variance) or Gaussian, drawn from an optional torch.Generator.

Gradients. Everything above is plain torch operations on the codes h_l, the weights and the
probes, with f'_l = f'(h_l) taken from the activation table as a function of h_l. Ordinary
first-order backward therefore differentiates the penalty w.r.t. every W_l, b_l and x: through
f'(h_l) (whose derivative f''(a_l) autograd obtains from the table's formula) and back through
each fastae.encode into the earlier layers. No create_graph, no double backward.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from fastae.activations import get_activation
from fastae.functional.checks import autocast_inputs
from fastae.functional.checks import check_encode_args
from fastae.functional.checks import check_tensor
from fastae.functional.checks import stats_dtype
from fastae.functional.checks import without_autocast
from fastae.functional.stats import EncodeStats

__all__ = [
    "DEFAULT_K",
    "EXACT_BUDGET",
    "DeepEncodeResult",
    "DeepPenalty",
    "choose_method",
    "deep_contractive_penalty",
    "deep_encode",
    "exact_cost",
]

# NOTE: "auto" runs the exact penalty when its multiply-adds are at most EXACT_BUDGET forward
# passes of the encoder's matmuls (B sum_l H_l H_{l-1}), i.e. roughly when min(D, H_L) <= 64.
# An estimate with k probes costs k forward passes, so past that point exact costs more than
# four DEFAULT_K estimates. Example: a 784-256-32 encoder is exact (code side, 32 rows).
# Measured by benchmarks/deep_penalty_cost.py (B = 128, float32, forward + backward, 2-core CPU
# under load): 784-256-32 exact/code 127 ms vs estimate 410 ms (cost ratio 12, exact chosen);
# 784-512-128 exact/code 1471 ms vs estimate 257 ms (ratio 75, estimate chosen).
EXACT_BUDGET = 64

# Probes used by "estimate" (and "auto" when it falls back to it) unless k is given. The
# relative standard deviation of one sample's estimate is at most sqrt(2 / k) for Rademacher
# probes (sqrt(2) for k = 1, 0.35 for k = 16), and the batch mean averages B independent ones.
DEFAULT_K = 16

PENALTIES = ("auto", "exact", "estimate")
SIDES = ("auto", "code", "input")
PROBES = ("rademacher", "gaussian")


class DeepPenalty(NamedTuple):
    """The whole-encoder contractive penalty and how it was computed."""

    value: Tensor
    """Scalar, fp32 (fp64 for fp64 inputs): (1/B) sum_b ||dh_L/dx_b||_F^2, exact or estimated."""

    method: str
    """Either "exact" or "estimate"."""

    side: str
    """For "exact": "code" (rows of J from the code side) or "input" (columns from the input
    side). For "estimate": "input" (forward-mode probes J v)."""

    k: int
    """Number of random probes per sample for "estimate"; 0 for "exact"."""


class DeepEncodeResult(NamedTuple):
    """What deep_encode returns."""

    h: Tensor
    """(*, H_L): the code, in the dtype of x."""

    stats: list[EncodeStats]
    """One EncodeStats per layer (stats[-1].rho_hat and .l1 are those of the code). Each
    .contractive is that layer's own one-layer term, not the deep penalty."""

    penalty: DeepPenalty
    """The contractive penalty of the whole encoder x -> h_L."""


def _check_layers(layers: object, features: int | None) -> list[tuple[Tensor, Tensor | None, str]]:
    """Each layer is (weight (H_l, H_{l-1}), bias (H_l,) or None, activation name); H_0 is
    features, or the width of the first weight when features is None."""
    if not isinstance(layers, Sequence) or len(layers) == 0:
        raise ValueError(
            f"layers: got {layers!r:.80}, expected a non-empty sequence of (weight, bias or "
            "None, activation)"
        )
    checked = []
    width = features
    for i, layer in enumerate(layers):
        if not isinstance(layer, (tuple, list)) or len(layer) != 3:
            raise ValueError(
                f"layers[{i}]: got {layer!r:.80}, expected a tuple (weight, bias or None, "
                "activation)"
            )
        weight, bias, activation = layer
        check_tensor(f"layers[{i}] weight", weight)
        get_activation(activation)
        if width is None and weight.dim() == 2:
            width = weight.shape[1]
        if weight.dim() != 2 or weight.shape[1] != width:
            raise ValueError(
                f"layers[{i}] weight: got shape {tuple(weight.shape)}, expected (H, {width}) to "
                f"take the {'input' if i == 0 else f'output of layers[{i - 1}]'} of width {width}"
            )
        checked.append((weight, bias, activation))
        width = weight.shape[0]
    return checked


def exact_cost(batch: int, widths: Sequence[int]) -> dict[str, int]:
    """Multiply-adds of the exact penalty from each side, for widths [D, H_1, ..., H_L].

    Returns {"code": ..., "input": ..., "forward": ...}, "forward" being the encoder's own
    matmuls B sum_l H_l H_{l-1}, the unit of EXACT_BUDGET.
    """
    dims = list(widths)
    depth = len(dims) - 1
    features, code = dims[0], dims[-1]
    forward = batch * sum(dims[i] * dims[i - 1] for i in range(1, depth + 1))

    if depth == 1:
        code_side = batch * code
    else:
        first = dims[1]
        code_side = batch * code * dims[depth - 1]
        code_side += sum(batch * code * dims[i] * dims[i - 1] for i in range(2, depth))
        code_side += _last_factor_cost(batch, code, first, features)

    input_side = batch * dims[1] * features
    input_side += sum(batch * features * dims[i] * dims[i - 1] for i in range(2, depth + 1))
    return {"code": code_side, "input": input_side, "forward": forward}


def choose_method(
    batch: int,
    widths: Sequence[int],
    *,
    penalty: str = "auto",
    k: int | None = None,
    side: str = "auto",
) -> tuple[str, str, int]:
    """How deep_contractive_penalty computes the penalty for widths [D, H_1, ..., H_L].

    Returns (method, side, k) as in DeepPenalty: "auto" becomes "exact" when the cheaper side
    costs at most EXACT_BUDGET forward passes, else "estimate"; side "auto" becomes the cheaper
    side; k is the number of probes of an estimate (DEFAULT_K unless given), 0 for exact. The
    choice needs only the shapes, so a model can report it before its first batch.
    """
    if penalty not in PENALTIES:
        raise ValueError(f"penalty: got {penalty!r}, expected one of {', '.join(PENALTIES)}")
    if side not in SIDES:
        raise ValueError(f"side: got {side!r}, expected one of {', '.join(SIDES)}")
    cost = exact_cost(batch, widths)
    if penalty == "auto":
        affordable = min(cost["code"], cost["input"]) <= EXACT_BUDGET * cost["forward"]
        penalty = "exact" if affordable else "estimate"
    if penalty == "estimate":
        return "estimate", "input", DEFAULT_K if k is None else k
    if side == "auto":
        side = "code" if cost["code"] <= cost["input"] else "input"
    return "exact", side, 0


def _last_factor_cost(batch: int, code: int, first: int, features: int) -> int:
    """Multiply-adds of ||q D_1 W_1||_F^2 for q of shape (B, H_L, H_1): the cheaper of the
    direct product and the Gram route (G = W_1 W_1^T once, then q D_1 G)."""
    return min(batch * code * first * features, _gram_cost(batch, code, first, features))


def _gram_cost(batch: int, code: int, first: int, features: int) -> int:
    return batch * code * first * first + first * first * features


def _rows_times(u: Tensor, matrix: Tensor) -> Tensor:
    """(B, m, n) @ (n, p) -> (B, m, p) as one 2-D GEMM over the B * m rows."""
    batch, rows, inner = u.shape
    return (u.reshape(batch * rows, inner) @ matrix).view(batch, rows, matrix.shape[1])


def _exact_code_side(derivs: list[Tensor], weights: list[Tensor]) -> Tensor:
    """Per-sample ||J_b||_F^2 (B,), multiplying J_b out row block by row block from h_L."""
    depth = len(weights)
    # One layer: the closed form sum_j f'_j^2 n_j.
    if depth == 1:
        return derivs[0].square() @ weights[0].square().sum(1)

    # q = D_L W_L: (B, H_L, H_{L-1}), then q <- (q D_l) W_l.
    q = derivs[-1].unsqueeze(2) * weights[-1]
    for layer in range(depth - 2, 0, -1):
        q = _rows_times(q * derivs[layer].unsqueeze(1), weights[layer])

    # Last factor D_1 W_1: through the Gram matrix when that is cheaper (H_1 < D and a batch
    # large enough to pay for building G), directly otherwise.
    q = q * derivs[0].unsqueeze(1)
    first = weights[0]
    batch, code, hidden = q.shape
    direct = batch * code * hidden * first.shape[1]
    if _gram_cost(batch, code, hidden, first.shape[1]) < direct:
        return (_rows_times(q, first @ first.t()) * q).sum(dim=(1, 2))
    return _rows_times(q, first).square().sum(dim=(1, 2))


def _exact_input_side(derivs: list[Tensor], weights: list[Tensor]) -> Tensor:
    """Per-sample ||J_b||_F^2 (B,), multiplying J_b out column block by column block from x."""
    # Kept transposed, t^T = (D_l W_l ... D_1 W_1)^T: (B, D, H_l), so that every step is a GEMM
    # over rows. t^T = W_1^T D_1, then t^T <- (t^T W_l^T) D_l.
    t = weights[0].t().unsqueeze(0) * derivs[0].unsqueeze(1)
    for layer in range(1, len(weights)):
        t = _rows_times(t, weights[layer].t()) * derivs[layer].unsqueeze(1)
    return t.square().sum(dim=(1, 2))


def _estimate(
    derivs: list[Tensor],
    weights: list[Tensor],
    k: int,
    generator: torch.Generator | None,
    probes: str,
) -> Tensor:
    """Per-sample unbiased estimates (B,) of ||J_b||_F^2 from k probes J_b v each."""
    batch, features = derivs[0].shape[0], weights[0].shape[1]
    dtype, device = weights[0].dtype, weights[0].device
    draw_device = generator.device if generator is not None else device
    shape = (batch, k, features)
    if probes == "rademacher":
        v = torch.randint(0, 2, shape, generator=generator, device=draw_device).to(dtype)
        v = v.mul_(2).sub_(1)
    else:
        v = torch.randn(shape, generator=generator, device=draw_device, dtype=dtype)
    u = v.to(device)

    # u <- (u W_l^T) D_l: the rows of u are the probes (J_b v)^T carried through the layers.
    for deriv, weight in zip(derivs, weights, strict=True):
        u = _rows_times(u, weight.t()) * deriv.unsqueeze(1)
    return u.square().sum(dim=(1, 2)) / k


def deep_contractive_penalty(
    codes: Sequence[Tensor],
    layers: Sequence[tuple[Tensor, Tensor | None, str]],
    *,
    penalty: str = "auto",
    k: int | None = None,
    generator: torch.Generator | None = None,
    side: str = "auto",
    probes: str = "rademacher",
) -> DeepPenalty:
    """The contractive penalty (1/B) sum_b ||dh_L/dx_b||_F^2 of a deep encoder, from its codes.

    Args:
        codes: h_1, ..., h_L, each (B, H_l), as produced by the layers (e.g. by fastae.encode);
            the penalty is differentiated through them, so pass them with their graph.
        layers: (weight (H_l, H_{l-1}), bias or None, activation) for l = 1 .. L; only the
            weights and activations are used here.
        penalty: "exact", "estimate", or "auto": exact when exact_cost() of the cheaper side is
            at most EXACT_BUDGET forward passes of the encoder, else an estimate.
        k: probes per sample for the estimate (default DEFAULT_K).
        generator: a torch.Generator for the probes (reproducible estimates).
        side: for "exact", "code", "input" or "auto" (the side with fewer multiply-adds).
        probes: "rademacher" (entries +-1) or "gaussian", both with identity covariance.

    Returns:
        DeepPenalty(value, method, side, k), value in fp32 (fp64 for fp64 codes).
    """
    if penalty not in PENALTIES:
        raise ValueError(f"penalty: got {penalty!r}, expected one of {', '.join(PENALTIES)}")
    if side not in SIDES:
        raise ValueError(f"side: got {side!r}, expected one of {', '.join(SIDES)}")
    if probes not in PROBES:
        raise ValueError(f"probes: got {probes!r}, expected one of {', '.join(PROBES)}")
    if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
        raise ValueError(f"k: got {k!r}, expected a positive integer number of probes")
    layers = _check_layers(layers, None)
    if not isinstance(codes, Sequence) or len(codes) != len(layers):
        raise ValueError(
            f"codes: got {codes!r:.80}, expected a sequence of {len(layers)} tensors, one per layer"
        )
    rows = None
    for i, (h, (weight, _, _)) in enumerate(zip(codes, layers, strict=True)):
        check_tensor(f"codes[{i}]", h)
        count = h.numel() // max(h.shape[-1], 1) if h.dim() >= 1 else 0
        rows = count if rows is None else rows
        if h.dim() < 1 or h.shape[-1] != weight.shape[0] or count != rows or count == 0:
            raise ValueError(
                f"codes[{i}]: got shape {tuple(h.shape)}, expected ({rows or 'B'}, "
                f"{weight.shape[0]}) to match layers[{i}] weight of shape {tuple(weight.shape)}"
            )

    # f'_l from h_l in the accumulation dtype; the weights follow.
    acc = stats_dtype(codes[0].dtype)
    derivs, weights = [], []
    for h, (weight, _, activation) in zip(codes, layers, strict=True):
        act = get_activation(activation)
        derivs.append(act.d1(h.reshape(-1, h.shape[-1]).to(acc)))
        weights.append(weight.to(acc))

    batch = derivs[0].shape[0]
    widths = [weights[0].shape[1]] + [w.shape[0] for w in weights]
    method, side, probes_k = choose_method(batch, widths, penalty=penalty, k=k, side=side)

    # In float32 (acc) even inside torch.autocast, like every statistic of fastae.
    with without_autocast(derivs[0].device):
        if method == "estimate":
            per_sample = _estimate(derivs, weights, probes_k, generator, probes)
        elif side == "code":
            per_sample = _exact_code_side(derivs, weights)
        else:
            per_sample = _exact_input_side(derivs, weights)
    if method == "estimate":
        return DeepPenalty(per_sample.mean(), "estimate", "input", probes_k)
    return DeepPenalty(per_sample.mean(), "exact", side, 0)


def deep_encode(
    x: Tensor,
    layers: Sequence[tuple[Tensor, Tensor | None, str]],
    *,
    penalty: str = "auto",
    k: int | None = None,
    generator: torch.Generator | None = None,
    backend: str = "auto",
    side: str = "auto",
    probes: str = "rademacher",
) -> DeepEncodeResult:
    """Run a deep encoder layer by layer with fastae.encode and compute its contractive penalty.

    Args:
        x: (B, D) inputs, or (*, D): leading dimensions are flattened into the batch.
        layers: a non-empty sequence of (weight (H_l, H_{l-1}), bias (H_l,) or None, activation)
            with H_0 = D, applied in order.
        penalty, k, generator, side, probes: see deep_contractive_penalty.
        backend: passed to fastae.encode for every layer.

    Returns:
        DeepEncodeResult(h, stats, penalty): the code (*, H_L) in the dtype of x, one EncodeStats
        per layer, and the DeepPenalty of the whole encoder. Everything is differentiable with
        ordinary backward.

    The penalty is a mean over the local batch and takes no process group; the Autoencoder
    turns it into a mean over every rank's batch (fastae.functional.distributed.global_mean).
    """
    # fastae.functional imports this module, so encode is looked up at call time.
    from fastae.functional import encode

    check_tensor("x", x)
    if x.dim() < 1:
        raise ValueError(f"x: got shape {tuple(x.shape)}, expected (B, D)")
    checked = _check_layers(layers, x.shape[-1])
    lead = x.shape[:-1]
    h = x.reshape(-1, x.shape[-1])

    codes, stats = [], []
    for i, (weight, bias, activation) in enumerate(checked):
        # Inside torch.autocast the previous code is in autocast's dtype and weight may not be.
        h, weight, bias = autocast_inputs(h, weight, bias)
        try:
            check_encode_args(h, weight, bias)
        except (TypeError, ValueError) as error:
            # "x" in these messages is this layer's input: x itself or the previous code.
            raise type(error)(f"layers[{i}]: {error}") from error
        h, layer_stats = encode(h, weight, bias, activation, backend=backend)
        codes.append(h)
        stats.append(layer_stats)

    result = deep_contractive_penalty(
        codes, checked, penalty=penalty, k=k, generator=generator, side=side, probes=probes
    )
    return DeepEncodeResult(h.reshape(*lead, h.shape[-1]), stats, result)
