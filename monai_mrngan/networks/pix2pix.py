"""pix2pix next-slice generator: a MONAI UNet predicting slice i +- 1 from slice i, in [-1, 1].

Two parameterizations (``residual``):

- ``residual=True`` (kept, the default): ``clamp(x + residual_scale * tanh(net(x)), -1, 1)``.
  With ``residual_scale=2`` this is exactly ``clamp(x01 + tanh(net), 0, 1)`` in [0, 1] units, so
  the correction can reach any value, and with the last convolution zero-initialised the
  untrained model *is* the copy baseline; training only has to learn the slice-to-slice change.
  Measured on IXI it passes the copy baseline within minutes of CPU training.
- ``residual=False``: ``tanh(net(x))`` as in the pix2pix paper; it must first learn to copy the
  whole head and was still ten times worse than copying after a hundred iterations.

Direction (``direction_mode``):

- ``"input"``: one UNet with a second input channel filled with the direction (+1 / -1);
- ``"pair"``: two UNets, ``forward_net`` for +1 and ``backward_net`` for -1, each sample routed to
  its own one.

Both are called the same way, ``generator(x, direction)`` with ``x`` (B, 1, H, W) in [-1, 1] and
``direction`` a (B,) / (B, 1) tensor or an int; ``direction=None`` means +1 for every sample.
Depth is ``len(channels)``: H and W must be divisible by ``2 ** (len(channels) - 1)`` (64, 128 and
256 px all work with the default four levels). MONAI's UNet is used as is; this wrapper only adds
the direction channel / routing, the output parameterization and the zero initialisation, which
MONAI's UNet has no options for.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from monai.networks.nets import UNet

__all__ = ["Pix2PixGenerator", "DIRECTION_MODES"]

DIRECTION_MODES = ("input", "pair")


def _unet(in_channels: int, channels: Sequence[int], strides: Sequence[int], num_res_units: int, dropout: float, norm) -> torch.nn.Sequential:
    """MONAI UNet ending in ``channels[0]`` features, then a 1x1 convolution head to one channel.

    The separate head is what can be zero-initialised: MONAI's UNet ends in a residual unit whose
    identity path would still pass the transposed convolution's output through.
    """
    unet = UNet(
        spatial_dims=2,
        in_channels=in_channels,
        out_channels=channels[0],
        channels=tuple(channels),
        strides=tuple(strides),
        num_res_units=num_res_units,
        dropout=dropout,
        norm=norm,
    )
    return torch.nn.Sequential(unet, torch.nn.PReLU(), torch.nn.Conv2d(channels[0], 1, kernel_size=1))


class Pix2PixGenerator(torch.nn.Module):
    """UNet generator for next-slice prediction in [-1, 1] (see the module docstring).

    Args:
        channels: feature channels per UNet level; its length sets the depth.
        strides: downsampling strides between levels (default all 2).
        num_res_units: residual units per level (MONAI UNet).
        dropout: dropout probability in every UNet block (pix2pix uses dropout as its noise).
        norm: normalisation of the UNet blocks (MONAI name, default instance norm).
        residual: output ``clamp(x + residual_scale * tanh(net), -1, 1)`` instead of ``tanh(net)``.
        residual_scale: scale of the correction in [-1, 1] units (2 = the whole range).
        direction_mode: ``"input"`` (one model, direction channel) or ``"pair"`` (two models).
        zero_init: zero the last convolution (residual mode starts as the copy baseline).
    """

    def __init__(
        self,
        channels: Sequence[int] = (32, 64, 128, 256),
        strides: Sequence[int] | None = None,
        num_res_units: int = 1,
        dropout: float = 0.0,
        norm: str | tuple = "INSTANCE",
        residual: bool = True,
        residual_scale: float = 2.0,
        direction_mode: str = "input",
        zero_init: bool = True,
    ) -> None:
        super().__init__()
        if direction_mode not in DIRECTION_MODES:
            raise ValueError(f"direction_mode must be one of {DIRECTION_MODES}, got {direction_mode!r}")
        if len(channels) < 2:
            raise ValueError(f"channels needs at least 2 levels, got {tuple(channels)}")
        strides = tuple(strides) if strides is not None else (2,) * (len(channels) - 1)
        if len(strides) != len(channels) - 1:
            raise ValueError(f"strides needs {len(channels) - 1} entries for {len(channels)} channels, got {strides}")
        self.residual = bool(residual)
        self.residual_scale = float(residual_scale)
        self.direction_mode = direction_mode
        self.divisor = int(math.prod(strides))
        if direction_mode == "input":
            self.net = _unet(2, channels, strides, num_res_units, dropout, norm)
            nets = [self.net]
        else:
            self.forward_net = _unet(1, channels, strides, num_res_units, dropout, norm)
            self.backward_net = _unet(1, channels, strides, num_res_units, dropout, norm)
            nets = [self.forward_net, self.backward_net]
        if zero_init and residual:
            for net in nets:
                torch.nn.init.zeros_(net[-1].weight)
                torch.nn.init.zeros_(net[-1].bias)

    @staticmethod
    def direction_tensor(direction: torch.Tensor | int | float | None, batch: int, device: torch.device) -> torch.Tensor:
        """Directions as a (B,) float tensor of +1 / -1 (``None`` -> all +1)."""
        if direction is None:
            direction = 1
        d = torch.as_tensor(direction, dtype=torch.float32, device=device).reshape(-1)
        if d.numel() == 1:
            d = d.expand(batch)
        if d.numel() != batch:
            raise ValueError(f"got {d.numel()} directions for a batch of {batch} slices")
        if not bool(torch.all((d == 1) | (d == -1))):
            raise ValueError(f"directions must be +1 or -1, got {sorted(set(d.tolist()))}")
        return d

    def _raw(self, x: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        if self.direction_mode == "input":
            plane = d.view(-1, 1, 1, 1).expand(-1, 1, *x.shape[2:])
            return self.net(torch.cat([x, plane], dim=1))
        fwd = d > 0
        if bool(fwd.all()):
            return self.forward_net(x)
        if not bool(fwd.any()):
            return self.backward_net(x)
        out = torch.empty_like(x)
        out[fwd] = self.forward_net(x[fwd]).to(out.dtype)
        out[~fwd] = self.backward_net(x[~fwd]).to(out.dtype)
        return out

    def forward(self, x: torch.Tensor, direction: torch.Tensor | int | None = None) -> torch.Tensor:
        """Predict the neighbouring slice: ``x`` (B, 1, H, W) in [-1, 1] -> (B, 1, H, W) in [-1, 1]."""
        if x.ndim != 4 or x.shape[1] != 1:
            raise ValueError(f"expected slices shaped (B, 1, H, W), got {tuple(x.shape)}")
        if x.shape[-2] % self.divisor or x.shape[-1] % self.divisor:
            raise ValueError(
                f"slice size {tuple(x.shape[-2:])} is not divisible by {self.divisor}; "
                "use a multiple of it or change the network depth (channels/strides)"
            )
        d = self.direction_tensor(direction, x.shape[0], x.device)
        raw = self._raw(x, d)
        if self.residual:
            return torch.clamp(x + self.residual_scale * torch.tanh(raw), -1.0, 1.0)
        return torch.tanh(raw)
