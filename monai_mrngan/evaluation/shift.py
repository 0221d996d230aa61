"""Scanner shift: the same held-out subjects as if they came from other scanners, for a side-by-side evaluation.

All training data here come from one scanner. :data:`~monai_mrngan.transforms.scanners.SHIFTS` is a fixed, seeded set
of simulated acquisitions (:mod:`monai_mrngan.transforms.scanners`), applied to each held-out (test) volume before it is prepared again the way
``prepare`` scales a scan (:func:`~monai_mrngan.data.grid.scale_intensity`): contrast curves, a smooth bias field, noise, the
smoothness of a 1 mm acquisition brought to 2 mm, a coarser quantisation, and one combination.
None of them uses the settings of any training augmentation (they are fixed here, not drawn).

:func:`shifted_dataset` writes such a dataset (the test split only, the same subjects and
positions); :func:`evaluate_shifted` runs :func:`~monai_mrngan.evaluation.reconstruction.evaluate_reconstruction`
on the original and on every shift and writes the tables side by side (``shift_report.json``,
``shift_report.md``).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Mapping

from ..data.datalist import DATALIST_NAME, load_split
from ..data.io import atomic_path, load_volume, save_json, save_nifti
from ..inference.components import Components
from ..transforms.scanners import SHIFTS, acquire, check_shifts, describe, simulate
from .reconstruction import evaluate_reconstruction

logger = logging.getLogger(__name__)

__all__ = ["SHIFTS", "check_shifts", "acquire", "simulate", "shifted_dataset", "evaluate_shifted"]  # the first four: transforms.scanners


def shifted_dataset(dataset_dir: str | os.PathLike, out_dir: str | os.PathLike, name: str, split: str = "test", limit: int | None = None,
                    seed: int = 0) -> Path:
    """Write ``split``'s volumes of a prepared dataset as seen by scanner ``name`` into ``out_dir`` (volumes + datalist)."""
    out_dir = Path(out_dir)
    entries = load_split(dataset_dir, split, limit)
    shifted = []
    for n, e in enumerate(entries):
        vol, affine = load_volume(e["image"])
        rel = f"volumes/{Path(e['image']).name}"
        save_nifti(simulate(vol, name, seed + n), affine, out_dir / rel)
        shifted.append({**{k: v for k, v in e.items() if k != "image"}, "image": rel, "scanner_shift": name})
    save_json({"description": f"{dataset_dir} ({split}) under scanner shift {name}", "training": [], "validation": [], split: shifted},
              out_dir / DATALIST_NAME)
    return out_dir


def _row(report: Mapping[str, Any]) -> dict[str, Any]:
    single = {m: {k: s[k] for k in ("ssim_head", "psnr")} for m, s in report["single_slice"]["methods"].items()}
    cases = {**report["few_slices"], **{f"thick_{k}": methods for k, methods in report.get("thick_slices", {}).items()}}
    few = {k: {m: {x: s[x] for x in ("ssim_head", "psnr")} for m, s in methods.items()} for k, methods in cases.items()}
    return {"single_slice": single, "few_slices": few, "uncertainty": report.get("uncertainty")}  # the map's reliability per shift


def evaluate_shifted(dataset_dir: str | os.PathLike, out_dir: str | os.PathLike, components: Components, shifts: list[str] | None = None,
                     split: str = "test", limit: int | None = None, seed: int = 0, **evaluate_kw: Any) -> dict[str, Any]:
    """The same evaluation on the original held-out subjects and under every scanner shift, side by side."""
    out_dir = Path(out_dir)
    names = list(shifts or SHIFTS)
    check_shifts(names)  # before the original subjects' evaluation, not after it
    rows = {"original": _row(evaluate_reconstruction(dataset_dir, out_dir / "original", components, split=split, limit=limit, **evaluate_kw))}
    for name in names:
        data = shifted_dataset(dataset_dir, out_dir / "shifted_data" / name, name, split, limit, seed)
        logger.info("scanner shift %s: evaluating", name)
        rows[name] = _row(evaluate_reconstruction(data, out_dir / name, components, split=split, limit=None, **evaluate_kw))
    save_json({"shifts": {n: describe(SHIFTS[n]) for n in names}, "results": rows},
              out_dir / "shift_report.json")
    with atomic_path(out_dir / "shift_report.md") as tmp:
        tmp.write_text(_markdown(rows))
    return rows


def _markdown(rows: Mapping[str, Any]) -> str:
    methods = list(rows["original"]["single_slice"])
    lines = ["One slice, whole volume: head-only SSIM / PSNR dB", "",
             "| data | " + " | ".join(methods) + " |", "|---|" + "---:|" * len(methods)]
    for name, r in rows.items():
        lines.append(f"| {name} | " + " | ".join(f"{r['single_slice'][m]['ssim_head']:.3f} / {r['single_slice'][m]['psnr']:.2f}"
                                                for m in methods if m in r["single_slice"]) + " |")
    for k in rows["original"]["few_slices"]:
        few = list(rows["original"]["few_slices"][k])
        lines += ["", f"Few slices, {k}: head-only SSIM / PSNR dB", "", "| data | " + " | ".join(few) + " |", "|---|" + "---:|" * len(few)]
        for name, r in rows.items():
            lines.append(f"| {name} | " + " | ".join(f"{r['few_slices'][k][m]['ssim_head']:.3f} / {r['few_slices'][k][m]['psnr']:.2f}"
                                                    for m in few if m in r["few_slices"].get(k, {})) + " |")
    return "\n".join(lines) + "\n"
