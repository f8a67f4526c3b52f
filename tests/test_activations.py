"""The activation table: f' and f'' written in terms of h agree with autograd of f."""

import pytest
import torch

from fastae.activations import ACTIVATIONS
from fastae.activations import get_activation


@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
def test_derivatives_from_h_match_autograd(name):
    act = get_activation(name)
    # Away from relu's kink at 0; wide enough to reach the tails of sigmoid, tanh and softplus.
    a = torch.linspace(-6, 6, 241, dtype=torch.float64)
    a = a[a.abs() > 1e-3].requires_grad_(True)

    h = act.forward(a)
    (d1,) = torch.autograd.grad(h.sum(), a, create_graph=True)
    (d2,) = torch.autograd.grad(d1.sum(), a) if d1.requires_grad else (torch.zeros_like(a),)

    torch.testing.assert_close(act.d1(h.detach()), d1.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(act.d2(h.detach()), d2, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
def test_outputs_stay_in_the_documented_range(name):
    act = get_activation(name)
    h = act.forward(torch.tensor([-1e4, -30.0, 0.0, 30.0, 1e4], dtype=torch.float64))
    assert torch.isfinite(h).all()
    assert (h >= act.low).all() and (h <= act.high).all()


def test_softplus_derivative_holds_far_past_the_threshold():
    # F.softplus switches to h = a past a = 20, where 1 - exp(-h) would still be exact: the
    # table's softplus must not make that switch.
    act = get_activation("softplus")
    a = torch.tensor([25.0, 40.0], dtype=torch.float64)
    torch.testing.assert_close(act.d1(act.forward(a)), torch.sigmoid(a), rtol=1e-15, atol=0)


def test_unknown_activation_names_the_known_ones():
    with pytest.raises(ValueError, match=r"activation: got 'gelu', expected one of identity, relu"):
        get_activation("gelu")
