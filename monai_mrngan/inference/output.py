"""Writing a reconstruction: the volume (NIfTI, in the input's space when it has one, and on the model grid),
its provenance map, a labelled montage (PNG) and the positions (JSON), each atomically."""

from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from ..data.inputs import InputSlices
from ..data.io import save_json, save_nifti, save_png, slice_to_display, to_8bit
from ..data.positions import HEAD_HEIGHT_MM
from .uncertainty import MAP_STORED, slice_means
from .volume import Reconstruction

__all__ = ["montage", "provenance", "save_reconstruction", "Reconstructed"]

TILE_PX = 128  # montage tiles are shown at least this large


def montage(volume: np.ndarray, positions: Sequence[float] | None = None, inputs: Sequence[int] = (), num: int = 16, cols: int = 4,
            tile_px: int = TILE_PX, uncertainty: np.ndarray | None = None) -> np.ndarray:
    """A grid of ``num`` evenly spaced axial slices (display orientation), top of the head first.

    Tiles are upscaled to at least ``tile_px``; the input slices are always shown, framed; with
    ``positions`` each tile is labelled with its depth below the vertex in mm. Returns 8-bit pixels
    (H, W) uint8 (0 .. 255 for the volume's 0 .. 1); with ``uncertainty`` (like ``volume``) RGB (H, W, 3):
    under each row of slices the same slices' expected error in colour, and a colour bar in intensity
    units at the bottom. (8 bits throughout: the PNG's own depth, with no float copy of the picture.)
    """
    from PIL import Image, ImageDraw

    depth = volume.shape[2]
    picks = [int(i) for i in np.linspace(depth - 1, 0, min(num, depth)).round()]
    for i in inputs:  # the input replaces the nearest evenly spaced pick
        if i not in picks:
            picks[int(np.argmin([abs(p - i) for p in picks]))] = int(i)
    picks = sorted(set(picks), reverse=True)
    zoom = max(1, int(math.ceil(tile_px / max(volume.shape[:2]))))
    tiles = [_zoomed(to_8bit(slice_to_display(volume[:, :, i])), zoom) for i in picks]
    rows = int(math.ceil(len(tiles) / cols))
    h, w = tiles[0].shape
    per_row = 2 if uncertainty is not None else 1
    bar_h = 40 if uncertainty is not None else 0
    canvas = Image.new("L", (cols * w, rows * h * per_row + bar_h))
    draw = ImageDraw.Draw(canvas)
    for n, (i, tile) in enumerate(zip(picks, tiles)):
        r, c = divmod(n, cols)
        x, y = c * w, r * h * per_row
        canvas.paste(Image.fromarray(tile), (x, y))
        if i in inputs:
            draw.rectangle([x + 1, y + 1, x + w - 2, y + h - 2], outline=255, width=3)
        if positions is not None:
            label = f"{float(positions[i]) * HEAD_HEIGHT_MM:.0f} mm" + (" input" if i in inputs else "")
            box = draw.textbbox((x + 5, y + 5), label)
            draw.rectangle([box[0] - 2, box[1] - 2, box[2] + 2, box[3] + 2], fill=0)
            draw.text((x + 5, y + 5), label, fill=255)
    gray = np.asarray(canvas)
    if uncertainty is None:
        return gray
    return _uncertainty_rows(gray, uncertainty, picks, zoom, cols, (h, w), bar_h)


def _zoomed(tile: np.ndarray, zoom: int) -> np.ndarray:
    """A tile (H, W[, 3]) with each pixel repeated ``zoom`` x ``zoom`` times (nearest neighbour)."""
    return tile if zoom == 1 else tile.repeat(zoom, axis=0).repeat(zoom, axis=1)


def _uncertainty_rows(gray: np.ndarray, unc: np.ndarray, picks: Sequence[int], zoom: int, cols: int, tile: tuple[int, int], bar_h: int) -> np.ndarray:
    """RGB montage (uint8): ``gray``'s slice rows, each followed by its slices' uncertainty (colour map 'inferno',
    0 .. the 99th percentile of the slices shown), and a labelled colour bar at the bottom."""
    from matplotlib import colormaps
    from PIL import Image, ImageDraw

    lut = to_8bit(colormaps["inferno"](np.linspace(0, 1, 256))[:, :3])  # a 256-colour table: one lookup per pixel
    h, w = tile
    shown = unc[:, :, list(picks)]  # the colour scale of what is drawn (a sixth of a volume's voxels to sort)
    vmax = float(np.percentile(shown, 99)) if np.any(shown > 0) else 1.0
    vmax = vmax if vmax > 0 else float(shown.max()) or 1.0
    rgb = np.repeat(gray[..., None], 3, axis=2)
    for n, i in enumerate(picks):  # coloured at the volume's size, then zoomed
        r, c = divmod(n, cols)
        colour = lut[to_8bit(slice_to_display(unc[:, :, i]) * np.float32(1.0 / vmax))]
        rgb[(2 * r + 1) * h : (2 * r + 2) * h, c * w : (c + 1) * w] = _zoomed(colour, zoom)
    y0, width = rgb.shape[0] - bar_h, rgb.shape[1]
    rgb[y0 + 4 : y0 + 18, 10 : width - 10] = lut[np.linspace(0, 255, width - 20).round().astype(np.uint8)][None]
    img = Image.fromarray(rgb)
    draw = ImageDraw.Draw(img)
    draw.text((10, y0 + 22), "0", fill=(255, 255, 255))
    label = f"{vmax:.3g} expected |error| (intensity units, 1 = full range); 0 on real thin slices"
    draw.text((max(10, width - 10 - int(draw.textlength(label))), y0 + 22), label, fill=(255, 255, 255))
    return np.asarray(img)


def provenance(num_slices: int, inputs: Sequence[int], spacing_mm: float) -> np.ndarray:
    """Per output slice: 0 on a real (input) slice, else the distance in mm to the nearest one."""
    k = np.arange(num_slices)[:, None]
    return (np.abs(k - np.asarray(list(inputs))[None, :]).min(1) * float(spacing_mm)).astype(np.float32)


def _stem(out: Path) -> str:
    return out.name[: -len(".nii.gz")] if out.name.endswith(".nii.gz") else out.stem


def save_reconstruction(rec: Reconstruction, out: str | os.PathLike, affine: np.ndarray | None = None, spacing_mm: float = 2.0,
                        input_affine: np.ndarray | None = None, sources: Sequence[str] | None = None,
                        uncertainty: np.ndarray | None = None, uncertainty_note: str | None = None) -> dict[str, str]:
    """Write the volume, its provenance map, a montage and the positions JSON (each atomically); return the paths.

    ``affine``: the model grid's (default a RAS diagonal with ``spacing_mm``). With ``input_affine``
    (the input had a geometry) ``OUT.nii.gz`` is placed in the input's world and the model-grid
    volume is written beside it as ``OUT_model_grid.nii.gz``; otherwise ``OUT.nii.gz`` is the model
    grid. ``OUT_provenance.nii.gz`` (same grid and affine as ``OUT``): 0 on real slices, else the
    distance in mm to the nearest real slice. With ``uncertainty`` (H, W, D, like the volume)
    ``OUT_uncertainty.nii.gz`` (same grid and affine as ``OUT``): the expected absolute error per voxel
    in the output's intensity units, 0 on real thin slices (a thick-slice scan's slabs are predicted: the output there is
    not the slab); the positions JSON gives each slice's mean over
    its head voxels, and ``uncertainty_note`` says why there is no map when there is none.
    """
    out = Path(out)
    stem = _stem(out)
    if affine is None:
        affine = np.diag([spacing_mm, spacing_mm, spacing_mm, 1.0])
    out_affine = affine if input_affine is None else input_affine
    dist = provenance(rec.volume.shape[2], rec.input_indices, spacing_mm)
    prov = out.with_name(f"{stem}_provenance.nii.gz")
    niftis = {"volume": (rec.volume, out_affine, out, {})}
    if input_affine is not None:
        niftis["model_grid_volume"] = (rec.volume, affine, out.with_name(f"{stem}_model_grid.nii.gz"), {})
    niftis["provenance"] = (np.broadcast_to(dist, rec.volume.shape), out_affine, prov, {})
    unc_mean = None
    if uncertainty is not None:
        # stored as scaled uint8 (MAP_STORED): 128 px, 0.03 CPU s to write, not float32's 0.2 s
        niftis["uncertainty"] = (uncertainty, out_affine, out.with_name(f"{stem}_uncertainty.nii.gz"), {"stored": MAP_STORED})
        unc_mean = slice_means(uncertainty, rec.volume)
    # the NIfTIs are gzip-compressed side by side (zlib releases the GIL) while the montage is drawn: at 128 px the
    # volume and the uncertainty map took 0.3 s each one after the other, 0.4 s for three together (2 cores)
    with ThreadPoolExecutor(max_workers=min(len(niftis), os.cpu_count() or 1)) as pool:
        written = {key: pool.submit(save_nifti, data, aff, path, **kw) for key, (data, aff, path, kw) in niftis.items()}
        mont = out.with_name(f"{stem}_montage.png")
        save_png(montage(rec.volume, rec.positions, rec.input_indices, uncertainty=uncertainty), mont, display=False)
        paths = {key: str(future.result()) for key, future in written.items()}  # re-raises a failed write
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
            "uncertainty": paths.get("uncertainty"),
            **({"uncertainty_note": uncertainty_note} if uncertainty_note else {}),
            "sources": list(sources) if sources is not None else None,
            "input_check": rec.extra.get("input_check"),
            "placement": rec.extra.get("placement"),
            **({"intensity": rec.extra["intensity"]} if rec.extra.get("intensity") else {}),
            **({"slab_mm": rec.extra["slab_mm"]} if rec.extra.get("slab_mm") else {}),  # the volume agrees with slabs this thick
            "input_indices": rec.input_indices,
            "input_positions": rec.input_positions,
            "positions": [round(float(p), 6) for p in rec.positions],
            "shape": list(rec.volume.shape),
            "slices": [
                {"index": k, "p": round(float(p), 6), "depth_mm": round(float(p) * HEAD_HEIGHT_MM, 2), "real": k in real,
                 "distance_mm": round(float(dist[k]), 3),
                 **({"prior_weight": round(float(prior_weight[k]), 4)} if prior_weight is not None and k not in real and np.isfinite(prior_weight[k]) else {}),
                 **({"uncertainty_mean": round(float(unc_mean[k]), 5)} if unc_mean is not None else {})}
                for k, p in enumerate(rec.positions)
            ],
        },
        meta,
    )
    paths["positions"] = str(meta)
    return paths


@dataclass
class Reconstructed:
    """What :func:`~monai_mrngan.inference.reconstruct.reconstruct_slices` made, ready to write: the reconstruction, the
    inputs as used (a stack's slices outside the grid dropped), their check scores, and the affines and uncertainty map
    that :meth:`save` writes."""

    rec: Reconstruction
    inputs: InputSlices
    checks: list[dict]
    spacing_mm: float
    grid_affine: np.ndarray | None = None
    input_affine: np.ndarray | None = None
    uncertainty: np.ndarray | None = None
    uncertainty_note: str | None = None

    def save(self, out: str) -> dict[str, str]:
        """Write everything :func:`save_reconstruction` writes for ``out``; return the paths."""
        return save_reconstruction(self.rec, out, self.grid_affine, self.spacing_mm, input_affine=self.input_affine, sources=self.inputs.sources,
                                   uncertainty=self.uncertainty, uncertainty_note=self.uncertainty_note)
