"""Which signals should the uncertainty map use? Calibrations with and without a signal, side by side.

Reconstructs validation subjects (calibration) and test subjects (scoring) once with the trained
stages of WORKDIR, exactly as the ``calibrate`` step and ``evaluate`` do
(:func:`monai_mrngan.evaluation.uncertainty.reconstructions`), then for every feature set fits a
:class:`~monai_mrngan.inference.calibration.Calibration` on the validation samples and scores it on
the test samples: Spearman correlation of predicted and true absolute error over head voxels and over
slices, per case (one slice, every 4th, every 8th).

    python -m scripts.bench.uncertainty_features --workdir W --dataset_dir D [--val 5] [--test 8] [--hidden 16 16] [--stride 2] [--json OUT]

``--hidden``: the correction network's widths, as the calibrate step's ``calibration_hidden`` (``--hidden``
with no value: the log-linear model alone). ``--stride``: the signals' in-plane block size, as its
``calibration_stride``; each test voxel is scored with its block's prediction (not the map's bilinear blend).

For the full signal set it also prints ``oracle_scale_slice``: the slice ranking when each reconstruction's map is
scaled so that its mean over the head equals the true mean error (an oracle: no method knows a subject's error
level), which bounds what any per-reconstruction signal could add to the slice ranking.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
from scipy.stats import spearmanr

from monai_mrngan.data.datalist import load_split
from monai_mrngan.evaluation.uncertainty import head_samples, reconstructions
from monai_mrngan.apps.cli import _components  # the workdir loader reconstruct uses
from monai_mrngan.inference.runners import one_pass_gaps
from monai_mrngan.inference.calibration import FEATURES, Calibration

LEFT_OUT = ("edge_xy", "run_spread", "spread_local", "misfit_xy", "candidate_spread", "head_area")  # the signals whose worth is checked by leaving each out
SETS = {"all": list(FEATURES), **{f"without {name}": [f for f in FEATURES if f != name] for name in LEFT_OUT}}


def collect(entries: list, comp, head_only: bool, voxels: int, rng: np.random.Generator, stride: int) -> list[tuple[str, dict, np.ndarray, np.ndarray]]:
    one_pass = one_pass_gaps(comp.model)
    out = []
    for _, case, rec, vol, spacing, fitted, scored in reconstructions(entries, comp, (0.3, 0.5, 0.7), (4, 8), comp.localizer is not None,
                                                                      0.12, True, True):
        sig, err, sid = head_samples(rec, vol, comp.prior, spacing, fitted, one_pass, scored, head_only=head_only, stride=stride)
        pick = rng.choice(err.size, min(voxels, err.size), replace=False) if not head_only else np.arange(err.size)
        out.append((case, {k: v[pick] for k, v in sig.items()}, err[pick], sid[pick]))
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--dataset_dir", required=True)
    ap.add_argument("--val", type=int, default=5)
    ap.add_argument("--test", type=int, default=8)
    ap.add_argument("--hidden", type=int, nargs="*", default=[16, 16])
    ap.add_argument("--stride", type=int, default=2)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    rng = np.random.default_rng(0)
    comp = _components(args.workdir)
    t0 = time.time()
    val = collect(load_split(args.dataset_dir, "validation", args.val), comp, False, 60000, rng, args.stride)
    test = collect(load_split(args.dataset_dir, "test", args.test), comp, True, 0, rng, args.stride)
    print(f"reconstructed {args.val} validation and {args.test} test subjects in {time.time() - t0:.0f} s", file=sys.stderr)
    vsig = {k: np.concatenate([s[k] for _, s, _, _ in val]) for k in FEATURES}
    verr = np.concatenate([e for _, _, e, _ in val])
    results = {}
    for name, feats in SETS.items():
        cal = Calibration.fit(vsig, verr, features=feats, hidden=args.hidden)
        row = {}
        for case in ("single_slice", "k4", "k8"):
            parts = [(s, e, i) for c, s, e, i in test if c == case]
            pv, tv, ps, ts, scale = [], [], [], [], []
            for s, e, sid in parts:
                p = cal.predict(s)
                pv.append(p)
                tv.append(e)
                n = np.bincount(sid)
                ok = n > 0
                ps.append(np.bincount(sid, p)[ok] / n[ok])
                ts.append(np.bincount(sid, e)[ok] / n[ok])
                scale.append(np.full(int(ok.sum()), e.mean() / max(float(p.mean()), 1e-12)))  # the oracle's factor
            pv, tv, ps, ts, scale = (np.concatenate(x) for x in (pv, tv, ps, ts, scale))
            sub = rng.choice(pv.size, min(200000, pv.size), replace=False)
            row[case] = {"spearman_voxel": round(float(spearmanr(pv[sub], tv[sub])[0]), 4), "spearman_slice": round(float(spearmanr(ps, ts)[0]), 4)}
            if name == "all":
                row[case]["oracle_scale_slice"] = round(float(spearmanr(ps * scale, ts)[0]), 4)
        results[name] = {"features": feats, "weights": [round(w, 4) for w in cal.weights], **row}
        print(name, json.dumps(row), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
