"""The deep contractive penalty against explicit Jacobians, a hand-worked case, gradcheck, and the
statistics of the probe estimate."""

import math

import pytest
import torch

import fastae
from fastae.activations import get_activation
from fastae.functional.deep import DEFAULT_K
from fastae.functional.deep import _gram_cost
from fastae.functional.deep import deep_contractive_penalty
from fastae.functional.deep import exact_cost
from fastae.reference import jacobian_penalty
from fastae.reference import jacobians

F64 = torch.float64

# Widths [D, H_1, ..., H_L]: undercomplete (code side cheaper) and overcomplete (input side).
SHAPES = [
    pytest.param([7, 5, 3], id="2-layer-under"),
    pytest.param([3, 6, 9], id="2-layer-over"),
    pytest.param([8, 6, 5, 2], id="3-layer-under"),
    pytest.param([3, 8, 4, 10], id="3-layer-over"),
]
ACTIVATIONS = ["sigmoid", "tanh", "relu"]


def make_layers(widths, activation, dtype=F64, bias=True, requires_grad=False):
    """Layers with weights of scale 1/sqrt(fan_in), so every penalty is O(1)."""
    layers = []
    for fan_in, fan_out in zip(widths[:-1], widths[1:], strict=True):
        weight = (torch.randn(fan_out, fan_in, dtype=dtype) / math.sqrt(fan_in)).requires_grad_(
            requires_grad
        )
        b = torch.randn(fan_out, dtype=dtype).mul_(0.5).requires_grad_(requires_grad)
        layers.append((weight, b if bias else None, activation))
    return layers


def plain_encoder(layers):
    """The same encoder in plain torch ops (no fastae.encode), for the reference."""

    def run(x):
        for weight, bias, activation in layers:
            a = x @ weight.t()
            if bias is not None:
                a = a + bias
            x = get_activation(activation).forward(a)
        return x

    return run


def min_abs_preactivation(x, layers):
    low = math.inf
    for weight, bias, activation in layers:
        a = x @ weight.t() + (bias if bias is not None else 0)
        low = min(low, a.abs().min().item())
        x = get_activation(activation).forward(a)
    return low


def relu_safe_input(widths, layers, batch=5, margin=1e-3):
    """Inputs whose pre-activations all stay at least margin away from the relu kink."""
    for _ in range(100):
        x = torch.randn(batch, widths[0], dtype=F64)
        if min_abs_preactivation(x, layers) > margin:
            return x
    raise AssertionError("no input away from the relu kink in 100 draws")


@pytest.mark.parametrize("widths", SHAPES)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_exact_matches_reference_jacobian(widths, activation):
    layers = make_layers(widths, activation)
    x = relu_safe_input(widths, layers, batch=6)
    expected = jacobian_penalty(plain_encoder(layers), x)

    for side in ("code", "input"):
        result = fastae.deep_encode(x, layers, penalty="exact", side=side, backend="torch")
        assert result.penalty.method == "exact" and result.penalty.side == side
        assert abs(result.penalty.value.item() - expected.item()) <= 1e-10, side

    # "auto" at these widths is exact, from the side with fewer multiply-adds.
    auto = fastae.deep_encode(x, layers, backend="torch").penalty
    cost = exact_cost(x.shape[0], widths)
    assert auto.method == "exact" and auto.k == 0
    assert auto.side == ("code" if cost["code"] <= cost["input"] else "input")
    assert auto.side == ("code" if widths[-1] < widths[0] else "input")
    assert abs(auto.value.item() - expected.item()) <= 1e-10


@pytest.mark.parametrize(
    ("widths", "batch", "gram"),
    [([12, 4, 3], 32, True), ([12, 10, 3], 1, False), ([9, 4, 5, 3], 16, True)],
)
def test_code_side_gram_and_direct_routes(widths, batch, gram):
    # The last factor D_1 W_1 goes through G = W_1 W_1^T only when that is cheaper.
    assert (
        _gram_cost(batch, widths[-1], widths[1], widths[0])
        < batch * widths[-1] * widths[1] * widths[0]
    ) == gram
    layers = make_layers(widths, "tanh")
    x = torch.randn(batch, widths[0], dtype=F64)
    expected = jacobian_penalty(plain_encoder(layers), x)
    got = fastae.deep_encode(x, layers, penalty="exact", side="code").penalty.value
    assert abs(got.item() - expected.item()) <= 1e-10


@pytest.mark.parametrize("activation", ["sigmoid", "tanh", "relu", "softplus", "identity"])
def test_single_layer_equals_closed_form(activation):
    layers = make_layers([6, 4], activation)
    x = relu_safe_input([6, 4], layers)
    result = fastae.deep_encode(x, layers, penalty="exact", backend="torch")
    closed_form = result.stats[0].contractive
    torch.testing.assert_close(result.penalty.value, closed_form, rtol=0, atol=1e-12)
    expected = jacobian_penalty(plain_encoder(layers), x)
    assert abs(result.penalty.value.item() - expected.item()) <= 1e-10


def test_hand_case_relu():
    # a_1 = [1, -1] -> h_1 = [1, 0], D_1 = diag(1, 0); a_2 = 1 -> D_2 = 1.
    # J = [1, 1] diag(1, 0) [[1, 0], [0, -1]] = [1, 0], so ||J||_F^2 = 1.
    w1 = torch.tensor([[1.0, 0.0], [0.0, -1.0]], dtype=F64)
    w2 = torch.tensor([[1.0, 1.0]], dtype=F64)
    x = torch.tensor([[1.0, 1.0]], dtype=F64)
    layers = [(w1, None, "relu"), (w2, None, "relu")]

    for side in ("code", "input"):
        penalty = fastae.deep_encode(x, layers, penalty="exact", side=side).penalty
        assert penalty.value.item() == 1.0, side

    # The two wrong quantities: the raw weight product [1, -1] (2.0 squared, sqrt(2) not), and
    # the code layer's own one-layer closed form f'^2 ||W_2||^2 = 2.
    raw = (w2 @ w1).square().sum()
    assert raw.item() == 2.0 and abs(raw.sqrt().item() - math.sqrt(2.0)) < 1e-15
    _, last_stats = fastae.encode(torch.relu(x @ w1.t()), w2, None, "relu")
    assert last_stats.contractive.item() == 2.0
    assert jacobian_penalty(plain_encoder(layers), x).item() == 1.0


@pytest.mark.parametrize(
    ("widths", "activation", "side"),
    [
        ([5, 4, 3], "sigmoid", "code"),
        ([5, 4, 3], "tanh", "input"),
        ([3, 4, 2, 5], "tanh", "code"),
        ([3, 4, 2, 5], "sigmoid", "input"),
        ([4, 3, 2], "relu", "code"),
    ],
)
def test_gradcheck_exact(widths, activation, side):
    layers = make_layers(widths, activation)
    x = relu_safe_input(widths, layers, batch=3, margin=1e-2)
    params = [x] + [t for w, b, _ in layers for t in (w, b)]
    params = [p.clone().requires_grad_(True) for p in params]

    def penalty(x, *flat):
        rebuilt = [(flat[2 * i], flat[2 * i + 1], activation) for i in range(len(layers))]
        return fastae.deep_encode(
            x, rebuilt, penalty="exact", side=side, backend="torch"
        ).penalty.value

    assert torch.autograd.gradcheck(penalty, params, eps=1e-6, atol=1e-8)


def test_gradcheck_estimate():
    widths, activation = [4, 3, 2], "tanh"
    layers = make_layers(widths, activation)
    x = torch.randn(3, widths[0], dtype=F64)
    params = [
        p.clone().requires_grad_(True) for p in [x] + [t for w, b, _ in layers for t in (w, b)]
    ]

    def penalty(x, *flat):
        rebuilt = [(flat[2 * i], flat[2 * i + 1], activation) for i in range(len(layers))]
        generator = torch.Generator().manual_seed(7)  # the same probes on every call
        return fastae.deep_encode(
            x, rebuilt, penalty="estimate", k=3, generator=generator, backend="torch"
        ).penalty.value

    assert torch.autograd.gradcheck(penalty, params, eps=1e-6, atol=1e-8)


@pytest.mark.parametrize("side", ["code", "input"])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_gradients_match_reference(activation, side):
    # Plain first-order backward of the penalty against autograd through explicit Jacobians.
    widths = [6, 5, 4, 3]
    layers = make_layers(widths, activation)
    x = relu_safe_input(widths, layers, batch=4)
    x.requires_grad_(True)
    for weight, bias, _ in layers:
        weight.requires_grad_(True)
        bias.requires_grad_(True)
    leaves = [x] + [t for w, b, _ in layers for t in (w, b)]

    result = fastae.deep_encode(x, layers, penalty="exact", side=side, backend="torch")
    got = torch.autograd.grad(result.penalty.value, leaves, materialize_grads=True)
    reference = jacobian_penalty(plain_encoder(layers), x)
    expected = torch.autograd.grad(reference, leaves, materialize_grads=True)
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12)


def rademacher_variance(jac, k):
    """Exact variance of the batch-mean estimate: per sample 2 (||A||_F^2 - sum_i A_ii^2) / k,
    A = J^T J, and the B samples' probes are independent."""
    gram = jac.transpose(1, 2) @ jac
    per_sample = 2 * (gram.square().sum((1, 2)) - gram.diagonal(dim1=1, dim2=2).square().sum(1))
    return per_sample.sum().item() / (k * jac.shape[0] ** 2)


@pytest.mark.parametrize("k", [1, 4, 16])
def test_estimate_is_unbiased(k):
    widths, activation, draws = [6, 5, 3], "tanh", 2000
    layers = make_layers(widths, activation)
    x = torch.randn(4, widths[0], dtype=F64)
    codes = [fastae.deep_encode(x, layers[:i], penalty="exact").h for i in (1, 2)]
    exact = deep_contractive_penalty(codes, layers, penalty="exact").value.item()

    generator = torch.Generator().manual_seed(1234 + k)
    samples = torch.stack(
        [
            deep_contractive_penalty(
                codes, layers, penalty="estimate", k=k, generator=generator
            ).value
            for _ in range(draws)
        ]
    )
    mean, var = samples.mean().item(), samples.var().item()
    standard_error = math.sqrt(var / draws)
    assert abs(mean - exact) <= 3 * standard_error, (mean, exact, standard_error)

    # The measured variance agrees with the Rademacher formula within 4 of its standard errors.
    expected_var = rademacher_variance(jacobians(plain_encoder(layers), x), k)
    centred = (samples - samples.mean()).square()
    var_standard_error = centred.std().item() / math.sqrt(draws)
    assert abs(var - expected_var) <= 4 * var_standard_error, (var, expected_var)


def test_estimate_gradient_is_unbiased():
    # The estimate is linear in v v^T, so its gradient is an unbiased estimate of the exact one.
    widths, draws = [5, 4, 3], 1000
    layers = make_layers(widths, "sigmoid")
    x = torch.randn(3, widths[0], dtype=F64)
    weight = layers[0][0].clone().requires_grad_(True)
    layers = [(weight, layers[0][1], "sigmoid"), layers[1]]

    def gradient(**kwargs):
        value = fastae.deep_encode(x, layers, **kwargs).penalty.value
        return torch.autograd.grad(value, weight)[0]

    exact = gradient(penalty="exact")
    generator = torch.Generator().manual_seed(5)
    samples = torch.stack(
        [gradient(penalty="estimate", k=2, generator=generator) for _ in range(draws)]
    )
    z = (samples.mean(0) - exact) / (samples.std(0) / math.sqrt(draws))
    # 20 entries: each within 4 standard errors.
    assert z.abs().max().item() <= 4.0, z


def test_gaussian_probes_are_unbiased():
    widths, draws, k = [5, 4, 2], 2000, 4
    layers = make_layers(widths, "sigmoid")
    x = torch.randn(3, widths[0], dtype=F64)
    exact = fastae.deep_encode(x, layers, penalty="exact").penalty.value.item()
    generator = torch.Generator().manual_seed(99)
    samples = torch.stack(
        [
            fastae.deep_encode(
                x, layers, penalty="estimate", k=k, generator=generator, probes="gaussian"
            ).penalty.value
            for _ in range(draws)
        ]
    )
    standard_error = samples.std().item() / math.sqrt(draws)
    assert abs(samples.mean().item() - exact) <= 3 * standard_error


def test_estimate_is_reproducible_with_a_generator():
    layers = make_layers([5, 4, 2], "tanh")
    x = torch.randn(3, 5, dtype=F64)

    def run(seed):
        generator = torch.Generator().manual_seed(seed)
        return fastae.deep_encode(x, layers, penalty="estimate", generator=generator).penalty

    first, again, other = run(3), run(3), run(4)
    assert first.method == "estimate" and first.k == DEFAULT_K
    assert first.value.item() == again.value.item()
    assert first.value.item() != other.value.item()


def test_auto_falls_back_to_estimate_when_exact_is_too_costly():
    # min(D, H_L) = 150: from the input side the exact penalty costs D (H_2 H_1) + H_1 D
    # multiply-adds per sample, about 100 forward passes (H_1 D + H_2 H_1) > EXACT_BUDGET = 64.
    layers = make_layers([300, 200, 150], "sigmoid", dtype=torch.float32)
    x = torch.randn(2, 300)
    cost = exact_cost(2, [300, 200, 150])
    assert 64 < min(cost["code"], cost["input"]) / cost["forward"] < 128
    penalty = fastae.deep_encode(x, layers, generator=torch.Generator().manual_seed(0)).penalty
    assert (penalty.method, penalty.k) == ("estimate", DEFAULT_K)
    penalty = fastae.deep_encode(x, layers, k=5).penalty
    assert (penalty.method, penalty.k) == ("estimate", 5)

    # A 784-256-32 encoder is exact from the code side.
    layers = make_layers([784, 256, 32], "sigmoid", dtype=torch.float32)
    penalty = fastae.deep_encode(torch.rand(2, 784), layers).penalty
    assert (penalty.method, penalty.side, penalty.k) == ("exact", "code", 0)


def test_float32_and_leading_dimensions():
    layers = make_layers([6, 5, 3], "sigmoid", dtype=torch.float32)
    x = torch.randn(2, 3, 6)
    result = fastae.deep_encode(x, layers, penalty="exact")
    assert result.h.shape == (2, 3, 3) and result.penalty.value.dtype == torch.float32
    expected = jacobian_penalty(plain_encoder(layers), x.reshape(6, 6))
    torch.testing.assert_close(result.penalty.value, expected, rtol=1e-5, atol=1e-7)
    # The per-layer statistics are those of fastae.encode on each layer's input.
    torch.testing.assert_close(result.stats[-1].rho_hat, result.h.reshape(6, 3).mean(0))
    assert len(result.stats) == 2


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs_accumulate_in_float32(dtype):
    layers = make_layers([8, 6, 3], "sigmoid", dtype=dtype)
    x = torch.randn(5, 8, dtype=dtype)
    value = fastae.deep_encode(x, layers, penalty="exact").penalty.value
    assert value.dtype == torch.float32
    layers64 = [(w.double(), b.double(), act) for w, b, act in layers]
    expected = jacobian_penalty(plain_encoder(layers64), x.double())
    # Loose on purpose: the codes h_l themselves are rounded to 8 (bf16) or 11 (fp16) bits.
    torch.testing.assert_close(value.double(), expected, rtol=2e-2, atol=0)


def test_bad_arguments_are_named():
    layers = make_layers([4, 3, 2], "tanh")
    x = torch.randn(2, 4, dtype=F64)
    with pytest.raises(ValueError, match=r"layers\[1\] weight: got shape \(2, 5\)"):
        fastae.deep_encode(x, [layers[0], (torch.randn(2, 5, dtype=F64), None, "tanh")])
    with pytest.raises(ValueError, match=r"layers\[0\]: got"):
        fastae.deep_encode(x, [(layers[0][0], None)])
    with pytest.raises(ValueError, match="layers: got"):
        fastae.deep_encode(x, [])
    with pytest.raises(ValueError, match="penalty: got 'fast'"):
        fastae.deep_encode(x, layers, penalty="fast")
    with pytest.raises(ValueError, match="k: got 0"):
        fastae.deep_encode(x, layers, penalty="estimate", k=0)
    with pytest.raises(ValueError, match="side: got 'left'"):
        fastae.deep_encode(x, layers, side="left")
    with pytest.raises(TypeError, match=r"layers\[1\]: bias: got dtype torch.float32"):
        fastae.deep_encode(x, [layers[0], (layers[1][0], torch.zeros(2), "tanh")])
    codes = [torch.rand(2, 3, dtype=F64), torch.rand(2, 3, dtype=F64)]
    with pytest.raises(ValueError, match=r"codes\[1\]: got shape \(2, 3\), expected \(2, 2\)"):
        deep_contractive_penalty(codes, layers)
    with pytest.raises(ValueError, match="codes: got"):
        deep_contractive_penalty(codes[:1], layers)
    with pytest.raises(ValueError, match="activation: got 'gelu'"):
        fastae.deep_encode(x, [(layers[0][0], None, "gelu")])
