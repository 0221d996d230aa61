"""How much of the fitted prior's error, far from the input slice, any intensity correction could remove.

For each test volume and input position (the evaluation's 0.3 / 0.5 / 0.7, true positions), the prior is
fitted to the input slice as the evaluation fits it; then every other slice is scored as it is and after
the best gain and offset *for that slice*, fitted against the truth over the head (an oracle: no method
knows the truth). The oracle's gain bounds what a learned per-slice intensity correction of the prior
(what a cell seeing only the prior far from the input could learn) can add, by distance band.

A second oracle bounds what carrying the input slice's own evidence outwards could add: the prior's miss at the
input (``input - fitted prior`` there, Gaussian-smoothed in-plane by ``RESIDUAL_SIGMA_PX``) added to every other
slice with the gain for its distance that fits the truth best, pooled over the volumes (fitted on the scored data
itself, so an upper bound for a linear carry of it).

    python -m scripts.bench.prior_headroom --workdir W [--dataset_dir D] [--limit 8] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from .common import log

BANDS = ((1, 3), (3, 10), (10, 20), (20, 40), (40, 200))
RESIDUAL_SIGMA_PX = 2.0  # in-plane smoothing of the input's miss (0, 2, 4, 8 px tried on IXI: 2 carried the most beyond d = 2)


def headroom(workdir: str, dataset_dir: str | None, limit: int | None = 8, inputs: tuple[float, ...] = (0.3, 0.5, 0.7)) -> list[dict]:
    from monai_mrngan.apps.cli import _components, _dataset_of
    from monai_mrngan.data.datalist import load_split
    from monai_mrngan.data.io import load_volume
    from monai_mrngan.data.positions import HEAD_THRESHOLD, index_for_position

    prior = _components(workdir).prior
    if prior is None:
        raise SystemExit(f"{workdir}: no atlas bank (brain_generalization/models/atlas_bank.pt)")
    from scipy.ndimage import gaussian_filter

    rows = []  # (distance, mse as fitted, mse after the oracle gain / offset, gain)
    carry: dict[int, np.ndarray] = {}  # distance -> sums (miss . error, miss . miss, error . error) for the second oracle
    for entry in load_split(_dataset_of(workdir, dataset_dir), "test", limit):
        vol, _ = load_volume(entry["image"])
        pos = np.asarray(entry["positions"], dtype=np.float64)
        truth = torch.from_numpy(np.ascontiguousarray(np.moveaxis(vol, 2, 0))).double()
        for p_in in inputs:
            i0 = index_for_position(pos, p_in)
            fitted = prior.slice_at(torch.as_tensor(pos), truth[i0 : i0 + 1, None].float(), float(pos[i0])).reshape(truth.shape).double()
            miss = torch.from_numpy(gaussian_filter((truth[i0] - fitted[i0]).numpy(), RESIDUAL_SIGMA_PX)).reshape(-1)
            miss_sq = float(miss @ miss)
            for i in range(len(pos)):
                if i == i0:
                    continue
                x, y = fitted[i].reshape(-1), truth[i].reshape(-1)
                e = y - x
                carry.setdefault(abs(i - i0), np.zeros(3))[:] += (float(miss @ e), miss_sq, float(e @ e))
                head = (x > HEAD_THRESHOLD) | (y > HEAD_THRESHOLD)
                if int(head.sum()) < 200:
                    continue
                xm, ym = x[head] - x[head].mean(), y[head] - y[head].mean()
                gain = float((xm * ym).sum() / (xm * xm).sum().clamp_min(1e-12))
                corrected = x.clone()
                corrected[head] = (xm * gain + y[head].mean()).clamp(0, 1)
                rows.append((abs(i - i0), float(((x - y) ** 2).mean()), float(((corrected - y) ** 2).mean()), gain))
        log(f"{entry.get('subject', entry['image'])}: done")
    r = np.asarray(rows)
    out = []
    for lo, hi in BANDS:
        sel = (r[:, 0] >= lo) & (r[:, 0] < hi)
        if sel.any():
            psnr, oracle = (-10 * np.log10(r[sel, 1])).mean(), (-10 * np.log10(r[sel, 2])).mean()
            out.append({"d": f"{lo}-{hi - 1}", "n": int(sel.sum()), "psnr_fitted": float(psnr), "psnr_oracle_gain_offset": float(oracle),
                        "headroom_db": float(oracle - psnr), "gain_mean": float(r[sel, 3].mean()), "gain_sd": float(r[sel, 3].std()),
                        "carried_miss_db": _carried_db(carry, lo, hi)})
    out.append({"d": "all", "carried_miss_db": _carried_db(carry, 1, 10**6)})
    return out


def _carried_db(carry: dict[int, np.ndarray], lo: int, hi: int) -> float:
    """dB the best per-distance gain on the input's miss removes from the pooled squared error of distances [lo, hi)."""
    s = [v for d, v in carry.items() if lo <= d < hi]
    removed = sum(v[0] ** 2 / max(v[1], 1e-12) for v in s)  # least squares: (miss . e)^2 / (miss . miss) per distance
    total = sum(v[2] for v in s)
    return float(-10 * np.log10(1 - removed / total)) if total > 0 else float("nan")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", required=True, help="pipeline work folder with the brain_generalization atlas bank")
    ap.add_argument("--dataset_dir", default=None)
    ap.add_argument("--limit", type=int, default=8, help="first N test volumes")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    res = headroom(args.workdir, args.dataset_dir, args.limit)
    print("| d (slices) | slices | fitted prior PSNR dB | with the oracle gain and offset | headroom dB | oracle gain (mean +- sd) | input's miss carried, dB |")
    print("|---|---:|---:|---:|---:|---|---:|")
    for r in res[:-1]:
        print(f"| {r['d']} | {r['n']} | {r['psnr_fitted']:.2f} | {r['psnr_oracle_gain_offset']:.2f} | {r['headroom_db']:+.2f} | "
              f"{r['gain_mean']:.3f} +- {r['gain_sd']:.3f} | {r['carried_miss_db']:+.3f} |")
    print(f"input's miss carried to every other slice (pooled squared error): {res[-1]['carried_miss_db']:+.3f} dB")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
