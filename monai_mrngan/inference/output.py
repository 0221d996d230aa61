"""Writing a reconstruction: the volume (NIfTI), a montage (PNG) and the positions (JSON), atomically."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np

from ..data.io import save_json, save_nifti, save_png, slice_to_display
from .volume import Reconstruction

__all__ = ["montage", "save_reconstruction"]


def montage(volume: np.ndarray, num: int = 16, cols: int = 4) -> np.ndarray:
    """A grid of ``num`` evenly spaced axial slices (display orientation), top of the head first."""
    depth = volume.shape[2]
    picks = np.unique(np.linspace(depth - 1, 0, min(num, depth)).round().astype(int))[::-1]
    tiles = [slice_to_display(volume[:, :, i]) for i in picks]
    rows = int(math.ceil(len(tiles) / cols))
    h, w = tiles[0].shape
    out = np.zeros((rows * h, cols * w), dtype=np.float32)
    for n, tile in enumerate(tiles):
        r, c = divmod(n, cols)
        out[r * h : (r + 1) * h, c * w : (c + 1) * w] = tile
    return out


def save_reconstruction(rec: Reconstruction, out: str | os.PathLike, affine: np.ndarray | None = None, spacing_mm: float = 2.0) -> dict[str, str]:
    """Write ``OUT.nii.gz``, ``OUT_montage.png`` and ``OUT_positions.json`` (atomically); return the paths."""
    out = Path(out)
    stem = out.name[: -len(".nii.gz")] if out.name.endswith(".nii.gz") else out.stem
    if affine is None:
        affine = np.diag([spacing_mm, spacing_mm, spacing_mm, 1.0])
    save_nifti(rec.volume, affine, out)
    mont = out.with_name(f"{stem}_montage.png")
    save_png(montage(rec.volume), mont, display=False)
    meta = out.with_name(f"{stem}_positions.json")
    save_json(
        {
            "method": rec.method,
            "input_indices": rec.input_indices,
            "input_positions": rec.input_positions,
            "positions": [round(float(p), 6) for p in rec.positions],
            "shape": list(rec.volume.shape),
        },
        meta,
    )
    return {"volume": str(out), "montage": str(mont), "positions": str(meta)}
