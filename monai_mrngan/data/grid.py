"""The model grid: how any image becomes slices the stages work on, in one home.

Reorientation to RAS and resampling (MONAI ``Orientation`` / ``Spacing``), intensity scaling to
[0, 1] (the head's 75th percentile to a fixed level, :func:`scale_intensity`), the in-plane crop / pad around the head's
intensity centre of mass (MONAI ``BorderPad`` / ``SpatialCrop``, which keep the affine right), and
:func:`prepare_slices`, which applies them to any input's axial slices. ``prepare`` uses the same
pieces for whole scans (:mod:`monai_mrngan.data.prepare`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import BorderPad, Orientation, Spacing, SpatialCrop
from scipy import ndimage

from .io import InputError
from .positions import HEAD_THRESHOLD

UPPER_PERCENTILE = 99.5  # of the positive voxels: the first guess of the scale, which finds the head
HEAD_PERCENTILE = 75.0  # of the head's voxels: what the scale is set by
HEAD_LEVEL = 0.66  # where the head's 75th percentile lands (IXI under the old 99.5th-percentile scaling: 0.661 +- 0.015)

__all__ = ["UPPER_PERCENTILE", "HEAD_PERCENTILE", "HEAD_LEVEL", "to_ras", "to_ras_isotropic", "scale_intensity", "unit_range_and_scale", "to_unit_range",
           "crop_inplane", "PreparedSlices", "prepare_slices"]


def to_ras(data: np.ndarray, affine: np.ndarray) -> MetaTensor:
    img = MetaTensor(torch.from_numpy(np.ascontiguousarray(data, dtype=np.float32))[None], affine=torch.as_tensor(affine, dtype=torch.float64))
    return Orientation(axcodes="RAS", labels=None)(img)


def to_ras_isotropic(data: np.ndarray, affine: np.ndarray, spacing: float) -> MetaTensor:
    """RAS at isotropic ``spacing`` mm, trilinear, with no anti-aliasing filter before a downsampling.

    Deliberately so: the shared IXI 2 mm volumes the stages train on were made the same way. Their sharpness
    (the mean squared second difference over the head, 60 volumes) rises and falls with the fractional offset
    of each 2 mm sample on the 0.94 / 1.2 mm acquisition grid, by 28-32 % along the in-plane axes (period 15
    samples, 2 / 0.9375 = 32 / 15) and 55 % along the slice axis (period 3, 2 / 1.2 = 5 / 3): the mark of
    plain linear interpolation. A Gaussian pre-filter would make a 1 mm scan from another scanner smoother
    than anything the stages saw; the training's blur augmentation covers the other direction."""
    return Spacing(pixdim=(spacing,) * 3, mode="bilinear", padding_mode="zeros")(to_ras(data, affine))


def scale_intensity(img: np.ndarray) -> tuple[np.ndarray, float]:
    """Scale a scan to [0, 1] by its head's 75th percentile (set to :data:`HEAD_LEVEL`), clipped.

    Returns ``(scaled, top)`` with ``scaled = clip(img / top, 0, 1)``; ``top`` is 0 (and ``scaled``
    all zeros) when nothing is positive. The head is what lies above ``HEAD_THRESHOLD`` of a first
    scale (the 99.5th percentile of the positive voxels), found again once at the new scale.

    Why not the 99.5th percentile itself (what ``prepare`` used before): that percentile sits in
    the bright tail (fat, vessels), which a scanner that stores its full range (not IXI's clipped
    uint8) moves, and every tissue's scaled value with it. On 15 held-out IXI volumes under seven
    simulated scanner changes (``python -m scripts.bench.standardise``), the head's 75th percentile
    kept the scaled head closest to the unchanged scan: mean absolute difference 0.035 against
    0.072 (0.19 against 0.019 with scalp fat 1.8x brighter; 0.100 against 0.050 under gamma 0.7);
    the 90th and 95th head percentiles and a white-matter histogram mode scored 0.040-0.047.
    Percentiles over positive voxels only: MONAI's ScaleIntensityRangePercentiles counts the
    (majority) background zeros too, which shifts the percentile with the field of view.
    """
    positive = img[img > 0]
    top = float(np.percentile(positive, UPPER_PERCENTILE)) if positive.size else 0.0
    if top <= 0:
        return np.zeros_like(img, dtype=np.float32), top
    for _ in range(2):
        head = img > HEAD_THRESHOLD * top
        if int(head.sum()) < 16:  # too little head to set a scale by: keep the first guess
            break
        top = float(np.percentile(img[head], HEAD_PERCENTILE)) / HEAD_LEVEL
    return np.clip(img / top, 0.0, 1.0).astype(np.float32), top


def unit_range_and_scale(img: np.ndarray) -> tuple[np.ndarray, float]:
    """Values already in [0, 1] stay (scale 1); others are scaled as ``prepare`` scales volumes.

    Returns ``(scaled, scale)``: ``scaled * scale`` gives the input's intensities back (inside the
    clipping); ``scale`` is 0 when nothing is positive.
    """
    if img.min() >= 0.0 and img.max() <= 1.0:
        return img, 1.0
    return scale_intensity(img)


def to_unit_range(img: np.ndarray) -> np.ndarray:
    """Values already in [0, 1] stay; others are scaled as ``prepare`` scales volumes."""
    return unit_range_and_scale(img)[0]


def crop_inplane(img: torch.Tensor, centre: Sequence[float], size: Sequence[int]) -> tuple[torch.Tensor, list[int]]:
    """Crop / zero-pad a channel-first (1, X, Y[, Z]) image in-plane to ``size`` around ``centre`` (voxels).

    The one in-plane crop of the project (``prepare`` and slices from elsewhere); a ``MetaTensor``
    keeps its affine. Returns the image and the padding added (x before, x after, y before, y after).
    """
    x0, y0 = int(round(centre[0])) - int(size[0]) // 2, int(round(centre[1])) - int(size[1]) // 2
    pads = [max(0, -x0), max(0, x0 + int(size[0]) - img.shape[1]), max(0, -y0), max(0, y0 + int(size[1]) - img.shape[2])]
    extra = [0, 0] * (img.ndim - 3)
    img = BorderPad(spatial_border=pads + extra)(img) if any(pads) else img
    start = [x0 + pads[0], y0 + pads[2]] + [0] * (img.ndim - 3)
    end = [start[0] + int(size[0]), start[1] + int(size[1])] + list(img.shape[3:])
    return SpatialCrop(roi_start=start, roi_end=end)(img), pads


@dataclass
class PreparedSlices:
    """Axial slices of any input on the model grid, and where that grid lies in the input's world.

    ``slices`` (K, size, size) float32 in [0, 1]; ``indices`` the selected slices along the
    RAS-reoriented axis 2; ``affine`` maps (i, j, k) to the input's world (RAS mm): model-grid
    pixel (i, j) of the input slice at RAS index ``indices[0] + k`` (so its third column is the
    input's own slice step, ``step_mm`` long); ``scale``: what was divided out (``slices * scale``
    are the input's intensities, inside the clipping).
    """

    slices: np.ndarray
    affine: np.ndarray
    step_mm: float
    indices: list[int]
    scale: float


def prepare_slices(data: np.ndarray, affine: np.ndarray, spacing: float, size: int | Sequence[int], indices: Sequence[int] | None = None,
                   source: str | Path = "<array>", top: float | None = None) -> PreparedSlices:
    """Axial slices of any volume (or a one-slice volume) prepared as :func:`prepare_volume` prepares scans.

    Reoriented to RAS (``indices`` count along that axis 2, negative from the top; default: all),
    scaled like ``prepare`` (by the whole input's head, :func:`scale_intensity`, whatever range its values
    have; a lone slice by its own head, see ``InputSlices.scaled_alone``), resampled in-plane to ``spacing`` mm (each slice
    stays where it was acquired: thick-slice stacks keep their gaps), and cropped / padded to
    ``size`` around the selected slices' intensity centre of mass. Raises :class:`InputError` for
    an index outside the volume or an input with nothing positive. ``top``: the scale :func:`scale_intensity` found for
    this same volume before (a ``PreparedSlices.scale``), so other slices of it skip its percentiles.
    """
    img = to_ras(np.asarray(data, dtype=np.float32), affine)
    depth = img.shape[3]
    picked = list(range(depth)) if indices is None else [int(i) for i in indices]
    bad = [i for i in picked if not -depth <= i < depth]
    if bad:
        raise InputError(source, f"slice index {bad[0]} outside the volume's {depth} axial slices (counted in RAS orientation)")
    picked = [i % depth for i in picked]
    # scaled exactly as ``prepare`` scales, even when the values already lie in [0, 1]: a scan normalised by its
    # maximum would otherwise reach the models 2.5x too dark, a lone 2D slice so normalised 2.1x (0.47 of its level;
    # normalised by the slice's own maximum 0.69). Slices already on the prepared grid never come here
    # (data.inputs._already_prepared, slice_to_grid at the model size)
    if top is None or top <= 0:
        scaled, top = scale_intensity(img[0].numpy())
    else:
        scaled = np.clip(img[0].numpy() / top, 0.0, 1.0).astype(np.float32)
    if top <= 0:
        raise InputError(source, "no positive intensities; nothing to scale for the models")
    scaled_img = MetaTensor(torch.from_numpy(scaled)[None], affine=img.affine)
    first = SpatialCrop(roi_start=[0, 0, picked[0]], roi_end=[img.shape[1], img.shape[2], picked[0] + 1])(scaled_img)
    # the picked slices as the channels of one one-slice image at the first one's place: every slice shares the in-plane
    # geometry, so one resampling grid serves all (one MONAI call, not one per slice: 256 calls took 1.1 s)
    stack = MetaTensor(torch.from_numpy(np.ascontiguousarray(np.moveaxis(scaled[:, :, picked], 2, 0)))[..., None], affine=first.affine)
    planes = Spacing(pixdim=(spacing, spacing, -1), mode="bilinear", padding_mode="zeros")(stack)  # in-plane only
    weights = sum(planes[i, :, :, 0].numpy() for i in range(planes.shape[0]))
    centre = ndimage.center_of_mass(weights) if weights.sum() > 0 else ((weights.shape[0] - 1) / 2, (weights.shape[1] - 1) / 2)
    size2 = (int(size), int(size)) if np.isscalar(size) else (int(size[0]), int(size[1]))
    cropped = crop_inplane(planes, centre, size2)[0]
    slices = np.clip(cropped[:, :, :, 0].numpy(), 0.0, 1.0).astype(np.float32)
    out_affine = np.asarray(cropped.affine, dtype=np.float64)
    return PreparedSlices(slices, out_affine, float(np.linalg.norm(out_affine[:3, 2])), picked, float(top))
