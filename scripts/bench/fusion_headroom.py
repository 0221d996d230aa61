"""How much a better fusion of the two runs that fill each gap could add (few-slice input).

With ``both_ways`` (MRNGAN's default) every gap between two given slices is filled twice, by a run from
each end that sees the other end, and the two are blended with linear weights by distance
(:func:`~monai_mrngan.inference.volume.fill_volume`). This script keeps both runs of every gap
(test volumes, every k-th true slice given, as the evaluation gives them) and scores, on the missing
slices with the evaluation's metrics (:func:`~monai_mrngan.metrics.image.slice_metrics`, mean per slice):

- each run alone (from the lower end, from the upper end);
- blends ``w_lower = (1 - r)^g / ((1 - r)^g + r^g)`` at relative place ``r`` in the gap; ``g = 1`` is
  today's linear blend, other ``g`` trust the nearer end more (``g > 1``) or less;
- an oracle: per slice the MSE-optimal weight, fitted against the truth (no method knows it). It bounds
  what any per-slice fusion of the two runs, learned or not, could add over the linear blend.

    python -m scripts.bench.fusion_headroom --workdir W [--dataset_dir D] [--limit 6] [--k 2 4 8 16] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from .common import log

GAMMAS = (0.5, 1.0, 2.0)


class _Recorder:
    """A runner that hands every call through to ``run`` and keeps what it generated (one call per volume)."""

    def __init__(self, run, device: str):
        self.run, self.device, self.gap_aware, self.both_ways = run, device, run.gap_aware, run.both_ways
        self.out = self.starts = self.dirs = None

    def __call__(self, starts, start_positions, directions, steps, step_p, far=None):
        far = tuple(t.to(self.device) for t in far) if far is not None else None
        out = self.run(starts.to(self.device), start_positions.to(self.device), directions.to(self.device), steps, step_p, far=far)
        self.out, self.starts, self.dirs = out[:, :, 0].float().cpu(), start_positions.cpu().double(), directions.cpu()
        self.last_signals = getattr(self.run, "last_signals", None)
        return out


def gap_runs(rec: _Recorder, grid: np.ndarray, given: list[int]) -> list[tuple[int, torch.Tensor, torch.Tensor]]:
    """Per gap ``(lower given index, run from the lower end, run from the upper end (lower slice first))``;
    each run's start slice is found from its start position on the grid."""
    step = grid[1] - grid[0]
    start_idx = np.rint((rec.starts.numpy() - grid[0]) / step).astype(int)
    by_start = {(int(i), int(d)): n for n, (i, d) in enumerate(zip(start_idx, rec.dirs.tolist()))}
    out = []
    for lo, hi in zip(given[:-1], given[1:]):
        gap = hi - lo - 1
        if gap > 0:
            a = rec.out[by_start[(lo, 1)], :gap].clamp(0, 1)
            b = rec.out[by_start[(hi, -1)], :gap].flip(0).clamp(0, 1)
            out.append((lo, a, b))
    return out


def headroom(workdir: str, dataset_dir: str | None, limit: int | None = 6, ks: tuple[int, ...] = (2, 4, 8, 16)) -> dict[int, dict]:
    from monai_mrngan.apps.cli import _components, _dataset_of
    from monai_mrngan.data.datalist import load_split
    from monai_mrngan.data.io import load_volume
    from monai_mrngan.data.positions import position_step
    from monai_mrngan.inference.runners import make_runner
    from monai_mrngan.inference.volume import fill_volume
    from monai_mrngan.metrics.image import slice_metrics

    comp = _components(workdir)
    if comp.model is None or comp.prior is None or not getattr(comp.model, "both_ways", False):
        raise SystemExit(f"{workdir}: needs a trained both-ways MRNGAN cell and its atlas bank")
    names = ["lower run alone", "upper run alone"] + [f"blend g = {g:g}" + (" (now)" if g == 1.0 else "") for g in GAMMAS] + ["oracle weight per slice"]
    scores = {k: {n: [] for n in names} for k in ks}
    for entry in load_split(_dataset_of(workdir, dataset_dir), "test", limit):
        vol, _ = load_volume(entry["image"])
        pos = np.asarray(entry["positions"], dtype=np.float64)
        truth = torch.from_numpy(np.ascontiguousarray(np.moveaxis(vol, 2, 0))).float()
        step_p = position_step(pos)
        for k in ks:
            given = list(range(0, truth.shape[0], k))
            if len(given) < 2:
                continue
            rec = _Recorder(make_runner("mrngan", model=comp.model, next_fn=comp.next_fn, prior=comp.prior, fit_prior=True), comp.device)
            fill_volume(rec, truth[given], given, truth.shape[0], pos, step_p)
            for lo, a, b in gap_runs(rec, pos, given):
                t = truth[lo + 1 : lo + 1 + a.shape[0]]
                r = (torch.arange(1, a.shape[0] + 1, dtype=torch.float32) / (a.shape[0] + 1)).view(-1, 1, 1)
                da, db = (a - t).flatten(1), (b - t).flatten(1)
                w = ((db * (db - da)).sum(1) / (db - da).pow(2).sum(1).clamp_min(1e-12)).clamp(0, 1).view(-1, 1, 1)
                fused = [a, b] + [(1 - r) ** g / ((1 - r) ** g + r ** g) * a + r ** g / ((1 - r) ** g + r ** g) * b for g in GAMMAS] + [w * a + (1 - w) * b]
                for name, x in zip(names, fused):
                    scores[k][name].append(slice_metrics(x[:, None], t[:, None]))
        log(f"{entry.get('subject', entry['image'])}: done")
    out = {}
    for k in ks:
        out[k] = {}
        for name, parts in scores[k].items():
            if parts:
                out[k][name] = {m: float(torch.nanmean(torch.cat([p[m] for p in parts]).double())) for m in ("psnr", "ssim_head")}
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", required=True, help="pipeline work folder with trained flow, prior and mrngan stages")
    ap.add_argument("--dataset_dir", default=None)
    ap.add_argument("--limit", type=int, default=6, help="first N test volumes")
    ap.add_argument("--k", type=int, nargs="+", default=[2, 4, 8, 16])
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    res = headroom(args.workdir, args.dataset_dir, args.limit, tuple(args.k))
    names = list(next(iter(res.values())))
    print("| fusion of the two runs | " + " | ".join(f"k = {k}: PSNR dB / head SSIM" for k in res) + " |")
    print("|---|" + "---|" * len(res))
    for name in names:
        now = {k: res[k]["blend g = 1 (now)"]["psnr"] for k in res}
        cells = [f"{res[k][name]['psnr']:.2f} ({res[k][name]['psnr'] - now[k]:+.2f}) / {res[k][name]['ssim_head']:.3f}" for k in res]
        print(f"| {name} | " + " | ".join(cells) + " |")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
