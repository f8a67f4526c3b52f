"""Validation metrics that tell the autoencoder variants apart (and PCA, the linear baseline).

    mse              mean squared error of the reconstruction of clean validation inputs
    corrupted_mse    mean squared error between the reconstruction of corrupted validation
                     inputs x~ and the clean x (what a denoising model is trained for)
    jacobian         mean over validation samples of ||dh/dx||_F^2, h the code (the quantity a
                     contractive model penalises), always exact and for the whole encoder: the
                     chain-rule product of every layer, also where training estimated it
    mean_activation  mean of |h| over samples and code units (equal to the mean of h for
                     sigmoid codes)
    near_zero        fraction of code entries with |h| < NEAR_ZERO

The corruption for corrupted_mse is drawn from a generator seeded with a fixed seed, so every
model of a comparison sees the same x~.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from fastae.activations import get_activation
from fastae.corruption import Corruption

__all__ = ["NEAR_ZERO", "METRICS", "evaluate_model", "evaluate_pca", "jacobian_norm"]

# A sigmoid unit below 0.05 passes on less than 5% of its range: counted as inactive.
NEAR_ZERO = 0.05

# Validation samples per chunk of the Jacobian computation ((chunk, H, D) floats at a time).
_JACOBIAN_CHUNK = 1024

METRICS = ("mse", "corrupted_mse", "jacobian", "mean_activation", "near_zero")


def jacobian_norm(model, x: Tensor) -> Tensor:
    """Per-sample ||dh_k/dx||_F^2 (B,) of the encoder of an Autoencoder, by the chain rule:
    J = diag(f'(a_k)) W_k ... diag(f'(a_1)) W_1, with f' taken from the saved codes."""
    act = get_activation(model.activation)
    out = []
    with torch.no_grad():
        for start in range(0, x.shape[0], _JACOBIAN_CHUNK):
            h = x[start : start + _JACOBIAN_CHUNK]
            jac = None
            for layer in model.encoder:
                a = torch.nn.functional.linear(h, layer.weight, layer.bias)
                h = act.forward(a)
                local = act.d1(h)[:, :, None] * layer.weight[None]  # (B, H_l, H_{l-1})
                jac = local if jac is None else torch.bmm(local, jac)
            out.append(jac.square().sum(dim=(1, 2)))
    return torch.cat(out)


def _corrupted(x: Tensor, corruption: Corruption, seed: int) -> Tensor:
    generator = torch.Generator(device=x.device)
    generator.manual_seed(seed)
    return corruption(x, generator)


def _code_metrics(h: Tensor) -> dict[str, float]:
    magnitude = h.abs()
    return {
        "mean_activation": magnitude.mean().item(),
        "near_zero": (magnitude < NEAR_ZERO).float().mean().item(),
    }


def evaluate_model(model, x_val: Tensor, corruption: Corruption, seed: int = 0) -> dict:
    """The METRICS of an Autoencoder on x_val (B, D), in eval mode (no training noise)."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            mse = torch.nn.functional.mse_loss(model(x_val), x_val).item()
            x_tilde = _corrupted(x_val, corruption, seed)
            corrupted = torch.nn.functional.mse_loss(model(x_tilde), x_val).item()
            h = model.encode(x_val)
        jacobian = jacobian_norm(model, x_val).mean().item()
    finally:
        model.train(was_training)
    return {"mse": mse, "corrupted_mse": corrupted, "jacobian": jacobian, **_code_metrics(h)}


def evaluate_pca(pca, x_val: np.ndarray, corruption: Corruption, seed: int = 0) -> dict:
    """The METRICS of a fitted sklearn PCA: code h = (x - mean) V^T, so dh/dx = V for every
    sample and ||J||_F^2 = sum of the squared entries of V (the number of components)."""
    x = torch.from_numpy(x_val)
    x_tilde = _corrupted(x, corruption, seed).numpy()
    h = pca.transform(x_val)
    reconstruction = pca.inverse_transform(h)
    corrupted = pca.inverse_transform(pca.transform(x_tilde))
    return {
        "mse": float(np.mean((reconstruction - x_val) ** 2)),
        "corrupted_mse": float(np.mean((corrupted - x_val) ** 2)),
        "jacobian": float(np.square(pca.components_).sum()),
        **_code_metrics(torch.from_numpy(np.asarray(h, dtype=np.float32))),
    }
