"""Modules built on the fused encoder.

FusedEncoder is a drop-in for ``nn.Linear`` followed by an activation: the same parameters
(``weight`` of shape (H, D), ``bias`` of shape (H,)), the same initialisation, and it loads an
``nn.Linear`` state_dict. Its forward is one call to fastae.encode, so the statistics of the
layer (contractive, rho_hat, l1; DESIGN section 2) come out of the same pass as the code h and
are kept in ``last_stats`` for the loss to use. A denoising model passes its input corruption
as ``noise`` (a fastae.functional.Noise): the layer then encodes x~, drawn inside the fused
pass, instead of x.

With ``process_group`` set, the statistics of a forward in training mode are means over the
samples of every rank of the group (DESIGN section 4), as SyncBatchNorm does for its batch
statistics; in eval mode each process keeps to its own batch, so that evaluation needs no
collective and may run on one rank alone.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastae.activations import get_activation
from fastae.functional import EncodeStats
from fastae.functional import Noise
from fastae.functional import encode

__all__ = ["FusedEncoder"]


class FusedEncoder(torch.nn.Linear):
    """h = f(x W^T + b), with the batch statistics of the pass kept in ``last_stats``.

    Args:
        in_features: D, the size of each input sample.
        out_features: H, the number of hidden units.
        activation: "sigmoid", "tanh", "relu", "softplus" or "identity".
        bias: whether the layer has a bias b (as in nn.Linear).
        backend: "auto", "torch" or "triton" (see fastae.encode).
        process_group: a torch.distributed group over which the statistics are reduced in
            training mode, or None (see the module docstring). Not part of the state_dict.

    Attributes:
        last_stats: EncodeStats of the last forward (differentiable, means over its batch), or
            None before the first forward.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        activation: str = "sigmoid",
        bias: bool = True,
        *,
        backend: str = "auto",
        process_group=None,
        device=None,
        dtype=None,
    ) -> None:
        for name, value in (("in_features", in_features), ("out_features", out_features)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: got {value!r}, expected a positive integer")
        # nn.Linear's constructor allocates and initialises weight and bias exactly as usual.
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.activation = get_activation(activation).name
        self.backend = backend
        self.process_group = process_group
        self.last_stats: EncodeStats | None = None

    def forward(self, x: Tensor, noise: Noise | None = None) -> Tensor:
        """x: (*, D) -> h: (*, H); the statistics of this batch go to ``last_stats``.

        With ``noise`` the layer encodes the corrupted x~ (see fastae.encode), not x.
        """
        group = self.process_group if self.training else None
        h, stats = encode(
            x,
            self.weight,
            self.bias,
            self.activation,
            backend=self.backend,
            noise=noise,
            process_group=group,
        )
        self.last_stats = stats
        return h

    def __getstate__(self) -> dict:
        # last_stats belongs to the last forward's autograd graph: a copy or a pickle of the
        # layer starts without it, as a fresh layer does (copy.deepcopy refuses non-leaf
        # tensors, so keeping it would break deepcopy, AveragedModel and the like).
        state = self.__dict__.copy()
        state["last_stats"] = None
        return state

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, activation={self.activation!r}"
