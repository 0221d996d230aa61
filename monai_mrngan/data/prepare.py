"""Turn a folder of brain MRIs into the prepared dataset every stage trains on.

For each scan (see :func:`prepare_volume`):

1. load and validate (3D, finite, not constant; see :mod:`monai_mrngan.data.io`);
2. reorient to RAS and resample to isotropic ``spacing`` mm (MONAI ``Orientation``, ``Spacing``);
3. scale intensities robustly: the 75th percentile of the head's voxels to a fixed level, clip to [0, 1]
   (:func:`~monai_mrngan.data.grid.scale_intensity`, which says why);
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
   - a skull-stripped scan (:mod:`.head_layers`) has no vertex either (its top is the brain's), and
     every stage learns whole heads: it is skipped;
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
from typing import Callable, Sequence

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import SpatialCrop
from scipy import ndimage

from .datalist import DATALIST_NAME, SPLITS
from .discovery import Scan, find_scans, is_bids
from .io import InputError, check_destination, load_volume, save_json, save_nifti
from .grid import crop_inplane, scale_intensity, to_ras_isotropic
from .head_layers import looks_stripped, stripped_reason, stripped_score
from .positions import HEAD_HEIGHT_MM, HEAD_THRESHOLD, VERTEX_MIN_AREA_MM2, slice_positions

logger = logging.getLogger(__name__)

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


def _scale(vol: np.ndarray) -> tuple[np.ndarray, float]:
    scaled, top = scale_intensity(vol)
    if top <= 0:
        raise SkipScan("no positive intensities" if not (vol > 0).any() else "intensity percentile is zero")
    return scaled, top


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


Placer = Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, dict]]
"""``place(slices (K, H, W) on the model grid, offsets_p (K,)) -> (positions (K,), info)``: positions of
slices whose places relative to each other are known, e.g. ``functools.partial(localize_with_offset, network)``
(:func:`monai_mrngan.inference.localize.localize_with_offset`)."""


def prepare_volume(path: str | Path, spacing: float = 1.0, size: int = 256, place: Placer | None = None) -> PreparedVolume:
    """Prepare one scan (see the module docstring). Raises ``InputError`` or ``SkipScan``.

    ``place``: a scan whose field of view cuts the top of the head has no vertex to count positions
    from; with a placer (trained stages) its slices are placed instead of skipped, and
    ``steps["placement"]`` says how (method, the fitted offset and its spread).
    """
    data, affine = load_volume(path)
    img = to_ras_isotropic(data, affine, spacing)
    vol, top = _scale(img[0].numpy())
    area, stray = _slice_stats(vol, spacing)
    depth = vol.shape[2]

    inside = np.nonzero(area >= VERTEX_MIN_AREA_MM2)[0]
    if inside.size == 0:
        raise SkipScan(f"no axial slice shows a head section of {VERTEX_MIN_AREA_MM2:g} mm^2")
    vertex = int(inside.max())
    cut = vertex == depth - 1  # the top slice still shows a head section: the vertex lies above the field of view
    if cut and place is None:
        raise SkipScan(f"head cut at the top of the field of view (no vertex): its top slice still shows {area[vertex]:.0f} mm^2 of "
                       "head, so positions counted from the vertex would be off by the missing top (prepare --place-with "
                       "WORKDIR places such scans with trained stages)")
    bottom = max(0, vertex - int(math.floor(HEAD_HEIGHT_MM / spacing + 1e-6))) if not cut else int(inside.min())
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
    stripped = stripped_score(np.moveaxis(out[0].numpy(), 2, 0), spacing)
    if looks_stripped(stripped):
        raise SkipScan(stripped_reason(stripped))

    placement = None
    if cut:
        slices = np.moveaxis(out[0].numpy(), 2, 0)
        found, placement = place(slices, (depth - 1 - keep) * spacing / HEAD_HEIGHT_MM)
        inside_head = (found >= 0.0) & (found <= 1.0)
        if inside_head.sum() < MIN_SLICES:
            raise SkipScan(f"head cut at the top of the field of view; placed, only {int(inside_head.sum())} slices lie within 0 <= p <= 1")
        first, last = (int(i) for i in np.nonzero(inside_head)[0][[0, -1]])
        keep, out = keep[first : last + 1], SpatialCrop(roi_start=[0, 0, first], roi_end=[size, size, last + 1])(out)
        positions = np.asarray(found[first : last + 1], dtype=np.float64)
        placement = {"method": "localized slices, one offset (the top of the head is outside the field of view)", **placement}
    else:
        positions = slice_positions(depth, vertex, spacing)[keep]
    steps = {
        "shape_in": list(data.shape),
        "spacing_in_mm": [round(float(s), 4) for s in np.sqrt((affine[:3, :3] ** 2).sum(axis=0))],
        "resampled_shape": list(vol.shape),
        "intensity_scale": round(top, 4),
        "vertex_index": None if cut else vertex,
        "kept_slices": [int(keep[0]), int(keep[-1])],
        "dropped_slices": {
            "empty_above_vertex": int(depth - 1 - vertex),
            "off_anatomy_below_head_height": int(bottom),
            "empty_or_noisy_ends": int((vertex + 1 - bottom) - keep.size),
        },
        "noisy_slices_inside": int(noisy.sum()),
        "stripped_score": None if stripped is None else round(stripped, 4),
        "inplane_center_voxel": [round(cx, 1), round(cy, 1)],
        "inplane_padding": pads,
        **({"placement": placement} if placement is not None else {}),
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
    place: Placer | None = None,
) -> dict:
    """Prepare every scan under ``src`` into ``dst``; return the report (also written to DST).

    ``place``: scans whose field of view cuts the top of the head are placed with it (see
    :func:`prepare_volume`) instead of skipped; their datalist entries record the ``placement``.

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
            vol = prepare_volume(scan.path, spacing, size, place)
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
        **({"placement": vol.steps["placement"]} if "placement" in vol.steps else {}),
    }
