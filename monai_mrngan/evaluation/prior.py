"""Evaluate general-brain priors on held-out subjects, per position bin.

For every test volume and every reference position (default p = 0.3 / 0.5 / 0.7) the true slice
nearest that position is the patient's single input slice. Each prior predicts every other slice
of the volume at its true ``p``: once plain (unfitted) and once fitted to the input slice. Metrics
are :func:`monai_mrngan.metrics.slice_metrics` (SSIM, head-only SSIM, PSNR, MSE), averaged per
position bin and overall; the input slice itself is left out. Position consistency: a slice
localization network (optional) predicts ``p`` for generated slices; the MAE against the ``p`` they
were drawn for is reported.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch

from ..atlas.prior import BrainPrior, FitConfig, TemplateLocalizer, load_prior
from ..data.datalist import load_split
from ..data.io import atomic_path, load_volume, pyplot, save_figure, save_json, slice_to_display
from ..data.positions import index_for_position, position_bins
from ..inference.components import load_bundle_network
from ..inference.localize import localize
from ..metrics.image import METRIC_NAMES, pool_rows, slice_metrics

logger = logging.getLogger(__name__)

REFERENCE_POSITIONS = (0.3, 0.5, 0.7)


def _summ(rows: Sequence[dict[str, torch.Tensor]], bins: np.ndarray, num_bins: int) -> dict:
    cat = {k: v.double() for k, v in pool_rows(rows).items() if k in METRIC_NAMES}
    out = {"overall": {k: float(torch.nanmean(v)) for k, v in cat.items()}, "num_slices": int(len(bins))}
    per_bin = {}
    for b in range(num_bins):
        sel = torch.as_tensor(bins == b)
        if sel.any():
            per_bin[str(b)] = {k: float(torch.nanmean(v[sel])) for k, v in cat.items()} | {"num_slices": int(sel.sum())}
    out["bins"] = per_bin
    return out


@torch.no_grad()
def evaluate_prior(
    prior: BrainPrior,
    entries: Sequence[Mapping],
    reference_positions: Sequence[float] = REFERENCE_POSITIONS,
    num_bins: int = 5,
    fitted: bool = True,
) -> dict:
    """Metrics of ``prior`` on ``entries`` (datalist items with ``image`` and ``positions``).

    Returns ``{"plain": summary, "fitted": summary, "fit_seconds": s}``, each summary holding
    ``overall`` and per-``bins`` means; ``fitted`` is skipped when ``fitted=False``.
    """
    plain_rows, fit_rows, plain_bins, fit_bins = [], [], [], []
    fit_time, n_fits = 0.0, 0
    for n, e in enumerate(entries):
        vol, _ = load_volume(e["image"])
        pos = np.asarray(e["positions"], dtype=np.float64)
        if tuple(vol.shape[:2]) != prior.shape:
            raise ValueError(f"{e['image']}: slices {vol.shape[:2]} but the prior is {prior.shape}")
        truth = torch.from_numpy(np.moveaxis(vol, -1, 0))[:, None].clamp(0, 1)
        bins = position_bins(pos, num_bins)
        plain_rows.append(slice_metrics(prior.slice_at(torch.from_numpy(pos)), truth))
        plain_bins.append(bins)
        if not fitted:
            continue
        for p_ref in reference_positions:
            i = index_for_position(pos, p_ref)
            keep = np.arange(len(pos)) != i
            t0 = time.perf_counter()
            pred = prior.slice_at(torch.from_numpy(pos[keep]), truth[i : i + 1], float(pos[i]))
            fit_time += time.perf_counter() - t0
            n_fits += 1
            fit_rows.append(slice_metrics(pred, truth[keep]))
            fit_bins.append(bins[keep])
        logger.info("%s: evaluated %d/%d volumes", prior.name, n + 1, len(entries))
    out = {"plain": _summ(plain_rows, np.concatenate(plain_bins), num_bins)}
    if fitted and fit_rows:
        out["fitted"] = _summ(fit_rows, np.concatenate(fit_bins), num_bins)
        out["fit_seconds"] = fit_time / max(n_fits, 1)
    return out


def load_localizer(
    config_file: str | os.PathLike | None, weights: str | os.PathLike | None, overrides: Mapping | None = None
) -> torch.nn.Module | None:
    """The slice localization network from its bundle config (``network_def``, with the ``overrides``
    it was trained with) and weights; None when absent."""
    if not config_file or not weights or not Path(config_file).is_file() or not Path(weights).is_file():
        logger.info("no localizer given (or files absent): position consistency skipped")
        return None
    return load_bundle_network(config_file, weights, overrides=overrides).eval()


@torch.no_grad()
def position_consistency(localizer: torch.nn.Module, prior: BrainPrior, positions: Sequence[float]) -> dict:
    """MAE (and share within 5 %) between the localizer's ``p`` for the prior's slices and the ``p`` they were drawn for."""
    p = torch.as_tensor(np.asarray(positions, dtype=np.float64))
    pred = localize(localizer, prior.slice_at(p).float()).double().reshape(-1)
    err = (pred - p).abs()
    return {"mae": float(err.mean()), "within_5pct": float((err <= 0.05).double().mean()), "num_positions": int(len(p))}


@torch.no_grad()
def _real_slice_mae(localizer: torch.nn.Module, entries: Sequence[Mapping]) -> dict:
    errs = []
    for e in entries:
        vol, _ = load_volume(e["image"])
        pos = torch.as_tensor(np.asarray(e["positions"], dtype=np.float64))
        keep = (pos >= 0.05) & (pos <= 0.95)
        x = torch.from_numpy(np.moveaxis(vol, -1, 0))[:, None][keep.numpy()]
        errs.append((localize(localizer, x).double() - pos[keep]).abs())
    err = torch.cat(errs)
    return {"mae": float(err.mean()), "within_5pct": float((err <= 0.05).double().mean()), "num_slices": int(len(err))}


def sample_grid(priors: Mapping[str, BrainPrior], positions: Sequence[float], path: str | os.PathLike, reference: tuple[torch.Tensor, float] | None = None, truth: torch.Tensor | None = None) -> Path:
    """PNG grid: one row per prior (plus fitted rows when ``reference`` is given, and the truth), one column per ``p``."""
    plt = pyplot()
    rows: list[tuple[str, torch.Tensor]] = []
    p = torch.as_tensor(np.asarray(positions, dtype=np.float64))
    if truth is not None:
        rows.append(("patient (truth)", truth))
    for name, prior in priors.items():
        rows.append((f"{name}", prior.slice_at(p)))
        if reference is not None:
            rows.append((f"{name} fitted", prior.slice_at(p, reference[0], reference[1])))
    fig, axes = plt.subplots(len(rows), len(p), figsize=(1.6 * len(p), 1.7 * len(rows)), squeeze=False)
    for r, (name, imgs) in enumerate(rows):
        for c in range(len(p)):
            ax = axes[r][c]
            ax.imshow(slice_to_display(imgs[c, 0].numpy()), cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(f"p={float(p[c]):.2f}", fontsize=8)
            if c == 0:
                ax.set_ylabel(name, fontsize=7)
    fig.tight_layout()
    return save_figure(fig, path, dpi=80)


def markdown_table(results: Mapping[str, dict], num_bins: int = 5) -> str:
    """Overall and per-bin head-only SSIM / SSIM / PSNR / MSE for every evaluated prior."""
    lines = ["| prior | fit | SSIM | head-only SSIM | PSNR dB | MSE |", "|---|---|---:|---:|---:|---:|"]
    for name, res in results.items():
        for kind in ("plain", "fitted"):
            if kind in res:
                o = res[kind]["overall"]
                lines.append(f"| {name} | {kind} | {o['ssim']:.3f} | {o['ssim_head']:.3f} | {o['psnr']:.2f} | {o['mse']:.4f} |")
    lines += ["", "Head-only SSIM / PSNR per position bin (bin b covers p in [b/5, (b+1)/5)):", ""]
    header = "| prior | fit | " + " | ".join(f"bin {b}" for b in range(num_bins)) + " |"
    lines += [header, "|---|---|" + "---:|" * num_bins]
    for name, res in results.items():
        for kind in ("plain", "fitted"):
            if kind in res:
                cells = [
                    f"{res[kind]['bins'][str(b)]['ssim_head']:.3f} / {res[kind]['bins'][str(b)]['psnr']:.1f}" if str(b) in res[kind]["bins"] else "-"
                    for b in range(num_bins)
                ]
                lines.append(f"| {name} | {kind} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def run_evaluation(
    dataset_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    priors: Mapping[str, str | None],
    fit: FitConfig | dict | None = None,
    split: str = "test",
    reference_positions: Sequence[float] = REFERENCE_POSITIONS,
    num_bins: int = 5,
    localizer_config: str | None = None,
    localizer_weights: str | None = None,
    localizer_overrides: Mapping | None = None,
    grid_positions: Sequence[float] = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9),
    limit: int | None = None,
) -> dict:
    """Evaluate each prior file in ``priors`` (name -> path; missing paths skipped) on ``split``.

    Writes ``metrics.json``, ``metrics.md`` and ``samples.png`` to ``output_dir``; returns the metrics.
    """
    entries = load_split(dataset_dir, split, limit)
    if not entries:
        raise ValueError(f"{dataset_dir}: split {split!r} is empty")
    output_dir = Path(output_dir)
    loaded = {}
    for name, path in priors.items():
        if path and Path(path).is_file():
            loaded[name] = load_prior(path, fit)
        else:
            logger.info("prior %s: %s absent, skipped", name, path)
    if not loaded:
        raise FileNotFoundError(f"none of the priors exist: {dict(priors)}; train or build the prior first")
    results: dict = {}
    for name, prior in loaded.items():
        results[name] = evaluate_prior(prior, entries, reference_positions, num_bins)
    localizer = load_localizer(localizer_config, localizer_weights, localizer_overrides)
    grid = np.linspace(0.05, 0.95, 19)
    key = "position_consistency"
    if localizer is None and "mean_brain" in loaded:
        # stand-in: template matching against the mean brain; its own error on real test slices is reported too
        localizer, key = TemplateLocalizer(loaded["mean_brain"]), "position_consistency_template"
        results["_template_localizer_on_real_slices"] = _real_slice_mae(localizer, entries)
    if localizer is not None:
        for name, prior in loaded.items():
            results[name][key] = position_consistency(localizer, prior, grid)
    results["_setup"] = {"split": split, "num_volumes": len(entries), "reference_positions": list(reference_positions), "fit": vars(next(iter(loaded.values())).config)}
    save_json(results, output_dir / "metrics.json")
    with atomic_path(output_dir / "metrics.md") as tmp:
        tmp.write_text(markdown_table({k: v for k, v in results.items() if not k.startswith("_")}, num_bins))
    e = entries[0]
    vol, _ = load_volume(e["image"])
    pos = np.asarray(e["positions"])
    idx = [index_for_position(pos, p) for p in grid_positions]
    truth = torch.from_numpy(np.moveaxis(vol[..., idx], -1, 0))[:, None]
    i0 = index_for_position(pos, 0.5)
    ref = torch.from_numpy(vol[..., i0])[None, None]
    sample_grid(loaded, [float(pos[i]) for i in idx], output_dir / "samples.png", (ref, float(pos[i0])), truth)
    return results
