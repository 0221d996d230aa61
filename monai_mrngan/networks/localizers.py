"""Slice localizers: 2D axial slice (B, 1, H, W) in [0, 1] -> position ``p`` (B, 1) in [0, 1].

Four networks, each selectable by ``network_def`` in a bundle config and sized by
``spatial_size`` (the prepared in-plane size, e.g. ``[128, 128]``):

- :class:`LocalizerCNN`: the paper's network (four 3x3 "same" convolutions with ReLU,
  128 -> 64 -> 32 -> 1 filters, flatten, 256-unit ReLU dense layer, one sigmoid output),
  built from MONAI ``Convolution`` blocks.
- :class:`LocalizerFFN`: a feed-forward network on the flattened slice (MONAI ``FullyConnectedNet``).
- :class:`LocalizerDCNN`: a deeper strided CNN (MONAI ``Regressor`` with plain convolutions).
- :class:`LocalizerDCNNRes`: the same depth with residual units (MONAI ``Regressor`` with ``ResidualUnit``).

Every network ends in a sigmoid so its output is a valid ``p``; they share :class:`_SigmoidHead`
so state_dict keys are ``net.*`` for all of them.
"""

from __future__ import annotations

from typing import Sequence

import torch
from monai.networks.blocks import Convolution
from monai.networks.nets import FullyConnectedNet, Regressor
from torch import nn

__all__ = ["LocalizerCNN", "LocalizerFFN", "LocalizerDCNN", "LocalizerDCNNRes", "LOCALIZERS"]


def _size(spatial_size: Sequence[int] | int, downsample: int = 1) -> tuple[tuple[int, int], tuple[int, int]]:
    """(input size, working size after ``downsample``) with checks."""
    size = (int(spatial_size),) * 2 if isinstance(spatial_size, int) else tuple(int(s) for s in spatial_size)
    if len(size) != 2 or min(size) < 1:
        raise ValueError(f"spatial_size must be two positive ints (H, W), got {spatial_size!r}")
    if downsample < 1 or size[0] % downsample or size[1] % downsample:
        raise ValueError(f"downsample {downsample} must be >= 1 and divide spatial_size {size}")
    return size, (size[0] // downsample, size[1] // downsample)  # type: ignore[return-value]


class _SigmoidHead(nn.Module):
    """``sigmoid(net(pool(x)))`` reshaped to (B, 1); checks the input shape once per call.

    ``downsample`` > 1 average-pools the input by that factor first (no weights), so a network
    that accepts prepared 128 px slices can run at 64 px where compute is scarce (CPU benchmarks).
    """

    def __init__(self, net: nn.Module, spatial_size: tuple[int, int], in_channels: int = 1, downsample: int = 1) -> None:
        super().__init__()
        self.pool = nn.AvgPool2d(downsample) if downsample > 1 else nn.Identity()
        self.net = net
        self.spatial_size = spatial_size
        self.in_channels = in_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or tuple(x.shape[1:]) != (self.in_channels, *self.spatial_size):
            raise ValueError(
                f"{type(self).__name__} expects slices shaped (B, {self.in_channels}, {self.spatial_size[0]}, "
                f"{self.spatial_size[1]}), got {tuple(x.shape)}"
            )
        return torch.sigmoid(self.net(self.pool(x)).reshape(x.shape[0], 1))


class LocalizerCNN(_SigmoidHead):
    """The paper's localizer: 4 same-padded 3x3 conv + ReLU (128, 64, 32, 1), dense 256 + ReLU, sigmoid.

    Args:
        spatial_size: input (H, W); the dense layer has ``H * W`` inputs.
        in_channels: input channels (1 for a grayscale slice).
        filters: output channels of the four convolutions.
        hidden: units of the dense layer.
        downsample: average-pool the input by this factor first (1 = the paper's network).
    """

    def __init__(
        self,
        spatial_size: Sequence[int] | int = (128, 128),
        in_channels: int = 1,
        filters: Sequence[int] = (128, 64, 32, 1),
        hidden: int = 256,
        downsample: int = 1,
    ) -> None:
        size, work = _size(spatial_size, downsample)
        layers: list[nn.Module] = []
        prev = in_channels
        for c in filters:
            layers.append(Convolution(spatial_dims=2, in_channels=prev, out_channels=int(c), kernel_size=3, act="RELU", norm=None))
            prev = int(c)
        layers += [nn.Flatten(), nn.Linear(prev * work[0] * work[1], hidden), nn.ReLU(), nn.Linear(hidden, 1)]
        super().__init__(nn.Sequential(*layers), size, in_channels, downsample)
        # He initialisation with a small positive bias: with PyTorch's default init the single-filter
        # ReLU bottleneck often starts (or soon ends) all zero and the output collapses to a constant.
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                nn.init.constant_(m.bias, 0.01)


class LocalizerFFN(_SigmoidHead):
    """Feed-forward localizer on the flattened slice (the paper's FFN baseline).

    Args:
        spatial_size: input (H, W).
        hidden: widths of the hidden layers.
        dropout: dropout after each hidden layer.
    """

    def __init__(
        self,
        spatial_size: Sequence[int] | int = (128, 128),
        in_channels: int = 1,
        hidden: Sequence[int] = (512, 256),
        dropout: float | None = 0.1,
        downsample: int = 1,
    ) -> None:
        size, work = _size(spatial_size, downsample)
        net = FullyConnectedNet(in_channels * work[0] * work[1], 1, list(hidden), dropout=dropout, act="RELU")
        super().__init__(net, size, in_channels, downsample)


class LocalizerDCNN(_SigmoidHead):
    """Deeper CNN: a MONAI ``Regressor`` of strided convolutions (no skips) and a linear output.

    Args:
        spatial_size: input (H, W).
        channels / strides: one entry per convolution layer.
        num_res_units: 0 for plain convolutions; > 0 turns each layer into a ``ResidualUnit``.
        norm / act / dropout: as in MONAI's ``Regressor``.
    """

    def __init__(
        self,
        spatial_size: Sequence[int] | int = (128, 128),
        in_channels: int = 1,
        channels: Sequence[int] = (16, 32, 32, 64, 64, 128, 128, 256),
        strides: Sequence[int] = (2, 1, 2, 1, 2, 1, 2, 2),
        num_res_units: int = 0,
        norm: str | tuple = "BATCH",
        act: str | tuple = "PRELU",
        dropout: float | None = None,
        downsample: int = 1,
    ) -> None:
        size, work = _size(spatial_size, downsample)
        if len(channels) != len(strides):
            raise ValueError(f"channels ({len(channels)}) and strides ({len(strides)}) must have the same length")
        net = Regressor(
            in_shape=(in_channels, *work),
            out_shape=(1,),
            channels=tuple(channels),
            strides=tuple(strides),
            num_res_units=num_res_units,
            norm=norm,
            act=act,
            dropout=dropout,
        )
        super().__init__(net, size, in_channels, downsample)


class LocalizerDCNNRes(LocalizerDCNN):
    """Deeper CNN with residual connections: :class:`LocalizerDCNN` built from MONAI ``ResidualUnit``."""

    def __init__(
        self,
        spatial_size: Sequence[int] | int = (128, 128),
        in_channels: int = 1,
        channels: Sequence[int] = (16, 32, 32, 64, 64, 128, 128, 256),
        strides: Sequence[int] = (2, 1, 2, 1, 2, 1, 2, 2),
        num_res_units: int = 2,
        norm: str | tuple = "BATCH",
        act: str | tuple = "PRELU",
        dropout: float | None = None,
        downsample: int = 1,
    ) -> None:
        if num_res_units < 1:
            raise ValueError("LocalizerDCNNRes needs num_res_units >= 1; use LocalizerDCNN for plain convolutions")
        super().__init__(spatial_size, in_channels, channels, strides, num_res_units, norm, act, dropout, downsample)


LOCALIZERS = {"FFN": LocalizerFFN, "CNN": LocalizerCNN, "DCNN": LocalizerDCNN, "DCNN-Res": LocalizerDCNNRes}
"""The paper's Table 1 names -> classes (used by scripts/compare_localizers.py)."""
