"""Per-slice image quality, the one implementation every evaluation and baseline uses.

All metrics take [0, 1] intensities, data range 1:
- ``mse``, ``psnr`` (``10 log10(1 / mse)``), ``psnr_paper`` (the paper's convention,
  ``20 log10(255 / sqrt(mse))`` on [0, 1] data, i.e. PSNR + 48.13 dB),
- ``ssim``: MONAI's SSIM (Gaussian window 11, sigma 1.5) averaged over the whole slice,
- ``ssim_head``: the same SSIM map averaged over head pixels only (true slice > ``HEAD_THRESHOLD``),
  because background inflates whole-slice SSIM (an all-black guess scores about 0.54).

MONAI's ``SSIMMetric`` only returns the whole-image mean, so the map comes from MONAI's
``compute_ssim_and_cs`` and the head mask is applied here.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from monai.metrics.regression import compute_ssim_and_cs

from ..data.positions import HEAD_THRESHOLD
from ..transforms.shapes import as_slice_batch

SSIM_WIN = 11
SSIM_SIGMA = 1.5
PAPER_PSNR_OFFSET_DB = 20.0 * math.log10(255.0)
METRIC_NAMES = ("ssim", "ssim_head", "psnr", "mse")


def ssim_and_head(pred: torch.Tensor, target: torch.Tensor, head_threshold: float = HEAD_THRESHOLD) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per slice of (B, 1, H, W) batches: whole-slice SSIM (B,), head-only SSIM (B,) and head pixel count (B,)
    (head SSIM is 0 where there is no head). Differentiable in ``pred``: the metric and the loss that trains
    towards it share this one computation."""
    ssim_map, _ = compute_ssim_and_cs(
        pred, target, spatial_dims=2, kernel_size=[SSIM_WIN] * 2, kernel_sigma=[SSIM_SIGMA] * 2, data_range=1.0
    )
    # the map is the 'valid' convolution: crop the head mask by half a window on each side to match
    h0 = (target.shape[-2] - ssim_map.shape[-2]) // 2
    w0 = (target.shape[-1] - ssim_map.shape[-1]) // 2
    mask = (target[..., h0 : h0 + ssim_map.shape[-2], w0 : w0 + ssim_map.shape[-1]] > head_threshold).to(ssim_map.dtype)
    head_px = mask.flatten(1).sum(1)
    return ssim_map.flatten(1).mean(1), (ssim_map * mask).flatten(1).sum(1) / head_px.clamp_min(1.0), head_px


@torch.no_grad()
def slice_metrics(pred: torch.Tensor, target: torch.Tensor, head_threshold: float = HEAD_THRESHOLD) -> dict[str, torch.Tensor]:
    """Per-slice ``mse``, ``psnr``, ``ssim``, ``ssim_head`` (each a (B,) tensor) for [0, 1] slices."""
    pred, target = as_slice_batch(pred).clamp(0, 1), as_slice_batch(target)
    if pred.shape != target.shape:
        raise ValueError(f"prediction {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape")
    mse = ((pred - target) ** 2).flatten(1).mean(1)
    psnr = 10.0 * torch.log10(1.0 / mse.clamp_min(1e-10))
    ssim, ssim_head, head_px = ssim_and_head(pred, target, head_threshold)
    ssim_head = torch.where(head_px > 0, ssim_head, torch.full_like(ssim_head, float("nan")))
    return {"ssim": ssim, "ssim_head": ssim_head, "psnr": psnr, "mse": mse}


def paper_psnr(mse: float) -> float:
    """The paper's PSNR convention on [0, 1] data: ``20 log10(255 / sqrt(mse))``."""
    return PAPER_PSNR_OFFSET_DB - 10.0 * math.log10(max(mse, 1e-20))


def summarize(values: dict[str, torch.Tensor]) -> dict[str, float]:
    """Mean of each per-slice metric, ignoring NaNs (slices with no head pixels for ssim_head)."""
    return {k: float(torch.nanmean(torch.as_tensor(v, dtype=torch.float64))) for k, v in values.items()}


def pool_rows(rows: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Per-slice metric rows (each ``{name: (N_i,) tensor}``, as :func:`slice_metrics` gives) joined into one
    ``{name: (sum N_i,) tensor}``; no rows: an empty tensor for each of :data:`METRIC_NAMES`."""
    return {k: torch.cat([r[k] for r in rows]) for k in rows[0]} if rows else {k: torch.zeros(0) for k in METRIC_NAMES}


MIN_HEAD_PIXELS = 50
""":func:`slice_sharpness` gives NaN for a slice with fewer head pixels than this (too little head to measure)."""


def slice_sharpness(slices: torch.Tensor, head_threshold: float = HEAD_THRESHOLD) -> torch.Tensor:
    """How much fine detail each slice holds: the mean absolute 4-neighbour Laplacian over its head pixels
    (> ``head_threshold``) over their mean intensity: (B,) float64 for slices shaped as :func:`as_slice_batch` takes them;
    NaN where a slice shows fewer than :data:`MIN_HEAD_PIXELS` head pixels.

    Divided by the mean, so a contrast scaling leaves it alone; a smoother acquisition lowers it and noise raises it.
    (Edge pixels repeat their neighbour, as scipy's ``laplace`` does by default; MONAI has no Laplacian filter.)"""
    x = as_slice_batch(slices).double()
    pad = torch.nn.functional.pad(x, (1, 1, 1, 1), mode="replicate")
    kernel = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]], dtype=x.dtype)[None, None]
    lap = torch.nn.functional.conv2d(pad, kernel).abs()
    head = (x > head_threshold).to(x.dtype)
    n = head.sum((1, 2, 3))
    mean = (x * head).sum((1, 2, 3)) / n.clamp_min(1)
    out = (lap * head).sum((1, 2, 3)) / n.clamp_min(1) / mean.clamp_min(1e-6)
    return torch.where(n >= MIN_HEAD_PIXELS, out, torch.full_like(out, float("nan")))
