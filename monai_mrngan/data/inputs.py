"""User inputs for ``reconstruct`` / ``complete``: any file a physician or researcher holds, on the model grid.

One home for reading what does not come from ``prepare``:

- a DICOM series folder (any acquisition orientation) or a single DICOM file (:mod:`.dicom`);
- a NIfTI: 2D, or 3D with a slice index or as a stack, any size, spacing and orientation;
- a PNG (or JPEG / TIFF): at the model size as is, any other size with ``pixel_mm`` (a picture has no geometry).

Everything with a geometry goes through :func:`~monai_mrngan.data.grid.prepare_slices` (the same
reorientation, scaling, resampling and crop as ``prepare``), which also says where the model grid
lies in the input's world, so outputs can overlay the input. ``slice_index`` counts along the
volume's axial axis after reorientation to RAS (0 = lowest slice), for DICOM and NIfTI alike.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple, Sequence

import nibabel as nib
import numpy as np

from .dicom import is_dicom, read_dicom_file, read_dicom_series_slots, series_folders, slice_normal_angle
from .io import InputError, check_values, is_nifti, is_picture, load_slice, read_image
from .grid import PreparedSlices, prepare_slices, to_unit_range

__all__ = ["InputSlices", "read_inputs", "read_slice_and_volume", "stack_of_volume", "slice_to_grid", "MAX_TILT_DEGREES"]

logger = logging.getLogger(__name__)

MAX_TILT_DEGREES = 10.0
"""A single slice must be axial within this angle: the models only know axial slices."""


@dataclass
class InputSlices:
    """Input slices on the model grid (``slices`` (K, H, W) in [0, 1]) and what is known of their place.

    ``affine``: (i, j, k) -> the input's world (RAS mm) for the model-grid pixel (i, j) of the
    first slice moved ``k`` input slice steps along its axial axis (None for a PNG: no geometry);
    ``offsets_mm``: each slice's distance above the first along that axis (a stack's geometry);
    ``sources``: a label per slice; ``scale``: the intensity divided out; ``indices``: each slice's
    axial index in its volume reoriented to RAS (one input with a geometry; else empty);
    ``scaled_alone``: every slice is a one-slice input scaled by its own head (raw intensities, no volume
    to scale by), whose scale differs from its volume's by where it lies in the head (see
    :func:`~monai_mrngan.atlas.bank.slice_scale_profile`); ``thickness_mm``: how thick each slice is along the
    axial axis, where the input says (an axial DICOM series' ``SliceThickness``; None: unknown, e.g. a NIfTI).
    """

    slices: np.ndarray
    sources: list[str]
    affine: np.ndarray | None = None
    step_mm: float | None = None
    offsets_mm: list[float] = field(default_factory=list)
    scale: float = 1.0
    indices: list[int] = field(default_factory=list)
    scaled_alone: bool = False
    thickness_mm: float | None = None

    @property
    def has_geometry(self) -> bool:
        return self.affine is not None


class _Loaded(NamedTuple):
    """An input file read once: voxels, RAS affine, for a DICOM series with missing files which of its slice places
    hold one (None: every place), for a DICOM series the file at each place and its ``SliceThickness`` (None for
    other inputs)."""

    data: np.ndarray
    affine: np.ndarray
    present: np.ndarray | None = None
    files: list[Path | None] | None = None
    thickness_mm: float | None = None


def _volume(path: Path | list[Path], name: Path) -> _Loaded:
    """A DICOM series (a folder, or a list of its files) / file or a NIfTI (2D images become one-slice volumes),
    read once. ``name``: what errors name."""
    present = files = thickness = None
    if isinstance(path, list) or (path.is_dir() and is_dicom(path)):
        data, affine, present, files, thickness = read_dicom_series_slots(path)
        present = None if present.all() else present
    elif is_dicom(path):
        data, affine = read_dicom_file(path)
    else:
        data, affine = read_image(path, "one 2D slice or one 3D volume")
    values = check_values(name, np.asarray(data) if present is None else data[:, :, present])  # the slices it has
    data = values if present is None else data
    if data.ndim == 2:
        data = data[:, :, None]
    elif data.ndim == 3 and data.shape[2] > 1 and 1 in data.shape[:2]:
        raise InputError(name, f"a slice stored along another axis (shape {tuple(data.shape)}); expected an axial slice or a volume")
    return _Loaded(data, affine, present, files, thickness)


def _axial_flipped(affine: np.ndarray) -> bool | None:
    """Whether a series' stored axis 2 (its files, in order) runs down the head, against RAS; None when that axis is
    not the axial one (a sagittal or coronal series, whose files are not axial slices)."""
    ornt = nib.orientations.io_orientation(np.asarray(affine, dtype=np.float64))
    return None if int(ornt[2, 0]) != 2 else bool(ornt[2, 1] < 0)


def _file_at(files: list[Path | None], ras_index: int, affine: np.ndarray) -> Path | None:
    """The file of an axial series that holds RAS axial slice ``ras_index`` (None for a series of another orientation)."""
    flipped = _axial_flipped(affine)
    return None if flipped is None else files[len(files) - 1 - ras_index if flipped else ras_index]


def _present_ras(present: np.ndarray, affine: np.ndarray, path: Path) -> list[int]:
    """The RAS axial indices of the slices a series with missing files has (its stored axis 2 must be the axial one)."""
    flipped = _axial_flipped(affine)
    if flipped is None:
        raise InputError(path, f"{int((~present).sum())} of the series' {present.size} evenly spaced slices are missing; only an axial "
                               "series may have gaps (a sagittal or coronal one has no whole axial slice without them)")
    idx = np.nonzero(present)[0]
    return sorted(int(i) for i in ((present.size - 1 - idx) if flipped else idx))


def _already_prepared(data: np.ndarray, affine: np.ndarray, spacing: float, size: int, indices: Sequence[int] | None,
                      path: Path) -> PreparedSlices | None:
    """A slice of a prepared volume (RAS, ``size`` px at ``spacing`` mm, values in [0, 1]) is used as it is."""
    zooms = np.linalg.norm(np.asarray(affine, dtype=np.float64)[:3, :2], axis=0)
    if (data.shape[:2] != (size, size) or nib.aff2axcodes(affine) != ("R", "A", "S") or not np.allclose(zooms, spacing, rtol=0.02)
            or data.min() < 0.0 or data.max() > 1.0):
        return None
    depth = data.shape[2]
    picked = list(range(depth)) if indices is None else [int(i) for i in indices]
    if any(not -depth <= i < depth for i in picked):
        raise InputError(path, f"slice index {picked[0]} outside the volume's {depth} axial slices")
    picked = [i % depth for i in picked]
    moved = np.asarray(affine, dtype=np.float64).copy()
    moved[:3, 3] += moved[:3, 2] * picked[0]
    return PreparedSlices(np.moveaxis(data[:, :, picked], 2, 0).astype(np.float32), moved, float(np.linalg.norm(moved[:3, 2])), picked, 1.0)


def _one_with_geometry(path: Path | list[Path], size: int, spacing: float, slice_index: int | None, stack: bool,
                       loaded: _Loaded | None = None, keep: Sequence[int] | None = None, top: float | None = None) -> InputSlices:
    """``loaded``: what :func:`_volume` returned for ``path`` (read once for two calls); ``keep``: a stack's RAS axial
    indices to use (default: every slice the input has); ``top``: its intensity scale, when an earlier call found it."""
    name = path[0].parent if isinstance(path, list) else path  # a list of one series' files is named by their folder
    data, affine, present, files, series_thickness = loaded if loaded is not None else _volume(path, name)
    depth = data.shape[2]
    real = None if present is None else _present_ras(present, affine, name)
    if depth == 1:
        angle = slice_normal_angle(affine)
        if angle > MAX_TILT_DEGREES:
            raise InputError(name, f"slice is {angle:.0f} degrees from axial (coronal or sagittal?); only an axial slice (within "
                                   f"{MAX_TILT_DEGREES:g} degrees) can be placed in the head")
        indices: Sequence[int] | None = [0]
    elif stack:
        indices = real if keep is None else [int(i) for i in keep]
    elif slice_index is None:
        raise InputError(name, f"3D volume of {depth} axial slices where one slice is expected; pass a slice index (--slice-index N, "
                               "counted from the bottom in RAS orientation) or --stack to use every axial slice")
    else:
        indices = [int(slice_index)]
        if real is not None and -depth <= indices[0] < depth and indices[0] % depth not in real:
            raise InputError(name, f"slice {indices[0]} is one of the series' missing slices (it has {', '.join(map(str, real[:8]))}"
                                   f"{', ...' if len(real) > 8 else ''})")
    prepared = _already_prepared(data, affine, spacing, size, indices, name) or prepare_slices(data, affine, spacing, size, indices, source=name, top=top)
    offsets = [float((i - prepared.indices[0]) * prepared.step_mm) for i in prepared.indices]
    label = str(name) if len(prepared.indices) == 1 and depth == 1 else None
    sources = [label or f"{name}#{i}" for i in prepared.indices]
    if isinstance(path, list):  # the files given: each slice named by its own file
        sources = [str(_file_at(files, i, affine) or s) for i, s in zip(prepared.indices, sources)]
    thickness = series_thickness if stack and _axial_flipped(affine) is not None else None  # an axial series
    return InputSlices(prepared.slices, sources, prepared.affine, prepared.step_mm, offsets, prepared.scale, list(prepared.indices),
                       scaled_alone=depth == 1 and prepared.scale != 1.0, thickness_mm=thickness)


def slice_to_grid(img: np.ndarray, size: int | Sequence[int], spacing: float, pixel_mm: float | Sequence[float] | None = None,
                  source: str | os.PathLike = "<array>") -> np.ndarray:
    """A 2D RAS slice without a geometry (a PNG, or an array) -> the model grid (``size`` px at ``spacing`` mm).

    At the model size it is used as it is (scaled like ``prepare`` when outside [0, 1]: a slice exported from
    prepared data); any other size needs its pixel size ``pixel_mm`` and goes through
    :func:`~monai_mrngan.data.grid.prepare_slices`, which scales it by its own head whatever its range (a PNG
    holds a viewer's display values in whatever window the viewer had: taken as they were, a window with
    white matter saturated reached the models 1.29x too bright, a min-max window 0.69x too dark).
    """
    size2 = (int(size), int(size)) if np.isscalar(size) else (int(size[0]), int(size[1]))
    img = np.asarray(img, dtype=np.float32)
    if img.shape == size2:
        return to_unit_range(img).astype(np.float32)
    if pixel_mm is None:
        raise InputError(source, f"slice is {img.shape[0]}x{img.shape[1]} px but the models work on {size2[0]}x{size2[1]} px at "
                                 f"{spacing:g} mm; its pixel size is unknown, so pass pixel_mm (--pixel_mm on the command line, "
                                 "e.g. --pixel_mm 1.0) to resample it")
    px = np.broadcast_to(np.asarray(pixel_mm, dtype=np.float64), (2,))
    if (px <= 0).any() or not np.isfinite(px).all():
        raise InputError(source, f"invalid pixel size {px.tolist()} mm")
    return prepare_slices(img[:, :, None], np.diag([px[0], px[1], spacing, 1.0]), spacing, size2, [0], source=source).slices[0]


def read_slice_and_volume(path: str | os.PathLike, size: int, spacing: float, slice_index: int) -> tuple[InputSlices, InputSlices]:
    """One axial slice of a 3D input (``read_inputs([path], ..., slice_index=...)``) and every axial slice of it
    (``read_inputs([path], ..., stack=True)``: what places the slice and judges the whole head), the file read once
    and scaled once (a 176-file DICOM series took 0.4 s to read). Anything but one NIfTI or DICOM input goes through
    :func:`read_inputs`, which raises its one-line error."""
    p = Path(path)
    if not p.exists() or not (is_nifti(p) or is_dicom(p)):
        return read_inputs([p], size, spacing, slice_index=slice_index), read_inputs([p], size, spacing, stack=True)
    loaded = _volume(p, p)
    one = _one_with_geometry(p, size, spacing, slice_index, False, loaded)
    return one, _one_with_geometry(p, size, spacing, None, True, loaded, top=one.scale)  # the volume's scale found once


def stack_of_volume(data: np.ndarray, affine: np.ndarray, path: str | os.PathLike, size: int, spacing: float,
                    keep: Sequence[int]) -> InputSlices:
    """The axial slices ``keep`` (RAS indices) of a volume already loaded from ``path`` (voxels and affine as nibabel gives them),
    read as ``--stack`` reads a file: ``complete``'s scans off the prepared grid, whose missing slices are left out."""
    return _one_with_geometry(Path(path), size, spacing, None, True, _Loaded(np.asarray(data), affine), keep)


def read_inputs(inputs: Sequence[str | os.PathLike], size: int, spacing: float, slice_index: int | None = None,
                stack: bool = False, pixel_mm: float | Sequence[float] | None = None) -> InputSlices:
    """Every input file (or DICOM folder) -> slices on the model grid (``size`` px at ``spacing`` mm).

    ``stack``: one input whose axial slices are all used, with their relative positions from its
    geometry (a thick-slice acquisition). Otherwise each input is one slice; the geometry kept is
    the first input's when there is a single input.
    """
    paths = [Path(p) for p in inputs]
    if not paths:
        raise ValueError("no input slices given")
    for p in paths:
        if not p.exists():
            raise InputError(p, "no such file or folder")
    if stack and len(paths) > 1:
        bad = [p for p in paths if p.is_dir() or not is_dicom(p)]
        if bad:
            raise InputError(bad[0], f"--stack takes one input (a volume or a DICOM series folder), or the DICOM files of one "
                                     f"series; got {len(paths)} inputs")
        return _one_with_geometry(paths, size, spacing, slice_index, stack)
    parts = []
    for p in paths:
        if is_picture(p):
            if stack or slice_index is not None:
                raise InputError(p, "a PNG, JPEG or TIFF picture is one slice; --stack and --slice-index apply to volumes")
            img = load_slice(p)  # one slice scaled by its own head unless at the model size: brought to its volume's level later
            parts.append(InputSlices(slice_to_grid(img, size, spacing, pixel_mm, p)[None], [str(p)],
                                     scaled_alone=img.shape != (size, size)))
        elif is_nifti(p) or is_dicom(p):
            parts.append(_one_with_geometry(p, size, spacing, slice_index, stack))
        else:
            inside = series_folders(p) if p.is_dir() else []
            if inside:  # a patient or study folder of a PACS export: name the series folders in it
                raise InputError(p, f"no DICOM files in this folder itself; its DICOM series are in subfolders such as "
                                    f"{', '.join(str(d) for d in inside)}: pass one of them")
            raise InputError(p, "unsupported input; expected a DICOM series folder or file, .nii / .nii.gz, or a .png / .jpg / .tif picture")
    if len(parts) == 1:
        return parts[0]
    if all(p.is_file() and is_dicom(p) for p in paths):
        logger.warning("%d DICOM files, each placed on its own; if they are slices of one series, --stack places them together "
                       "by their geometry (ImagePositionPatient) and writes the output in their space", len(paths))
    return InputSlices(np.concatenate([q.slices for q in parts]), [s for q in parts for s in q.sources],
                       scaled_alone=all(q.scaled_alone for q in parts))
