"""Evaluation of next-slice prediction on a split, pix2pix against the copy baseline, in one run.

- One step: every adjacent pair of every volume, in both directions; per-slice MSE, PSNR (data
  range 1, and the paper's convention ``20 log10(255 / sqrt(MSE))``), SSIM and head-only SSIM, as
  worst / average / best like the paper's Table 2, for pix2pix and for copying slice i as i +- 1.
- Rollout: from the slices nearest to the start positions ``p`` of every volume, in both
  directions, the model is fed its own output for k = 1..K steps and scored against the true
  slice at distance k, next to copying the start slice to distance k. Written to ``rollout.csv``
  and ``rollout.png`` with the plain mean-brain level from BASELINES.md as reference lines.

Metrics all come from :func:`monai_mrngan.metrics.slice_metrics`. Outputs in ``output_dir``:
``flow_eval.json``, ``table2.md``, ``rollout.csv``, ``rollout.png``.
"""

from __future__ import annotations

import csv
import logging
import os
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ..data.datalist import load_split
from ..data.io import atomic_path, load_volume, pyplot, save_figure, save_json
from ..metrics import METRIC_NAMES, paper_psnr, slice_metrics
from ..metrics.image import PAPER_PSNR_OFFSET_DB
from ..inference.flow import load_generator, predict_next

__all__ = ["evaluate_flow", "evaluate_bundle", "MEAN_BRAIN_LEVELS", "table2"]

logger = logging.getLogger(__name__)

#: the plain mean brain at the true position on the shared IXI data (BASELINES.md)
MEAN_BRAIN_LEVELS = {"ssim": 0.600, "ssim_head": 0.214, "psnr": 19.2}
_HIGHER_BETTER = {"ssim": True, "ssim_head": True, "psnr": True, "mse": False, "psnr_paper": True}


def _predict(generator: torch.nn.Module, x: torch.Tensor, d: torch.Tensor, batch_size: int) -> torch.Tensor:
    return torch.cat([predict_next(generator, x[i : i + batch_size], d[i : i + batch_size]) for i in range(0, len(x), batch_size)])


def _stats(values: dict[str, list[torch.Tensor]]) -> dict[str, dict[str, float]]:
    out = {}
    for name, chunks in values.items():
        v = torch.cat(chunks).double()
        v = v[~torch.isnan(v)]
        hi = _HIGHER_BETTER[name]
        out[name] = {
            "worst": float(v.min() if hi else v.max()),
            "avg": float(v.mean()),
            "best": float(v.max() if hi else v.min()),
            "n": int(v.numel()),
        }
    mse = out["mse"]["avg"]
    out["psnr_paper"] = {k: out["psnr"][k] + PAPER_PSNR_OFFSET_DB for k in ("worst", "avg", "best")}
    out["psnr_paper"]["of_mean_mse"] = paper_psnr(mse)
    out["psnr_paper"]["n"] = out["psnr"]["n"]
    return out


def _append(acc: dict[str, list[torch.Tensor]], metrics: dict[str, torch.Tensor]) -> None:
    for k in METRIC_NAMES:
        acc.setdefault(k, []).append(metrics[k].cpu())


def table2(one_step: dict[str, dict[str, dict[str, float]]]) -> str:
    """The one-step figures laid out like the paper's Table 2 (Markdown)."""
    lines = [
        "| method | row | MSE | PSNR dB (range 1) | PSNR dB (paper conv.) | SSIM | head-only SSIM |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for method, s in one_step.items():
        for row in ("worst", "avg", "best"):
            lines.append(
                f"| {method} | {row} | {s['mse'][row]:.2e} | {s['psnr'][row]:.2f} | {s['psnr_paper'][row]:.2f} | "
                f"{s['ssim'][row]:.4f} | {s['ssim_head'][row]:.4f} |"
            )
    return "\n".join(lines) + "\n"


def _start_indices(positions: Sequence[float], starts: Sequence[float]) -> list[int]:
    pos = np.asarray(positions, dtype=np.float64)
    return sorted({int(np.argmin(np.abs(pos - p))) for p in starts})


def _plot(rows: list[dict], levels: dict[str, float] | None, path: Path) -> None:
    plt = pyplot()
    k = [r["k"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for ax, name, label in zip(axes, ("psnr", "ssim", "ssim_head"), ("PSNR dB (range 1)", "SSIM", "head-only SSIM")):
        ax.plot(k, [r[f"pix2pix_{name}"] for r in rows], "o-", ms=3, label="pix2pix rollout")
        ax.plot(k, [r[f"copy_{name}"] for r in rows], "s--", ms=3, label="copy at distance k")
        if levels and name in levels:
            ax.axhline(levels[name], color="gray", ls=":", label="mean brain (BASELINES.md)")
        ax.set_xlabel("steps k (slices)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)


@torch.no_grad()
def evaluate_flow(
    generator: torch.nn.Module,
    dataset_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    split: str = "test",
    steps: int = 40,
    starts: Sequence[float] = (0.3, 0.5, 0.7),
    batch_size: int = 64,
    limit: int | None = None,
    reference_levels: dict[str, float] | None = MEAN_BRAIN_LEVELS,
) -> dict:
    """One-step table and rollout curve for ``generator`` vs copy on ``split``; returns the summary.

    ``starts``: anatomical positions ``p`` where rollouts begin (nearest slice of each volume).
    ``reference_levels``: horizontal reference lines and crossing points (default: the plain
    mean brain from BASELINES.md; ``None`` for none).
    """
    entries = load_split(dataset_dir, split, limit=limit)
    if not entries:
        raise ValueError(f"{dataset_dir}: split {split!r} is empty")
    out_dir = Path(output_dir)
    generator.eval()
    acc: dict[str, dict[str, list[torch.Tensor]]] = {"pix2pix": {}, "copy": {}}
    roll: dict[str, dict[int, dict[str, list[torch.Tensor]]]] = {"pix2pix": {}, "copy": {}}
    n_pred, t_pred = 0, 0.0
    vols, roll_x, roll_d, roll_meta = [], [], [], []
    for i, entry in enumerate(entries):
        arr, _ = load_volume(entry["image"])
        vol = torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1)[:, None]  # (D, 1, H, W)
        vols.append(vol)
        x = torch.cat([vol[:-1], vol[1:]])
        y = torch.cat([vol[1:], vol[:-1]])
        d = torch.cat([torch.ones(len(vol) - 1), -torch.ones(len(vol) - 1)])
        t0 = time.perf_counter()
        pred = _predict(generator, x, d, batch_size)
        t_pred += time.perf_counter() - t0
        n_pred += len(x)
        _append(acc["pix2pix"], slice_metrics(pred, y))
        _append(acc["copy"], slice_metrics(x, y))
        for s in _start_indices(entry.get("positions", np.linspace(0, 1, len(vol))), starts):
            for direction in (1, -1):
                roll_x.append(vol[s])
                roll_d.append(float(direction))
                roll_meta.append((i, s, direction))
        logger.info("one step: volume %d/%d (%d pairs)", i + 1, len(entries), len(x))
    one_step = {m: _stats(v) for m, v in acc.items()}

    # rollout: every start of every volume, both directions, advances in one batch per step
    cur = torch.stack(roll_x)
    dirs = torch.tensor(roll_d)
    start_slices = cur.clone()
    for k in range(1, int(steps) + 1):
        cur = _predict(generator, cur, dirs, batch_size)
        valid = [j for j, (v, s, d) in enumerate(roll_meta) if 0 <= s + d * k < len(vols[v])]
        if not valid:
            break
        target = torch.stack([vols[roll_meta[j][0]][roll_meta[j][1] + roll_meta[j][2] * k] for j in valid])
        roll["pix2pix"][k] = {}
        roll["copy"][k] = {}
        _append(roll["pix2pix"][k], slice_metrics(cur[valid], target))
        _append(roll["copy"][k], slice_metrics(start_slices[valid], target))
        logger.info("rollout step %d/%d: %d valid", k, steps, len(valid))

    rows = []
    for k in sorted(roll["pix2pix"]):
        row: dict = {"k": k, "n": int(roll["pix2pix"][k]["mse"][0].numel())}
        for m in ("pix2pix", "copy"):
            for name in METRIC_NAMES:
                v = torch.cat(roll[m][k][name]).double()
                row[f"{m}_{name}"] = float(torch.nanmean(v))
        rows.append(row)
    with atomic_path(out_dir / "rollout.csv") as tmp:
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    _plot(rows, reference_levels, out_dir / "rollout.png")

    def first_k(cond) -> int | None:
        return next((r["k"] for r in rows if cond(r)), None)

    crossings = {
        f"below_copy_{n}": first_k(lambda r, n=n: r[f"pix2pix_{n}"] <= r[f"copy_{n}"]) for n in ("psnr", "ssim", "ssim_head")
    }
    if reference_levels:
        for n, level in reference_levels.items():
            crossings[f"below_mean_brain_{n}"] = first_k(lambda r, n=n, level=level: r[f"pix2pix_{n}"] < level)
    summary = {
        "split": split,
        "volumes": len(entries),
        "one_step": one_step,
        "rollout": {"steps": int(steps), "starts_p": list(starts), "crossings": crossings, "curve": rows},
        "inference_slices_per_second": n_pred / max(t_pred, 1e-9),
        "reference_levels": reference_levels,
    }
    save_json(summary, out_dir / "flow_eval.json")
    with atomic_path(out_dir / "table2.md") as tmp:
        tmp.write_text(table2(one_step))
    p, c = one_step["pix2pix"], one_step["copy"]
    logger.info(
        "one step pix2pix: SSIM %.3f head %.3f PSNR %.2f dB | copy: SSIM %.3f head %.3f PSNR %.2f dB | %.1f slices/s",
        p["ssim"]["avg"], p["ssim_head"]["avg"], p["psnr"]["avg"], c["ssim"]["avg"], c["ssim_head"]["avg"], c["psnr"]["avg"],
        summary["inference_slices_per_second"],
    )
    return summary


def evaluate_bundle(
    bundle_root: str | os.PathLike,
    dataset_dir: str | os.PathLike,
    output_dir: str | os.PathLike | None = None,
    ckpt: str | os.PathLike | None = None,
    split: str = "test",
    steps: int = 40,
    device: str = "cpu",
    **network_overrides,
) -> dict:
    """:func:`evaluate_flow` for a trained flow_generation bundle (CLI-friendly); ``network_overrides``
    as in :func:`monai_mrngan.inference.flow.load_generator`."""
    gen = load_generator(bundle_root, ckpt, device, **network_overrides)
    out = output_dir if output_dir is not None else Path(bundle_root) / "eval"
    return evaluate_flow(gen, dataset_dir, out, split=split, steps=steps)

