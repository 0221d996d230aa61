"""Completing a scan off the prepared grid (``input_kind`` ``scan``): a thick-slice acquisition, or a volume
at another in-plane size or voxel size whose missing slices are blanked, or a DICOM series folder (thick slices, or
an axial series with files missing).

Its real (non-missing) axial slices are read as ``reconstruct --stack`` reads a file
(:func:`~monai_mrngan.data.inputs.stack_of_volume`: reoriented, scaled, resampled and cropped as ``prepare``
does; positions relative to each other from the geometry) and reconstructed by the same code
(:func:`~monai_mrngan.inference.reconstruct.reconstruct_slices`: the input checks, one offset placed, the
few-slice mode on the prepared grid). The output is what ``reconstruct`` writes: the volume placed in the
input's world so that it overlays the input in a viewer, the model-grid volume beside it, the provenance and
uncertainty maps, a montage and a positions JSON. Its voxels are in the models' [0, 1] (as ``prepare``
writes volumes; the sidecar's ``intensity.scale`` times a voxel is the input's intensity): a resampled
slice cannot keep the input's voxels bit-exact, unlike a volume on the grid.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from ..data.inputs import InputSlices, read_inputs, stack_of_volume
from ..data.io import InputError
from ..inference.components import Components
from ..inference.reconstruct import reconstruct_slices
from .complete_io import SPACING_TOLERANCE, Completed, models_used

__all__ = ["complete_scan", "complete_series"]


def complete_scan(
    path: Path, data: np.ndarray, affine: np.ndarray, real_idx: np.ndarray, ras_positions: np.ndarray | None, components: Components,
    reference: Mapping[str, Any], method: str, file_index: Callable[[np.ndarray], list[int]], models: Mapping[str, dict] | None = None,
    slab_mm: float | None = None,
) -> Completed:
    """Complete a scan off the prepared grid from its real axial slices ``real_idx`` (RAS indices).

    ``data`` / ``affine``: the file's voxels (a private copy; NaN in missing slices allowed) and affine;
    ``ras_positions``: ``p`` per RAS axial slice from the sidecar, or None (placed as ``reconstruct --stack``
    places a stack); ``file_index``: RAS axial indices -> the file's own, for the sidecar; ``models``: :func:`~.complete_io.model_files`;
    ``slab_mm``: how thick its slices are (the sidecar's ``slab_mm``; None: their spacing when wider than the grid's,
    :func:`~monai_mrngan.inference.stacks.slab_thickness_mm`).
    Raises :class:`InputError` naming the file for anything the reconstruction refuses. Nothing is written.
    """
    if np.issubdtype(data.dtype, np.floating):
        data = np.nan_to_num(data, nan=0.0)  # NaN-filled missing slices would spoil the volume's intensity scale
    got = stack_of_volume(data, affine, path, int(reference["shape"][0]), float(reference["spacing_mm"]), real_idx.tolist())
    given = None if ras_positions is None else [float(p) for p in ras_positions[real_idx]]
    return _completed(path, got, given, components, reference, method, lambda ras: file_index(np.asarray(ras, dtype=int)), models, slab_mm)


def complete_series(path: Path, components: Components, reference: Mapping[str, Any], method: str,
                    models: Mapping[str, dict] | None = None) -> Completed:
    """Complete a DICOM series folder: its axial slices (any acquisition orientation, read once as ``reconstruct --stack``
    reads a series) when they lie further apart than the grid's or files are missing from it (an axial series with
    gaps); else :class:`InputError` (nothing to complete). Sidecar indices are RAS axial indices of the series."""
    spacing = float(reference["spacing_mm"])
    got = read_inputs([path], int(reference["shape"][0]), spacing, stack=True)
    gaps = len(got.indices) > 1 and bool((np.diff(got.indices) > 1).any())
    if not gaps and (got.step_mm or 0.0) <= (1 + SPACING_TOLERANCE) * spacing:
        raise InputError(path, f"a DICOM series of {len(got.indices)} axial slices {got.step_mm or 0:g} mm apart with no file "
                               f"missing, no further apart than the grid's {spacing:g} mm: nothing to complete")
    return _completed(path, got, None, components, reference, method, lambda ras: [int(i) for i in ras], models)


def _completed(path: Path, got: InputSlices, given: list[float] | None, components: Components, reference: Mapping[str, Any],
               method: str, file_index: Callable[[Sequence[int]], list[int]], models: Mapping[str, dict] | None,
               slab_mm: float | None = None) -> Completed:
    """Reconstruct a scan's slices (``got``, at ``given`` positions or placed) on the prepared grid, as ``reconstruct --stack`` does."""
    try:
        done = reconstruct_slices(got, components, positions=given, method=method, spacing_mm=float(reference["spacing_mm"]),
                                  reference_affine=np.asarray(reference["affine"]), reference_positions=list(reference["positions"]), stack=True,
                                  slab_mm=slab_mm)
    except ValueError as err:  # e.g. no slice within the grid, two slices on one grid slice, nothing to place by
        raise InputError(path, str(err)) from err
    rec = done.rec
    used = sorted(int(i) for i in done.inputs.indices)
    placement = rec.extra.get("placement") or {}
    meta = {
        "input_kind": "scan",
        "shape": list(rec.volume.shape),
        "axial_axis": 2,
        "generated_slices": [i for i in range(rec.volume.shape[2]) if i not in set(rec.input_indices)],
        "real_slices": sorted(int(i) for i in rec.input_indices),
        "input_slices": file_index(used),
        "input_slices_left_out": file_index(sorted(set(int(i) for i in got.indices) - set(used))),
        "positions": [round(float(p), 6) for p in rec.positions],
        "positions_from": "sidecar" if given is not None else f"placed ({placement.get('method', 'localized')})",
        "placement": placement,
        "intensity": {"scale": round(float(got.scale), 6), "unit_range": False,
                      "units": "the models' [0, 1], as prepare writes volumes; intensity.scale times a voxel is the input's intensity"},
        "method": method,
        "slab_mm": rec.extra.get("slab_mm", 0.0),
        "models": models_used(method, given is None and str(placement.get("method", "")).startswith("localized"), models),
    }
    return Completed(rec.volume, done.input_affine if done.input_affine is not None else done.grid_affine, meta, reconstructed=done)
