"""Corruptions: values in the data range, fresh noise each step, seeded, off in eval mode."""

import pytest
import torch

from fastae.corruption import Corruption
from fastae.corruption import parse_corruption
from fastae.functional.noise import Noise
from fastae.functional.noise import corrupt
from fastae.models import Autoencoder
from fastae.nn import FusedEncoder


def _gen(seed=0):
    generator = torch.Generator()
    generator.manual_seed(seed)
    return generator


def test_masking_zeroes_without_rescaling():
    x = torch.ones(4)
    out = Corruption("masking", 0.5)(x, _gen())
    assert set(out.tolist()) <= {0.0, 1.0}

    big = torch.full((200, 100), 0.7)
    out = Corruption("masking", 0.5)(big, _gen())
    values = set(out.unique().tolist())
    assert values == {0.0, torch.tensor(0.7).item()}
    # 20000 Bernoulli(0.5) draws: 6 standard deviations is 0.021.
    assert abs((out == 0).float().mean().item() - 0.5) < 0.021


def test_gaussian_is_clipped_to_the_data_range():
    x = torch.rand(50, 20)
    out = Corruption("gaussian", 2.0)(x, _gen())
    assert out.min().item() == 0.0 and out.max().item() == 1.0
    assert ((out > 0) & (out < 1)).any()


def test_salt_and_pepper_values():
    x = torch.full((100, 100), 0.5)
    out = Corruption("salt-and-pepper", 0.2)(x, _gen())
    assert set(out.unique().tolist()) == {0.0, 0.5, 1.0}
    assert abs((out != 0.5).float().mean().item() - 0.2) < 0.03


def test_same_seed_same_noise_different_seed_different():
    x = torch.rand(10, 10)
    noise = Corruption("gaussian", 0.3)
    assert torch.equal(noise(x, _gen(1)), noise(x, _gen(1)))
    assert not torch.equal(noise(x, _gen(1)), noise(x, _gen(2)))


def _denoising(seed=0):
    torch.manual_seed(0)
    return Autoencoder(12, (5,), variant="denoising", noise="masking:0.4", seed=seed)


def test_noise_fresh_each_step_and_repeats_from_seed():
    x = torch.rand(6, 12)
    a, b = _denoising(seed=7), _denoising(seed=7)
    first, second = a(x), a(x)
    assert not torch.equal(first, second)
    assert torch.equal(first, b(x)) and torch.equal(second, b(x))


def test_off_in_eval_mode():
    x = torch.rand(6, 12)
    model = _denoising().eval()
    clean = model.decode(model.encode(x))
    assert torch.equal(model(x), clean)
    assert torch.equal(model(x), clean)


def test_loss_target_is_the_clean_x():
    # The fused encoder draws x~ keyed by (model seed, training step); corrupt() recovers it.
    x = torch.rand(6, 12)
    model = _denoising(seed=5)
    expected = []
    for step in range(2):
        x_tilde = corrupt(x, Noise("masking", 0.4, seed=5, step=step), model.backend)
        assert not torch.equal(x_tilde, x)
        expected.append(torch.nn.functional.mse_loss(model.decode(model.encode(x_tilde)), x))

    for step in range(2):
        losses = model.loss(x)
        torch.testing.assert_close(losses.reconstruction, expected[step])
        assert torch.equal(losses.total, losses.reconstruction)
        assert model.noise_step == step + 1


def test_the_fused_encoder_gets_the_noise_in_training_only(monkeypatch):
    model = _denoising(seed=3)
    seen = []
    forward = FusedEncoder.forward

    def spy(layer, x, noise=None):
        seen.append(noise)
        return forward(layer, x, noise=noise)

    monkeypatch.setattr(FusedEncoder, "forward", spy)
    x = torch.rand(4, 12)
    model.loss(x)
    model(x)
    model.eval()
    model.loss(x)
    model(x)
    assert seen[:2] == [
        Noise("masking", 0.4, seed=3, step=0),
        Noise("masking", 0.4, seed=3, step=1),
    ]
    assert seen[2:] == [None, None]
    assert model.noise_step == 2


@pytest.mark.parametrize(
    "text, match",
    [
        ("masking", "expected KIND:LEVEL"),
        ("masking:1.5", "strictly between 0 and 1"),
        ("masking:0", "strictly between 0 and 1"),
        ("gaussian:-0.1", "expected a number > 0"),
        ("blur:0.1", "corruption kind: got 'blur'"),
        ("gaussian:abc", "expected a number"),
    ],
)
def test_bad_corruptions(text, match):
    with pytest.raises(ValueError, match=match):
        parse_corruption(text)
