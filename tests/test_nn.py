"""FusedEncoder: a drop-in for nn.Linear + activation that keeps the statistics of its pass."""

import pytest
import torch

import fastae
from fastae import reference
from fastae.nn import FusedEncoder


def test_same_parameters_and_init_as_linear():
    torch.manual_seed(3)
    linear = torch.nn.Linear(7, 5)
    torch.manual_seed(3)
    fused = FusedEncoder(7, 5, "tanh")

    assert [n for n, _ in fused.named_parameters()] == ["weight", "bias"]
    assert torch.equal(fused.weight, linear.weight)
    assert torch.equal(fused.bias, linear.bias)


def test_loads_linear_state_dict_and_matches_linear_plus_activation():
    linear = torch.nn.Linear(6, 4)
    fused = FusedEncoder(6, 4, "sigmoid")
    fused.load_state_dict(linear.state_dict())
    x = torch.randn(9, 6)

    torch.testing.assert_close(fused(x), torch.sigmoid(linear(x)))


def test_inside_sequential_and_stats_match_reference():
    model = torch.nn.Sequential(FusedEncoder(5, 3, "softplus"), torch.nn.Linear(3, 5))
    x = torch.randn(11, 5, dtype=torch.float64)
    model = model.double()
    model(x)
    layer = model[0]
    _, expected = reference.encode(x, layer.weight, layer.bias, "softplus")

    stats = layer.last_stats
    torch.testing.assert_close(stats.contractive, expected.contractive)
    torch.testing.assert_close(stats.rho_hat, expected.rho_hat)
    torch.testing.assert_close(stats.l1, expected.l1)


def test_stats_are_differentiable():
    layer = FusedEncoder(4, 3).double()
    x = torch.randn(8, 4, dtype=torch.float64)
    layer(x)
    layer.last_stats.contractive.backward()
    expected = torch.autograd.grad(
        reference.contractive_penalty(x, layer.weight, layer.bias), layer.weight
    )[0]

    torch.testing.assert_close(layer.weight.grad, expected)


def test_exported_from_package():
    assert fastae.nn.FusedEncoder is FusedEncoder


@pytest.mark.parametrize("bad", [0, -1, 2.5])
def test_bad_width_is_an_error(bad):
    with pytest.raises(ValueError, match="out_features"):
        FusedEncoder(3, bad)


def test_unknown_activation_is_an_error():
    with pytest.raises(ValueError, match="activation: got 'gelu'"):
        FusedEncoder(3, 2, "gelu")


def test_deepcopy_after_a_forward_with_gradients():
    # last_stats hangs on the forward's autograd graph; a copy starts without it, as a fresh
    # layer does, and computes the same thing.
    import copy

    layer = FusedEncoder(6, 4, backend="torch").double()
    x = torch.rand(3, 6, dtype=torch.float64)
    h = layer(x)
    clone = copy.deepcopy(layer)
    assert clone.last_stats is None and layer.last_stats is not None
    assert clone.weight is not layer.weight and torch.equal(clone.weight, layer.weight)
    assert torch.equal(clone(x), h)
    torch.testing.assert_close(clone.last_stats.contractive, layer.last_stats.contractive)
