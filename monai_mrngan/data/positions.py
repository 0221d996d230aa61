"""The one definition of an axial slice's position ``p``: anatomy, not field of view.

``p`` is the depth of a slice below the top of the head (the vertex), divided by a standard head
height ``HEAD_HEIGHT_MM`` (200 mm): ``p = 0`` at the vertex, ``p = 0.5`` 100 mm below it (about the
lateral ventricles / basal ganglia), ``p = 1`` 200 mm below it (skull base / upper neck). It does not
depend on where a scanner's field of view happens to cut the neck, so the same ``p`` means the same
anatomy in every subject. ``prepare`` finds the vertex (the highest axial slice whose head cross
section reaches ``VERTEX_MIN_AREA_MM2``), keeps the slices with ``0 <= p <= 1`` and stores each
volume's slice-index -> ``p`` mapping in the datalist (``positions``). Prepared volumes are RAS, so
array index increases towards the vertex and ``p`` decreases with the index.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

HEAD_HEIGHT_MM = 200.0
"""Depth below the vertex that maps to ``p = 1``."""

HEAD_THRESHOLD = 0.1
"""Intensity (prepared [0, 1] scale) above which a voxel counts as head: for trimming, metrics and the prior."""

VERTEX_MIN_AREA_MM2 = 1000.0
"""Head cross-section (mm^2) that marks the first slice of the head below the air above it."""

NUM_POSITION_BINS = 5
"""The paper's five-class setting: ``p`` binned into five equal 20 % bins."""


def slice_positions(num_slices: int, vertex_index: float, spacing_mm: float) -> np.ndarray:
    """``p`` of each array index of a RAS volume whose vertex lies at ``vertex_index``."""
    idx = np.arange(num_slices, dtype=np.float64)
    return (vertex_index - idx) * float(spacing_mm) / HEAD_HEIGHT_MM


def position_bins(p: np.ndarray | Sequence[float] | float, num_bins: int = NUM_POSITION_BINS) -> np.ndarray:
    """Bin index (0..num_bins-1) of each position; positions outside [0, 1] go to the end bins."""
    p = np.asarray(p, dtype=np.float64)
    return np.clip(np.floor(p * num_bins), 0, num_bins - 1).astype(np.int64)


def index_for_position(positions: Sequence[float], p: float) -> int:
    """The slice index whose position is nearest to ``p``."""
    return int(np.argmin(np.abs(np.asarray(positions, dtype=np.float64) - float(p))))


def position_step(positions: Sequence[float]) -> float:
    """Change of ``p`` from one slice index to the next (negative for RAS volumes)."""
    positions = np.asarray(positions, dtype=np.float64)
    if positions.size < 2:
        raise ValueError("need at least two slices to know the slice step")
    return float((positions[-1] - positions[0]) / (positions.size - 1))
