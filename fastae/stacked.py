"""Greedy layer-wise pretraining of a deep autoencoder (a stack of shallow ones).

For an Autoencoder with encoder widths D -> H_1 -> ... -> H_k, stage l (l = 1 .. k) trains a
shallow autoencoder H_{l-1} -> H_l -> H_{l-1} on the codes h_{l-1} of the layers below it (h_0 =
x), then copies it into the deep model:

    encoder layer l         <- the shallow encoder (weight W_l, bias b_l)
    decoder layer l         <- the shallow decoder: the mirrored layer H_l -> H_{l-1} has the
                               same shape (untied: weight and bias; tied: only the bias, the
                               weight being W_l^T already)

The shallow autoencoder of stage l is the deep model's own variant with the same penalty
weights, corruption, tying, bias and activation, and it starts from the deep model's current
layer l and mirrored decoder layer, so that its training is the only change. Its output
activation and reconstruction loss are those of the deep model's decoder at that place: the
model's output activation and reconstruction for stage 1 (the reconstruction of x), the hidden
activation and MSE for the others (the codes of tanh or relu layers are not in [0, 1]). A
contractive stage therefore uses the one-layer closed form; a denoising stage corrupts its own
input codes (the corruptions keep values in [0, 1], the range of sigmoid codes: with tanh codes
a gaussian corruption also clips their negative part).

The codes h_{l-1} for stage l are computed once, in eval mode and without gradient, with the
layers already pretrained. Each stage is one call of fastae.train.fit (same batch size, learning
rate, seed and device as the fine-tuning); after the last stage the caller fine-tunes the whole
stack with fit as usual.
"""

from __future__ import annotations

import logging
from dataclasses import replace

import numpy as np
import torch

from fastae.models import Autoencoder
from fastae.train import TrainConfig
from fastae.train import TrainResult
from fastae.train import fit

logger = logging.getLogger(__name__)

__all__ = ["pretrain", "shallow_autoencoder"]


def shallow_autoencoder(model: Autoencoder, layer: int) -> Autoencoder:
    """The shallow autoencoder of stage ``layer`` (0-based) of model, started from the model's
    encoder layer ``layer`` and its mirrored decoder layer."""
    widths = (model.in_features, *model.hidden)
    config = model.config
    first = layer == 0
    config.update(
        in_features=widths[layer],
        hidden=[widths[layer + 1]],
        output_activation=model.output_activation if first else model.activation,
        reconstruction=model.reconstruction if first else "mse",
        # NOTE: one layer is always exact (its closed form); the deep method does not apply.
        penalty_method="auto",
        penalty_probes=None,
        seed=model.seed + layer,
    )
    shallow = Autoencoder(**config)
    with torch.no_grad():
        shallow.encoder[0].load_state_dict(model.encoder[layer].state_dict())
        if model.tied:
            if model.decoder_bias is not None:
                shallow.decoder_bias[0].copy_(model.decoder_bias[layer])
        else:
            shallow.decoder[0].load_state_dict(model.decoder[layer].state_dict())
    return shallow.to(model.encoder[layer].weight.device)


def _copy_back(model: Autoencoder, shallow: Autoencoder, layer: int) -> None:
    with torch.no_grad():
        model.encoder[layer].load_state_dict(shallow.encoder[0].state_dict())
        if model.tied:
            if model.decoder_bias is not None:
                model.decoder_bias[layer].copy_(shallow.decoder_bias[0])
        else:
            model.decoder[layer].load_state_dict(shallow.decoder[0].state_dict())


def _codes(model: Autoencoder, layers: int, x: np.ndarray, device: torch.device) -> np.ndarray:
    """h_layers of x through the first ``layers`` encoder layers, eval mode, no gradient."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            h = torch.from_numpy(x).to(device)
            for layer in model.encoder[:layers]:
                h = layer(h)
    finally:
        model.train(was_training)
    return np.ascontiguousarray(h.cpu().numpy(), dtype=np.float32)


def pretrain(
    model: Autoencoder,
    x_train: np.ndarray,
    x_val: np.ndarray,
    config: TrainConfig,
    epochs: int,
    *,
    progress: bool | None = None,
) -> list[TrainResult]:
    """Greedy layer-wise pretraining of every encoder layer of model, in place.

    Args:
        model: the deep Autoencoder; its encoder layers and mirrored decoder layers are
            overwritten with the pretrained shallow autoencoders.
        x_train, x_val: float32 arrays (N, D), scaled to the data range.
        config: batch size, learning rate, seed and device of every stage (its epochs are
            replaced by ``epochs``).
        epochs: epochs of each stage.
        progress: show a tqdm bar per stage (None: only on a terminal).

    Returns:
        One TrainResult per stage, in layer order (per-epoch train and validation losses of the
        shallow autoencoder).
    """
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs: got {epochs!r}, expected a positive integer")
    device = torch.device(config.device)
    model.to(device)
    stage_config = replace(config, epochs=epochs)
    results = []
    for layer in range(len(model.hidden)):
        shallow = shallow_autoencoder(model, layer)
        codes_train = _codes(model, layer, x_train, device)
        codes_val = _codes(model, layer, x_val, device)
        logger.info(
            "pretraining layer %d/%d (%d -> %d, %s) for %d epochs",
            layer + 1,
            len(model.hidden),
            shallow.in_features,
            shallow.code_size,
            shallow.variant,
            epochs,
        )
        result = fit(shallow, codes_train, codes_val, stage_config, progress=progress)
        _copy_back(model, shallow, layer)
        first, last = result.history[0], result.history[-1]
        logger.info(
            "layer %d/%d pretrained in %.1f s: train loss %.5f -> %.5f, val loss %.5f -> %.5f",
            layer + 1,
            len(model.hidden),
            result.train_seconds,
            first["train_loss"],
            last["train_loss"],
            first["val_loss"],
            last["val_loss"],
        )
        results.append(result)
    return results
