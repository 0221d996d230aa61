"""Which intensity standardisation survives a change of scanner? (issue #17)

``prepare`` divides a scan by the 99.5th percentile of its positive voxels. A scanner that
stores its full range (bright fat, vessels) rather than IXI's clipped uint8 moves that
percentile, and with it every tissue's scaled value. This script compares reference values for
the division on held-out prepared volumes put through the scanner simulations of
:mod:`monai_mrngan.evaluation.shift` plus a ``bright_tail`` one (3 % of head voxels, the
brightest outer ones such as scalp fat, 1.8x brighter, as a full-range scanner stores them):

- ``p99.5``: the 99.5th percentile of positive voxels (today's ``prepare``);
- ``p95``, ``p90``, ``p75``: those percentiles of head voxels;
- ``wm_mode``: the white-matter peak, the mode of the smoothed histogram of head voxels above
  their median (the brightest large tissue class of a T1 scan);
- ``nyul``: histogram standardisation (Nyul & Udupa): the head's deciles (and 1st / 99th
  percentiles) mapped piecewise linearly onto their means over the training split.

Each standardiser maps a volume to ``v / ref(v) * c`` with ``c`` the mean ``ref`` of the
unshifted volumes (so originals keep their scale); the score is the mean absolute difference,
over head voxels, between the standardised shifted volume and the standardised original (lower
is better), per shift, in [0, 1] intensity units.

    python -m scripts.bench.standardise --dataset_dir D [--limit 15] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Callable

import numpy as np
from scipy import ndimage

from monai_mrngan.data.datalist import load_split
from monai_mrngan.data.io import load_volume
from monai_mrngan.data.positions import HEAD_THRESHOLD
from monai_mrngan.transforms.scanners import SHIFTS, acquire


def _p995(v: np.ndarray, head: np.ndarray) -> float:
    return float(np.percentile(v[v > 0], 99.5))


def _p95(v: np.ndarray, head: np.ndarray) -> float:
    return float(np.percentile(v[head], 95))


def _p75(v: np.ndarray, head: np.ndarray) -> float:
    return float(np.percentile(v[head], 75))


def _p90(v: np.ndarray, head: np.ndarray) -> float:
    return float(np.percentile(v[head], 90))


def _wm_mode(v: np.ndarray, head: np.ndarray) -> float:
    x = v[head]
    med = float(np.median(x))
    x = x[x > med]  # bins fixed by the median, which a thin bright tail does not move
    hist, edges = np.histogram(x, bins=200, range=(med, 2.5 * med))
    hist = ndimage.gaussian_filter1d(hist.astype(float), 3)
    i = int(np.argmax(hist))
    return float((edges[i] + edges[i + 1]) / 2)


REFS: dict[str, Callable[[np.ndarray, np.ndarray], float]] = {"p99.5": _p995, "p95": _p95, "p90": _p90, "p75": _p75, "wm_mode": _wm_mode}

NYUL_PERCENTILES = (1, 10, 20, 30, 40, 50, 60, 70, 80, 90, 99)
"""Head-voxel percentiles used as landmarks by the histogram standardisation (Nyul & Udupa's deciles)."""


def nyul_landmarks(v: np.ndarray, head: np.ndarray) -> np.ndarray:
    return np.percentile(v[head], NYUL_PERCENTILES)


def nyul(v: np.ndarray, head: np.ndarray, standard: np.ndarray) -> np.ndarray:
    """Histogram standardisation: the scan's head landmarks mapped piecewise linearly onto ``standard`` (the
    training split's mean landmarks); 0 stays 0, beyond the outer landmarks the end segments' slopes go on."""
    own = np.concatenate([[0.0], nyul_landmarks(v, head)])
    std = np.concatenate([[0.0], standard])
    own = np.maximum.accumulate(own + np.arange(own.size) * 1e-9)  # strictly increasing for the interpolation
    out = np.interp(v, own, std)
    top = v > own[-1]
    out[top] = std[-1] + (v[top] - own[-1]) * (std[-1] - std[-2]) / max(own[-1] - own[-2], 1e-9)
    return out


def _bright_tail(v: np.ndarray, head: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    outer = head & ~ndimage.binary_erosion(head, iterations=3)
    vals = np.where(outer, v, -1.0)
    cut = np.quantile(vals[outer], 1 - 0.03 * head.sum() / max(outer.sum(), 1))
    out = v.copy()
    out[outer & (v >= cut)] *= 1.8
    return out


def shifted(v: np.ndarray, name: str, seed: int) -> np.ndarray:
    """``v`` as scanner ``name`` would store it (before any scaling)."""
    if name == "bright_tail":
        return _bright_tail(v, v > HEAD_THRESHOLD, np.random.default_rng(seed))
    return acquire(v, name, seed)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset_dir", required=True)
    ap.add_argument("--limit", type=int, default=15)
    ap.add_argument("--train_limit", type=int, default=40, help="training volumes the histogram standardisation learns from")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    vols = [load_volume(e["image"])[0].astype(np.float64) for e in load_split(args.dataset_dir, "test", args.limit)]
    heads = [v > HEAD_THRESHOLD for v in vols]
    c = {r: float(np.mean([f(v, h) for v, h in zip(vols, heads)])) for r, f in REFS.items()}
    train = [load_volume(e["image"])[0].astype(np.float64) for e in load_split(args.dataset_dir, "training", args.train_limit)]
    standard = np.mean([nyul_landmarks(v, v > HEAD_THRESHOLD) for v in train], axis=0)  # learned on the training split
    standardise: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
        **{r: (lambda v, h, f=f, k=c[r]: v / f(v, h) * k) for r, f in REFS.items()},
        "nyul": lambda v, h: nyul(v, h, standard),
    }
    methods = list(standardise)
    unshifted = [{r: np.clip(fn(v, h)[h], 0, 1.5) for r, fn in standardise.items()} for v, h in zip(vols, heads)]  # once per volume
    names = [*SHIFTS, "bright_tail"]
    table: dict[str, dict[str, float]] = {n: {} for n in names}
    for n in names:
        errs: dict[str, list[float]] = {r: [] for r in methods}
        for i, (v, h) in enumerate(zip(vols, heads)):
            s = shifted(v, n, seed=i)
            for r, fn in standardise.items():
                errs[r].append(float(np.mean(np.abs(unshifted[i][r] - np.clip(fn(s, h)[h], 0, 1.5)))))
        table[n] = {r: round(float(np.mean(e)), 4) for r, e in errs.items()}
        print(f"{n:20s} " + "  ".join(f"{r} {table[n][r]:.4f}" for r in methods), flush=True)
    table["mean"] = {r: round(float(np.mean([table[n][r] for n in names])), 4) for r in methods}
    print(f"{'mean':20s} " + "  ".join(f"{r} {table['mean'][r]:.4f}" for r in methods))
    if args.json:
        Path(args.json).write_text(json.dumps({"subjects": len(vols), "mae_head": table}, indent=1))


if __name__ == "__main__":
    sys.exit(main())
