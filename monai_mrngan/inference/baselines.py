"""Baselines MRNGAN is judged against, as runners for :func:`~.reconstruct.fill_volume`.

- ``copy``: the input slice repeated (:func:`copy_runner`).
- ``prior``: the general brain at each position, fitted to the input slice (:func:`prior_runner`).
- ``pix2pix_iterative``: pix2pix rolled out on its own outputs, both ways (:func:`pix2pix_runner`).
- ``linear``: for few-slice input, copy runs from both sides of a gap blended with linear weights
  by distance, which is exactly linear interpolation between the two given slices (and nearest
  copy beyond the outermost ones); :func:`linear_fill` is the same as a plain function.

:class:`MeanBrainPrior` is the plain population mean over ``p`` from a prepared split, with the
prior contract's ``slice_at``; it is the unaligned "mean brain" floor of BASELINES.md and a
stand-in prior for tests and for runs before the brain generalization stage is trained.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import numpy as np
import torch

from ..networks.recurrent import NextFn
from .reconstruct import Runner, fill_volume, prior_fn_for, run_positions

__all__ = ["copy_runner", "prior_runner", "pix2pix_runner", "linear_fill", "MeanBrainPrior"]


def copy_runner() -> Runner:
    """Every generated slice is the start slice."""

    def run(starts: torch.Tensor, start_positions: torch.Tensor, directions: torch.Tensor, steps: int, step_p: float) -> torch.Tensor:
        return starts[:, None].expand(-1, steps, -1, -1, -1).clone()

    return run


def prior_runner(prior: Any, fit: bool = True) -> Runner:
    """The prior slice at each position of the run (fitted to the start slice when ``fit``)."""

    def run(starts: torch.Tensor, start_positions: torch.Tensor, directions: torch.Tensor, steps: int, step_p: float) -> torch.Tensor:
        pos = run_positions(start_positions, directions, steps, step_p)[:, 1:]
        fn = prior_fn_for(prior, starts if fit else None, start_positions)
        return fn(pos).to(starts).clamp(0, 1)

    return run


def pix2pix_runner(next_fn: NextFn) -> Runner:
    """pix2pix fed its own outputs (``next_fn`` as from :func:`~.reconstruct.next_fn_for`)."""

    @torch.no_grad()
    def run(starts: torch.Tensor, start_positions: torch.Tensor, directions: torch.Tensor, steps: int, step_p: float) -> torch.Tensor:
        prev, outs = starts, []
        for _ in range(steps):
            prev = next_fn(prev, directions).clamp(0, 1)
            outs.append(prev)
        return torch.stack(outs, 1)

    return run


def linear_fill(slices: torch.Tensor | np.ndarray, indices: Sequence[int], num_slices: int) -> torch.Tensor:
    """(D,H,W) volume by linear interpolation between given slices (nearest copy beyond the ends)."""
    grid = -np.arange(num_slices, dtype=np.float64)  # positions are irrelevant to copying
    return fill_volume(copy_runner(), torch.as_tensor(slices, dtype=torch.float32), indices, num_slices, grid, -1.0)


class MeanBrainPrior:
    """The population mean slice at each ``p``: volumes of a split averaged on a common ``p`` grid.

    Args:
        mean: (N, H, W) mean slices at ``grid`` (N,) positions (increasing ``p``).
    """

    def __init__(self, mean: torch.Tensor, grid: torch.Tensor) -> None:
        self.mean = torch.as_tensor(mean, dtype=torch.float32)
        self.grid = torch.as_tensor(grid, dtype=torch.float32)

    @classmethod
    def from_dataset(cls, dataset_dir: str | os.PathLike, split: str = "training", bins: int = 101, limit: int | None = None) -> "MeanBrainPrior":
        """Average a prepared split's volumes at ``bins`` positions from 0 to 1 (linear in ``p``)."""
        from ..data.datalist import load_split
        from ..data.io import load_volume

        entries = load_split(dataset_dir, split, limit)
        if not entries:
            raise ValueError(f"{dataset_dir}: split {split!r} is empty")
        grid = np.linspace(0.0, 1.0, bins)
        acc, cnt = None, np.zeros(bins)
        for e in entries:
            vol, _ = load_volume(e["image"])
            pos = np.asarray(e["positions"], dtype=np.float64)
            order = np.argsort(pos)  # increasing p
            pos, vol = pos[order], vol[:, :, order]
            if acc is None:
                acc = np.zeros((bins,) + vol.shape[:2])
            inside = (grid >= pos[0]) & (grid <= pos[-1])
            j = np.clip(np.searchsorted(pos, grid[inside]) - 1, 0, len(pos) - 2)
            w = ((grid[inside] - pos[j]) / np.maximum(pos[j + 1] - pos[j], 1e-9))[:, None, None]
            acc[inside] += (1 - w) * np.moveaxis(vol[:, :, j], 2, 0) + w * np.moveaxis(vol[:, :, j + 1], 2, 0)
            cnt[inside] += 1
        mean = acc / np.maximum(cnt, 1)[:, None, None]
        return cls(torch.from_numpy(mean.astype(np.float32)), torch.from_numpy(grid.astype(np.float32)))

    def slice_at(self, positions: torch.Tensor, reference: torch.Tensor | None = None, reference_position: float | None = None) -> torch.Tensor:
        """(B,1,H,W) mean slices at ``positions`` (B,) by linear interpolation in ``p`` (no fitting)."""
        p = torch.as_tensor(positions, dtype=torch.float32).reshape(-1).clamp(float(self.grid[0]), float(self.grid[-1]))
        j = (torch.searchsorted(self.grid, p) - 1).clamp(0, len(self.grid) - 2)
        w = ((p - self.grid[j]) / (self.grid[j + 1] - self.grid[j]).clamp_min(1e-9)).view(-1, 1, 1)
        return ((1 - w) * self.mean[j] + w * self.mean[j + 1])[:, None]
