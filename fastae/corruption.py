"""Input corruptions for denoising autoencoders (DESIGN section 7).

    gaussian(sigma)        x~ = clip(x + sigma * N(0, 1), low, high)
    masking(nu)            each entry is set to 0 with probability nu; the others are kept as they
                           are (no 1 / (1 - nu) rescaling: x~ is an input, not dropout)
    salt-and-pepper(nu)    each entry is replaced with probability nu, by low or high with equal
                           probability

Every value stays inside the data range [low, high] ([0, 1] for data scaled by fastae.data).
The noise is drawn from a torch.Generator passed in by the caller. Metrics and plots corrupt
their inputs here. Training does not: a denoising Autoencoder hands its Corruption to the first
fused encoder layer as a fastae.functional.Noise keyed by (model seed, training step), which draws
the same distributions inside the fused pass without storing x~ (fastae.functional.noise).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["KINDS", "Corruption", "parse_corruption"]

KINDS = ("gaussian", "masking", "salt-and-pepper")


@dataclass(frozen=True)
class Corruption:
    """One corruption: ``kind`` in KINDS and its ``level`` (sigma for gaussian, the fraction nu of
    entries hit for masking and salt-and-pepper); values are kept in [low, high]."""

    kind: str
    level: float
    low: float = 0.0
    high: float = 1.0

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(
                f"corruption kind: got {self.kind!r}, expected one of {', '.join(KINDS)}"
            )
        level = self.level
        if isinstance(level, bool) or not isinstance(level, (int, float)):
            raise ValueError(f"corruption level: got {level!r}, expected a number")
        if self.kind == "gaussian" and not 0.0 < level:
            raise ValueError(f"gaussian sigma: got {level!r}, expected a number > 0")
        if self.kind != "gaussian" and not 0.0 < level < 1.0:
            raise ValueError(
                f"{self.kind} fraction: got {level!r}, expected a number strictly between 0 and 1"
            )
        if not self.low < self.high:
            raise ValueError(f"data range: got [{self.low}, {self.high}], expected low < high")

    def __call__(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """x~ of the shape and dtype of x, drawn from ``generator`` (on the device of x)."""
        if self.kind == "gaussian":
            noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            return (x + self.level * noise).clamp_(self.low, self.high)

        hit = torch.rand(x.shape, generator=generator, device=x.device) < self.level
        if self.kind == "masking":
            return x.masked_fill(hit, 0.0)

        # salt-and-pepper: a second draw picks high (salt) or low (pepper) for each hit entry.
        salt = torch.rand(x.shape, generator=generator, device=x.device) < 0.5
        value = torch.where(salt, self.high, self.low).to(x.dtype)
        return torch.where(hit, value, x)

    def spec(self) -> str:
        """The KIND:LEVEL text that parse_corruption reads back."""
        return f"{self.kind}:{self.level:g}"


def parse_corruption(text: str, low: float = 0.0, high: float = 1.0) -> Corruption:
    """Read KIND:LEVEL, e.g. "masking:0.3", "gaussian:0.2", "salt-and-pepper:0.1"."""
    kind, sep, level = str(text).partition(":")
    if not sep:
        raise ValueError(
            f"noise: got {text!r}, expected KIND:LEVEL with KIND one of {', '.join(KINDS)}"
        )
    try:
        value = float(level)
    except ValueError:
        raise ValueError(f"noise: got level {level!r} in {text!r}, expected a number") from None
    return Corruption(kind.strip(), value, low, high)
