"""Deep contractive autoencoders (the whole-encoder penalty inside Autoencoder) and greedy
layer-wise pretraining (fastae.stacked, `fastae train --stacked`)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from fastae import reference
from fastae.activations import get_activation
from fastae.data import load_dataset
from fastae.data import prepare
from fastae.functional.deep import DEFAULT_K
from fastae.functional.deep import deep_contractive_penalty
from fastae.metrics import evaluate_model
from fastae.models import Autoencoder
from fastae.stacked import pretrain
from fastae.stacked import shallow_autoencoder
from fastae.train import TrainConfig
from fastae.train import fit
from fastae.train import load_checkpoint
from fastae.train import load_weights

F64 = torch.float64
ENV = {**os.environ, "PYTHONWARNINGS": "ignore"}


def plain_encoder(model):
    """The model's encoder in plain torch operations, for the autograd reference."""

    def run(x):
        for layer in model.encoder:
            x = get_activation(layer.activation).forward(
                torch.nn.functional.linear(x, layer.weight, layer.bias)
            )
        return x

    return run


def deep_model(hidden, activation, **kwargs):
    torch.manual_seed(0)
    model = Autoencoder(7, hidden, variant="contractive", lam=0.5, activation=activation, **kwargs)
    return model.double()


@pytest.mark.parametrize("hidden", [(5, 3), (6, 4, 2), (9, 11)], ids=["2", "3", "2-over"])
@pytest.mark.parametrize("activation", ["sigmoid", "tanh", "relu"])
def test_deep_contractive_loss_is_the_whole_encoder_jacobian(hidden, activation):
    model = deep_model(hidden, activation)
    x = torch.rand(6, 7, dtype=F64)
    losses = model.loss(x)
    expected = reference.jacobian_penalty(plain_encoder(model), x)

    torch.testing.assert_close(losses.penalty, 0.5 * expected, rtol=0, atol=1e-10)
    assert model.last_penalty.method == "exact"
    assert model.last_penalty.k == 0
    # Undercomplete encoders multiply the Jacobian out from the code side, overcomplete ones
    # from the input side.
    assert model.last_penalty.side == ("input" if hidden[-1] > 7 else "code")
    torch.testing.assert_close(model.last_penalty.value, expected, rtol=0, atol=1e-10)


def test_deep_penalty_gradients_reach_every_encoder_layer_and_match_autograd():
    model = deep_model((5, 4, 3), "tanh")
    x = torch.rand(6, 7, dtype=F64)
    model.loss(x).penalty.backward()
    ours = [p.grad.clone() for layer in model.encoder for p in (layer.weight, layer.bias)]

    model.zero_grad()
    (0.5 * reference.jacobian_penalty(plain_encoder(model), x)).backward()
    for got, layer_param in zip(
        ours, [p for layer in model.encoder for p in (layer.weight, layer.bias)], strict=True
    ):
        assert got.abs().sum() > 0
        torch.testing.assert_close(got, layer_param.grad, rtol=0, atol=1e-10)


def test_one_layer_keeps_the_closed_form_and_the_deep_penalty_agrees():
    model = deep_model((4,), "sigmoid")
    x = torch.rand(6, 7, dtype=F64)
    penalty = model.loss(x).penalty / 0.5
    layer = model.encoder[0]
    deep = deep_contractive_penalty([layer(x)], [(layer.weight, layer.bias, layer.activation)])

    torch.testing.assert_close(penalty, deep.value, rtol=0, atol=1e-12)
    torch.testing.assert_close(penalty, layer.last_stats.contractive, rtol=0, atol=0)
    assert tuple(model.last_penalty[1:]) == ("exact", "code", 0)


def test_estimate_is_reported_reproducible_and_unbiased_on_average(one_thread):
    model = deep_model((5, 3), "sigmoid", penalty_method="estimate", penalty_probes=4)
    x = torch.rand(6, 7, dtype=F64)
    assert model.penalty_plan(6) == {"method": "estimate", "side": "input", "k": 4}
    first = model.loss(x).penalty
    assert tuple(model.last_penalty[1:]) == ("estimate", "input", 4)

    # The probes come from the model's seeded generator: a fresh model repeats them.
    again = deep_model((5, 3), "sigmoid", penalty_method="estimate", penalty_probes=4)
    assert torch.equal(again.loss(x).penalty, first)

    # Further draws: their mean is within 4 standard errors of the exact value.
    with torch.no_grad():
        draws = torch.stack([model.loss(x).penalty for _ in range(300)]) / 0.5
    exact = reference.jacobian_penalty(plain_encoder(model), x)
    assert abs(draws.mean() - exact) < 4 * draws.std() / len(draws) ** 0.5


def test_auto_picks_the_estimate_for_a_wide_encoder_and_says_so():
    torch.manual_seed(0)
    model = Autoencoder(160, (160, 160), variant="contractive", lam=0.1)
    assert model.penalty_plan(8) == {"method": "estimate", "side": "input", "k": DEFAULT_K}
    model.loss(torch.rand(8, 160))
    assert tuple(model.last_penalty[1:]) == ("estimate", "input", DEFAULT_K)

    narrow = Autoencoder(64, (32, 8), variant="contractive", lam=0.1)
    assert narrow.penalty_plan(32) == {"method": "exact", "side": "code", "k": 0}


def test_penalty_options_round_trip_and_bad_ones_are_refused():
    model = Autoencoder(5, (4, 2), variant="contractive", lam=0.1, penalty_method="estimate",
                        penalty_probes=3)  # fmt: skip
    rebuilt = Autoencoder(**json.loads(json.dumps(model.config)))
    assert rebuilt.config == model.config
    assert (rebuilt.penalty_method, rebuilt.penalty_probes) == ("estimate", 3)

    with pytest.raises(ValueError, match="penalty_method: got 'fast', expected one of auto"):
        Autoencoder(5, (4, 2), variant="contractive", lam=0.1, penalty_method="fast")
    with pytest.raises(ValueError, match="penalty_probes: got 0, expected a positive integer"):
        Autoencoder(5, (4, 2), variant="contractive", lam=0.1, penalty_probes=0)
    with pytest.raises(ValueError, match="penalty_probes: got 4 with penalty_method 'exact'"):
        Autoencoder(5, (4, 2), variant="contractive", lam=0.1, penalty_method="exact",
                    penalty_probes=4)  # fmt: skip
    with pytest.raises(ValueError, match="for variant 'undercomplete', expected 'auto', None"):
        Autoencoder(5, (4, 2), penalty_method="exact")


# -- greedy layer-wise pretraining ---------------------------------------------------------------


@pytest.fixture(scope="module")
def digits():
    return prepare(load_dataset("digits"), 0.2, 0)


@pytest.fixture
def one_thread():
    # As `fastae train` does for models this small: two threads mostly wait on each other.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_pretraining_trains_each_layer_and_copies_it_into_the_stack(digits, one_thread):
    torch.manual_seed(0)
    model = Autoencoder(64, (32, 8), variant="contractive", lam=0.03)
    initial = {name: value.clone() for name, value in model.state_dict().items()}
    config = TrainConfig(epochs=1, batch_size=32, lr=0.01, seed=0)

    # Stage 1 by hand, from the same initial weights: the shallow 64-32-64 AE on x.
    x_train, x_val = digits.x_train[:480], digits.x_val[:120]
    by_hand = shallow_autoencoder(model, 0)
    fit(by_hand, x_train, x_val, TrainConfig(epochs=3, batch_size=32, lr=0.01))

    stages = pretrain(model, x_train, x_val, config, epochs=3)

    assert len(stages) == 2
    for stage in stages:
        train_losses = [record["train_loss"] for record in stage.history]
        val_losses = [record["val_loss"] for record in stage.history]
        assert train_losses[-1] < train_losses[0] and val_losses[-1] < val_losses[0]
    for name, value in model.state_dict().items():
        assert not torch.equal(value, initial[name]), f"{name} was not pretrained"
    assert torch.equal(model.encoder[0].weight, by_hand.encoder[0].weight)
    assert torch.equal(model.decoder[0].weight, by_hand.decoder[0].weight)
    assert torch.equal(model.decoder[0].bias, by_hand.decoder[0].bias)

    # Stage 2 reconstructs the 32 codes of the pretrained first layer through the hidden
    # activation, as the deep decoder's layer 2 does.
    second = shallow_autoencoder(model, 1)
    assert (second.in_features, second.hidden) == (32, (8,))
    assert (second.output_activation, second.reconstruction) == ("sigmoid", "mse")


def test_tied_pretraining_keeps_the_tied_structure(digits, one_thread):
    torch.manual_seed(0)
    model = Autoencoder(64, (16, 4), variant="sparse-l1", gamma=0.01, tied=True)
    before = [bias.clone() for bias in model.decoder_bias]
    pretrain(model, digits.x_train[:200], digits.x_val[:50], TrainConfig(batch_size=32), 1)
    assert sorted(model.state_dict()) == [
        "decoder_bias.0", "decoder_bias.1", "encoder.0.bias", "encoder.0.weight",
        "encoder.1.bias", "encoder.1.weight",
    ]  # fmt: skip
    assert all(not torch.equal(b, a) for b, a in zip(before, model.decoder_bias, strict=True))


# -- the command ---------------------------------------------------------------------------------


def _run(args, cwd):
    return subprocess.run(
        [sys.executable, "-m", "fastae", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=180,
        env=ENV,
    )


@pytest.mark.parametrize(
    "extra, logged",
    [
        (["--epochs", "2"], ["epoch 2/2"]),
        (
            ["--stacked", "--pretrain-epochs", "1", "--epochs", "1"],
            [
                "pretraining layer 1/2 (64 -> 32, contractive)",
                "pretraining layer 2/2 (32 -> 8",
                "pretrained 2 layers",
                "epoch 1/1",
            ],
        ),  # fmt: skip
    ],
    ids=["plain", "stacked"],
)
def test_train_deep_contractive_end_to_end(tmp_path, digits, extra, logged):
    out = tmp_path / "run"
    args = ["train", "--hidden", "32,8", "--variant", "contractive", "--out", str(out), *extra]
    done = _run(args, tmp_path)
    assert done.returncode == 0, done.stderr
    assert "contractive penalty of the 2-layer encoder: exact (side code, k 0)" in done.stderr
    for line in logged:
        assert line in done.stderr

    summary = json.loads((out / "summary.json").read_text())
    assert summary["contractive_penalty"] == {"method": "exact", "side": "code", "k": 0}
    config, weights, _, _ = load_checkpoint(str(out))
    assert config["model"]["hidden"] == [32, 8]
    assert config["model"]["penalty_method"] == "auto"
    if "--stacked" in extra:
        assert config["pretrain"]["epochs_per_layer"] == 1
        assert len(config["pretrain"]["val_loss"]) == 2
        assert summary["pretrain_seconds"] > 0

    # The reloaded model gives exactly the metrics the run reported.
    model = Autoencoder(**config["model"])
    load_weights(model, weights)
    metrics = evaluate_model(model, torch.from_numpy(digits.x_val), model.noise or _masking())
    for key in ("mse", "corrupted_mse", "jacobian", "mean_activation", "near_zero"):
        assert metrics[key] == summary[key], key


def _masking():
    from fastae.corruption import parse_corruption

    return parse_corruption("masking:0.3")


def test_stacked_flags_are_checked(tmp_path, monkeypatch, capsys):
    from fastae import cli

    monkeypatch.chdir(tmp_path)
    cases = [
        (["train", "--stacked"], "--stacked: got --hidden 8 (one encoder layer)"),
        (["train", "--hidden", "32,8", "--pretrain-epochs", "2"], "--pretrain-epochs: got 2"),
        (
            ["train", "--variant", "denoising", "--penalty-method", "exact"],
            "--penalty-method: applies to --variant contractive",
        ),
        (["train", "--penalty-probes", "0"], "argument --penalty-probes: got '0'"),
    ]
    for args, message in cases:
        with pytest.raises(SystemExit) as exited:
            raise SystemExit(cli.main(args))
        err = capsys.readouterr().err
        assert exited.value.code == 2 and message in err, err
    assert list(tmp_path.iterdir()) == []


def test_pretraining_inputs_are_float32_codes(digits):
    # The codes fed to stage 2 are those of the pretrained first layer in eval mode.
    from fastae.stacked import _codes

    torch.manual_seed(0)
    model = Autoencoder(64, (32, 8), variant="denoising", noise="masking:0.5")
    codes = _codes(model, 1, digits.x_val, torch.device("cpu"))
    with torch.no_grad():
        expected = model.encoder[0](torch.from_numpy(digits.x_val)).numpy()
    assert codes.dtype == np.float32 and np.array_equal(codes, expected)
    assert model.training
