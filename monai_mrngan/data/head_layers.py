"""Does a scan still show the layers around the brain? A check for skull-stripped (brain-extracted) inputs.

Every stage learned whole heads: the vertex that positions are counted from is the top of the scalp,
and the prior and the cell draw scalp and skull. A skull-stripped scan breaks both without a sign: its
"vertex" is the top of the brain, 10-30 mm below the real one (22-30 mm on 4 of 6 held-out IXI
subjects stripped by threshold, erosion and the largest component), and lone stripped slices were placed
up to 139 mm off. The input check did not flag them (atlas match 0.93-0.98) or blamed the plane.

What does: in a T1 head slice, the outer few millimetres (scalp fat, bright) enclose a darker band
(skull, CSF) before the brain. :func:`outer_layer_score` is the darkest band 4-16 mm in from the
head's edge over the brightest band 0-6 mm in: about 0.2-0.8 on whole heads, and 1 (no darker band:
"flat") where intensity only rises inwards, as in a brain without its coverings. One slice is too
noisy to judge by (on IXI 0.5 % of whole-head slices between p = 0.15 and 0.85 are flat); a volume's
share of flat slices among its larger head sections (:func:`stripped_score`) is not: at most 0.42 over
the 150 shared IXI scans (the 15 test scans: 0.20, and 0.29 under the simulated scanners of
``evaluate --shift``) and 0.44 on the demo's 25 phantoms read at 3 mm, at least 0.93 on the 15 test scans stripped
(:data:`STRIPPED_SCORE` lies between). The layers need a grid fine enough to show them:
coarser than :data:`MAX_SPACING_MM` (the demo's 4 mm grid, the tests' tiny data), nothing is judged.

No library offers this (brain-extraction tools make masks; none says whether a scan was already
extracted), hence our own few lines on scipy's distance transform.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from .positions import HEAD_THRESHOLD

__all__ = ["outer_layer_score", "stripped_score", "looks_stripped", "stripped_reason", "FLAT", "STRIPPED_SCORE", "MAX_SPACING_MM"]

FLAT = 0.99
""":func:`outer_layer_score` at or above which a slice shows no darker band inside its outer layer."""
STRIPPED_SCORE = 0.8
"""A volume's share of flat slices (:func:`stripped_score`) at or above which it counts as skull-stripped: nearer the
stripped side (0.93 and up) than the whole-head side (0.44 and down), since refusing a whole head costs more than
missing a stripped one (which is then treated as before)."""
MAX_SPACING_MM = 3.0
"""Coarsest in-plane pixel on which the 2-6 mm layers are judged."""


def outer_layer_score(image: np.ndarray, spacing_mm: float) -> float:
    """The darkest band 4-16 mm inside the head's edge over the brightest band 0-6 mm inside it, for one
    (H, W) slice in [0, 1] with ``spacing_mm`` pixels; NaN when the head is too small to hold the bands or the grid
    is coarser than :data:`MAX_SPACING_MM`."""
    if float(spacing_mm) > MAX_SPACING_MM:
        return float("nan")
    head = ndimage.binary_fill_holes(np.asarray(image) > HEAD_THRESHOLD)
    labels, n = ndimage.label(head)
    if n == 0:
        return float("nan")
    head = labels == 1 + int(np.argmax(ndimage.sum(head, labels, range(1, n + 1))))
    depth = ndimage.distance_transform_edt(head) * float(spacing_mm)
    width = max(2.0, float(spacing_mm))
    starts = np.arange(0.0, 16.0, width)
    bands = []
    for a in starts:
        ring = (depth > a) & (depth <= a + width)
        if not ring.any():
            return float("nan")
        bands.append(float(image[ring].mean()))
    outer = int((starts < 6.0).sum())  # the bands starting within 6 mm of the edge; the deeper ones overlap the last
    return float(min(bands[outer - 1 :]) / max(max(bands[:outer]), 1e-6))


def stripped_score(slices: np.ndarray, spacing_mm: float, min_slices: int = 5) -> float | None:
    """The share of flat slices (:data:`FLAT`) among a volume's (Z, H, W) slices whose head section is at least half
    its largest; None when fewer than ``min_slices`` of them have a score (none on a grid coarser than
    :data:`MAX_SPACING_MM`)."""
    slices = np.asarray(slices)
    if slices.ndim != 3:
        return None
    area = (slices > HEAD_THRESHOLD).sum(axis=(1, 2))
    if not area.any():
        return None
    scores = np.array([outer_layer_score(slices[k], spacing_mm) for k in np.nonzero(area >= 0.5 * area.max())[0]])
    scores = scores[np.isfinite(scores)]
    return float(np.mean(scores >= FLAT)) if len(scores) >= min_slices else None


def looks_stripped(score: float | None) -> bool:
    """The verdict on a :func:`stripped_score`: skull-stripped at :data:`STRIPPED_SCORE` or above; None (not judged) is not."""
    return score is not None and score >= STRIPPED_SCORE


def stripped_reason(score: float) -> str:
    """Why a scan with :func:`stripped_score` ``score`` is refused or skipped: one line, for every caller."""
    return (f"looks skull-stripped: {score:.0%} of its head sections show no scalp or skull around the brain (whole heads: under "
            f"{STRIPPED_SCORE:.0%}); positions counted from the top of the brain are 10-30 mm off, and every stage learned whole heads")
