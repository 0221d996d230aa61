"""How well could ANY reader of one axial slice's anatomy localize it? A bound per head, from the data alone.

A head's anatomy sits at its own depth below the vertex: a taller head (or thicker skull and scalp) puts every
structure deeper. One slice shows the anatomy but not the head's height, so a reader that knew the anatomy
perfectly would still answer with the depth that anatomy has in the *average* training head. This script
finds, for each head, the map ``p = a * p_mean + b`` under which its axial profiles (head area, mean head
intensity and bright-tissue area per slice, each over its own maximum) best match the mean profile of the
training heads (grid search over ``a`` in [0.8, 1.2], ``b`` in [-0.08, 0.08]), and reports the error such an
ideal reader makes over the slices with ``p`` in [0.1, 0.9]: ``200 mm * |p - p_mean|``. The fit of ``a`` and
``b`` is coarse (they trade off against each other; about 1 mm), so the figure is an estimate, not a proof.

    python -m scripts.bench.localization_bound --dataset_dir D

The trained localizer and the atlas refinement on the same slices: ``python -m scripts.bench.localization``.
"""

from __future__ import annotations

import argparse

import numpy as np

from monai_mrngan.data.datalist import load_split
from monai_mrngan.data.io import load_volume
from monai_mrngan.data.positions import HEAD_HEIGHT_MM, HEAD_THRESHOLD

from .common import log

P = np.linspace(0.0, 1.0, 201)
INSIDE = (P >= 0.1) & (P <= 0.9)
A = np.linspace(0.8, 1.2, 81)
B = np.linspace(-0.08, 0.08, 81)


def profiles(volume: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """(3, 201) head area, mean head intensity and bright-tissue area per slice, on the ``P`` grid."""
    head = volume > HEAD_THRESHOLD  # the head mask of prepare's vertex and of the head-only metrics
    area = head.sum((0, 1)).astype(np.float64)
    bright = (volume > 0.6).sum((0, 1)).astype(np.float64)
    mean = np.where(area > 0, (volume * head).sum((0, 1)) / np.maximum(area, 1), 0.0)
    order = np.argsort(positions)
    rows = (area / max(area.max(), 1), mean, bright / max(bright.max(), 1))
    return np.stack([np.interp(P, positions[order], r[order]) for r in rows])


def best_map(profile: np.ndarray, mean_profile: np.ndarray) -> tuple[float, float]:
    """(a, b) of ``p = a * p_mean + b`` matching ``profile`` to ``mean_profile`` best (least squares)."""
    best = (np.inf, 1.0, 0.0)
    for a in A:
        for b in B:
            pm = (P - b) / a
            ok = INSIDE & (pm >= 0.05) & (pm <= 0.95)
            moved = np.stack([np.interp(pm[ok], P, m) for m in mean_profile])
            err = float(((moved - profile[:, ok]) ** 2).mean())
            if err < best[0]:
                best = (err, float(a), float(b))
    return best[1], best[2]


def bounds(dataset_dir: str) -> dict[str, list[dict]]:
    """Per split, one row per head: its ``a``, ``b`` and the ideal reader's MAE and signed mean error in mm
    (negative: placed too close to the vertex, as in ``scripts.bench.localization``)."""
    found = {}
    for split in ("training", "validation", "test"):
        found[split] = []
        for entry in load_split(dataset_dir, split):
            vol, _ = load_volume(entry["image"])
            found[split].append({"subject": entry.get("subject", entry["image"]),
                                 "profile": profiles(vol, np.asarray(entry["positions"], dtype=np.float64))})
    mean_profile = np.mean([r["profile"] for r in found["training"]], axis=0)
    p = P[INSIDE]
    for split, rows in found.items():
        for r in rows:
            a, b = best_map(r.pop("profile"), mean_profile)
            pm = (p - b) / a
            r.update(a=a, b=b, ideal_mae_mm=float(np.abs(p - pm).mean() * HEAD_HEIGHT_MM),
                     ideal_bias_mm=float((pm - p).mean() * HEAD_HEIGHT_MM))
        log(f"{split}: {len(rows)} heads")
    return found


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset_dir", required=True, help="prepared dataset (datalist.json with training, validation, test)")
    args = ap.parse_args(argv)
    found = bounds(args.dataset_dir)
    print("| split | head | a | b | ideal reader: MAE mm (bias) |")
    print("|---|---|---:|---:|---:|")
    for split, rows in found.items():
        for r in rows:
            print(f"| {split} | {r['subject']} | {r['a']:.3f} | {r['b']:+.3f} | {r['ideal_mae_mm']:.1f} ({r['ideal_bias_mm']:+.1f}) |")
    for split, rows in found.items():
        if rows:
            print(f"{split}: ideal reader {np.mean([r['ideal_mae_mm'] for r in rows]):.1f} mm (mean over {len(rows)} heads)")


if __name__ == "__main__":
    main()
