#!/usr/bin/env python
"""Quality and speed of the fitted atlas prior on held-out subjects (before/after comparisons of the fit).

    python scripts/bench/prior_quality.py --bank BANK.pt --dataset_dir DIR [--limit 15] [--offset 0.05] [--json OUT]

Fits the prior as ``bundles/mrngan/configs/inference.json::prior_fit`` says to the true slice at
p = 0.3 / 0.5 / 0.7 of each of the first ``--limit`` test subjects and scores every other slice at
its true ``p`` (:func:`monai_mrngan.evaluation.prior.evaluate_prior`: SSIM, head-only SSIM, PSNR
overall and per position bin); then the refinement (``BrainPrior.locate``) started ``+- --offset``
from each input's true position, reporting its error in mm (200 mm head height). Runs with whatever
``monai_mrngan`` is on the path, so the same command scores an older checkout (PYTHONPATH).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from monai_mrngan.atlas.prior import load_prior
from monai_mrngan.data.datalist import load_split
from monai_mrngan.data.io import load_volume
from monai_mrngan.data.positions import HEAD_HEIGHT_MM, index_for_position
from monai_mrngan.evaluation.prior import REFERENCE_POSITIONS, evaluate_prior

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
    args = ap.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    entries = load_split(args.dataset_dir, args.split, args.limit)
    prior = load_prior(args.bank, bundle_prior_fit())
    t0 = time.perf_counter()
    res = evaluate_prior(prior, entries, REFERENCE_POSITIONS)
    res["eval_seconds"] = time.perf_counter() - t0
    res["locate"] = locate_errors(prior, entries, args.offset)
    res["setup"] = {"subjects": len(entries), "fit": bundle_prior_fit(), "bank": str(args.bank), "torch_threads": torch.get_num_threads()}
    f = res["fitted"]
    print(f"fitted: SSIM {f['overall']['ssim']:.4f} head SSIM {f['overall']['ssim_head']:.4f} PSNR {f['overall']['psnr']:.3f} "
          f"fit {res['fit_seconds']:.3f} s; per bin (head SSIM / PSNR): "
          + " ".join(f"{b}: {v['ssim_head']:.3f}/{v['psnr']:.2f}" for b, v in f["bins"].items()))
    loc = res["locate"]
    print(f"locate from +-{loc['start_error_mm']:.0f} mm: mean {loc['mean_mm']:.2f} mm, max {loc['max_mm']:.1f} mm, "
          f"within 4 mm {loc['within_4mm']:.2f}, {loc['seconds_per_locate']:.3f} s per call")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
