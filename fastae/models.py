"""Autoencoder variants built from FusedEncoder layers (DESIGN section 7).

    variant        bottleneck by            loss
    undercomplete  narrow hidden layer(s)   reconstruction
    sparse-l1      activations              reconstruction + gamma * l1
    sparse-kl      activations              reconstruction + beta * kl_sparsity(rho_hat, rho)
    denoising      corrupted input          reconstruction of the clean x from x~
    contractive    encoder Jacobian         reconstruction + lam * contractive

One class, ``Autoencoder``, is configured by the variant and its weights. The encoder is a stack
of FusedEncoder layers D -> H_1 -> ... -> H_k; the statistics the penalties need come out of the
same pass as the codes. The sparsity penalties use the statistics of the code layer (the last
one). The contractive penalty is the mean over the batch of ||dh_k/dx||_F^2 for the whole encoder:
with one layer, the closed form the fused pass computed; with several, the Jacobian
D_k W_k ... D_1 W_1 of fastae.functional.deep, from the codes the forward already computed,
exact or estimated with random probes (``penalty_method``; ``last_penalty`` says which ran).
The decoder mirrors the encoder;
with ``tied=True`` it uses the transpose of each encoder weight (one parameter per layer, only the
decoder biases are new).

``config`` is a JSON-ready dict of every constructor argument: ``Autoencoder(**config)`` builds
the same model, so a checkpoint folder (weights + config) fully describes it.

Across processes, ``set_process_group(group)`` makes every batch mean of the training loss a
mean over the samples of all ranks (the encoder statistics and the reconstruction), with
gradients scaled so that DistributedDataParallel's average over the ranks gives exactly the
gradients of one process on the concatenated batch (DESIGN section 4). The group is a property
of the running processes, not of the model: it is not part of ``config`` or the state_dict.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from fastae.activations import get_activation
from fastae.corruption import Corruption
from fastae.corruption import parse_corruption
from fastae.functional import Noise
from fastae.functional import kl_sparsity
from fastae.functional.checks import check_rho
from fastae.functional.deep import PENALTIES
from fastae.functional.deep import DeepPenalty
from fastae.functional.deep import choose_method
from fastae.functional.deep import deep_contractive_penalty
from fastae.functional.distributed import global_mean
from fastae.nn import FusedEncoder

__all__ = ["RECONSTRUCTIONS", "VARIANTS", "Autoencoder", "Losses", "check_targets"]

VARIANTS = ("undercomplete", "sparse-l1", "sparse-kl", "denoising", "contractive")
RECONSTRUCTIONS = ("mse", "bce")

# The penalty weight that each variant turns on; the others must stay at zero.
_VARIANT_WEIGHT = {"sparse-l1": "gamma", "sparse-kl": "beta", "contractive": "lam"}


class Losses(NamedTuple):
    """The loss of one batch and its parts."""

    total: Tensor
    """Scalar: reconstruction + lam * contractive + beta * kl + gamma * l1 (what is minimised)."""

    reconstruction: Tensor
    """Scalar: MSE (mean over every entry) or binary cross-entropy (same reduction)."""

    penalty: Tensor
    """Scalar: the weighted penalty part of ``total`` (0 for undercomplete and denoising)."""


def check_targets(x: Tensor) -> None:
    """Binary cross-entropy needs targets in [0, 1]; outside it the loss can go negative."""
    low, high = torch.aminmax(x.detach())
    low, high = low.item(), high.item()
    if not (0.0 <= low and high <= 1.0):
        raise ValueError(
            f"reconstruction 'bce': got targets in [{low:.6g}, {high:.6g}], expected values in "
            "[0, 1] (scale the data, or use reconstruction 'mse')"
        )


def _check_weight(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name}: got {value!r}, expected a number >= 0")
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"{name}: got {value!r}, expected a finite number >= 0")
    return float(value)


class Autoencoder(torch.nn.Module):
    """An autoencoder of any variant of DESIGN section 7.

    Args:
        in_features: D, the size of each sample.
        hidden: the encoder widths H_1, ..., H_k (e.g. (32, 8)); the last is the code size.
        variant: one of VARIANTS.
        activation: the activation of every encoder layer and of the hidden decoder layers.
        output_activation: the activation of the reconstruction ("sigmoid" for data in [0, 1]).
        tied: decoder weight of each layer = the transpose of the encoder weight.
        bias: whether the layers have biases.
        reconstruction: "mse" or "bce" (needs output_activation "sigmoid" and targets in [0, 1]).
        lam: weight of the contractive penalty (variant "contractive").
        beta, rho: weight and target mean activation of the KL sparsity penalty ("sparse-kl").
        gamma: weight of the L1 activation penalty ("sparse-l1").
        noise: the input corruption, a Corruption or "KIND:LEVEL" text ("denoising").
        penalty_method: how the contractive penalty of a deep encoder is computed: "exact",
            "estimate" (penalty_probes random probes per sample, unbiased) or "auto" (exact when
            affordable; see fastae.functional.deep.choose_method). A one-layer encoder always
            uses the exact closed form, unless "estimate" is asked for.
        penalty_probes: k, the probes per sample of the estimate (None: DEFAULT_K).
        seed: seed of the generator the corruption noise (and the probes) are drawn from.
        backend: the fastae.encode backend of the encoder layers.

    Attributes:
        last_penalty: DeepPenalty of the last contractive loss (value detached; method, side,
            k), or None before the first one and for other variants.
    """

    def __init__(
        self,
        in_features: int,
        hidden: tuple[int, ...] | list[int] = (8,),
        *,
        variant: str = "undercomplete",
        activation: str = "sigmoid",
        output_activation: str = "sigmoid",
        tied: bool = False,
        bias: bool = True,
        reconstruction: str = "mse",
        lam: float = 0.0,
        beta: float = 0.0,
        rho: float = 0.05,
        gamma: float = 0.0,
        noise: Corruption | str | None = None,
        penalty_method: str = "auto",
        penalty_probes: int | None = None,
        seed: int = 0,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        if isinstance(in_features, bool) or not isinstance(in_features, int) or in_features < 1:
            raise ValueError(f"in_features: got {in_features!r}, expected a positive integer")
        hidden = tuple(hidden)
        if not hidden or any(
            isinstance(h, bool) or not isinstance(h, int) or h < 1 for h in hidden
        ):
            raise ValueError(f"hidden: got {hidden!r}, expected one or more positive widths")
        if variant not in VARIANTS:
            raise ValueError(f"variant: got {variant!r}, expected one of {', '.join(VARIANTS)}")
        act = get_activation(activation).name
        out_act = get_activation(output_activation).name
        if reconstruction not in RECONSTRUCTIONS:
            raise ValueError(f"reconstruction: got {reconstruction!r}, expected 'mse' or 'bce'")
        if reconstruction == "bce" and out_act != "sigmoid":
            raise ValueError(
                f"output_activation: got {out_act!r} with reconstruction 'bce', expected "
                "'sigmoid' (cross-entropy needs reconstructions in (0, 1))"
            )
        weights = {
            "lam": _check_weight("lam", lam),
            "beta": _check_weight("beta", beta),
            "gamma": _check_weight("gamma", gamma),
        }
        rho = check_rho(rho)
        if isinstance(noise, str):
            noise = parse_corruption(noise)

        # Each variant turns on exactly its own part of the loss.
        own = _VARIANT_WEIGHT.get(variant)
        for name, value in weights.items():
            if name == own and value == 0.0:
                raise ValueError(f"{name}: got 0 for variant {variant!r}, expected a weight > 0")
            if name != own and value != 0.0:
                raise ValueError(
                    f"{name}: got {value:g} for variant {variant!r}, expected 0 ({name} belongs "
                    f"to variant {next(v for v, w in _VARIANT_WEIGHT.items() if w == name)!r})"
                )
        if variant == "denoising" and noise is None:
            raise ValueError("noise: got None for variant 'denoising', expected a corruption")
        if variant != "denoising" and noise is not None:
            raise ValueError(
                f"noise: got {noise.spec()!r} for variant {variant!r}, expected None "
                "(input corruption belongs to variant 'denoising')"
            )
        if variant == "sparse-kl" and act != "sigmoid":
            raise ValueError(
                f"activation: got {act!r} for variant 'sparse-kl', expected 'sigmoid' (the KL "
                "penalty needs codes in [0, 1])"
            )
        if penalty_method not in PENALTIES:
            raise ValueError(
                f"penalty_method: got {penalty_method!r}, expected one of {', '.join(PENALTIES)}"
            )
        if penalty_probes is not None and (
            isinstance(penalty_probes, bool)
            or not isinstance(penalty_probes, int)
            or penalty_probes < 1
        ):
            raise ValueError(
                f"penalty_probes: got {penalty_probes!r}, expected a positive integer or None"
            )
        if variant != "contractive" and (penalty_method != "auto" or penalty_probes is not None):
            raise ValueError(
                f"penalty_method, penalty_probes: got {penalty_method!r}, {penalty_probes!r} for "
                f"variant {variant!r}, expected 'auto', None (they belong to variant "
                "'contractive')"
            )
        if penalty_method == "exact" and penalty_probes is not None:
            raise ValueError(
                f"penalty_probes: got {penalty_probes} with penalty_method 'exact', expected "
                "None (probes are drawn by 'estimate' and 'auto' only)"
            )

        self.in_features = in_features
        self.hidden = hidden
        self.variant = variant
        self.activation = act
        self.output_activation = out_act
        self.tied = bool(tied)
        self.use_bias = bool(bias)
        self.reconstruction = reconstruction
        self.lam, self.beta, self.gamma = weights["lam"], weights["beta"], weights["gamma"]
        self.rho = rho
        self.noise: Corruption | None = noise
        self.penalty_method = penalty_method
        self.penalty_probes = penalty_probes
        self.seed = int(seed)
        self.backend = backend

        widths = (in_features, *hidden)
        self.encoder = torch.nn.ModuleList(
            FusedEncoder(widths[i], widths[i + 1], act, bias=bias, backend=backend)
            for i in range(len(hidden))
        )
        if self.tied:
            # Layer i of the decoder maps H_{i+1} -> H_i with the weight W_i^T of encoder layer i;
            # only its bias (started at zero) is a new parameter.
            self.decoder = None
            self.decoder_bias = (
                torch.nn.ParameterList(
                    torch.nn.Parameter(torch.zeros(widths[i])) for i in range(len(hidden))
                )
                if bias
                else None
            )
        else:
            self.decoder = torch.nn.ModuleList(
                torch.nn.Linear(widths[i + 1], widths[i], bias=bias) for i in range(len(hidden))
            )
            self.decoder_bias = None
        self._generator: torch.Generator | None = None
        self._generator_state: Tensor | None = None
        # Training steps that drew encoder noise so far: the step of the next Noise key.
        self.noise_step = 0
        self.last_penalty: DeepPenalty | None = None
        self.process_group = None

    # -- configuration -------------------------------------------------------------------------

    @property
    def config(self) -> dict:
        """Every constructor argument, JSON-ready: Autoencoder(**config) rebuilds this model."""
        return {
            "in_features": self.in_features,
            "hidden": list(self.hidden),
            "variant": self.variant,
            "activation": self.activation,
            "output_activation": self.output_activation,
            "tied": self.tied,
            "bias": self.use_bias,
            "reconstruction": self.reconstruction,
            "lam": self.lam,
            "beta": self.beta,
            "rho": self.rho,
            "gamma": self.gamma,
            "noise": self.noise.spec() if self.noise is not None else None,
            "penalty_method": self.penalty_method,
            "penalty_probes": self.penalty_probes,
            "seed": self.seed,
            "backend": self.backend,
        }

    @property
    def code_size(self) -> int:
        return self.hidden[-1]

    def set_process_group(self, group) -> None:
        """Reduce the batch means of the training loss over a torch.distributed group (None: this
        process alone). In eval mode every mean stays local (see the module docstring)."""
        self.process_group = group
        for layer in self.encoder:
            layer.process_group = group

    # -- corruption noise ----------------------------------------------------------------------

    def generator(self, device: torch.device) -> torch.Generator:
        """The generator the corruption noise is drawn from, seeded with ``seed`` on first use."""
        if self._generator is None or self._generator.device != torch.device(device):
            self._generator = torch.Generator(device=device)
            self._generator.manual_seed(self.seed)
            if self._generator_state is not None:
                self._generator.set_state(self._generator_state)
                self._generator_state = None
        return self._generator

    def generator_state(self) -> Tensor | None:
        """The state of the noise generator (for checkpoints), None if it never ran."""
        if self._generator is not None:
            return self._generator.get_state()
        return self._generator_state

    def set_generator_state(self, state: Tensor | None) -> None:
        """Restore a state from generator_state(); the next noise continues from there."""
        self._generator = None
        self._generator_state = state

    def corrupt(self, x: Tensor) -> Tensor:
        """x~: x with this model's corruption applied (x itself when it has none), drawn in
        PyTorch from the model's generator. Training uses it only when the first encoder layer
        is not a FusedEncoder; otherwise the fused pass draws x~ itself (encoder_noise)."""
        if self.noise is None:
            return x
        return self.noise(x, self.generator(x.device))

    def encoder_noise(self) -> Noise | None:
        """The corruption for this training step as a fastae Noise keyed by (seed, noise_step),
        for the first encoder layer to draw inside its fused pass; advances noise_step. None in
        eval mode, for a model without corruption, or when the first layer is not fused."""
        if self.noise is None or not self.training or not self.encoder_noise_is_fused():
            return None
        noise = Noise(
            self.noise.kind,
            self.noise.level,
            self.noise.low,
            self.noise.high,
            seed=self.seed,
            step=self.noise_step,
        )
        self.noise_step += 1
        return noise

    def encoder_noise_is_fused(self) -> bool:
        """Whether training corruption is drawn inside the first encoder layer's fused pass."""
        return self.noise is not None and isinstance(self.encoder[0], FusedEncoder)

    def _train_input(self, x: Tensor) -> tuple[Tensor, Noise | None]:
        """What the encoder gets in this mode: (x, Noise) when the fused pass corrupts, (x~,
        None) when PyTorch does, (x, None) in eval mode or without corruption."""
        if not self.training or self.noise is None:
            return x, None
        if self.encoder_noise_is_fused():
            return x, self.encoder_noise()
        return self.corrupt(x), None

    # -- forward -------------------------------------------------------------------------------

    def encode(self, x: Tensor) -> Tensor:
        """The code h_k of x: (B, D) -> (B, H_k). No corruption (that belongs to training)."""
        return self._encode_layers(x)[-1]

    def decode_logits(self, h: Tensor) -> Tensor:
        """The pre-activation of the reconstruction: (B, H_k) -> (B, D)."""
        z = h
        act = get_activation(self.activation)
        for i in reversed(range(len(self.hidden))):
            if self.tied:
                bias = self.decoder_bias[i] if self.decoder_bias is not None else None
                weight_t = self.encoder[i].weight
                z = z @ weight_t if bias is None else torch.addmm(bias, z, weight_t)
            else:
                z = self.decoder[i](z)
            if i > 0:
                z = act.forward(z)
        return z

    def decode(self, h: Tensor) -> Tensor:
        """The reconstruction x_hat of the code h: (B, H_k) -> (B, D)."""
        return get_activation(self.output_activation).forward(self.decode_logits(h))

    def forward(self, x: Tensor) -> Tensor:
        """x_hat: (B, D) -> (B, D). In training mode a denoising model encodes the corrupted x~;
        in eval mode nothing is corrupted."""
        x_in, noise = self._train_input(x)
        return self.decode(self._encode_layers(x_in, noise)[-1])

    def loss(self, x: Tensor, *, corrupted: Tensor | None = None) -> Losses:
        """The loss of the batch x (B, D): reconstruction of the clean x plus the penalties.

        In training mode a denoising model reconstructs x from x~ (fresh noise every call), or
        from ``corrupted`` when given: the trainer of several processes corrupts the global batch
        and hands each rank its rows, so that the noise is that of one process.
        """
        if self.reconstruction == "bce":
            check_targets(x)
        if corrupted is not None and tuple(corrupted.shape) != tuple(x.shape):
            raise ValueError(
                f"corrupted: got shape {tuple(corrupted.shape)}, expected the shape of x, "
                f"{tuple(x.shape)}"
            )
        if self.training and corrupted is not None:
            x_in, noise = corrupted, None
        else:
            x_in, noise = self._train_input(x)
        codes = self._encode_layers(x_in, noise)
        logits = self.decode_logits(codes[-1])
        group = self.process_group if self.training else None
        if group is not None:
            # A mean over every entry of every rank: local sum, global count (DESIGN section 4).
            if self.reconstruction == "bce":
                local = F.binary_cross_entropy_with_logits(logits, x, reduction="sum")
            else:
                x_hat = get_activation(self.output_activation).forward(logits)
                local = F.mse_loss(x_hat, x, reduction="sum")
            reconstruction = global_mean(local, x.numel(), group)
        elif self.reconstruction == "bce":
            reconstruction = F.binary_cross_entropy_with_logits(logits, x)
        else:
            x_hat = get_activation(self.output_activation).forward(logits)
            reconstruction = F.mse_loss(x_hat, x)

        code_stats = self.encoder[-1].last_stats
        penalty = reconstruction.new_zeros(())
        if self.lam:
            penalty = penalty + self.lam * self._contractive(x_in, codes)
        if self.beta:
            penalty = penalty + self.beta * kl_sparsity(code_stats.rho_hat, self.rho)
        if self.gamma:
            penalty = penalty + self.gamma * code_stats.l1
        penalty = penalty.to(reconstruction.dtype)
        return Losses(reconstruction + penalty, reconstruction, penalty)

    def _encode_layers(self, x: Tensor, noise: Noise | None = None) -> list[Tensor]:
        """The codes h_1, ..., h_k of every encoder layer (their statistics in last_stats); the
        first layer corrupts its input with ``noise`` when one is given."""
        codes = []
        h = x
        for i, layer in enumerate(self.encoder):
            h = layer(h, noise=noise) if i == 0 and noise is not None else layer(h)
            codes.append(h)
        return codes

    def penalty_plan(self, batch: int) -> dict:
        """How the contractive penalty of a batch of ``batch`` samples will be computed, from the
        shapes alone: {"method": "exact" or "estimate", "side": "code" or "input", "k": probes
        (0 for exact)}. One layer with a method other than "estimate" is the closed form
        (method "exact", side "code"). Raises ValueError for variants without the penalty."""
        if self.variant != "contractive":
            raise ValueError(f"variant: got {self.variant!r}, expected 'contractive'")
        if len(self.hidden) == 1 and self.penalty_method != "estimate":
            return {"method": "exact", "side": "code", "k": 0}
        method, side, k = choose_method(
            batch, (self.in_features, *self.hidden), penalty=self.penalty_method,
            k=self.penalty_probes,
        )  # fmt: skip
        return {"method": method, "side": side, "k": k}

    def _contractive(self, x: Tensor, codes: list[Tensor]) -> Tensor:
        """The contractive penalty of the encoder: mean over the batch of ||dh_k/dx||_F^2.

        One layer: the closed form that the fused pass computed with the code. Several layers:
        the whole encoder's Jacobian D_k W_k ... D_1 W_1 from the codes h_1, ..., h_k of this
        forward (no second pass), exact or estimated as penalty_method says; the probes come
        from the model's generator, whose state the checkpoint keeps. ``x`` (the encoder's
        input) is not needed: every f'_l comes from h_l.
        """
        if len(codes) == 1 and self.penalty_method != "estimate":
            value = self.encoder[0].last_stats.contractive
            self.last_penalty = DeepPenalty(value.detach(), "exact", "code", 0)
            return value
        layers = [(layer.weight, layer.bias, layer.activation) for layer in self.encoder]
        result = deep_contractive_penalty(
            codes, layers, penalty=self.penalty_method, k=self.penalty_probes,
            generator=self.generator(codes[0].device),
        )  # fmt: skip
        self.last_penalty = result._replace(value=result.value.detach())
        group = self.process_group if self.training else None
        if group is not None:
            # The batch mean over every rank, as for the statistics of the fused pass.
            count = codes[0].shape[0]
            return global_mean(result.value * count, count, group)
        return result.value
