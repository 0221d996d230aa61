"""How much of the fitted prior's error, far from the input slice, any intensity correction could remove.

For each test volume and input position (the evaluation's 0.3 / 0.5 / 0.7, true positions), the prior is
fitted to the input slice as the evaluation fits it; then every other slice is scored as it is and after
the best gain and offset *for that slice*, fitted against the truth over the head (an oracle: no method
knows the truth). The oracle's gain bounds what a learned per-slice intensity correction of the prior
(what a cell seeing only the prior far from the input could learn) can add, by distance band.

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


def headroom(workdir: str, dataset_dir: str | None, limit: int | None = 8, inputs: tuple[float, ...] = (0.3, 0.5, 0.7)) -> list[dict]:
    from monai_mrngan.apps.cli import _components, _dataset_of
    from monai_mrngan.data.datalist import load_split
    from monai_mrngan.data.io import load_volume
    from monai_mrngan.data.positions import HEAD_THRESHOLD, index_for_position

    prior = _components(workdir).prior
    if prior is None:
        raise SystemExit(f"{workdir}: no atlas bank (brain_generalization/models/atlas_bank.pt)")
    rows = []  # (distance, mse as fitted, mse after the oracle gain / offset, gain)
    for entry in load_split(_dataset_of(workdir, dataset_dir), "test", limit):
        vol, _ = load_volume(entry["image"])
        pos = np.asarray(entry["positions"], dtype=np.float64)
        truth = torch.from_numpy(np.ascontiguousarray(np.moveaxis(vol, 2, 0))).double()
        for p_in in inputs:
            i0 = index_for_position(pos, p_in)
            fitted = prior.slice_at(torch.as_tensor(pos), truth[i0 : i0 + 1, None].float(), float(pos[i0])).reshape(truth.shape).double()
            for i in range(len(pos)):
                x, y = fitted[i].reshape(-1), truth[i].reshape(-1)
                head = (x > HEAD_THRESHOLD) | (y > HEAD_THRESHOLD)
                if i == i0 or int(head.sum()) < 200:
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
                        "headroom_db": float(oracle - psnr), "gain_mean": float(r[sel, 3].mean()), "gain_sd": float(r[sel, 3].std())})
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", required=True, help="pipeline work folder with the brain_generalization atlas bank")
    ap.add_argument("--dataset_dir", default=None)
    ap.add_argument("--limit", type=int, default=8, help="first N test volumes")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    res = headroom(args.workdir, args.dataset_dir, args.limit)
    print("| d (slices) | slices | fitted prior PSNR dB | with the oracle gain and offset | headroom dB | oracle gain (mean +- sd) |")
    print("|---|---:|---:|---:|---:|---|")
    for r in res:
        print(f"| {r['d']} | {r['n']} | {r['psnr_fitted']:.2f} | {r['psnr_oracle_gain_offset']:.2f} | {r['headroom_db']:+.2f} | {r['gain_mean']:.3f} +- {r['gain_sd']:.3f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
