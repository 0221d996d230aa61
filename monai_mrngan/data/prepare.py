"""Turn a folder of brain MRIs into the prepared dataset every stage trains on.

For each scan (see :func:`prepare_volume`):

1. load and validate (3D, finite, not constant; see :mod:`monai_mrngan.data.io`);
2. reorient to RAS and resample to isotropic ``spacing`` mm (MONAI ``Orientation``, ``Spacing``);
3. scale intensities robustly: divide by the 99.5th percentile of the nonzero voxels, clip to [0, 1];
4. find the head: voxels above ``HEAD_THRESHOLD`` (0.1); per axial slice its area in mm^2 and its
   stray-signal fraction (pixels above threshold outside the slice's filled head mask);
5. trim axially by the documented heuristics (the paper's "simple heuristics"):
   - *empty*: slices above the vertex, i.e. whose head area is below ``VERTEX_MIN_AREA_MM2``;
   - *off-anatomy*: slices deeper than ``HEAD_HEIGHT_MM`` below the vertex (neck, shoulders), so
     every kept slice has an anatomical position ``0 <= p <= 1`` (:mod:`.positions`);
   - *noisy*: end slices whose stray-signal fraction exceeds ``NOISY_FRACTION``; a scan with more
     than ``MAX_NOISY_SHARE`` noisy slices inside the head is skipped as overly noisy;
   - a scan whose top slice still shows a head section (``VERTEX_MIN_AREA_MM2`` or more) lost its
     vertex to the field of view, by however little; positions would be wrong, so it is skipped;
6. crop/pad in-plane to ``size`` x ``size`` centred on the head's intensity centre of mass
   (MONAI ``BorderPad`` + ``SpatialCrop`` keep the affine right);
7. write ``volumes/<name>.nii.gz`` atomically and record ``positions`` in the datalist.
"""

from __future__ import annotations

import logging
import math
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import BorderPad, Orientation, Spacing, SpatialCrop
from scipy import ndimage

from .datalist import DATALIST_NAME, SPLITS
from .discovery import Scan, find_scans, is_bids
from .io import InputError, check_destination, load_volume, save_json, save_nifti
from .positions import HEAD_HEIGHT_MM, HEAD_THRESHOLD, VERTEX_MIN_AREA_MM2, slice_positions

logger = logging.getLogger(__name__)

UPPER_PERCENTILE = 99.5
NOISY_FRACTION = 0.05
"""A slice is noisy when more than this share of its non-head pixels are above threshold."""
MAX_NOISY_SHARE = 0.2
MIN_SLICES = 8
REPORT_NAME = "prepare_report.json"


@dataclass
class PreparedVolume:
    """A prepared volume and what was done to it."""

    data: np.ndarray  # (size, size, D) float32 in [0, 1], RAS
    affine: np.ndarray
    positions: np.ndarray  # p of each axial index
    steps: dict


class SkipScan(Exception):
    """A readable scan that the heuristics reject; the message is the reason."""


def _to_ras(data: np.ndarray, affine: np.ndarray) -> MetaTensor:
    img = MetaTensor(torch.from_numpy(np.ascontiguousarray(data, dtype=np.float32))[None], affine=torch.as_tensor(affine, dtype=torch.float64))
    return Orientation(axcodes="RAS", labels=None)(img)


def _to_ras_isotropic(data: np.ndarray, affine: np.ndarray, spacing: float) -> MetaTensor:
    return Spacing(pixdim=(spacing,) * 3, mode="bilinear", padding_mode="zeros")(_to_ras(data, affine))


def scale_intensity(img: np.ndarray) -> tuple[np.ndarray, float]:
    """Divide by the 99.5th percentile of the positive values and clip to [0, 1].

    Returns ``(scaled, top)``; ``top`` is 0 (and ``scaled`` all zeros) when nothing is positive.
    Percentile over positive voxels only: MONAI's ScaleIntensityRangePercentiles counts the
    (majority) background zeros too, which shifts the percentile with the field of view.
    """
    positive = img[img > 0]
    top = float(np.percentile(positive, UPPER_PERCENTILE)) if positive.size else 0.0
    if top <= 0:
        return np.zeros_like(img, dtype=np.float32), top
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


def _scale(vol: np.ndarray) -> tuple[np.ndarray, float]:
    scaled, top = scale_intensity(vol)
    if top <= 0:
        raise SkipScan("no positive intensities" if not (vol > 0).any() else "intensity percentile is zero")
    return scaled, top


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
                   source: str | Path = "<array>") -> PreparedSlices:
    """Axial slices of any volume (or a one-slice volume) prepared as :func:`prepare_volume` prepares scans.

    Reoriented to RAS (``indices`` count along that axis 2, negative from the top; default: all),
    scaled like ``prepare`` (by the whole input's 99.5th percentile; an input already in [0, 1] is
    kept as it is), resampled in-plane to ``spacing`` mm (each slice
    stays where it was acquired: thick-slice stacks keep their gaps), and cropped / padded to
    ``size`` around the selected slices' intensity centre of mass. Raises :class:`InputError` for
    an index outside the volume or an input with nothing positive.
    """
    img = _to_ras(np.asarray(data, dtype=np.float32), affine)
    depth = img.shape[3]
    picked = list(range(depth)) if indices is None else [int(i) for i in indices]
    bad = [i for i in picked if not -depth <= i < depth]
    if bad:
        raise InputError(source, f"slice index {bad[0]} outside the volume's {depth} axial slices (counted in RAS orientation)")
    picked = [i % depth for i in picked]
    scaled, top = unit_range_and_scale(img[0].numpy())
    if top <= 0:
        raise InputError(source, "no positive intensities; nothing to scale for the models")
    scaled_img = MetaTensor(torch.from_numpy(scaled)[None], affine=img.affine)
    resample = Spacing(pixdim=(spacing, spacing, -1), mode="bilinear", padding_mode="zeros")  # in-plane only
    planes = [resample(SpatialCrop(roi_start=[0, 0, i], roi_end=[img.shape[1], img.shape[2], i + 1])(scaled_img)) for i in picked]
    weights = sum(pl[0, :, :, 0].numpy() for pl in planes)
    centre = ndimage.center_of_mass(weights) if weights.sum() > 0 else ((weights.shape[0] - 1) / 2, (weights.shape[1] - 1) / 2)
    size2 = (int(size), int(size)) if np.isscalar(size) else (int(size[0]), int(size[1]))
    cropped = [crop_inplane(pl, centre, size2)[0] for pl in planes]
    slices = np.stack([np.clip(c[0, :, :, 0].numpy(), 0.0, 1.0) for c in cropped]).astype(np.float32)
    out_affine = np.asarray(cropped[0].affine, dtype=np.float64)
    return PreparedSlices(slices, out_affine, float(np.linalg.norm(out_affine[:3, 2])), picked, float(top))


def _slice_stats(vol: np.ndarray, spacing: float) -> tuple[np.ndarray, np.ndarray]:
    """Head area (mm^2) and stray-signal fraction of every axial slice.

    Stray signal = above-threshold pixels in specks (connected pieces smaller than 1 % of the
    slice's largest piece) as a share of the pixels outside the filled head: noise and ghosting
    make many specks, while a scalp ring broken into a few large arcs does not.
    """
    mask = vol > HEAD_THRESHOLD
    area = mask.sum(axis=(0, 1)) * spacing**2
    stray = np.zeros(vol.shape[2])
    for z in np.nonzero(mask.any(axis=(0, 1)))[0]:
        m = mask[:, :, z]
        labels, n = ndimage.label(m)
        sizes = np.bincount(labels.ravel())[1:]
        big = np.isin(labels, 1 + np.nonzero(sizes >= max(0.01 * sizes.max(), 4))[0])
        head = ndimage.binary_fill_holes(ndimage.binary_closing(big, iterations=2))
        outside = ~head
        stray[z] = (m & outside).sum() / max(outside.sum(), 1)
    return area, stray


def prepare_volume(path: str | Path, spacing: float = 1.0, size: int = 256) -> PreparedVolume:
    """Prepare one scan (see the module docstring). Raises ``InputError`` or ``SkipScan``."""
    data, affine = load_volume(path)
    img = _to_ras_isotropic(data, affine, spacing)
    vol, top = _scale(img[0].numpy())
    area, stray = _slice_stats(vol, spacing)
    depth = vol.shape[2]

    inside = np.nonzero(area >= VERTEX_MIN_AREA_MM2)[0]
    if inside.size == 0:
        raise SkipScan(f"no axial slice shows a head section of {VERTEX_MIN_AREA_MM2:g} mm^2")
    vertex = int(inside.max())
    if vertex == depth - 1:  # the top slice still shows a head section: the vertex lies above the field of view
        raise SkipScan(f"head cut at the top of the field of view (no vertex): its top slice still shows {area[vertex]:.0f} mm^2 of "
                       "head, so positions counted from the vertex would be off by the missing top")
    bottom = max(0, vertex - int(math.floor(HEAD_HEIGHT_MM / spacing + 1e-6)))
    keep = np.arange(bottom, vertex + 1)
    noisy = stray[keep] > NOISY_FRACTION
    if noisy.mean() > MAX_NOISY_SHARE:
        raise SkipScan(f"overly noisy: {int(noisy.sum())} of {keep.size} head slices have stray signal above {NOISY_FRACTION:.0%}")
    empty = area[keep] < VERTEX_MIN_AREA_MM2
    bad = noisy | empty
    lo, hi = 0, keep.size
    while lo < hi and bad[lo]:
        lo += 1
    while hi > lo and bad[hi - 1]:
        hi -= 1
    keep = keep[lo:hi]
    if keep.size < MIN_SLICES:
        raise SkipScan(f"only {keep.size} usable axial slices (need {MIN_SLICES})")

    slab = vol[:, :, keep]
    weights = slab.sum(axis=2)
    cx, cy = (float(c) for c in ndimage.center_of_mass(weights))
    scaled = MetaTensor(torch.from_numpy(vol)[None], affine=img.affine)
    scaled = SpatialCrop(roi_start=[0, 0, int(keep[0])], roi_end=[vol.shape[0], vol.shape[1], int(keep[-1]) + 1])(scaled)
    out, pads = crop_inplane(scaled, (cx, cy), (size, size))

    positions = slice_positions(depth, vertex, spacing)[keep]
    steps = {
        "shape_in": list(data.shape),
        "spacing_in_mm": [round(float(s), 4) for s in np.sqrt((affine[:3, :3] ** 2).sum(axis=0))],
        "resampled_shape": list(vol.shape),
        "intensity_p99_5": round(top, 4),
        "vertex_index": vertex,
        "kept_slices": [int(keep[0]), int(keep[-1])],
        "dropped_slices": {
            "empty_above_vertex": int(depth - 1 - vertex),
            "off_anatomy_below_head_height": int(bottom),
            "empty_or_noisy_ends": int((vertex + 1 - bottom) - keep.size),
        },
        "noisy_slices_inside": int(noisy.sum()),
        "inplane_center_voxel": [round(cx, 1), round(cy, 1)],
        "inplane_padding": pads,
    }
    return PreparedVolume(out[0].numpy().astype(np.float32), out.affine.numpy(), positions, steps)


def split_subjects(subjects: Sequence[str], fractions: Sequence[float], seed: int) -> dict[str, list[str]]:
    """Shuffle unique subjects with ``seed`` and cut them into training / validation / test."""
    fr = np.asarray(fractions, dtype=np.float64)
    if fr.shape != (3,) or (fr < 0).any() or fr.sum() <= 0:
        raise ValueError(f"split must be three non-negative fractions, got {list(fractions)}")
    fr = fr / fr.sum()
    order = sorted(set(subjects))
    np.random.default_rng(seed).shuffle(order)
    n = len(order)
    n_val = int(round(fr[1] * n))
    n_test = int(round(fr[2] * n))
    if n >= 3:  # keep a requested split non-empty on small cohorts
        n_val = max(n_val, 1 if fr[1] > 0 else 0)
        n_test = max(n_test, 1 if fr[2] > 0 else 0)
    n_val, n_test = min(n_val, n), min(n_test, n - min(n_val, n))
    n_train = n - n_val - n_test
    return {"training": order[:n_train], "validation": order[n_train : n_train + n_val], "test": order[n_train + n_val :]}


def parse_split(split: str | Sequence[float]) -> tuple[float, float, float]:
    """``"0.8,0.1,0.1"`` (or a 3-sequence, as fire passes it) -> three floats."""
    parts = split.split(",") if isinstance(split, str) else list(split)
    if len(parts) != 3:
        raise ValueError(f"--split needs three comma-separated fractions, got {split!r}")
    return tuple(float(p) for p in parts)  # type: ignore[return-value]


def _check_folders(src: Path, dst: Path, overwrite: bool) -> None:
    if check_destination(src, dst, overwrite, "a prepared dataset"):
        for name in (DATALIST_NAME, REPORT_NAME):
            (dst / name).unlink(missing_ok=True)
        shutil.rmtree(dst / "volumes", ignore_errors=True)


def prepare_dataset(
    src: str | Path,
    dst: str | Path,
    spacing: float = 1.0,
    size: int = 256,
    seed: int = 0,
    split: str | Sequence[float] = (0.8, 0.1, 0.1),
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    """Prepare every scan under ``src`` into ``dst``; return the report (also written to DST).

    Bad or rejected inputs are reported (one line on stderr and in the report) and skipped.
    Raises ``RuntimeError`` when no usable scan was found.
    """
    src, dst = Path(src), Path(dst)
    fractions = parse_split(split)
    if spacing <= 0 or size < 16:
        raise ValueError(f"spacing must be > 0 and size >= 16, got spacing={spacing}, size={size}")
    scans, ignored = find_scans(src)
    _check_folders(src, dst, overwrite)
    (dst / "volumes").mkdir(parents=True, exist_ok=True)

    report: dict = {
        "src": str(src.resolve()),
        "dst": str(dst.resolve()),
        "layout": "bids" if is_bids(src) else "folder",
        "options": {"spacing": spacing, "size": size, "seed": seed, "split": list(fractions)},
        "definitions": {
            "position": f"p = depth below the vertex / {HEAD_HEIGHT_MM:g} mm (0 = top of head)",
            "head_threshold": HEAD_THRESHOLD,
            "vertex_min_area_mm2": VERTEX_MIN_AREA_MM2,
            "noisy_fraction": NOISY_FRACTION,
        },
        "inputs": [],
        "ignored_files": [str(p) for p in ignored],
    }
    entries: list[dict] = []
    used_names: set[str] = set()
    t0 = time.time()
    for i, scan in enumerate(scans, 1):
        record = {"source": str(scan.path), "subject": scan.subject, "session": scan.session}
        try:
            vol = prepare_volume(scan.path, spacing, size)
        except (InputError, SkipScan) as err:
            reason = str(err) if isinstance(err, InputError) else f"{scan.path}: {err}"
            record.update(status="skipped", reason=reason)
            print(f"prepare: skipped {reason}", file=sys.stderr)
        else:
            name = _unique(scan, used_names)
            rel = f"volumes/{name}.nii.gz"
            save_nifti(vol.data, vol.affine, dst / rel)
            record.update(status="ok", output=rel, num_slices=int(vol.data.shape[2]), steps=vol.steps)
            entries.append(_entry(scan, rel, vol, spacing))
        report["inputs"].append(record)
        if progress:
            eta = (time.time() - t0) / i * (len(scans) - i)
            print(f"prepare: {i}/{len(scans)} {scan.path.name} {record['status']} (eta {eta:.0f}s)", file=sys.stderr)

    if not entries:
        save_json(report, dst / REPORT_NAME)
        raise RuntimeError(f"{src}: no usable 3D structural MRI found ({len(scans)} candidates); see {dst / REPORT_NAME}")
    groups = split_subjects([e["subject"] for e in entries], fractions, seed)
    datalist = {k: [e for e in entries if e["subject"] in set(groups[k])] for k in SPLITS}
    report["splits"] = {k: {"subjects": len(groups[k]), "volumes": len(datalist[k])} for k in SPLITS}
    save_json(report, dst / REPORT_NAME)
    save_json({"description": "monai-mrngan prepared dataset", **datalist}, dst / DATALIST_NAME)
    return report


def _unique(scan: Scan, used: set[str]) -> str:
    name, k = scan.name, 1
    while name in used:
        k += 1
        name = f"{scan.name}_{k}"
    used.add(name)
    return name


def _entry(scan: Scan, rel: str, vol: PreparedVolume, spacing: float) -> dict:
    return {
        "image": rel,
        "subject": scan.subject,
        "session": scan.session,
        "num_slices": int(vol.data.shape[2]),
        "source": str(scan.path.resolve()),
        "spacing": [float(spacing)] * 3,
        "positions": [round(float(p), 6) for p in vol.positions],
    }
