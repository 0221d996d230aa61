"""A stack of slices (a thick-slice scan, or a series with files left out) on the output grid: where its slices lie,
which of them the grid takes, and how thick the slabs are that its slices record."""

from __future__ import annotations

import logging
from typing import Sequence

import numpy as np

from ..data.inputs import InputSlices
from ..data.positions import HEAD_HEIGHT_MM
from .components import Components
from .localize import place_slices
from .volume import one_per_grid_slice

logger = logging.getLogger(__name__)

__all__ = ["stack_positions", "stack_inside", "check_slab_mm", "slab_thickness_mm"]


def stack_positions(components: Components, got: InputSlices, given: Sequence[float] | None, spacing_mm: float) -> tuple[list[float], dict]:
    """Positions of a stack's slices from their relative geometry and ONE offset: the given position of
    the first slice, else found from the stack itself (:func:`~monai_mrngan.inference.localize.place_slices`:
    counted from the vertex when the stack shows it, else localized with one fitted offset)."""
    rel = -np.asarray(got.offsets_mm, dtype=np.float64) / HEAD_HEIGHT_MM  # higher slices lie closer to the vertex
    if given is not None:
        if len(given) not in (1, len(rel)):
            raise ValueError(f"a stack of {len(rel)} slices takes one position (its first slice) or {len(rel)}, got {len(given)}")
        positions = [float(p) for p in given] if len(given) == len(rel) else [float(given[0] + r) for r in rel]
        return positions, {"method": "given"}
    localizer, template = components.placer()
    found, info = place_slices(localizer, got.slices, got.offsets_mm, spacing_mm, template=template)
    logger.info("stack placed: %s", info)
    return [float(p) for p in found], info


def stack_inside(got: InputSlices, positions: list[float], lo: float, hi: float, step_p: float,
            reference_positions: Sequence[float] | None) -> tuple[InputSlices, list[float]]:
    """The stack's slices that the output grid takes: those whose positions lie on it (``lo <= p <= hi``; air above the
    head and neck below the grid are dropped), and of slices thinner than the grid, the one nearest each grid slice."""
    keep = [k for k, p in enumerate(positions) if lo <= p <= hi]
    if not keep:
        raise ValueError(f"no slice of the stack lies within the grid's positions {lo:.3f} <= p <= {hi:.3f}")
    if len(keep) < len(positions):
        logger.info("stack: %d of %d slices lie outside %.3f <= p <= %.3f and are left out", len(positions) - len(keep), len(positions), lo, hi)
    inside = len(keep)
    keep = [keep[k] for k in one_per_grid_slice([positions[k] for k in keep], step_p, reference_positions)]
    if len(keep) < inside:
        logger.info("stack: %d of %d slices are thinner than the grid's step; the one nearest each grid slice is used", inside - len(keep), inside)
    first = keep[0]
    affine = np.asarray(got.affine, dtype=np.float64).copy()
    affine[:3, 3] += affine[:3, 2] * (got.offsets_mm[first] / got.step_mm)
    kept = InputSlices(got.slices[keep], [got.sources[k] for k in keep], affine, got.step_mm,
                       [got.offsets_mm[k] - got.offsets_mm[first] for k in keep], got.scale, [got.indices[k] for k in keep] if got.indices else [],
                       thickness_mm=got.thickness_mm)
    return kept, [positions[k] for k in keep]


def check_slab_mm(slab_mm: float | None, stack: bool = True) -> None:
    """Refuse a given slab thickness that is negative, or given for anything but a stack (``--slab_mm``)."""
    if slab_mm is None:
        return
    if not stack:
        raise ValueError("a slab thickness (--slab_mm) applies to a --stack only")
    if slab_mm < 0:
        raise ValueError(f"slab thickness must be >= 0 mm, got {slab_mm:g}")


def slab_thickness_mm(got: InputSlices, spacing_mm: float, slab_mm: float | None = None) -> float:
    """How thick the slabs are that a stack's slices record, for
    :func:`~monai_mrngan.inference.reconstruct.reconstruct_volume`'s ``slab_mm`` (0: thin slices, nothing to agree
    with): ``slab_mm`` when given (0, e.g. for a protocol with a slice gap), else the input's own slice thickness
    (an axial DICOM series' ``SliceThickness``), else the stack's slice step (a thick-slice scan's slices cover their
    step; a NIfTI stores no thickness); 0 unless thicker than the grid's step."""
    check_slab_mm(slab_mm)
    thickness = slab_mm if slab_mm is not None else (got.thickness_mm or got.step_mm or 0.0)
    return float(thickness) if thickness > spacing_mm else 0.0
