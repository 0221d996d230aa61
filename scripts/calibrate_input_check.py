#!/usr/bin/env python
"""Measure the input check's scores on real held-out slices and on inputs it must refuse, as a table.

    python scripts/calibrate_input_check.py --bank WORKDIR/brain_generalization/models/atlas_bank.pt \
        --dataset_dir /data/ixi_2mm_128 [--subjects 15] [--weighted 5] [--json OUT]

For every test subject, its axial slices at p = 0.15, 0.25, ..., 0.85, and for the first three
subjects their coronal and sagittal planes at three depths plus noise, a grey gradient and an
empty image, prints ``axial_match`` and ``plane_margin``
(:class:`monai_mrngan.atlas.input_check.InputChecker`): the lowest real scores beside the highest
scores of what must be refused, i.e. how much room the thresholds ``MIN_MATCH`` / ``MIN_MARGIN`` have.
Then ``t1_contrast`` and ``white_over_grey`` (:func:`monai_mrngan.atlas.input_check.fitted_contrast`, the prior fitted as
``reconstruct`` fits it, at each slice's true position) of the same real slices beside the first ``--weighted`` subjects' slices given a T2-,
FLAIR- and PD-like tissue ranking (:func:`monai_mrngan.transforms.scanners.reweight`): the room ``MIN_CONTRAST`` and ``MIN_WHITE_OVER_GREY`` have.
A dataset written by ``evaluate --shift`` (its ``shifted_data/NAME``) scores the same slices from a simulated scanner.
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from monai_mrngan.atlas.input_check import (MIN_CONTRAST, MIN_MARGIN, MIN_MATCH, MIN_WHITE_OVER_GREY, ContrastCheck, InputChecker,
                                             fitted_contrast)
from monai_mrngan.atlas.prior import load_prior
from monai_mrngan.data.datalist import load_split
from monai_mrngan.data.io import load_volume
from monai_mrngan.transforms.scanners import WEIGHTINGS, reweight

INFERENCE_CONFIG = "bundles/mrngan/configs/inference.json"  # its prior_fit is how reconstruct fits the prior


def _canvas(plane: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    out = np.zeros(size, np.float32)
    h, w = min(size[0], plane.shape[0]), min(size[1], plane.shape[1])
    out[:h, :w] = plane[:h, :w]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bank", required=True, help="atlas bank (.pt) or mean brain (.nii.gz) of the brain generalization stage")
    ap.add_argument("--dataset_dir", required=True, help="prepared dataset; its test split is scored")
    ap.add_argument("--subjects", type=int, default=15)
    ap.add_argument("--weighted", type=int, default=5, help="subjects whose slices are also scored as T2, FLAIR and PD")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    with open(INFERENCE_CONFIG) as f:
        prior = load_prior(args.bank, fit=json.load(f)["prior_fit"])
    checker = InputChecker(prior)
    real, other, weighted = [], [], []
    rng = np.random.default_rng(0)
    for n, entry in enumerate(load_split(args.dataset_dir, "test")[: args.subjects]):
        vol, _ = load_volume(entry["image"])
        pos = np.asarray(entry["positions"])
        spacing = float(entry.get("spacing", [2.0])[0])

        def contrast(image: np.ndarray, k: int) -> dict:  # both scores and reconstruct's verdict on them
            scores = fitted_contrast(prior, image, pos[k], spacing)
            return {**scores.as_dict(), "refused": bool(scores.reason)}

        for p in np.arange(0.15, 0.851, 0.1):
            k = int(np.argmin(np.abs(pos - p)))
            res = checker.check(vol[:, :, k])
            real.append({"subject": entry.get("subject"), "p": round(float(p), 2), **res.as_dict(), **contrast(vol[:, :, k], k)})
            if n < args.weighted:
                for name in WEIGHTINGS:
                    weighted.append({"weighting": name, "subject": entry.get("subject"), "p": round(float(p), 2),
                                     **contrast(reweight(vol[:, :, k], name), k)})
        if n < 3:
            for j in (0.35, 0.5, 0.65):
                c, s = int(j * vol.shape[1]), int(j * vol.shape[0])
                for name, plane in ((f"coronal {j:.2f}", vol[:, c, :]), (f"sagittal {j:.2f}", vol[s, :, :])):
                    other.append({"input": name, **checker.check(_canvas(plane, vol.shape[:2])).as_dict()})
    for name, image in (("noise", rng.random((128, 128))), ("gradient", np.tile(np.linspace(0, 1, 128), (128, 1))),
                        ("empty", np.zeros((128, 128)))):
        other.append({"input": name, **checker.check(image).as_dict()})
    match = [r["axial_match"] for r in real]
    margin = [r["plane_margin"] for r in real]
    print(f"real axial slices: {len(real)}, accepted {sum(r['passed'] for r in real)}")
    print(f"  axial_match  min {min(match):.3f}  1st pct {np.percentile(match, 1):.3f}  median {np.median(match):.3f}  (threshold {MIN_MATCH})")
    print(f"  plane_margin min {min(margin):+.3f}  1st pct {np.percentile(margin, 1):+.3f}  median {np.median(margin):+.3f}  (threshold {MIN_MARGIN:+})")
    print("must be refused:")
    for r in other:
        print(f"  {r['input']:<16} axial_match {r['axial_match']:.3f}  plane_margin {r['plane_margin']:+.3f}  {'REFUSED' if not r['passed'] else 'ACCEPTED'}")
    judged = [r for r in real if r["t1_contrast"] is not None]
    print(f"contrast (thresholds t1_contrast {MIN_CONTRAST}, white_over_grey {MIN_WHITE_OVER_GREY}): real T1 slices {len(judged)} judged, "
          f"refused {sum(r['refused'] for r in judged)}")
    for key in ("t1_contrast", "white_over_grey"):
        v = [r[key] for r in judged if r[key] is not None]
        if v:
            print(f"  {key:<16} min {min(v):+.3f}  1st pct {np.percentile(v, 1):+.3f}  median {np.median(v):+.3f}")
    for name in WEIGHTINGS:
        got = [r for r in weighted if r["weighting"] == name and r["t1_contrast"] is not None]
        if got:
            t, w = [r["t1_contrast"] for r in got], [r["white_over_grey"] for r in got if r["white_over_grey"] is not None]
            wog = f"white_over_grey median {np.median(w):+.3f} max {max(w):+.3f}" if w else "white_over_grey not judged"
            print(f"  as {name:<6} {len(got)} judged: t1_contrast median {np.median(t):+.3f} max {max(t):+.3f}, refused by it "
                  f"{sum(bool(ContrastCheck(v, None).reason) for v in t)}; {wog}; refused {sum(r['refused'] for r in got)} "
                  f"({100 * np.mean([r['refused'] for r in got]):.0f} %)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"real": real, "other": other, "weighted": weighted}, f, indent=2)


if __name__ == "__main__":
    main()
