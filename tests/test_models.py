"""Autoencoder: losses against hand-worked numbers and the reference, tied weights, checkpoints."""

import json

import numpy as np
import pytest
import torch

import fastae
from fastae import reference
from fastae.corruption import Corruption
from fastae.metrics import jacobian_norm
from fastae.models import VARIANTS
from fastae.models import Autoencoder
from fastae.train import CheckpointError
from fastae.train import TrainConfig
from fastae.train import fit
from fastae.train import load_checkpoint
from fastae.train import load_weights
from fastae.train import save_checkpoint


def test_tied_linear_autoencoder_one_sgd_step():
    # x_hat = W^T (W x), W = [[1, 0]], x = [1, 1]: h = 1, x_hat = [1, 0], r = x_hat - x = [0, -1].
    # L = 0.5 ||r||^2; dL/dW = h r^T (decoder) + (W r) x^T (encoder) = [[0, -1]] + 0.
    # W - 0.1 dL/dW = [[1, 0.1]].
    model = Autoencoder(
        2, (1,), activation="identity", output_activation="identity", tied=True, bias=False
    )
    with torch.no_grad():
        model.encoder[0].weight.copy_(torch.tensor([[1.0, 0.0]]))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.tensor([[1.0, 1.0]])
    loss = 0.5 * (model(x) - x).square().sum()
    loss.backward()
    optimizer.step()

    assert len(list(model.parameters())) == 1
    assert list(model.state_dict()) == ["encoder.0.weight"]
    torch.testing.assert_close(model.encoder[0].weight, torch.tensor([[1.0, 0.1]]))


def test_tied_deep_decoder_uses_transposed_encoder_weights():
    model = Autoencoder(6, (4, 2), tied=True, activation="tanh").double()
    x = torch.rand(5, 6, dtype=torch.float64)
    w1, w2 = model.encoder[0].weight, model.encoder[1].weight
    h1 = torch.tanh(x @ w1.t() + model.encoder[0].bias)
    h2 = torch.tanh(h1 @ w2.t() + model.encoder[1].bias)
    z = torch.tanh(h2 @ w2 + model.decoder_bias[1])
    expected = torch.sigmoid(z @ w1 + model.decoder_bias[0])

    torch.testing.assert_close(model(x), expected)
    assert sorted(model.state_dict()) == [
        "decoder_bias.0",
        "decoder_bias.1",
        "encoder.0.bias",
        "encoder.0.weight",
        "encoder.1.bias",
        "encoder.1.weight",
    ]


def _double(model):
    return model.double()


def test_contractive_loss_matches_reference():
    model = _double(Autoencoder(7, (3,), variant="contractive", lam=0.5))
    x = torch.rand(9, 7, dtype=torch.float64)
    layer = model.encoder[0]
    x_hat = torch.sigmoid(model.decoder[0](layer(x)))
    expected = torch.nn.functional.mse_loss(x_hat, x) + 0.5 * reference.contractive_penalty(
        x, layer.weight, layer.bias
    )
    torch.testing.assert_close(model.loss(x).total, expected)


def test_kl_and_l1_losses_use_the_code_layer():
    x = torch.rand(9, 7, dtype=torch.float64)
    kl = _double(Autoencoder(7, (5, 3), variant="sparse-kl", beta=2.0, rho=0.1))
    code = kl.encode(x)
    rho_hat = code.mean(0)
    manual = (0.1 * torch.log(0.1 / rho_hat) + 0.9 * torch.log(0.9 / (1 - rho_hat))).sum()
    recon = torch.nn.functional.mse_loss(kl.decode(code), x)
    torch.testing.assert_close(kl.loss(x).total, recon + 2.0 * manual)

    l1 = _double(Autoencoder(7, (5, 3), variant="sparse-l1", gamma=0.3, activation="relu"))
    code = l1.encode(x)
    recon = torch.nn.functional.mse_loss(l1.decode(code), x)
    torch.testing.assert_close(l1.loss(x).total, recon + 0.3 * code.abs().sum(1).mean())


def test_kl_refuses_non_sigmoid_codes():
    with pytest.raises(ValueError, match="activation: got 'relu'"):
        Autoencoder(4, (2,), variant="sparse-kl", beta=1.0, activation="relu")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"variant": "contractive"}, "lam: got 0"),
        ({"variant": "undercomplete", "gamma": 0.1}, "gamma: got 0.1 for variant"),
        ({"variant": "sparse-l1", "gamma": -1.0}, "gamma: got -1.0"),
        ({"variant": "sparse-kl", "beta": 1.0, "rho": 1.0}, "rho: got 1.0"),
        ({"variant": "denoising"}, "noise: got None"),
        ({"variant": "vae"}, "variant: got 'vae'"),
        ({"hidden": (4, 0)}, "hidden: got"),
        ({"reconstruction": "bce", "output_activation": "identity"}, "output_activation"),
    ],
)
def test_bad_configurations(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Autoencoder(4, **kwargs)


def test_bce_refuses_targets_outside_unit_interval():
    model = Autoencoder(3, (2,), reconstruction="bce")
    x = torch.tensor([[0.0, 0.5, 1.5], [-0.25, 0.1, 0.2]])
    with pytest.raises(ValueError, match=r"got targets in \[-0.25, 1.5\]"):
        model.loss(x)


def test_bce_matches_torch():
    model = Autoencoder(3, (2,), reconstruction="bce")
    x = torch.rand(4, 3)
    expected = torch.nn.functional.binary_cross_entropy(model(x), x)
    torch.testing.assert_close(model.loss(x).reconstruction, expected)
    assert model.loss(x).total.item() >= 0


def test_jacobian_metric_matches_reference_for_a_deep_encoder():
    model = _double(Autoencoder(6, (5, 3), activation="tanh"))
    x = torch.rand(4, 6, dtype=torch.float64)
    torch_encoder = torch.nn.Sequential(
        torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3), torch.nn.Tanh()
    ).double()
    torch_encoder[0].load_state_dict(model.encoder[0].state_dict())
    torch_encoder[2].load_state_dict(model.encoder[1].state_dict())
    expected = reference.jacobian_penalty(torch_encoder, x, reduction="none")
    torch.testing.assert_close(jacobian_norm(model, x), expected)


def test_config_round_trips_through_json():
    model = Autoencoder(5, (4, 2), variant="denoising", noise="gaussian:0.2", tied=True, seed=3)
    rebuilt = Autoencoder(**json.loads(json.dumps(model.config)))
    assert rebuilt.config == model.config


def _trained(tmp_path, variant="denoising", **kwargs):
    torch.manual_seed(0)
    model = Autoencoder(10, (4,), variant=variant, seed=1, **kwargs)
    x = np.random.default_rng(0).random((40, 10), dtype=np.float32)
    config = TrainConfig(epochs=2, batch_size=8, lr=0.01)
    fit(model, x[:30], x[30:], config, run_dir=str(tmp_path), run_config={"model": model.config})
    return model, x


def test_checkpoint_reload_is_bitwise_equal(tmp_path):
    model, x = _trained(tmp_path, noise="masking:0.2")
    config, weights, _, state = load_checkpoint(str(tmp_path))
    reloaded = Autoencoder(**config["model"])
    load_weights(reloaded, weights)
    batch = torch.from_numpy(x)

    assert state["epoch"] == 2
    assert torch.equal(reloaded.eval()(batch), model.eval()(batch))


def test_loading_into_another_shape_lists_every_mismatch(tmp_path):
    _trained(tmp_path, noise="masking:0.2")
    _, weights, _, _ = load_checkpoint(str(tmp_path))
    other = Autoencoder(10, (5,), tied=True)
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(CheckpointError) as error:
        load_weights(other, weights)

    message = str(error.value)
    assert "encoder.0.weight: checkpoint shape (4, 10), model shape (5, 10)" in message
    assert "encoder.0.bias: checkpoint shape (4,), model shape (5,)" in message
    assert "decoder.0.weight: not a parameter of the model" in message
    assert "decoder_bias.0: missing from the checkpoint" in message
    assert all(torch.equal(before[k], v) for k, v in other.state_dict().items())


def test_interrupted_run_resumes_to_the_same_weights(tmp_path):
    x = np.random.default_rng(1).random((50, 10), dtype=np.float32)
    config = TrainConfig(epochs=4, batch_size=8, lr=0.01, seed=2)

    def fresh():
        torch.manual_seed(0)
        return Autoencoder(10, (3,), variant="denoising", noise="gaussian:0.3", seed=5)

    straight = fresh()
    fit(straight, x[:40], x[40:], config)

    interrupted = fresh()
    with pytest.raises(KeyboardInterrupt):
        fit(interrupted, x[:40], x[40:], config, run_dir=str(tmp_path), stop_at=(2, 3))
    assert load_checkpoint(str(tmp_path))[3]["epoch"] == 2

    resumed = fresh()
    result = fit(resumed, x[:40], x[40:], config, run_dir=str(tmp_path), resume=True)
    assert [h["epoch"] for h in result.history] == [1, 2, 3, 4]
    for name, value in straight.state_dict().items():
        assert torch.equal(resumed.state_dict()[name], value), name


def test_checkpoint_write_leaves_a_complete_checkpoint(tmp_path):
    # A kill between the renames leaves checkpoint.old, which load_checkpoint still reads.
    model, _ = _trained(tmp_path, noise="masking:0.2")
    (tmp_path / "checkpoint").rename(tmp_path / "checkpoint.old")
    assert load_checkpoint(str(tmp_path))[3]["epoch"] == 2
    save_checkpoint(str(tmp_path), model, torch.optim.Adam(model.parameters()), {}, {"epoch": 3})
    assert not (tmp_path / "checkpoint.old").exists()
    assert load_checkpoint(str(tmp_path))[3]["epoch"] == 3


def test_exported_from_package():
    assert fastae.models.Autoencoder is Autoencoder


def test_metrics_csv_has_one_column_order_for_fresh_and_resumed_runs(tmp_path):
    x = np.random.default_rng(1).random((50, 10), dtype=np.float32)
    config = TrainConfig(epochs=3, batch_size=8, lr=0.01)
    fresh, resumed = tmp_path / "fresh", tmp_path / "resumed"
    for run in (fresh, resumed):
        run.mkdir()
    fit(Autoencoder(10, (3,)), x[:40], x[40:], config, run_dir=str(fresh))
    with pytest.raises(KeyboardInterrupt):
        fit(Autoencoder(10, (3,)), x[:40], x[40:], config, run_dir=str(resumed), stop_at=(1, 0))
    fit(Autoencoder(10, (3,)), x[:40], x[40:], config, run_dir=str(resumed), resume=True)

    expected = "epoch,train_loss,train_reconstruction,train_penalty,val_loss,val_mse"
    for run in (fresh, resumed):
        lines = (run / "metrics.csv").read_text().splitlines()
        assert lines[0] == expected and len(lines) == 4, run


@pytest.mark.parametrize("variant", VARIANTS)
def test_deepcopy_and_averaged_model_after_training_steps(variant):
    # "Keep a copy of the best model" and torch.optim.swa_utils.AveragedModel deep-copy the model.
    import copy

    kwargs = {
        "contractive": {"lam": 0.1},
        "sparse-l1": {"gamma": 0.1},
        "sparse-kl": {"beta": 0.1, "rho": 0.1},
        "denoising": {"noise": Corruption("masking", 0.2)},
    }.get(variant, {})
    model = Autoencoder(6, (4,), variant=variant, **kwargs)
    x = torch.rand(8, 6)
    model.loss(x).total.backward()
    best = copy.deepcopy(model)
    averaged = torch.optim.swa_utils.AveragedModel(model)
    averaged.update_parameters(model)
    model.eval()
    best.eval()
    torch.testing.assert_close(best.decode(best.encode(x)), model.decode(model.encode(x)))
