"""Screen: what does a plain two-ended network give over linear interpolation in few-slice gaps?

A question for the quality issue's stretch target, outside the pipeline: MRNGAN fills a gap step by step
with a blend of candidates (previous output, pix2pix, the fitted prior, the far end). Would a network that
maps the gap's two real ends straight to a missing slice do better? This trains one on the training split
and scores it beside linear interpolation on the test split, with the evaluation's protocol (every k-th
true slice given, indices 0, k, 2k, ...; the slices between the first and the last given one scored with
:func:`~monai_mrngan.metrics.image.slice_metrics`, mean per slice), so its linear figures are the
evaluation's ``few_slices.k<k>.linear``.

The network: MONAI's 2D ``UNet`` (16-32-64-128 channels, instance norm) on (lower end, upper end, a
constant map of the relative place ``t`` in the gap, a constant map of the gap's width / 16), adding its
output, times a learnt gain that starts at 0, to the linear interpolation of the two ends: untrained, it
*is* linear interpolation. L1 loss, Adam 1e-3, batches of 8 random gaps (k in 2..16, both directions)
drawn from whole training volumes. Scoring averages its two orders (lower-upper and upper-lower).

    python -m scripts.bench.gap_unet --dataset_dir D --minutes 30 --out gap_unet.pt [--test 15]
    python -m scripts.bench.gap_unet --dataset_dir D --out gap_unet.pt --score_only
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
from monai.networks.nets import UNet

from monai_mrngan.data.datalist import load_split
from monai_mrngan.data.io import atomic_torch_save, load_volume
from monai_mrngan.inference.volume import linear_fill
from monai_mrngan.metrics.image import pool_rows, slice_metrics, summarize

from .common import log

GAPS = (2, 3, 4, 6, 8, 12, 16)
"""Gap widths (in slices) drawn in training, uniformly."""


class GapUNet(torch.nn.Module):
    """Linear interpolation of the gap's ends plus a UNet's correction (times a gain that starts at 0)."""

    def __init__(self) -> None:
        super().__init__()
        self.unet = UNet(2, 4, 1, channels=(16, 32, 64, 128), strides=(2, 2, 2), num_res_units=1, norm="instance")
        self.gain = torch.nn.Parameter(torch.zeros(()))

    def forward(self, lower: torch.Tensor, upper: torch.Tensor, t: torch.Tensor, gap: torch.Tensor) -> torch.Tensor:
        """``lower``, ``upper`` (B, 1, H, W); ``t`` in (0, 1) and ``gap`` in slices, (B,): the slice at ``t``."""
        t, gap = t.view(-1, 1, 1, 1).to(lower), gap.view(-1, 1, 1, 1).to(lower)
        x = torch.cat([lower, upper, t.expand_as(lower), (gap / 16.0).expand_as(lower)], 1)
        return ((1 - t) * lower + t * upper + self.gain * self.unet(x)).clamp(0, 1)


def _volumes(dataset_dir: str, split: str, limit: int | None = None) -> list[torch.Tensor]:
    """Each volume of the split as (D, H, W) float32."""
    return [torch.from_numpy(np.ascontiguousarray(np.moveaxis(load_volume(e["image"])[0].astype(np.float32), 2, 0)))
            for e in load_split(dataset_dir, split, limit)]


def train(dataset_dir: str, minutes: float, batch: int = 8, seed: int = 0) -> tuple[GapUNet, int]:
    """Train for ``minutes`` of wall time; returns the model and its iteration count."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    vols = _volumes(dataset_dir, "training")
    log(f"gap_unet: {len(vols)} training volumes")
    model = GapUNet()
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    t0, it, smooth = time.time(), 0, None
    while time.time() - t0 < minutes * 60:
        lower, upper, mid, t, gap = [], [], [], [], []
        for _ in range(batch):
            v = vols[rng.integers(len(vols))]
            k = int(rng.choice(GAPS))
            a, j = int(rng.integers(0, v.shape[0] - k)), int(rng.integers(1, k))
            up = rng.random() < 0.5  # both directions: the lower end is the lower slice or the upper one
            lower.append(v[a] if up else v[a + k]), upper.append(v[a + k] if up else v[a]), mid.append(v[a + j])
            t.append(j / k if up else 1 - j / k), gap.append(float(k))
        lower, upper, mid = (torch.stack(x)[:, None] for x in (lower, upper, mid))
        loss = (model(lower, upper, torch.tensor(t), torch.tensor(gap)) - mid).abs().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        it += 1
        smooth = float(loss.detach()) if smooth is None else 0.98 * smooth + 0.02 * float(loss.detach())
        if it % 200 == 0:
            log(f"gap_unet: iteration {it}, {time.time() - t0:.0f} s, L1 {smooth:.4f}")
    return model, it


@torch.no_grad()
def score(model: GapUNet, dataset_dir: str, limit: int, ks: tuple[int, ...] = (2, 4, 8, 16)) -> dict:
    """``{k: {"linear": metrics, "gap_unet": metrics}}`` on the first ``limit`` test volumes."""
    model.eval()
    rows: dict[int, dict[str, list]] = {k: {"linear": [], "gap_unet": []} for k in ks}
    for v in _volumes(dataset_dir, "test", limit):
        for k in ks:
            given = list(range(0, v.shape[0], k))
            missing = [i for i in range(given[0], given[-1]) if i not in given]
            lo = [i - i % k for i in missing]  # the given slice below each missing one (indices 0, k, 2k, ...)
            hi = [a + k for a in lo]
            t = torch.tensor([(i - a) / k for i, a in zip(missing, lo)])
            gap = torch.full((len(missing),), float(k))
            pred = 0.5 * (model(v[lo][:, None], v[hi][:, None], t, gap) + model(v[hi][:, None], v[lo][:, None], 1 - t, gap))
            target = v[missing][:, None]
            rows[k]["linear"].append(slice_metrics(linear_fill(v[given], given, v.shape[0])[missing][:, None], target))
            rows[k]["gap_unet"].append(slice_metrics(pred, target))
    return {k: {m: summarize(pool_rows(rr)) for m, rr in by_m.items()} for k, by_m in rows.items()}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset_dir", required=True)
    ap.add_argument("--out", required=True, help="the trained model's weights (written, or read with --score_only)")
    ap.add_argument("--minutes", type=float, default=30.0)
    ap.add_argument("--test", type=int, default=15)
    ap.add_argument("--score_only", action="store_true")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if args.score_only:
        model = GapUNet()
        model.load_state_dict(torch.load(args.out, weights_only=True))
    else:
        model, iterations = train(args.dataset_dir, args.minutes)
        atomic_torch_save(model.state_dict(), args.out)
        log(f"gap_unet: {iterations} iterations, weights in {args.out}")
    result = score(model, args.dataset_dir, args.test)
    print("| k | linear: PSNR dB / head SSIM | gap UNet | gap UNet - linear |\n|---|---|---|---:|")
    for k, by_m in result.items():
        lin, net = by_m["linear"], by_m["gap_unet"]
        print(f"| {k} | {lin['psnr']:.2f} / {lin['ssim_head']:.3f} | {net['psnr']:.2f} / {net['ssim_head']:.3f} | {net['psnr'] - lin['psnr']:+.2f} dB |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({str(k): v for k, v in result.items()}, f, indent=1)


if __name__ == "__main__":
    main()
