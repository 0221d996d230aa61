"""Writing a reconstruction: the volume (NIfTI, in the input's space when it has one, and on the model grid),
its provenance map, a labelled montage (PNG) and the positions (JSON), each atomically."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from ..data.io import save_json, save_nifti, save_png, slice_to_display
from ..data.positions import HEAD_HEIGHT_MM
from .volume import Reconstruction

__all__ = ["montage", "provenance", "save_reconstruction"]

TILE_PX = 128  # montage tiles are shown at least this large


def montage(volume: np.ndarray, positions: Sequence[float] | None = None, inputs: Sequence[int] = (), num: int = 16, cols: int = 4,
            tile_px: int = TILE_PX) -> np.ndarray:
    """A grid of ``num`` evenly spaced axial slices (display orientation), top of the head first.

    Tiles are upscaled to at least ``tile_px``; the input slices are always shown, framed; with
    ``positions`` each tile is labelled with its depth below the vertex in mm. Returns [0, 1] pixels.
    """
    from PIL import Image, ImageDraw

    depth = volume.shape[2]
    picks = [int(i) for i in np.linspace(depth - 1, 0, min(num, depth)).round()]
    for i in inputs:  # the input replaces the nearest evenly spaced pick
        if i not in picks:
            picks[int(np.argmin([abs(p - i) for p in picks]))] = int(i)
    picks = sorted(set(picks), reverse=True)
    zoom = max(1, int(math.ceil(tile_px / max(volume.shape[:2]))))
    tiles = [np.kron(slice_to_display(volume[:, :, i]), np.ones((zoom, zoom), dtype=np.float32)) for i in picks]
    rows = int(math.ceil(len(tiles) / cols))
    h, w = tiles[0].shape
    canvas = Image.new("L", (cols * w, rows * h))
    draw = ImageDraw.Draw(canvas)
    for n, (i, tile) in enumerate(zip(picks, tiles)):
        r, c = divmod(n, cols)
        x, y = c * w, r * h
        canvas.paste(Image.fromarray((np.clip(tile, 0, 1) * 255 + 0.5).astype(np.uint8)), (x, y))
        if i in inputs:
            draw.rectangle([x + 1, y + 1, x + w - 2, y + h - 2], outline=255, width=3)
        if positions is not None:
            label = f"{float(positions[i]) * HEAD_HEIGHT_MM:.0f} mm" + (" input" if i in inputs else "")
            box = draw.textbbox((x + 5, y + 5), label)
            draw.rectangle([box[0] - 2, box[1] - 2, box[2] + 2, box[3] + 2], fill=0)
            draw.text((x + 5, y + 5), label, fill=255)
    return np.asarray(canvas, dtype=np.float32) / 255.0


def provenance(num_slices: int, inputs: Sequence[int], spacing_mm: float) -> np.ndarray:
    """Per output slice: 0 on a real (input) slice, else the distance in mm to the nearest one."""
    k = np.arange(num_slices)[:, None]
    return (np.abs(k - np.asarray(list(inputs))[None, :]).min(1) * float(spacing_mm)).astype(np.float32)


def _stem(out: Path) -> str:
    return out.name[: -len(".nii.gz")] if out.name.endswith(".nii.gz") else out.stem


def save_reconstruction(rec: Reconstruction, out: str | os.PathLike, affine: np.ndarray | None = None, spacing_mm: float = 2.0,
                        input_affine: np.ndarray | None = None, sources: Sequence[str] | None = None) -> dict[str, str]:
    """Write the volume, its provenance map, a montage and the positions JSON (each atomically); return the paths.

    ``affine``: the model grid's (default a RAS diagonal with ``spacing_mm``). With ``input_affine``
    (the input had a geometry) ``OUT.nii.gz`` is placed in the input's world and the model-grid
    volume is written beside it as ``OUT_model_grid.nii.gz``; otherwise ``OUT.nii.gz`` is the model
    grid. ``OUT_provenance.nii.gz`` (same grid and affine as ``OUT``): 0 on real slices, else the
    distance in mm to the nearest real slice.
    """
    out = Path(out)
    stem = _stem(out)
    if affine is None:
        affine = np.diag([spacing_mm, spacing_mm, spacing_mm, 1.0])
    out_affine = affine if input_affine is None else input_affine
    save_nifti(rec.volume, out_affine, out)
    paths = {"volume": str(out)}
    if input_affine is not None:
        grid = out.with_name(f"{stem}_model_grid.nii.gz")
        save_nifti(rec.volume, affine, grid)
        paths["model_grid_volume"] = str(grid)
    dist = provenance(rec.volume.shape[2], rec.input_indices, spacing_mm)
    prov = out.with_name(f"{stem}_provenance.nii.gz")
    save_nifti(np.broadcast_to(dist, rec.volume.shape), out_affine, prov)
    paths["provenance"] = str(prov)
    mont = out.with_name(f"{stem}_montage.png")
    save_png(montage(rec.volume, rec.positions, rec.input_indices), mont, display=False)
    paths["montage"] = str(mont)
    meta = out.with_name(f"{stem}_positions.json")
    real = set(int(i) for i in rec.input_indices)
    prior_weight = rec.extra.get("prior_weight")
    save_json(
        {
            "method": rec.method,
            "volume": {"path": str(out), "space": "input" if input_affine is not None else "model grid"},
            "model_grid_volume": paths.get("model_grid_volume", str(out)),
            "provenance": str(prov),
            "sources": list(sources) if sources is not None else None,
            "input_check": rec.extra.get("input_check"),
            "placement": rec.extra.get("placement"),
            "input_indices": rec.input_indices,
            "input_positions": rec.input_positions,
            "positions": [round(float(p), 6) for p in rec.positions],
            "shape": list(rec.volume.shape),
            "slices": [
                {"index": k, "p": round(float(p), 6), "depth_mm": round(float(p) * HEAD_HEIGHT_MM, 2), "real": k in real,
                 "distance_mm": round(float(dist[k]), 3),
                 **({"prior_weight": round(float(prior_weight[k]), 4)} if prior_weight is not None and k not in real and np.isfinite(prior_weight[k]) else {})}
                for k, p in enumerate(rec.positions)
            ],
        },
        meta,
    )
    paths["positions"] = str(meta)
    return paths
