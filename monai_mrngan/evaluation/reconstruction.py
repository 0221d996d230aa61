"""Evaluation of whole-volume reconstruction on held-out subjects, MRNGAN against its baselines.

One run of :func:`evaluate_reconstruction` does both of issue 6's experiments:

- single slice: for each input position (default p = 0.3, 0.5, 0.7) the true slice nearest to it
  is given and every method reconstructs the whole volume on the subject's own grid; every other
  slice is scored, grouped by its distance ``d`` (in slices) from the input;
- few slices: every k-th true slice is given (default k = 2, 4, 8, 16; indices 0, k, 2k, ...) with
  its true position and the slices strictly between the first and the last given one that were
  not given are scored; MRNGAN against linear, monotone cubic (PCHIP) and registration-based interpolation;
- thick slices: as few slices, but each given slice is the mean of the k slices around it (default k = 3: contiguous
  6 mm slabs on a 2 mm grid, :func:`~monai_mrngan.transforms.slabs.slab_mean`), as a thick-slice scan records them,
  and the missing slices are scored against the sharp truth. Every method's volume is made to agree with the slabs, as
  ``reconstruct --stack`` does (``slab_mm``); ``linear_plain`` and ``cubic_plain`` are the two interpolations without
  that step, as a user would run them.

Outputs in ``out_dir``: ``report.json`` (``single_slice.methods.<method>`` with ``by_distance``,
``few_slices.k<k>.<method>``, ``thick_slices.k<k>.<method>``), ``report_meta.json`` (what was run: subjects, positions,
localization error), ``per_distance.csv``, ``distance_<metric>.png`` per metric,
``uncertainty_reliability.png`` (with a calibration: ``report.json["uncertainty"]``, see
:mod:`~monai_mrngan.evaluation.uncertainty`, scored on the MRNGAN reconstructions), and TensorBoard
scalars (``single_slice/<metric>/<method>`` with step ``d``). ``per_distance.csv`` rows are keyed
by ``setting`` (``single``, ``k<k>`` or ``thick_k<k>``), ``method`` and ``d``: the distance in slices from the
input slice (single) or from the nearest given slice (few slices, 1 .. k // 2).
Metrics come from :func:`monai_mrngan.metrics.slice_metrics` ([0,1] data, data range 1).
"""

from __future__ import annotations

import csv
import logging
import os
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from ..atlas.registration import shared_registrations
from ..data.datalist import load_split
from ..data.io import atomic_path, load_volume, pyplot, save_figure, save_json
from ..data.positions import HEAD_HEIGHT_MM, index_for_position, position_step
from ..inference.components import Components
from ..inference.localize import localize
from ..inference.reconstruct import reconstruct_volume, refine_positions
from ..inference.runners import make_runner, one_pass_gaps
from ..inference.uncertainty import track_spread
from ..metrics import METRIC_NAMES, pool_rows, slice_metrics, summarize
from ..transforms.slabs import slabs_at
from .subjects import map_subjects, subject_rng
from .uncertainty import UncertaintyScores, plot_reliability, scored_slices

logger = logging.getLogger(__name__)

__all__ = ["evaluate_reconstruction", "SINGLE_METHODS", "FEW_METHODS", "FEW_SLICE_K", "THICK_SLICE_K"]

SINGLE_METHODS = ("mrngan", "pix2pix_iterative", "prior", "copy")
FEW_METHODS = ("mrngan", "linear", "cubic", "registration")
FEW_SLICE_K = (2, 4, 8, 16)
THICK_SLICE_K = (3,)
PLAIN = "_plain"
"""Suffix of a thick-slice case's interpolation run as a user would run it: through the slabs, not made to agree with them."""


def _available(methods: Sequence[str], comp: Components) -> list[str]:
    ok = []
    for m in methods:
        try:
            make_runner(m, model=comp.model, next_fn=comp.next_fn, prior=comp.prior)
            ok.append(m)
        except ValueError as err:
            logger.warning("skipping %s: %s", m, err)
    return ok


def _summary(values: dict[str, torch.Tensor]) -> dict[str, float]:
    s = summarize({k: values[k] for k in METRIC_NAMES})
    return {k: s[k] for k in METRIC_NAMES}


def evaluate_reconstruction(
    dataset_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    components: Components | None = None,
    split: str = "test",
    methods: Sequence[str] = SINGLE_METHODS,
    input_positions: Sequence[float] = (0.3, 0.5, 0.7),
    few_slice_k: Sequence[int] = FEW_SLICE_K,
    few_slice_methods: Sequence[str] = FEW_METHODS,
    localize_inputs: bool = True,
    refine_window: float = 0.12,
    fit_prior: bool = True,
    few_slice_fit_prior: bool = True,
    limit: int | None = None,
    tensorboard: bool = True,
    calibration: Any = None,
    thick_slice_k: Sequence[int] = THICK_SLICE_K,
    workers: int = 1,
) -> dict[str, Any]:
    """Run the single-slice and few-slice evaluations on ``split`` and write the report files.

    Args:
        components: trained stages; a method whose components are missing is skipped (logged).
        localize_inputs: single-slice inputs get their position from ``components.localizer``
            (when there is one); otherwise the true position is used.
        refine_window: localized positions are refined by the prior's atlas matching within this
            window in ``p`` (:func:`~monai_mrngan.inference.reconstruct.refine_positions`; 0: the localizer's alone).
        fit_prior: fit the prior to the input slice (``prior`` baseline and MRNGAN alike).
        few_slice_fit_prior: also fit it to every given slice in the few-slice experiment, as
            ``reconstruct`` does (one batched fit of the given slices, warping only each gap's
            slices); False scores the cell with the plain mean prior, which a cell trained on the
            fitted-prior cache never saw.
        limit: evaluate only the first N subjects of the split.
        calibration: the uncertainty calibration to score (default ``components.calibration``); none:
            ``report.json["uncertainty"]`` is null.
        thick_slice_k: the thick-slice cases: every k-th slice given as the mean of the k slices around it (a
            slab as thick as the spacing), the few-slice methods filling the rest; () for none.
        workers: subjects evaluated at once, one forked single-threaded process each
            (:func:`~monai_mrngan.evaluation.subjects.map_subjects`; CPU only); the report is the same for any number.
    Returns the ``report.json`` dictionary.
    """
    comp = components or Components()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    entries = load_split(dataset_dir, split, limit)
    if not entries:
        raise ValueError(f"{dataset_dir}: split {split!r} is empty")
    single = _available(methods, comp)
    few = _available(few_slice_methods, comp)
    use_loc = localize_inputs and comp.localizer is not None
    by_d: dict[str, dict[int, list[dict[str, torch.Tensor]]]] = {m: {} for m in single}
    # (report section, k, per_distance.csv setting and uncertainty case name) of each given-slices case
    cases = [("few_slices", k, f"k{k}") for k in few_slice_k] + [("thick_slices", k, f"thick_k{k}") for k in thick_slice_k]
    few_rows: dict[tuple, dict[str, list]] = {c: {m: [] for m in _case_methods(c[0], few)} for c in cases}
    few_by_d: dict[tuple, dict[str, dict[int, list]]] = {c: {m: {} for m in _case_methods(c[0], few)} for c in cases}
    loc_err, raw_err, spacing = [], [], None
    cal = calibration if calibration is not None else getattr(comp, "calibration", None)
    unc = UncertaintyScores(cal) if cal is not None and "mrngan" in single + few else None
    one_pass = one_pass_gaps(comp.model)

    def subject(index: int, entry: dict) -> dict[str, Any]:
        """One subject's metrics (and uncertainty samples): what the loop below pools, small enough to come back from a worker."""
        vol, _ = load_volume(entry["image"])
        pos = np.asarray(entry["positions"], dtype=np.float64)
        step_p = position_step(pos)
        depth = vol.shape[2]
        spacing = abs(step_p) * HEAD_HEIGHT_MM
        out: dict[str, Any] = {"spacing": spacing, "single": [], "few": [], "loc_err": [], "raw_err": [],
                               "unc": UncertaintyScores(cal, rng=subject_rng(0, index)) if unc is not None else None}
        target = torch.from_numpy(np.ascontiguousarray(np.moveaxis(vol, 2, 0)))[:, None]  # (D,1,H,W)
        kw = dict(model=comp.model, next_fn=comp.next_fn, prior=comp.prior, step_p=step_p, num_slices=depth, device=comp.device)
        for p_in in input_positions:
            i0 = index_for_position(pos, p_in)
            x = target[i0 : i0 + 1]
            p0 = float(pos[i0])
            if use_loc:
                p0 = float(localize(comp.localizer, x.to(comp.device)).reshape(-1)[0])
                out["raw_err"].append(abs(p0 - float(pos[i0])))
                p0 = float(refine_positions(comp.prior, x, [p0], refine_window)[0])
                out["loc_err"].append(abs(p0 - float(pos[i0])))
            d = torch.as_tensor(np.abs(np.arange(depth) - i0))
            keep = d > 0
            for m in single:
                with track_spread(comp.prior, out["unc"] is not None and m == "mrngan"):
                    rec = reconstruct_volume(x, [p0], method=m, input_indices=[i0], fit_prior=fit_prior, **kw)
                if out["unc"] is not None and m == "mrngan":
                    out["unc"].add("single_slice", rec, vol, comp.prior, spacing, fit_prior, one_pass)
                pred = torch.from_numpy(np.moveaxis(rec.volume, 2, 0))[:, None]
                out["single"].append((m, d[keep], slice_metrics(pred[keep], target[keep])))
        sharp = torch.from_numpy(vol)
        for case in cases:
            section, k, setting = case
            given = list(range(0, depth, k))
            if len(given) < 2:
                continue
            inputs = target[given] if section == "few_slices" else slabs_at(sharp, given, k)[:, None]
            missing = torch.as_tensor(scored_slices(given, slabs=False))
            near = torch.as_tensor(np.abs(missing.numpy()[:, None] - np.asarray(given)[None]).min(1))  # to the nearest given slice
            with shared_registrations():  # the cell and the registration baseline fill the same gaps
                for m in _case_methods(section, few):
                    scored = out["unc"] is not None and m == "mrngan" and setting in out["unc"].vox
                    slab = k * spacing if section == "thick_slices" and not m.endswith(PLAIN) else 0.0  # made to agree with the slabs
                    with track_spread(comp.prior, scored):
                        rec = reconstruct_volume(inputs, pos[given].tolist(), method=m.removesuffix(PLAIN), input_indices=given,
                                                 fit_prior=few_slice_fit_prior, slab_mm=slab, **kw)
                    if scored:
                        out["unc"].add(setting, rec, vol, comp.prior, spacing, few_slice_fit_prior, one_pass, scored_slices(given, slabs=section == "thick_slices"))
                    pred = torch.from_numpy(np.moveaxis(rec.volume, 2, 0))[:, None]
                    out["few"].append((case, m, near, slice_metrics(pred[missing], target[missing])))
        return out

    t0 = time.time()
    for n, res in enumerate(map_subjects(subject, entries, workers, comp.device), 1):
        spacing = spacing or res["spacing"]
        loc_err += res["loc_err"]
        raw_err += res["raw_err"]
        if unc is not None:
            unc.merge(res["unc"])
        for m, d, met in res["single"]:
            for dist in torch.unique(d).tolist():
                sel = d == dist
                by_d[m].setdefault(int(dist), []).append({k: v[sel] for k, v in met.items()})
        for case, m, near, met in res["few"]:
            few_rows[case][m].append(met)
            for dist in torch.unique(near).tolist():
                few_by_d[case][m].setdefault(int(dist), []).append({key: v[near == dist] for key, v in met.items()})
        logger.info("reconstruction eval: %d/%d subjects (%s), %.0f s", n, len(entries), entries[n - 1].get("subject", ""), time.time() - t0)

    report: dict[str, Any] = {"single_slice": {"methods": {}}, "few_slices": {}, "thick_slices": {}}
    csv_rows = []
    for m in single:
        all_rows = [r for rows in by_d[m].values() for r in rows]
        entry = _summary(pool_rows(all_rows))
        entry["by_distance"] = []
        for dist in sorted(by_d[m]):
            pooled = pool_rows(by_d[m][dist])
            s = _summary(pooled)
            entry["by_distance"].append({"d": dist, **s})
            csv_rows.append({"setting": "single", "method": m, "d": dist, "d_mm": round(dist * (spacing or 0.0), 3), "n": int(pooled["mse"].numel()), **s})
        report["single_slice"]["methods"][m] = entry
    for case in cases:
        section, k, setting = case
        if few and not few_rows[case][few[0]]:  # no subject had two given slices at this spacing
            continue
        report[section][f"k{k}"] = {m: _summary(pool_rows(few_rows[case][m])) for m in few_rows[case]}
        for m in few_rows[case]:
            for dist in sorted(few_by_d[case][m]):
                pooled = pool_rows(few_by_d[case][m][dist])
                csv_rows.append({"setting": setting, "method": m, "d": dist, "d_mm": round(dist * (spacing or 0.0), 3), "n": int(pooled["mse"].numel()), **_summary(pooled)})
    report["uncertainty"] = unc.report() if unc is not None else None
    if report["uncertainty"]:
        plot_reliability(report["uncertainty"], out_dir / "uncertainty_reliability.png")
    save_json(report, out_dir / "report.json")
    save_json(
        {
            "dataset_dir": str(dataset_dir),
            "split": split,
            "subjects": [e.get("subject") for e in entries],
            "input_positions": list(input_positions),
            "few_slice_k": list(few_slice_k),
            "thick_slice_k": list(thick_slice_k),
            "localized_inputs": use_loc,
            "localization_abs_error_mean": float(np.mean(loc_err)) if loc_err else None,
            "localizer_abs_error_mean": float(np.mean(raw_err)) if raw_err else None,
            "refine_window": refine_window if use_loc else None,
            "fit_prior": fit_prior,
            "few_slice_fit_prior": few_slice_fit_prior,
            "slice_spacing_mm": spacing,
            "seconds": round(time.time() - t0, 1),
        },
        out_dir / "report_meta.json",
    )
    _write_csv(csv_rows, out_dir / "per_distance.csv")
    _plot(report, out_dir, spacing)
    if tensorboard:
        _tensorboard(report, out_dir)
    return report


def _case_methods(section: str, few: Sequence[str]) -> list[str]:
    """The methods of one given-slices case: the thick-slice cases also score linear and cubic interpolation as a user
    would run them, through the slabs without making the volume agree with them (``<method>_plain``)."""
    return list(few) + ([m + PLAIN for m in ("linear", "cubic") if m in few] if section == "thick_slices" else [])


def _write_csv(rows: list[dict], path: Path) -> None:
    fields = ["setting", "method", "d", "d_mm", "n", *METRIC_NAMES]
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for r in rows:
            writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})


def _plot(report: dict, out_dir: Path, spacing: float | None) -> None:
    plt = pyplot()
    methods = report["single_slice"]["methods"]
    for metric in METRIC_NAMES:
        fig, ax = plt.subplots(figsize=(6, 4))
        for m, entry in methods.items():
            ds = [r["d"] for r in entry["by_distance"]]
            ax.plot(ds, [r[metric] for r in entry["by_distance"]], label=m, marker=".", markersize=3)
        ax.set_xlabel("distance from the input slice (slices" + (f", {spacing:.3g} mm each)" if spacing else ")"))
        ax.set_ylabel(metric)
        ax.set_title(f"{metric} against distance from the input slice")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        save_figure(fig, out_dir / f"distance_{metric}.png", dpi=100)


def _tensorboard(report: dict, out_dir: Path) -> None:
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(str(out_dir)) as writer:
        for m, entry in report["single_slice"]["methods"].items():
            for r in entry["by_distance"]:
                for metric in METRIC_NAMES:
                    writer.add_scalar(f"single_slice/{metric}/{m}", r[metric], r["d"])
            for metric in METRIC_NAMES:
                writer.add_scalar(f"single_slice_mean/{metric}/{m}", entry[metric], 0)
        for section in ("few_slices", "thick_slices"):
            for k, methods in report[section].items():
                for m, s in methods.items():
                    for metric in METRIC_NAMES:
                        writer.add_scalar(f"{section}_{k}/{metric}/{m}", s[metric], 0)
