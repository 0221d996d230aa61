#!/usr/bin/env python
"""Quality and speed of the fitted atlas prior on held-out subjects (before/after comparisons of the fit).

    python scripts/bench/prior_quality.py --bank BANK.pt --dataset_dir DIR [--limit 15] [--offset 0.05] [--json OUT]
        [--fit '{"intensity": "monotone"}'] [--shift gamma_1.4] [--no_locate]

Fits the prior as ``bundles/mrngan/configs/inference.json::prior_fit`` says to the true slice at
p = 0.3 / 0.5 / 0.7 of each of the first ``--limit`` test subjects and scores every other slice at
its true ``p`` (:func:`monai_mrngan.evaluation.prior.evaluate_prior`: SSIM, head-only SSIM, PSNR
overall and per position bin); then the refinement (``BrainPrior.locate``) started ``+- --offset``
from each input's true position, reporting its error in mm (200 mm head height). Runs with whatever
``monai_mrngan`` is on the path, so the same command scores an older checkout (PYTHONPATH).
``--fit`` overrides fields of that ``prior_fit`` (e.g. ``{"intensity": "monotone"}``); ``--shift NAME``
first passes the test volumes through one of ``evaluate --shift``'s scanner simulations
(:data:`monai_mrngan.evaluation.shift.SHIFTS`, into a temporary folder), so the prior is fitted to and
scored against the shifted volumes.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from monai_mrngan.atlas.prior import load_prior
from monai_mrngan.data.datalist import load_split
from monai_mrngan.data.io import load_volume
from monai_mrngan.data.positions import HEAD_HEIGHT_MM, index_for_position
from monai_mrngan.evaluation.prior import REFERENCE_POSITIONS, evaluate_prior
from monai_mrngan.evaluation.shift import SHIFTS, shifted_dataset

REPO = Path(__file__).resolve().parents[2]


def bundle_prior_fit() -> dict:
    """The mrngan bundle's ``prior_fit`` (plain JSON value)."""
    return dict(json.loads((REPO / "bundles" / "mrngan" / "configs" / "inference.json").read_text())["prior_fit"])


def locate_errors(prior, entries, offset: float, window: float = 0.12) -> dict:
    """Mean / max error (mm) of ``prior.locate`` started at the true position +- ``offset``, and seconds per call."""
    errs, secs = [], []
    for e in entries:
        vol, _ = load_volume(e["image"])
        pos = np.asarray(e["positions"], dtype=np.float64)
        for p_ref in REFERENCE_POSITIONS:
            i = index_for_position(pos, p_ref)
            ref = torch.from_numpy(vol[..., i])[None, None].clamp(0, 1)
            for sign in (1, -1):
                t0 = time.perf_counter()
                found = prior.locate(ref, float(pos[i]) + sign * offset, window=window)
                secs.append(time.perf_counter() - t0)
                errs.append(abs(found - float(pos[i])) * HEAD_HEIGHT_MM)
    e = np.asarray(errs)
    return {"mean_mm": float(e.mean()), "max_mm": float(e.max()), "within_4mm": float((e <= 4.0).mean()), "n": int(e.size),
            "start_error_mm": offset * HEAD_HEIGHT_MM, "seconds_per_locate": float(np.mean(secs))}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bank", required=True, help="atlas bank (save_bank .pt)")
    ap.add_argument("--dataset_dir", required=True, help="prepared dataset (datalist.json)")
    ap.add_argument("--split", default="test")
    ap.add_argument("--limit", type=int, default=15, help="subjects")
    ap.add_argument("--offset", type=float, default=0.05, help="start error of the refinement, in p")
    ap.add_argument("--json", default=None)
    ap.add_argument("--fit", default="{}", help="JSON object of FitConfig fields overriding the bundle's prior_fit")
    ap.add_argument("--shift", default=None, choices=sorted(SHIFTS), help="score on the test volumes under this scanner simulation")
    ap.add_argument("--no_locate", action="store_true", help="skip the position refinement check")
    args = ap.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    fit = {**bundle_prior_fit(), **json.loads(args.fit)}
    with tempfile.TemporaryDirectory() as tmp:
        data = shifted_dataset(args.dataset_dir, tmp, args.shift, args.split, args.limit) if args.shift else args.dataset_dir
        entries = load_split(data, args.split, args.limit)
        prior = load_prior(args.bank, fit)
        t0 = time.perf_counter()
        res = evaluate_prior(prior, entries, REFERENCE_POSITIONS)
        res["eval_seconds"] = time.perf_counter() - t0
        if not args.no_locate:
            res["locate"] = locate_errors(prior, entries, args.offset)
    res["setup"] = {"subjects": len(entries), "fit": fit, "shift": args.shift, "bank": str(args.bank), "torch_threads": torch.get_num_threads()}
    f = res["fitted"]
    print(f"fitted: SSIM {f['overall']['ssim']:.4f} head SSIM {f['overall']['ssim_head']:.4f} PSNR {f['overall']['psnr']:.3f} "
          f"fit {res['fit_seconds']:.3f} s; per bin (head SSIM / PSNR): "
          + " ".join(f"{b}: {v['ssim_head']:.3f}/{v['psnr']:.2f}" for b, v in f["bins"].items()))
    loc = res.get("locate")
    if loc:
        print(f"locate from +-{loc['start_error_mm']:.0f} mm: mean {loc['mean_mm']:.2f} mm, max {loc['max_mm']:.1f} mm, "
              f"within 4 mm {loc['within_4mm']:.2f}, {loc['seconds_per_locate']:.3f} s per call")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
