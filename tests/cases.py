"""Inputs shared by the test modules (importable: pytest puts tests/ on sys.path)."""

import torch

ACTIVATION_NAMES = ("sigmoid", "tanh", "relu", "softplus", "identity")


def encoder_case(batch, features, hidden, activation="sigmoid", dtype=torch.float64, seed=0):
    """x (B, D), W (H, D), b (H,) drawn from a seeded generator.

    For relu the pre-activations are kept at least 0.05 away from the kink at 0, so that finite
    differences and the closed form see one side of it.
    """
    gen = torch.Generator().manual_seed(seed)
    for _ in range(1000):
        x = torch.randn(batch, features, generator=gen, dtype=torch.float64)
        weight = torch.randn(hidden, features, generator=gen, dtype=torch.float64) / features**0.5
        bias = 0.1 * torch.randn(hidden, generator=gen, dtype=torch.float64)
        a = x @ weight.t() + bias
        if activation != "relu" or a.abs().min() > 0.05:
            return x.to(dtype), weight.to(dtype), bias.to(dtype)
    raise RuntimeError("no relu case away from the kink after 1000 draws")
