"""Atlas banks: training volumes resampled onto one grid of positions ``p``, and general brains.

A *bank* is ``(K, P, H, W)`` in [0, 1]: ``K`` brain volumes sampled on a common grid of ``P``
positions. ``K = 1`` is the population mean brain (:func:`mean_brain`) or a GAN's general brain
(:func:`gan_general_brain`); ``K > 1`` keeps (a subset of) the training volumes themselves as
atlases (:func:`save_bank`). :mod:`monai_mrngan.atlas.prior` turns a bank into a prior that fits
one patient.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ..data.datalist import load_split
from ..data.grid import scale_intensity
from ..data.io import InputError, atomic_torch_save, load_volume, save_json, save_nifti, to_8bit
from ..data.positions import HEAD_HEIGHT_MM, HEAD_THRESHOLD
from ..metrics.image import slice_sharpness
from ..networks.gan import build_generator_from_checkpoint
from .fit import to_unit

logger = logging.getLogger(__name__)

PRIOR_SIDECAR_SUFFIX = ".positions.json"

__all__ = ["position_grid", "resample_to_positions", "build_bank", "mean_brain", "save_prior_volume", "save_bank", "bank_subjects", "sidecar_path",
           "build_mean_prior", "gan_general_brain", "position_items", "sharpness_profile", "slice_scale_profile", "PRIOR_SIDECAR_SUFFIX"]


def position_grid(num_positions: int) -> np.ndarray:
    """The common grid of positions in array-index order: ``p`` from 1 down to 0 (RAS: index grows to the vertex)."""
    if num_positions < 2:
        raise ValueError(f"need at least 2 positions, got {num_positions}")
    return np.linspace(1.0, 0.0, int(num_positions))


def resample_to_positions(volume: np.ndarray, positions: Sequence[float], grid: Sequence[float]) -> np.ndarray:
    """Resample a (H, W, D) volume whose axial index ``i`` lies at ``positions[i]`` onto ``grid``.

    Returns (len(grid), H, W); linear interpolation along ``p``, NaN where ``grid`` leaves the
    volume's range of positions (so averages can ignore it).
    """
    vol = np.asarray(volume, dtype=np.float32)
    pos = np.asarray(positions, dtype=np.float64)
    grid = np.asarray(grid, dtype=np.float64)
    if vol.ndim != 3 or pos.size != vol.shape[2]:
        raise ValueError(f"volume {vol.shape} and {pos.size} positions do not match")
    order = np.argsort(pos)
    pos, vol = pos[order], vol[..., order]
    x = np.interp(grid, pos, np.arange(pos.size))  # fractional index of each grid position
    lo = np.clip(np.floor(x).astype(int), 0, pos.size - 1)
    hi = np.clip(lo + 1, 0, pos.size - 1)
    w = (x - lo).astype(np.float32)
    out = vol[..., lo] * (1 - w) + vol[..., hi] * w
    outside = (grid < pos[0] - 1e-6) | (grid > pos[-1] + 1e-6)
    out[..., outside] = np.nan
    return np.ascontiguousarray(np.moveaxis(out, -1, 0))


def build_bank(entries: Sequence[dict], num_positions: int = 101, max_volumes: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Training volumes resampled onto the common position grid: ``(K, P, H, W)`` float32 with NaNs, and the grid."""
    grid = position_grid(num_positions)
    entries = list(entries)[: max_volumes or None]
    if not entries:
        raise ValueError("no training volumes to build the prior from")
    vols = []
    for i, e in enumerate(entries):
        vol, _ = load_volume(e["image"])
        if "positions" not in e:
            raise InputError(e["image"], "datalist entry has no 'positions'; prepare the dataset with `python -m monai_mrngan prepare`")
        vols.append(resample_to_positions(vol, e["positions"], grid))
        if (i + 1) % 20 == 0:
            logger.info("resampled %d/%d training volumes", i + 1, len(entries))
    shapes = {v.shape for v in vols}
    if len(shapes) != 1:
        raise ValueError(f"training volumes differ in shape after resampling: {sorted(shapes)}")
    return np.stack(vols), grid


def mean_brain(bank: np.ndarray) -> np.ndarray:
    """Mean over subjects of a ``(K, P, H, W)`` bank, ignoring NaNs (0 where no subject reaches)."""
    with np.errstate(invalid="ignore"):
        counts = np.isfinite(bank).sum(0)
        total = np.nansum(bank, 0)
    return np.where(counts > 0, total / np.maximum(counts, 1), 0.0).astype(np.float32)


def save_prior_volume(volume_phw: np.ndarray, grid: Sequence[float], path: str | os.PathLike, spacing_mm: float = 2.0) -> Path:
    """Write a (P, H, W) prior as a RAS NIfTI (H, W, P) plus a ``.positions.json`` sidecar with each index's ``p``."""
    grid = np.asarray(grid, dtype=np.float64)
    step_mm = abs(float(grid[0] - grid[-1])) / max(len(grid) - 1, 1) * HEAD_HEIGHT_MM
    affine = np.diag([spacing_mm, spacing_mm, step_mm or spacing_mm, 1.0])
    vol = np.clip(np.nan_to_num(np.moveaxis(np.asarray(volume_phw, dtype=np.float32), 0, -1)), 0, 1)
    path = Path(path)
    save_nifti(vol, affine, path)
    save_json({"positions": [round(float(p), 6) for p in grid]}, sidecar_path(path))
    return path


def bank_subjects(entries: Sequence[dict]) -> list[str]:
    """The subject each datalist entry adds to an atlas bank (its image path where it names none)."""
    return [str(e.get("subject") or e["image"]) for e in entries]


def save_bank(bank: np.ndarray, grid: Sequence[float], path: str | os.PathLike, subjects: Sequence[str] | None = None) -> Path:
    """Write an atlas bank (K, P, H, W) compactly (uint8) with its grid (and each volume's subject), for ``load_prior``."""
    return atomic_torch_save(
        {"kind": "atlas_bank", "bank": torch.from_numpy(to_8bit(bank)), "positions": torch.as_tensor(np.asarray(grid, np.float64)),
         "subjects": [str(s) for s in subjects] if subjects is not None else None},
        path,
    )


def sidecar_path(path: Path) -> Path:
    name = path.name
    for suffix in (".nii.gz", ".nii"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    return path.with_name(name + PRIOR_SIDECAR_SUFFIX)


def build_mean_prior(
    dataset_dir: str | os.PathLike, output: str | os.PathLike, num_positions: int = 101, split: str = "training",
    bank_path: str | os.PathLike | None = None, max_atlases: int | None = 40,
) -> Path:
    """Build the population mean brain from a prepared dataset's ``split`` and write it (NIfTI over ``p``).

    With ``bank_path`` also writes the first ``max_atlases`` resampled training volumes as an atlas bank.
    """
    entries = load_split(dataset_dir, split)
    bank, grid = build_bank(entries, num_positions)
    spacing = float(entries[0].get("spacing", [2.0])[0]) if entries else 2.0
    out = save_prior_volume(mean_brain(bank), grid, output, spacing_mm=spacing)
    if bank_path:
        subjects = bank_subjects(entries)
        save_bank(bank[: max_atlases or None], grid, bank_path, subjects[: max_atlases or None])
    logger.info("mean brain of %d volumes over %d positions written to %s", len(bank), len(grid), out)
    return out


@torch.no_grad()
def gan_general_brain(checkpoint: dict, positions: Sequence[float], num_samples: int = 8, seed: int = 0) -> np.ndarray:
    """Average ``num_samples`` generated slices per position for a cGAN or DCGAN-set checkpoint -> (N, H, W) in [0, 1]."""
    gen, kind, extra = build_generator_from_checkpoint(checkpoint)
    gen.eval()
    g = torch.Generator().manual_seed(seed)
    p = torch.as_tensor(np.asarray(positions, dtype=np.float32))
    out = []
    for start in range(0, len(p), 32):
        pb = p[start : start + 32]
        acc = 0.0
        for _ in range(num_samples):
            z = torch.randn(len(pb), gen.latent_size, generator=g)
            acc = acc + gen.generate(z, pb)
        out.append(((acc / num_samples) + 1.0) / 2.0)
    return torch.cat(out)[:, 0].clamp(0, 1).numpy()


def position_items(num_positions: int) -> list[dict]:
    """Dataset items ``{"position": (1,) tensor, "index": i}`` over the common grid (inference input)."""
    return [{"position": torch.tensor([float(p)]), "index": i} for i, p in enumerate(position_grid(num_positions))]


def _atlases(bank: torch.Tensor | np.ndarray) -> torch.Tensor:
    """A (K, P, H, W) or (P, H, W) bank, uint8 as ``save_bank`` stores it or [0, 1] floats, as a (K, P, H, W) tensor."""
    bank = torch.as_tensor(np.asarray(bank) if not torch.is_tensor(bank) else bank)
    return bank[None] if bank.ndim == 3 else bank


def sharpness_profile(bank: torch.Tensor | np.ndarray) -> np.ndarray:
    """The bank's fine detail per grid position: :func:`~monai_mrngan.metrics.image.slice_sharpness` of every
    atlas's slice, averaged over the atlases that show head there; (P,) float64 for a (K, P, H, W) or (P, H, W) bank
    (uint8 as ``save_bank`` stores it, or [0, 1] floats), NaN where no atlas shows head. The reference a scan's own
    sharpness is measured against (the uncertainty map's ``sharpness`` signal)."""
    bank = _atlases(bank)
    values = torch.stack([slice_sharpness(to_unit(bank[k])) for k in range(bank.shape[0])])  # (K, P), one atlas at a time
    return torch.nanmean(values, 0).numpy()


def slice_scale_profile(bank: torch.Tensor | np.ndarray, atlases: int = 8, min_head_px: int = 64) -> np.ndarray:
    """How a slice scaled alone differs from its volume scaled as a whole, per grid position: the median over the
    first ``atlases`` atlases of :func:`~monai_mrngan.data.grid.scale_intensity`'s scale of their slice there over
    that of their whole volume (the slice's own scale over its volume's). (P,) float64; NaN where
    fewer than ``min_head_px`` head pixels. On IXI 1.2 at p = 0.3-0.4 (a mid-brain slice's head is brighter than
    the whole head's), 1.0 at p = 0.6, 0.8 at the neck: a lone slice scaled by its own head is brought to the
    scale of the prepared volumes by multiplying it by this at its position."""
    bank = _atlases(bank)
    out = np.full((min(atlases, bank.shape[0]), bank.shape[1]), np.nan)
    for k in range(out.shape[0]):
        slices = to_unit(bank[k]).cpu().numpy()
        whole = scale_intensity(slices)[1]  # about 1: the atlas was scaled as a whole (above 1 where clipping bit)
        for j, sl in enumerate(slices):
            if whole > 0 and int((sl > HEAD_THRESHOLD).sum()) >= min_head_px:
                out[k, j] = scale_intensity(sl)[1] / whole
    med = np.full(out.shape[1], np.nan)
    seen = np.isfinite(out).any(axis=0)
    med[seen] = np.nanmedian(out[:, seen], axis=0)
    return med
