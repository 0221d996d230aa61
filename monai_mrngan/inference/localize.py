"""Where in the head is this slice? Localizer inference on tensors and on files.

- :func:`localize` (the cross-stage contract): (B, 1, H, W) [0, 1] slices at the prepared size ->
  (B,) positions ``p`` in [0, 1]; eval mode, no grad, batched.
- :func:`slice_items`: files -> one dictionary per axial slice, prepared as the training data was:
  * a prepared 3D volume (in-plane ``spatial_size``, values in [0, 1]) is used as is;
  * any other 3D volume goes through :func:`monai_mrngan.data.prepare.prepare_volume` (RAS,
    isotropic spacing, percentile scaling, vertex/neck trimming, crop on the head's centre);
    its heuristic position comes along as ``reference_p``;
  * a 2D slice (PNG, 2D NIfTI) of the prepared size with values in [0, 1] is used as is; a 2D slice
    of another size is resampled to the prepared spacing (pixel size from the NIfTI header, or
    ``pixel_mm`` for a PNG), scaled by its head like ``prepare`` (whatever its range), and cropped / padded
    around its intensity centre of mass. A PNG of the wrong size without ``pixel_mm`` is refused
    with a message saying so: its pixel size is unknown and a blind resize would be garbage.

The bundle's ``inference.json`` writes the CSV with :class:`monai_mrngan.engines.handlers.PositionCSVWriter`.
- :func:`localize_files`: the same without a bundle, for scripts and the CLI.
"""

from __future__ import annotations

import glob
import logging
import os
from pathlib import Path
from typing import Any, Iterable, Sequence

import nibabel as nib
import numpy as np
import torch

from ..data.io import InputError, is_nifti, is_picture, load_slice, load_volume
from ..data.inputs import slice_to_grid
from ..data.positions import HEAD_HEIGHT_MM, HEAD_THRESHOLD, VERTEX_MIN_AREA_MM2
from ..data.prepare import SkipScan, prepare_volume
from ..engines.handlers import position_rows, write_positions_csv

logger = logging.getLogger(__name__)

MAX_LOCALIZED = 64
"""At most this many slices, evenly spread, are localized to fit a volume's one offset: a 1 mm volume's 240 slices
took 12 s through the paper CNN on 2 cores, and neighbouring slices' answers err together, so more add little."""

@torch.no_grad()
def localize(network: torch.nn.Module, slices: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Positions ``p`` (B,) of (B, 1, H, W) [0, 1] slices at the prepared size (eval mode, no grad)."""
    slices = torch.as_tensor(slices)
    if slices.ndim != 4 or slices.shape[1] != 1:
        raise ValueError(f"localize expects slices shaped (B, 1, H, W), got {tuple(slices.shape)}")
    was_training = network.training
    network.eval()
    try:
        param = next(network.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
        out = [
            network(slices[i : i + batch_size].to(device=device, dtype=torch.float32)).reshape(-1).float().cpu()
            for i in range(0, slices.shape[0], batch_size)
        ]
    finally:
        network.train(was_training)
    return torch.cat(out).clamp(0.0, 1.0) if out else torch.zeros(0)


def localize_with_offset(network: torch.nn.Module, slices: torch.Tensor | np.ndarray, offsets_p: Sequence[float],
                         template: Any = None, window: float = 0.25) -> tuple[np.ndarray, dict]:
    """Positions of slices whose places relative to each other are known: ``p_k = p0 + offsets_p[k]``.

    Every slice (at most :data:`MAX_LOCALIZED`, evenly spread) is localized and the one unknown ``p0`` is the median
    of (localized ``p`` minus the slice's offset), so one badly localized slice cannot move the rest. With ``template`` (a
    :class:`~monai_mrngan.atlas.prior.TemplateLocalizer`), that offset is then refined within
    ``+- window`` by matching the whole stack against the mean brain at once
    (:meth:`~monai_mrngan.atlas.prior.TemplateLocalizer.fit_offset`). Returns the positions and
    ``{"localized_slices", "offset_p", "mean_abs_deviation_from_fit", "spread_mm"}`` (the mean
    distance, in p and in mm, between the localizer's answers and the fitted positions), with
    ``offset_p_localizer`` and ``offset_refined`` when refined.
    """
    x = torch.as_tensor(np.asarray(slices), dtype=torch.float32)
    x = x[:, None] if x.ndim == 3 else x
    rel = np.asarray(offsets_p, dtype=np.float64)
    pick = np.unique(np.linspace(0, len(rel) - 1, min(len(rel), MAX_LOCALIZED)).round().astype(int))
    found = localize(network, x[torch.from_numpy(pick)]).numpy().astype(np.float64)
    p0 = float(np.median(found - rel[pick]))
    refined = {}
    if template is not None and window > 0:
        p_loc, p0 = p0, float(template.fit_offset(x, rel, p0, window))
        refined = {"offset_p_localizer": round(p_loc, 6), "offset_refined": f"whole stack matched to the mean brain within +-{window:g} in p"}
    positions = p0 + rel
    dev = float(np.mean(np.abs(found - positions[pick])))
    info = {"localized_slices": int(len(found)), "offset_p": round(p0, 6), "mean_abs_deviation_from_fit": round(dev, 6),
            "spread_mm": round(dev * HEAD_HEIGHT_MM, 2), **refined}
    return positions, info


def place_slices(network: torch.nn.Module | None, slices: np.ndarray, offsets_mm: Sequence[float], spacing_mm: float,
                 template: Any = None) -> tuple[np.ndarray, dict]:
    """Positions of a volume's axial slices (model grid, ``offsets_mm`` above the first) from the volume itself.

    When the top of the head is inside the field of view (the top slice shows less than
    ``VERTEX_MIN_AREA_MM2`` of head, as ``prepare`` defines the vertex, and the slice above the
    highest head section is one step above it, not across missing slices), positions are counted
    from the vertex exactly as ``prepare`` counts them: no model is needed. Otherwise (a cut field of
    view, or a volume trimmed at the vertex) its slices are localized and one offset fitted
    (:func:`localize_with_offset`, refined by ``template`` when given; ``template`` alone places the
    volume when there is no ``network``). Returns the positions and how they were found.
    """
    offsets = np.asarray(offsets_mm, dtype=np.float64)
    area = (np.asarray(slices) > HEAD_THRESHOLD).sum(axis=(1, 2)) * float(spacing_mm) ** 2
    head = np.nonzero(area >= VERTEX_MIN_AREA_MM2)[0]
    top = int(np.argmax(offsets))
    if head.size and area[top] < VERTEX_MIN_AREA_MM2:
        vertex_mm = float(offsets[head].max())
        above = float(offsets[offsets > vertex_mm].min()) - vertex_mm  # to the first slice above it, which shows no head
        step = float(np.diff(np.sort(offsets)).min())  # the volume's own step (a series with gaps skips some)
        if above <= 1.5 * step:  # the vertex lies within one step; after missing slices it could lie anywhere in the gap
            return (vertex_mm - offsets) / HEAD_HEIGHT_MM, {"method": "vertex in the field of view", "vertex_offset_mm": round(vertex_mm, 2)}
    if network is None and template is None:
        raise ValueError("the volume's vertex cannot be read from its slices (the top of the head outside the field of view, or "
                         "missing slices next to it) and no localizer is there to place it")
    positions, info = localize_with_offset(network if network is not None else template, slices, -offsets / HEAD_HEIGHT_MM, template)
    return positions, {"method": "localized slices, one offset", **info}


def _pair(size: Sequence[int] | int) -> tuple[int, int]:
    return (int(size),) * 2 if isinstance(size, int) else (int(size[0]), int(size[1]))


def prepare_slice(
    img: np.ndarray,
    spatial_size: Sequence[int] | int,
    pixel_mm: Sequence[float] | float | None = None,
    spacing_mm: float = 2.0,
    source: str | os.PathLike = "<array>",
) -> np.ndarray:
    """A 2D RAS slice -> the prepared size, spacing and intensity range (:func:`~monai_mrngan.data.inputs.slice_to_grid`)."""
    return slice_to_grid(img, _pair(spatial_size), spacing_mm, pixel_mm, source)


def _nifti_ndim_and_zooms(path: Path) -> tuple[tuple[int, ...], tuple[float, ...]]:
    try:
        img = nib.load(str(path))
    except Exception as err:
        raise InputError(path, f"not a readable NIfTI image ({type(err).__name__})") from err
    return tuple(int(s) for s in img.shape), tuple(float(z) for z in img.header.get_zooms())


def _item(image: np.ndarray, source: str, index: int, reference_p: float | None) -> dict:
    return {
        "image": torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None],
        "source": source,
        "slice_index": int(index),
        "reference_p": float("nan") if reference_p is None else float(reference_p),
    }


def _volume_items(path: Path, size: tuple[int, int], spacing_mm: float) -> list[dict]:
    data, _ = load_volume(path)
    if data.shape[:2] == size and data.min() >= 0.0 and data.max() <= 1.0:
        return [_item(data[:, :, k], str(path), k, None) for k in range(data.shape[2])]
    if size[0] != size[1]:
        raise InputError(path, f"raw volumes are prepared to square slices; the localizer expects {size}")
    try:
        vol = prepare_volume(path, spacing=spacing_mm, size=size[0])
    except SkipScan as err:
        raise InputError(path, f"cannot be prepared like the training data: {err}") from err
    first = int(vol.steps["kept_slices"][0])
    logger.info("%s: prepared like the training data, kept resampled RAS slices %s", path, vol.steps["kept_slices"])
    return [_item(vol.data[:, :, k], str(path), first + k, vol.positions[k]) for k in range(vol.data.shape[2])]


def expand_inputs(inputs: str | os.PathLike | Iterable[str | os.PathLike]) -> list[Path]:
    """Files from a file, a folder (its .png / .nii / .nii.gz files), a glob pattern, or a list of those."""
    items = [inputs] if isinstance(inputs, (str, os.PathLike)) else list(inputs)
    files: list[Path] = []
    for item in items:
        p = Path(item)
        if p.is_dir():
            found = sorted(f for f in p.iterdir() if f.is_file() and (is_nifti(f) or is_picture(f)))
            if not found:
                raise InputError(p, "folder holds no .png / .jpg / .tif, .nii or .nii.gz files")
            files += found
        elif any(c in str(item) for c in "*?["):
            found = sorted(Path(f) for f in glob.glob(str(item)))
            if not found:
                raise InputError(item, "pattern matches no files")
            files += found
        else:
            if not p.is_file():
                raise InputError(p, "no such file")
            files.append(p)
    return files


def slice_items(
    inputs: str | os.PathLike | Iterable[str | os.PathLike],
    spatial_size: Sequence[int] | int = (128, 128),
    spacing_mm: float = 2.0,
    pixel_mm: float | None = None,
) -> list[dict]:
    """One ``{"image": (1, H, W), "source", "slice_index", "reference_p"}`` per slice of the inputs."""
    size = _pair(spatial_size)
    items: list[dict] = []
    for path in expand_inputs(inputs):
        if is_picture(path):
            items.append(_item(prepare_slice(load_slice(path), size, pixel_mm, spacing_mm, path), str(path), 0, None))
        elif is_nifti(path):
            shape, zooms = _nifti_ndim_and_zooms(path)
            spatial = [s for s in shape if s > 1]
            if len(spatial) >= 3:
                items += _volume_items(path, size, spacing_mm)
            else:
                px = pixel_mm if pixel_mm is not None else [z for s, z in zip(shape, zooms) if s > 1][:2]
                items.append(_item(prepare_slice(load_slice(path), size, px, spacing_mm, path), str(path), 0, None))
        else:
            raise InputError(path, "unsupported file type; expected .png / .jpg / .tif, .nii or .nii.gz")
    if not items:
        raise InputError(str(inputs), "no slices found in the inputs")
    return items


def localize_files(
    network: torch.nn.Module,
    inputs: str | os.PathLike | Iterable[str | os.PathLike],
    output_file: str | os.PathLike,
    spatial_size: Sequence[int] | int = (128, 128),
    spacing_mm: float = 2.0,
    pixel_mm: float | None = None,
    batch_size: int = 64,
) -> Path:
    """Predict every slice's ``p`` in the inputs (see :func:`slice_items`) and write the CSV."""
    items = slice_items(inputs, spatial_size, spacing_mm, pixel_mm)
    p = localize(network, torch.stack([it["image"] for it in items]), batch_size=batch_size).tolist()
    rows = position_rows([it["source"] for it in items], [it["slice_index"] for it in items], p, [it["reference_p"] for it in items])
    return write_positions_csv(rows, output_file)
