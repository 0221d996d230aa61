"""Simulated scanners: a prepared [0, 1] volume as another scanner would have stored it.

:data:`SHIFTS` is the fixed, seeded set the scanner-shift evaluation uses
(:mod:`monai_mrngan.evaluation.shift`): contrast curves, a smooth bias field, Rician noise, the smoothness of a 1 mm
acquisition brought to 2 mm, a coarser quantisation, and one combination. :func:`random_scanner` draws a scanner at
random from the same kinds of step (the uncertainty calibration's augmented validation copies,
:func:`monai_mrngan.evaluation.uncertainty.calibrate`). A simulated volume is prepared again the way ``prepare``
scales a scan (:func:`~monai_mrngan.data.grid.scale_intensity`).

Written here rather than with MONAI's random intensity transforms: the shift set must be fixed settings applied
to a whole volume in numpy (the evaluation's simulations are seeded per subject and not drawn), and the Rician noise
and the 3 x 3 x 3 cubic bias field have no MONAI equivalent with these parameters.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
from scipy import ndimage

from ..data.grid import scale_intensity
from ..data.positions import HEAD_THRESHOLD

__all__ = ["SHIFTS", "Step", "check_shifts", "acquire", "apply_steps", "simulate", "random_scanner", "simulate_random", "describe",
           "describe_random", "WEIGHTINGS", "reweight"]

Step = tuple[Callable[..., np.ndarray], float]
"""One acquisition step: a function ``(volume, argument, rng) -> volume`` and its argument."""


def _bias(shape: tuple[int, ...], amplitude: float, rng: np.random.Generator) -> np.ndarray:
    """A smooth multiplicative field ``1 + amplitude * f`` with ``f`` in [-1, 1] varying over about half the volume."""
    coarse = rng.uniform(-1.0, 1.0, size=(3, 3, 3))
    field = ndimage.zoom(coarse, [s / 3 for s in shape], order=3, mode="nearest")[tuple(slice(0, s) for s in shape)]
    return 1.0 + amplitude * field / max(float(np.abs(field).max()), 1e-6)


def _gamma(v: np.ndarray, g: float, rng: np.random.Generator) -> np.ndarray:
    return np.power(np.clip(v, 0, None), g)


def _noise(v: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    # magnitude images: Rician noise (two Gaussian channels), as a coil's noise looks in the background too
    return np.sqrt((v + rng.normal(0, sigma, v.shape)) ** 2 + rng.normal(0, sigma, v.shape) ** 2)


def _smooth(v: np.ndarray, sigma_vox: float, rng: np.random.Generator) -> np.ndarray:
    return ndimage.gaussian_filter(v, sigma_vox)


def _quantise(v: np.ndarray, levels: int, rng: np.random.Generator) -> np.ndarray:
    top = float(np.percentile(v[v > 0], 99.5)) if (v > 0).any() else 1.0
    return np.round(np.clip(v / top, 0, None) * (levels - 1)) / (levels - 1) * top


def _bias_field(v: np.ndarray, amplitude: float, rng: np.random.Generator) -> np.ndarray:
    return v * _bias(v.shape, amplitude, rng)


SHIFTS: dict[str, list[Step]] = {
    "gamma_0.7": [(_gamma, 0.7)],
    "gamma_1.4": [(_gamma, 1.4)],
    "bias_25pct": [(_bias_field, 0.25)],
    "noise_3pct": [(_noise, 0.03)],
    "smooth_1mm_to_2mm": [(_smooth, 0.6)],
    "quantise_6bit": [(_quantise, 64)],
    "combined": [(_gamma, 1.2), (_bias_field, 0.15), (_smooth, 0.4), (_noise, 0.02)],
}
"""Name -> steps applied in order to a prepared [0, 1] volume (then scaled again like ``prepare``)."""


def check_shifts(names: list[str]) -> None:
    """A one-line error naming every name that is not in :data:`SHIFTS`."""
    unknown = [n for n in names if n not in SHIFTS]
    if unknown:
        raise ValueError(f"unknown scanner shift {', '.join(map(repr, unknown))}; expected one of {sorted(SHIFTS)}")


def acquire(volume: np.ndarray, name: str, seed: int = 0) -> np.ndarray:
    """``volume`` (H, W, D) in [0, 1] as the scanner ``name`` of :data:`SHIFTS` would have stored it (not scaled again)."""
    check_shifts([name])
    return apply_steps(volume, SHIFTS[name], np.random.default_rng(seed))


def apply_steps(volume: np.ndarray, steps: Sequence[Step], rng: np.random.Generator) -> np.ndarray:
    """``volume`` (H, W, D) in [0, 1] through ``steps`` in order (not scaled again); air stays air where it was."""
    v = np.asarray(volume, dtype=np.float64)
    head = v > HEAD_THRESHOLD
    for step, arg in steps:
        v = step(v, arg, rng)
    return np.where(ndimage.binary_dilation(head, iterations=2) | (v > 0), v, 0.0)


def simulate(volume: np.ndarray, name: str, seed: int = 0) -> np.ndarray:
    """``volume`` (H, W, D) in [0, 1] as the scanner ``name`` of :data:`SHIFTS` would have given it, prepared again."""
    return scale_intensity(acquire(volume, name, seed).astype(np.float32))[0]


def random_scanner(rng: np.random.Generator) -> list[Step]:
    """A scanner drawn at random (at least one step): gamma 0.8-1.25 (p 0.5), a bias field of 5-20 % (p 0.5), Gaussian
    smoothing of 0.2-0.8 voxels (p 0.6), Rician noise of 0.5-3 % (p 0.5). Drawn from ranges, never one of the fixed
    settings of :data:`SHIFTS` exactly."""
    steps: list[Step] = []
    while not steps:
        if rng.random() < 0.5:
            steps.append((_gamma, float(rng.uniform(0.8, 1.25))))
        if rng.random() < 0.5:
            steps.append((_bias_field, float(rng.uniform(0.05, 0.2))))
        if rng.random() < 0.6:
            steps.append((_smooth, float(rng.uniform(0.2, 0.8))))
        if rng.random() < 0.5:
            steps.append((_noise, float(rng.uniform(0.005, 0.03))))
    return steps


def describe(steps: Sequence[Step]) -> list[str]:
    """Readable names of ``steps``, e.g. ``["smooth(0.61)", "noise(0.012)"]``."""
    return [f"{f.__name__.lstrip('_')}({a:.3g})" for f, a in steps]


def _drawn(seed: int) -> tuple[list[Step], np.random.Generator]:
    """The scanner :func:`random_scanner` draws from ``seed``, and the generator its steps then draw from."""
    rng = np.random.default_rng(seed)
    return random_scanner(rng), rng


def simulate_random(volume: np.ndarray, seed: int) -> tuple[np.ndarray, list[str]]:
    """``volume`` (H, W, D) in [0, 1] as the scanner :func:`random_scanner` draws from ``seed`` would have given it,
    prepared again (float32), and that scanner's :func:`describe`."""
    steps, rng = _drawn(seed)
    return scale_intensity(apply_steps(volume, steps, rng).astype(np.float32))[0], describe(steps)


def describe_random(seed: int) -> list[str]:
    """:func:`describe` of the scanner :func:`simulate_random` uses for ``seed``, without simulating anything."""
    return describe(_drawn(seed)[0])


WEIGHTINGS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "t2": ((0.0, 0.06, 0.2, 0.45, 0.7, 0.9, 1.0), (0.0, 0.05, 1.0, 0.55, 0.35, 0.6, 0.6)),
    "flair": ((0.0, 0.06, 0.2, 0.45, 0.7, 0.9, 1.0), (0.0, 0.05, 0.12, 0.65, 0.45, 0.6, 0.6)),
    "pd": ((0.0, 0.06, 0.2, 0.45, 0.7, 0.9, 1.0), (0.0, 0.05, 0.75, 0.8, 0.65, 0.8, 0.8)),
}
"""Piecewise-linear maps (knots, values) of a prepared T1 scan's intensities (fluid about 0.2, grey matter 0.45, white
matter 0.65, scalp fat 0.9) to the ranking another weighting gives the same tissues: T2 (fluid brightest, white matter
darkest), FLAIR (fluid dark, white matter below grey), PD (fluid and grey matter alike, white matter below). Not a
physical simulation (no relaxation times, partial volumes mapped as they fall): a test of whether a check tells the
rankings apart."""


def reweight(image: np.ndarray, name: str) -> np.ndarray:
    """A prepared T1 ``image`` in [0, 1] with the tissue ranking of weighting ``name`` (:data:`WEIGHTINGS`), scaled again
    as ``prepare`` scales a scan."""
    if name not in WEIGHTINGS:
        raise ValueError(f"unknown weighting {name!r}; choose from {sorted(WEIGHTINGS)}")
    knots, values = WEIGHTINGS[name]
    return scale_intensity(np.interp(np.clip(image, 0.0, 1.0), knots, values).astype(np.float32))[0]
