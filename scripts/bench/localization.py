"""Per-slice localization error of a pipeline work folder's stages: the trained localizer, the mean-brain
template, and the atlas refinement centred on the localizer alone or as ``refine_positions`` centres it.

Every slice with ``p`` in [0.1, 0.9] of the split's volumes; mean absolute error and mean signed error
(negative: placed too close to the vertex) in mm, overall and per 0.2 band of ``p``.

    python -m scripts.bench.localization --workdir W --dataset_dir D [--split test] [--limit 4] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from .common import log

BANDS = (0.1, 0.3, 0.5, 0.7, 0.9)


def errors(workdir: str, dataset_dir: str | None, split: str = "test", limit: int | None = None, window: float = 0.12) -> dict[str, dict]:
    from monai_mrngan.apps.cli import _components, _dataset_of
    from monai_mrngan.atlas.prior import template_localizer_for
    from monai_mrngan.data.datalist import load_split
    from monai_mrngan.data.io import load_volume
    from monai_mrngan.data.positions import HEAD_HEIGHT_MM
    from monai_mrngan.inference.localize import localize
    from monai_mrngan.inference.reconstruct import refine_positions
    from monai_mrngan.metrics.localization import localization_metrics

    comp = _components(workdir)
    if comp.localizer is None or comp.prior is None:
        raise SystemExit(f"{workdir}: needs a trained slice localizer and the atlas bank")
    found: dict[str, list[np.ndarray]] = {"truth": [], "localizer": [], "template": [], "refined around the localizer": [], "refined (refine_positions)": []}
    for entry in load_split(_dataset_of(workdir, dataset_dir), split, limit):
        vol, _ = load_volume(entry["image"])
        pos = np.asarray(entry["positions"], dtype=np.float64)
        keep = (pos >= BANDS[0]) & (pos <= BANDS[-1])
        x = torch.from_numpy(np.ascontiguousarray(np.moveaxis(vol, 2, 0)[keep])).float()[:, None]
        cnn = localize(comp.localizer, x).reshape(-1).float()
        found["truth"].append(pos[keep])
        found["localizer"].append(cnn.numpy())
        found["template"].append(template_localizer_for(comp.prior)(x).numpy())
        found["refined around the localizer"].append(np.array([comp.prior.locate(x[i : i + 1], float(cnn[i]), window=window) for i in range(len(x))]))
        found["refined (refine_positions)"].append(refine_positions(comp.prior, x, cnn, window).numpy())
        log(f"{entry.get('subject', entry['image'])}: {int(keep.sum())} slices")
    truth = np.concatenate(found.pop("truth"))
    out = {}
    for name, parts in found.items():
        pred = np.concatenate(parts).astype(np.float64)
        row = {"mae_mm": localization_metrics(pred, truth)["mae_mm"], "bias_mm": float((pred - truth).mean() * HEAD_HEIGHT_MM), "n": int(pred.size)}
        for lo, hi in zip(BANDS[:-1], BANDS[1:]):
            sel = (truth >= lo) & (truth < hi)
            row[f"mae_mm_p{lo:.1f}-{hi:.1f}"] = localization_metrics(pred[sel], truth[sel])["mae_mm"] if sel.any() else None
        out[name] = row
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", required=True, help="pipeline work folder (trained slice_localization and brain_generalization)")
    ap.add_argument("--dataset_dir", default=None, help="prepared dataset (default: the one the work folder was trained on)")
    ap.add_argument("--split", default="test")
    ap.add_argument("--limit", type=int, default=None, help="only the first N volumes of the split")
    ap.add_argument("--window", type=float, default=0.12, help="refinement window in p (the evaluation's refine_window)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    res = errors(args.workdir, args.dataset_dir, args.split, args.limit, args.window)
    bands = [f"p {lo:.1f}-{hi:.1f}" for lo, hi in zip(BANDS[:-1], BANDS[1:])]
    print(f"| method | MAE mm | bias mm | {' | '.join(bands)} |")
    print("|---|---:|---:|" + "---:|" * len(bands))
    for name, r in res.items():
        cells = [f"{v:.1f}" if v is not None else "-" for k, v in r.items() if k.startswith("mae_mm_p")]
        print(f"| {name} | {r['mae_mm']:.1f} | {r['bias_mm']:+.1f} | {' | '.join(cells)} |")
    print(f"{next(iter(res.values()))['n']} slices")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
