"""fastae: autoencoders for PyTorch with fused kernels for their penalties.

    import fastae
    h, stats = fastae.encode(x, weight, bias, activation="sigmoid")
    loss = mse + lam * stats.contractive + beta * fastae.kl_sparsity(stats.rho_hat, 0.05)

See README.md for the command line and the models.
"""

from fastae import activations
from fastae import models
from fastae import nn
from fastae import reference
from fastae.functional import DeepEncodeResult
from fastae.functional import DeepPenalty
from fastae.functional import EncodeStats
from fastae.functional import Noise
from fastae.functional import contractive_penalty
from fastae.functional import deep_contractive_penalty
from fastae.functional import deep_encode
from fastae.functional import encode
from fastae.functional import kl_sparsity

__version__ = "0.1.0"

__all__ = [
    "DeepEncodeResult",
    "DeepPenalty",
    "EncodeStats",
    "Noise",
    "activations",
    "contractive_penalty",
    "deep_contractive_penalty",
    "deep_encode",
    "encode",
    "kl_sparsity",
    "models",
    "nn",
    "reference",
]
