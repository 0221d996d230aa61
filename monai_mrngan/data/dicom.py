"""DICOM input: a series folder as one 3D volume, or one file as one slice, with its scanner geometry.

Read with pydicom (the maintained DICOM reader of the Python ecosystem; nibabel does not read
DICOM, and MONAI's ``PydicomReader`` gives no one-line diagnosis of a bad series). The geometry
comes from ImagePositionPatient / ImageOrientationPatient / PixelSpacing, so a series acquired in
any orientation (a sagittal MPRAGE too) becomes a volume with a correct RAS affine, like a NIfTI:

- array axis 0 runs along a row of the image (the "row" direction cosine, column index),
  axis 1 down the columns (row index), axis 2 across the slices (sorted along the slice normal);
- the affine maps (i, j, k) to RAS millimetres (DICOM's LPS with x and y negated).

A series folder may lack some of its files (an axial series with gaps): the missing places are
kept as empty slices and said so (:func:`read_dicom_series_slots`), so every slice it has stays at its
place. Every problem is an :class:`~monai_mrngan.data.io.InputError` naming the file or folder: not
DICOM, a multi-frame file, a compressed transfer syntax that cannot be decoded here, several
series in one folder, slices that differ in orientation or size, spacing that is not whole steps,
missing geometry.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, NamedTuple, Sequence

import numpy as np

from .io import InputError

__all__ = ["is_dicom", "series_folders", "read_dicom", "read_dicom_file", "read_dicom_series", "read_dicom_series_slots", "slice_normal_angle",
           "DicomSeries", "MAX_SERIES_SLOTS"]

_GEOMETRY_TAGS = ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing")
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def is_dicom(path: str | os.PathLike) -> bool:
    """True for a folder holding DICOM files, or a DICOM file (:func:`_looks_dicom`)."""
    path = Path(path)
    if path.is_dir():
        return any(_looks_dicom(f) for f in sorted(path.iterdir())[:50] if f.is_file())
    return path.is_file() and _looks_dicom(path)


def series_folders(root: str | os.PathLike, limit: int = 3, max_depth: int = 4) -> list[Path]:
    """Up to ``limit`` folders under ``root`` (``max_depth`` levels down, in name order) that hold DICOM files:
    what to pass instead of a patient or study folder of a PACS export."""
    found: list[Path] = []
    level = [Path(root)]
    for _ in range(max_depth):
        level = [d for parent in level for d in sorted(parent.iterdir()) if d.is_dir() and not d.name.startswith(".")]
        found += [d for d in level if is_dicom(d)][: limit - len(found)]
        if len(found) >= limit or not level:
            break
    return found


def _head_bytes(path: Path) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read(132)
    except OSError:
        return b""


def _has_preamble(path: Path) -> bool:
    """The DICOM file format's 128-byte preamble and ``DICM`` prefix."""
    return _head_bytes(path)[128:132] == b"DICM"


def _looks_dicom(path: Path) -> bool:
    """A DICOM file: the preamble, a ``.dcm`` name, or (some exports leave out the preamble) a first data
    element of the file meta (group 0002) or identifying (group 0008) group, little endian."""
    head = _head_bytes(path)
    return head[128:132] == b"DICM" or path.suffix.lower() == ".dcm" or head[:2] in (b"\x02\x00", b"\x08\x00")


def _dataset(path: Path, pixels: bool = True) -> Any:
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        ds = pydicom.dcmread(str(path), stop_before_pixels=not pixels, force=not _has_preamble(path))  # no preamble: read it anyway
    except InvalidDicomError as err:
        raise InputError(path, "not a DICOM file") from err
    except Exception as err:  # truncated or corrupt files raise many types
        raise InputError(path, f"unreadable DICOM file ({type(err).__name__}: {err})".splitlines()[0]) from err
    frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
    if frames > 1:
        raise InputError(path, f"multi-frame DICOM ({frames} frames in one file); export the series as one file per slice")
    missing = [t for t in _GEOMETRY_TAGS if t not in ds]
    if missing:
        raise InputError(path, f"DICOM file without {', '.join(missing)}; its position in the scanner is unknown")
    return ds


def _pixels(ds: Any, path: Path) -> np.ndarray:
    """The stored values with RescaleSlope / RescaleIntercept applied, as float32 (rows, cols)."""
    try:
        arr = ds.pixel_array
    except Exception as err:  # no decoder for a compressed transfer syntax, or broken pixel data
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        name = getattr(syntax, "name", str(syntax))
        raise InputError(path, f"cannot decode the pixel data (transfer syntax {name}; {type(err).__name__}); "
                               "convert the series to uncompressed DICOM or NIfTI (e.g. dcm2niix)") from err
    if arr.ndim != 2:
        raise InputError(path, f"pixel data of shape {tuple(arr.shape)}; expected one grayscale 2D image")
    slope = float(getattr(ds, "RescaleSlope", 1.0) or 1.0)
    intercept = float(getattr(ds, "RescaleIntercept", 0.0) or 0.0)
    return (arr.astype(np.float32) * slope + intercept).astype(np.float32)


def _orientation(ds: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    iop = np.asarray([float(v) for v in ds.ImageOrientationPatient], dtype=np.float64)
    row, col = iop[:3], iop[3:]
    normal = np.cross(row, col)
    return row, col, normal / max(np.linalg.norm(normal), 1e-12)


def _affine(ds: Any, slice_step: np.ndarray) -> np.ndarray:
    """RAS affine of a slice stack whose first slice is ``ds`` and whose slices step by ``slice_step`` (LPS mm)."""
    row, col, _ = _orientation(ds)
    dr, dc = (float(v) for v in ds.PixelSpacing)  # between rows (along col), between columns (along row)
    lps = np.eye(4)
    lps[:3, 0] = row * dc
    lps[:3, 1] = col * dr
    lps[:3, 2] = slice_step
    lps[:3, 3] = [float(v) for v in ds.ImagePositionPatient]
    return _LPS_TO_RAS @ lps


def slice_normal_angle(affine: np.ndarray) -> float:
    """Degrees between the slice normal (array axis 2) of an RAS affine and the head-foot axis."""
    n = np.asarray(affine, dtype=np.float64)[:3, 2]
    n = n / max(np.linalg.norm(n), 1e-12)
    return float(np.degrees(np.arccos(min(1.0, abs(n[2])))))


def read_dicom_file(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """One DICOM file as a one-slice volume ``(X, Y, 1)`` and its RAS affine (slice thickness as the step)."""
    path = Path(path)
    ds = _dataset(path)
    _, _, normal = _orientation(ds)
    thickness = float(getattr(ds, "SliceThickness", 0) or 0) or float(ds.PixelSpacing[0])
    return _pixels(ds, path).T[:, :, None], _affine(ds, normal * thickness)


def _series_files(folder: str | os.PathLike | Sequence[str | os.PathLike]) -> list[Path]:
    """A series' files: a folder's, in name order, hidden files and a DICOMDIR index left out; or the files given."""
    if isinstance(folder, (str, os.PathLike)):
        return sorted(f for f in Path(folder).iterdir() if f.is_file() and not f.name.startswith(".") and f.name.upper() != "DICOMDIR")
    return [Path(f) for f in folder]


MAX_SERIES_SLOTS = 4096
"""Most slice places a series may span (its slices and the missing ones between them)."""


class DicomSeries(NamedTuple):
    """A DICOM series read by :func:`read_dicom_series_slots`."""

    volume: np.ndarray  # (X, Y, Z) float32, zeros at the places without a file
    affine: np.ndarray  # RAS
    present: np.ndarray  # (Z,) bool: which evenly spaced slice places hold a file
    files: list[Path | None]  # the file at each place (None where none)
    thickness_mm: float | None  # the first file's SliceThickness (None when the header has none)


def read_dicom_series_slots(folder: str | os.PathLike | Sequence[str | os.PathLike]) -> DicomSeries:
    """Every DICOM file of ``folder`` (one series; or a list of its files) as a volume, its geometry, which of its
    evenly spaced slice places hold a file and its slice thickness (:class:`DicomSeries`), each file read once.

    Slices are sorted along the slice normal by ImagePositionPatient. The step is the series' single
    step; a gap of a whole number of steps (within 10 % of a step) is a run of missing files (an axial
    series with gaps): those places are zeros and ``present`` False. Any other spacing is refused.
    Non-DICOM files (e.g. a DICOMDIR index) are skipped.
    """
    files = _series_files(folder)
    if isinstance(folder, (str, os.PathLike)):
        folder, where = Path(folder), "in one folder"
    else:  # the files themselves: errors name the first one
        folder, where = files[0], f"among the {len(files)} files given"
    # each file read once, its pixel data kept as stored (pydicom decodes it on first access, below, after every check)
    headers = [(f, _dataset(f)) for f in files if _looks_dicom(f)]
    if not headers:
        raise InputError(folder, "no DICOM files in this folder")
    series = sorted({str(getattr(ds, "SeriesInstanceUID", "")) for _, ds in headers})
    if len(series) > 1:
        raise InputError(folder, f"mixed DICOM series {where} ({len(series)} SeriesInstanceUIDs); give one series at a time")
    row0, col0, normal = _orientation(headers[0][1])
    shape0 = (int(headers[0][1].Rows), int(headers[0][1].Columns))
    for f, ds in headers:
        row, col, _ = _orientation(ds)
        if not (np.allclose(row, row0, atol=1e-3) and np.allclose(col, col0, atol=1e-3)):
            raise InputError(f, "slice orientation differs from the rest of the series")
        if (int(ds.Rows), int(ds.Columns)) != shape0:
            raise InputError(f, f"image size {int(ds.Rows)}x{int(ds.Columns)} differs from the series' {shape0[0]}x{shape0[1]}")
    depth = np.array([float(np.dot([float(v) for v in ds.ImagePositionPatient], normal)) for _, ds in headers])
    order = np.argsort(depth, kind="stable")
    depth = depth[order]
    slots = np.zeros(1, dtype=np.int64)
    if len(depth) > 1:
        steps = np.diff(depth)
        if (steps <= 1e-6).any():
            raise InputError(folder, "two slices at the same position; the folder holds duplicates or several acquisitions")
        single = steps[steps < 1.5 * steps.min()]
        step = float(np.median(single))
        counts = np.rint(steps / step)
        if (np.abs(steps - counts * step) > 0.1 * step).any():
            raise InputError(folder, f"uneven slice spacing ({steps.min():.3g} to {steps.max():.3g} mm); expected one evenly spaced "
                                     "series (whole steps may be missing)")
        slots = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        if slots[-1] >= MAX_SERIES_SLOTS:
            raise InputError(folder, f"its {len(depth)} slices span {int(slots[-1]) + 1} slice places of {step:.3g} mm; at most "
                                     f"{MAX_SERIES_SLOTS} are read")
    else:
        step = float(getattr(headers[0][1], "SliceThickness", 0) or 0) or float(headers[0][1].PixelSpacing[0])
    planes = [_pixels(headers[i][1], headers[i][0]).T for i in order]
    vol = np.zeros((*planes[0].shape, int(slots[-1]) + 1), dtype=np.float32)
    vol[:, :, slots] = np.stack(planes, axis=2)
    present = np.zeros(vol.shape[2], dtype=bool)
    present[slots] = True
    placed: list[Path | None] = [None] * vol.shape[2]
    for slot, i in zip(slots, order):
        placed[int(slot)] = headers[i][0]
    thickness = float(getattr(headers[0][1], "SliceThickness", 0) or 0) or None  # thin slices 5 mm apart and 5 mm slabs store the same positions
    return DicomSeries(vol, _affine(headers[order[0]][1], normal * step), present, placed, thickness)  # the lowest slice's header holds the geometry


def read_dicom_series(folder: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Every DICOM file of ``folder`` (one series, evenly spaced, none missing) as a volume ``(X, Y, Z)`` and
    its RAS affine (:func:`read_dicom_series_slots`, which also takes a series with missing slices)."""
    vol, affine, present, _, _ = read_dicom_series_slots(folder)
    if not present.all():
        raise InputError(folder, f"{int((~present).sum())} of the series' {present.size} evenly spaced slices are missing")
    return vol, affine


def read_dicom(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """A DICOM series folder or a single DICOM file -> (volume (X, Y, Z), RAS affine)."""
    path = Path(path)
    if not path.exists():
        raise InputError(path, "no such file or folder")
    return read_dicom_series(path) if path.is_dir() else read_dicom_file(path)
