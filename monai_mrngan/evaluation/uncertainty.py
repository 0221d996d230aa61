"""Fitting the uncertainty calibration on the validation split, and scoring the map on the test split.

Both reconstruct held-out volumes with MRNGAN exactly as the reconstruction evaluation does (one
slice at each input position, localized and refined when a localizer is given; every k-th slice at
its true position) and compare the signals / predicted error of
:mod:`~monai_mrngan.inference.uncertainty` with the true absolute error over head voxels (true
slice > ``HEAD_THRESHOLD``) of the generated slices.

- :func:`calibrate`: the mrngan bundle's ``calibrate`` step (``configs/calibrate.json``): fits
  :class:`~monai_mrngan.inference.calibration.Calibration` on the validation split and writes it
  beside the weights (``models/uncertainty_calibration.json``);
- :class:`UncertaintyScores`: collected by :func:`~monai_mrngan.evaluation.reconstruction.evaluate_reconstruction`
  from its own MRNGAN reconstructions; ``report()`` is ``report.json["uncertainty"]``: per case
  (``single_slice``, ``k4``, ``k8``) ``spearman_voxel`` (over head voxels), ``spearman_slice``
  (per-slice mean predicted against mean true error over head voxels) and ``reliability`` (ten rows
  ``{"predicted", "true"}``: mean predicted and mean true error per decile of predicted error).
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from ..atlas.bank import sharpness_profile
from ..data.datalist import load_split
from ..data.io import load_volume, pyplot, save_figure
from ..data.positions import HEAD_HEIGHT_MM, HEAD_THRESHOLD, index_for_position, position_step
from ..inference.calibration import FEATURES, Calibration
from ..inference.components import Components
from ..inference.localize import localize
from ..inference.reconstruct import reconstruct_volume, refine_positions
from ..inference.runners import one_pass_gaps
from ..inference.uncertainty import broadcast, track_spread, uncertainty_map, uncertainty_signals
from ..inference.volume import Reconstruction
from ..transforms.scanners import describe_random, simulate_random
from ..transforms.slabs import slabs_at
from .subjects import map_subjects, subject_rng

logger = logging.getLogger(__name__)

__all__ = ["UNCERTAINTY_CASES", "OPTIONAL_SIGNALS", "scored_slices", "head_samples", "UncertaintyScores", "reconstructions", "select_signals", "calibrate",
           "plot_reliability"]

UNCERTAINTY_CASES = ("single_slice", "k4", "k8", "thick_k3")
"""The cases :class:`UncertaintyScores` scores: one slice, every 4th and 8th true slice, and every 3rd slice given as a
3-slice slab (a thick-slice scan: 6 mm slabs on a 2 mm grid), the volume made to agree with the slabs; that case is
scored on the slabs' own slices too (:func:`scored_slices`)."""
DECILES = 10
OPTIONAL_SIGNALS = ("head_area",)
"""Signals the calibrate step keeps only where they rank held-out validation subjects better (:func:`select_signals`):
``head_area`` raised the one-slice slice ranking on IXI (0.676 -> 0.705) and lowered the few-slice one on the demo's
phantoms (k4 0.922 -> 0.890; mrngan docs)."""
SHARPNESS_BAND_PERCENT = 5.0
"""The map is scaled only for a scan whose sharpness lies outside the 5th-95th percentile of the validation subjects'
own (:meth:`~monai_mrngan.inference.calibration.Calibration.sharpness_scale`). From one slice the measure varies
between IXI scans too (one slice's anatomy), and a scale there moved the maps' per-slice ranking from 0.717 to 0.699."""
SELECT_SAMPLES = 1_000_000
"""At most this many samples fit each calibration of :func:`select_signals`. IXI has 2.3 M per fold; fitted on all of
them, the held-out scores moved by < 0.001 (single correlations by up to 0.01), the choice held, and the four fits
took 72 s against 50 s."""


def _head_mask(rec: Reconstruction, target: np.ndarray, scored: np.ndarray | None, head_only: bool) -> tuple[np.ndarray, np.ndarray]:
    """Which voxels count ((H, W, D) bool: the head voxels of the ``scored`` slices, default every non-input slice;
    every voxel of them unless ``head_only``) and the slice index of each (negative, ``-1 - index``, outside the head)."""
    d = rec.volume.shape[2]
    if scored is None:
        scored = np.setdiff1d(np.arange(d), rec.input_indices)
    mask = np.zeros(rec.volume.shape, dtype=bool)
    mask[:, :, scored] = target[:, :, scored] > HEAD_THRESHOLD
    slice_id = np.broadcast_to(np.arange(d), rec.volume.shape)[mask]
    if not head_only:
        head = mask
        mask = np.zeros(rec.volume.shape, dtype=bool)
        mask[:, :, scored] = True
        slice_id = np.where(head, np.arange(d), -1 - np.arange(d))[mask]
    return mask, slice_id


def head_samples(rec: Reconstruction, target: np.ndarray, prior: Any, spacing_mm: float, fit_prior: bool, one_pass: bool,
                 scored: np.ndarray | None = None, head_only: bool = True, stride: int = 1, sharpness_reference: dict | None = None
                 ) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """Signals (flat, per voxel), true absolute error and slice index of every head voxel of the
    generated slices (``scored``: which slices count, default every non-input slice; ``head_only``
    False: every voxel of them, the slice index then negative (``-1 - index``) outside the head).
    ``stride``: the signals of each voxel's in-plane block (:func:`~monai_mrngan.inference.uncertainty.pool_inplane`);
    ``sharpness`` only with a ``sharpness_reference``."""
    mask, slice_id = _head_mask(rec, target, scored, head_only)
    sig = uncertainty_signals(rec, prior, spacing_mm, fit_prior, one_pass, stride, sharpness_reference)
    h, w, _ = rec.volume.shape
    if stride > 1:  # each voxel: its block's signals
        sig = {k: v if v.ndim == 1 else v.repeat(stride, 0).repeat(stride, 1)[:h, :w] for k, v in sig.items()}
    sig = broadcast(sig, rec.volume.shape)
    return {k: np.asarray(v[mask], dtype=np.float32) for k, v in sig.items()}, np.abs(rec.volume - target)[mask], slice_id


class UncertaintyScores:
    """Predicted against true error, collected reconstruction by reconstruction (see the module docstring).

    Voxel-level statistics use a random subsample of ``voxels`` head voxels per reconstruction
    (memory); slice means use every head voxel.
    """

    def __init__(self, calibration: Calibration, voxels: int = 20000, rng: np.random.Generator | None = None):
        self.cal, self.voxels = calibration, int(voxels)
        self.rng = rng if rng is not None else np.random.default_rng(0)
        self.vox: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {c: [] for c in UNCERTAINTY_CASES}
        self.slices: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {c: [] for c in UNCERTAINTY_CASES}

    def merge(self, other: UncertaintyScores) -> None:
        """Append ``other``'s samples (one subject's, collected in a worker) after this one's."""
        for case in UNCERTAINTY_CASES:
            self.vox[case] += other.vox[case]
            self.slices[case] += other.slices[case]

    def add(self, case: str, rec: Reconstruction, target: np.ndarray, prior: Any, spacing_mm: float, fit_prior: bool, one_pass: bool,
            scored: np.ndarray | None = None) -> None:
        mask, sid = _head_mask(rec, target, scored, head_only=True)
        if not mask.any():
            return
        pred = uncertainty_map(rec, prior, self.cal, spacing_mm, fit_prior, one_pass)[mask]  # the map reconstruct writes
        err = np.abs(rec.volume - target)[mask]
        n = np.bincount(sid, minlength=rec.volume.shape[2])
        ok = n > 0
        self.slices[case].append(((np.bincount(sid, pred, len(n))[ok] / n[ok]), (np.bincount(sid, err, len(n))[ok] / n[ok])))
        pick = self.rng.choice(err.size, min(self.voxels, err.size), replace=False)
        self.vox[case].append((pred[pick], err[pick]))

    def report(self) -> dict[str, Any]:
        from scipy.stats import spearmanr

        out: dict[str, Any] = {}
        for case in UNCERTAINTY_CASES:
            if not self.vox[case]:
                continue
            pv, tv = (np.concatenate(x) for x in zip(*self.vox[case]))
            ps, ts = (np.concatenate(x) for x in zip(*self.slices[case]))
            order = np.argsort(pv, kind="stable")
            # float64: a decile of one repeated value has exactly that mean (float32 sums were 1e-8 off and put tied deciles out of order)
            rows = [{"predicted": float(pv[b].mean(dtype=np.float64)), "true": float(tv[b].mean(dtype=np.float64))}
                    for b in np.array_split(order, DECILES) if b.size]
            out[case] = {
                "spearman_voxel": float(spearmanr(pv, tv)[0]),
                "spearman_slice": float(spearmanr(ps, ts)[0]) if ps.size > 2 else float("nan"),
                "reliability": rows,
                "n_voxels": int(pv.size),
                "n_slices": int(ps.size),
            }
        return out


def plot_reliability(scores: dict[str, Any], path: str | os.PathLike) -> None:
    """Mean true against mean predicted error per decile, one line per case, with the diagonal."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5, 5))
    top = 0.0
    for case, s in scores.items():
        x = [r["predicted"] for r in s["reliability"]]
        y = [r["true"] for r in s["reliability"]]
        top = max(top, *x, *y)
        ax.plot(x, y, marker="o", markersize=3, label=f"{case} (rho voxel {s['spearman_voxel']:.2f}, slice {s['spearman_slice']:.2f})")
    ax.plot([0, top], [0, top], "k--", lw=0.8, label="calibrated")
    ax.set_xlabel("predicted absolute error (decile mean)")
    ax.set_ylabel("true absolute error (decile mean)")
    ax.set_title("uncertainty reliability (head voxels)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path, dpi=100)


def scored_slices(given: Sequence[int], slabs: bool) -> np.ndarray:
    """The slices whose map is fitted and scored between the first and the last given slice: the generated ones, and
    with thick-slice inputs (``slabs``) the given ones too, whose output is a thin slice the slabs only constrain."""
    span = np.arange(given[0], given[-1] + 1)
    return span if slabs else np.setdiff1d(span, given)


def reconstructions(entries: Sequence[dict], comp: Components, input_positions: Sequence[float], few_slice_k: Sequence[int],
                    use_loc: bool, refine_window: float, fit_prior: bool, few_slice_fit_prior: bool, t0: float | None = None,
                    thick_slice_k: Sequence[int] = (), progress: bool = True) -> Iterator[tuple[int, str, Reconstruction, np.ndarray, float, bool, np.ndarray | None]]:
    """MRNGAN reconstructions of ``entries`` as the evaluation makes them: one slice at each input
    position (localized and refined with ``use_loc``), then every k-th slice at its true positions, then every k-th
    slice of ``thick_slice_k`` given as the mean of the k slices around it and the volume made to agree with them.
    Yields ``(entry index, case, reconstruction, true volume (H, W, D), spacing mm, prior fitted?, scored slices or None)``
    (case: ``single_slice``, ``k<k>`` or ``thick_k<k>``),
    with the prior's spread kept for the uncertainty signals. An entry with ``"scanner_seed"`` is its volume as a
    scanner drawn by :func:`~monai_mrngan.transforms.scanners.random_scanner` from that seed would have given it
    (prepared again; the truth is that volume too). An entry with ``"thick_slices": false`` skips the thick-slice cases.
    ``progress``: log each finished entry."""
    gap_kw = dict(method="mrngan", model=comp.model, next_fn=comp.next_fn, prior=comp.prior, device=comp.device)
    t0 = time.time() if t0 is None else t0
    for n, entry in enumerate(entries, 1):  # n - 1: the entry's index
        vol, _ = load_volume(entry["image"])
        if entry.get("scanner_seed") is not None:
            vol = simulate_random(vol, int(entry["scanner_seed"]))[0]
        pos = np.asarray(entry["positions"], dtype=np.float64)
        step_p = position_step(pos)
        spacing = abs(step_p) * HEAD_HEIGHT_MM
        depth = vol.shape[2]
        target = torch.from_numpy(np.ascontiguousarray(np.moveaxis(vol, 2, 0)))[:, None]
        kw = dict(step_p=step_p, num_slices=depth, **gap_kw)
        with track_spread(comp.prior):
            for p_in in input_positions:
                i0 = index_for_position(pos, p_in)
                x = target[i0 : i0 + 1]
                p0 = float(pos[i0])
                if use_loc:
                    p0 = float(refine_positions(comp.prior, x, localize(comp.localizer, x.to(comp.device)).cpu().reshape(-1)[:1], refine_window)[0])
                yield n - 1, "single_slice", reconstruct_volume(x, [p0], input_indices=[i0], fit_prior=fit_prior, **kw), vol, spacing, fit_prior, None
            thick_k = thick_slice_k if entry.get("thick_slices", True) else ()
            for k, thick in [(k, False) for k in few_slice_k] + [(k, True) for k in thick_k]:
                given = list(range(0, depth, k))
                if len(given) < 2:
                    continue
                x = slabs_at(torch.from_numpy(vol), given, k)[:, None] if thick else target[given]
                rec = reconstruct_volume(x, pos[given].tolist(), input_indices=given, fit_prior=few_slice_fit_prior,
                                         slab_mm=k * spacing if thick else 0.0, **kw)
                yield n - 1, f"thick_k{k}" if thick else f"k{k}", rec, vol, spacing, few_slice_fit_prior, scored_slices(given, thick)
        if progress:
            logger.info("uncertainty: %d/%d subjects (%s), %.0f s", n, len(entries), entry.get("subject", ""), time.time() - t0)


def _held_out_score(cal: Calibration, signals: dict[str, np.ndarray], err: np.ndarray, group: np.ndarray, slice_id: np.ndarray,
                    case: np.ndarray, case_names: Sequence[str]) -> dict[str, float]:
    """Per case (``case``: indices into ``case_names``), Spearman of predicted against true error over the samples'
    head voxels and over their slices (means over each reconstruction's sampled head voxels of a slice); ``score``:
    the mean of them all."""
    from scipy.stats import spearmanr

    pred = cal.predict(signals)
    out: dict[str, float] = {}
    for c in np.unique(case):
        m = (case == c) & (slice_id >= 0)
        if m.sum() < 3:
            continue
        _, key = np.unique(group[m] * (int(slice_id.max()) + 1) + slice_id[m], return_inverse=True)
        n = np.bincount(key)
        name = case_names[int(c)]
        out[f"{name}_voxel"] = float(spearmanr(pred[m], err[m])[0])
        out[f"{name}_slice"] = float(spearmanr(np.bincount(key, pred[m]) / n, np.bincount(key, err[m]) / n)[0]) if n.size > 2 else float("nan")
    vals = [v for v in out.values() if np.isfinite(v)]
    out["score"] = float(np.mean(vals)) if vals else float("nan")
    return out


def select_signals(signals: dict[str, np.ndarray], err: np.ndarray, subject: np.ndarray, group: np.ndarray, slice_id: np.ndarray,
                   case: np.ndarray, case_names: Sequence[str], optional: Sequence[str] = OPTIONAL_SIGNALS,
                   features: Sequence[str] = FEATURES, folds: int = 2, hidden: Sequence[int] = (16, 16), seed: int = 0,
                   max_samples: int = SELECT_SAMPLES, workers: int = 1, device: str | torch.device = "cpu") -> tuple[list[str], dict[str, Any]]:
    """``features`` less each ``optional`` signal that does not rank held-out subjects better.

    Per sample: ``subject`` (index), ``group`` (its reconstruction), ``slice_id`` (negative outside the head, as
    :func:`head_samples` gives it) and ``case`` (index into ``case_names``). The subjects are split into ``folds``
    (by index); each fold is scored (:func:`_held_out_score`: the mean of the voxel and slice Spearman correlations
    of each case) by calibrations fitted on the other folds (at most ``max_samples`` samples) with every feature and
    with each optional signal left out. A signal whose absence scores
    higher, averaged over the folds, is dropped. Returns the kept features and the record of the scores (the
    calibration's ``info["selection"]``); with fewer than two subjects nothing is dropped. ``workers``: fits run at
    once, one forked single-threaded process each (:func:`~monai_mrngan.evaluation.subjects.map_subjects`; each fit is
    seeded and single-threaded, so the record is the same for any number; one process when ``device`` is not the CPU).
    """
    features = list(features)
    optional = [o for o in optional if o in features]
    subjects, rank = np.unique(subject, return_inverse=True)  # rank: each sample's subject among the sorted subjects
    if not optional or subjects.size < 2:
        return features, {"optional": optional, "kept": optional, "reason": "fewer than two subjects" if optional else "no optional signal"}
    folds = min(int(folds), subjects.size)
    fold = rank.reshape(-1) % folds
    rng = np.random.default_rng(seed)
    variants = {"all": features, **{f"without {o}": [f for f in features if f != o] for o in optional}}
    jobs = []  # (variant, train samples, test samples): every fold's subsample drawn here, in fold order
    for f in range(folds):
        train, test = np.nonzero(fold != f)[0], np.nonzero(fold == f)[0]
        if train.size > max_samples:
            train = np.sort(rng.choice(train, max_samples, replace=False))
        jobs += [(name, train, test) for name in variants]

    def fit_and_score(_: int, job: tuple[str, np.ndarray, np.ndarray]) -> dict[str, float]:
        name, train, test = job
        cal = Calibration.fit({k: v[train] for k, v in signals.items()}, err[train], features=variants[name], hidden=hidden, seed=seed)
        return _held_out_score(cal, {k: v[test] for k, v in signals.items()}, err[test], group[test], slice_id[test], case[test], case_names)

    scores: dict[str, list[dict[str, float]]] = {v: [] for v in variants}
    for (name, _, _), score in zip(jobs, map_subjects(fit_and_score, jobs, workers, device)):
        scores[name].append(score)
    mean = {name: float(np.mean([s["score"] for s in rows])) for name, rows in scores.items()}
    kept = [o for o in optional if mean["all"] >= mean[f"without {o}"]]
    logger.info("uncertainty: held-out score with every signal %.4f; %s", mean["all"],
                ", ".join(f"without {o} {mean[f'without {o}']:.4f} ({'kept' if o in kept else 'dropped'})" for o in optional))
    record = {"optional": optional, "kept": kept, "folds": folds, "score": mean,
              "per_fold": {name: [{k: round(v, 4) for k, v in s.items()} for s in rows] for name, rows in scores.items()}}
    return [f for f in features if f not in optional or f in kept], record


def calibrate(
    dataset_dir: str | os.PathLike,
    components: Components,
    out_path: str | os.PathLike,
    split: str = "validation",
    input_positions: Sequence[float] = (0.3, 0.5, 0.7),
    few_slice_k: Sequence[int] = (4, 8),
    thick_slice_k: Sequence[int] = (3,),
    localize_inputs: bool = True,
    refine_window: float = 0.12,
    fit_prior: bool = True,
    few_slice_fit_prior: bool = False,
    limit: int | None = None,
    voxels: int = 50000,
    seed: int = 0,
    hidden: Sequence[int] = (16, 16),
    stride: int = 2,
    optional: Sequence[str] = OPTIONAL_SIGNALS,
    folds: int = 2,
    augment: int = 0,
    thick_subjects: int | None = None,
    workers: int = 1,
) -> Calibration:
    """Fit the uncertainty calibration on ``split`` (MRNGAN reconstructions as in the evaluation) and write it to ``out_path``.

    ``voxels``: head voxels sampled per reconstruction, and a quarter as many outside the head (true
    slice <= ``HEAD_THRESHOLD``), so the map also holds in the air around it. ``hidden``: the widths of
    the correction network over the log-linear model (empty: log-linear alone). ``thick_slice_k``: the thick-slice
    cases it also sees (every k-th slice given as a k-slice slab, the volume made to agree with the slabs, as
    ``evaluate`` and ``reconstruct --stack`` make it); the fit learns from them how much that step lowers the error
    (the ``slab_change`` and ``slab_mm`` signals); () leaves those signals out. ``thick_subjects``: only the first that many of
    the split's subjects (None: all) get the thick-slice cases, each of which costs about as much as
    the rest of its subject's reconstructions (a fitted prior per slab); the scanner-augmented copies never do (their
    power would otherwise be fitted on slab inputs too, smoother than any scanner's slices). ``stride``: the voxel signals'
    in-plane block size (the maps it makes are predicted on that grid). ``optional``: signals kept only where they
    rank held-out subjects better, over ``folds`` folds of the split's subjects (:func:`select_signals`; none: every
    signal). ``augment``: that many of the split's subjects (every other one first, ``augment`` at most) are also
    reconstructed as a scanner drawn at random would have given them (:func:`~monai_mrngan.transforms.scanners.random_scanner`,
    seeded), and the map fitted on the split is then scaled by a power of how far a scan's ``sharpness`` (against the
    atlas bank's, :func:`~monai_mrngan.atlas.bank.sharpness_profile`, stored in the calibration) lies outside the
    originals' range (:data:`SHARPNESS_BAND_PERCENT`), the power fitted on the copies and the originals
    (:meth:`~monai_mrngan.inference.calibration.Calibration.fit_sharpness_power`): fitted on
    one scanner alone, the map over-predicted a smoother scan's error by up to 40 % (mrngan docs). 0: no copies, no
    scaling. ``workers``: subjects reconstructed at once, one forked single-threaded process each
    (:func:`~monai_mrngan.evaluation.subjects.map_subjects`; CPU only); each subject's voxel samples are drawn by its
    own generator (:func:`~monai_mrngan.evaluation.subjects.subject_rng`), so the fit is the same for any number.
    Returns the calibration (its ``info`` holds the fit's settings, the augmented copies, the selection's
    scores and its Spearman correlation on the samples it was fitted on).
    """
    comp = components
    if comp.model is None or comp.next_fn is None or comp.prior is None:
        raise ValueError("calibrating the uncertainty needs the trained mrngan, flow and prior stages")
    entries = load_split(dataset_dir, split, limit)
    if not entries:
        raise ValueError(f"{dataset_dir}: split {split!r} is empty; the calibration is fitted on it")
    originals = len(entries)
    order = list(range(0, originals, 2)) + list(range(1, originals, 2))  # every other subject first
    # the first ones: both folds of the signal selection (every other subject) hold some
    thick = set(range(originals if thick_subjects is None else max(0, int(thick_subjects))))
    copies = [{**entries[i], "scanner_seed": seed + 1000 + i, "thick_slices": False} for i in order[: max(0, int(augment))]]
    entries = [{**e, "thick_slices": i in thick} for i, e in enumerate(entries)] + copies
    reference = None
    if copies:
        grid = comp.prior.positions.cpu().numpy()
        reference = {"p": [float(v) for v in grid], "value": [float(v) for v in np.nan_to_num(sharpness_profile(comp.prior.bank), nan=0.0)]}
    use_loc = localize_inputs and comp.localizer is not None
    one_pass = one_pass_gaps(comp.model)
    sig_parts, err_parts, id_parts = [], [], []  # id_parts: (subject, reconstruction, slice id, case) per sample
    copy_parts: list[tuple[dict[str, np.ndarray], np.ndarray]] = []  # the copies' samples: only for the sharpness power
    case_names: list[str] = []

    def subject(index: int, entry: dict) -> list[tuple[str, dict[str, np.ndarray], np.ndarray, np.ndarray]]:
        """(case, signals, true error, slice id) of the voxels sampled from each of one subject's reconstructions."""
        rng = subject_rng(seed, index)
        out = []
        for _, case, rec, vol, spacing, fitted, scored in reconstructions([entry], comp, input_positions, few_slice_k, use_loc, refine_window,
                                                                          fit_prior, few_slice_fit_prior, thick_slice_k=thick_slice_k, progress=False):
            sig, err, sid = head_samples(rec, vol, comp.prior, spacing, fitted, one_pass, scored, head_only=False, stride=stride,
                                         sharpness_reference=reference)
            head, air = np.nonzero(sid >= 0)[0], np.nonzero(sid < 0)[0]
            pick = np.concatenate([rng.choice(head, min(voxels, head.size), replace=False),
                                   rng.choice(air, min(voxels // 4, air.size), replace=False)])
            out.append((case, {k: v[pick] for k, v in sig.items()}, err[pick], sid[pick]))
        return out

    t0 = time.time()
    group = 0  # each reconstruction's index over the whole split
    for n, samples in enumerate(map_subjects(subject, entries, workers, comp.device)):
        for case, sig, err, sid in samples:
            if n >= originals:
                copy_parts.append((sig, err))
            else:
                sig_parts.append(sig)
                err_parts.append(err)
                if case not in case_names:
                    case_names.append(case)
                id_parts.append(np.stack(np.broadcast_arrays(n, group, sid, case_names.index(case))))
            group += 1
        logger.info("uncertainty: %d/%d subjects (%s), %.0f s", n + 1, len(entries), entries[n].get("subject", ""), time.time() - t0)
    signals = {k: np.concatenate([s[k] for s in sig_parts]) for k in sig_parts[0]}  # FEATURES, and sharpness with copies
    err = np.concatenate(err_parts)
    subject, group, slice_id, case = np.concatenate(id_parts, 1)
    features, selection = select_signals(signals, err, subject, group, slice_id, case, case_names, optional, folds=folds, hidden=hidden,
                                         seed=seed, workers=workers, device=comp.device)
    info = {"split": split, "subjects": [e.get("subject") for e in entries[:originals]], "input_positions": list(input_positions),
            "few_slice_k": list(few_slice_k), "thick_slice_k": list(thick_slice_k),
            "thick_subjects": [e.get("subject") for e in entries[:originals] if e["thick_slices"]] if thick_slice_k else [], "localized_inputs": use_loc, "fit_prior": fit_prior, "few_slice_fit_prior": few_slice_fit_prior,
            "samples": int(err.size), "method": "mrngan", "units": "absolute error in [0, 1] output intensity", "mask": f"head voxels (true > {HEAD_THRESHOLD}) and a quarter as many outside", "hidden": [int(h) for h in hidden], "stride": int(stride),
            "selection": selection}
    cal = Calibration.fit(signals, err, info=info, features=features, hidden=hidden, seed=seed)
    cal.stride = int(stride)
    if copy_parts:
        both = {k: np.concatenate([signals[k]] + [c[0][k] for c in copy_parts]) for k in {*features, "sharpness", "slab_mm"}}
        # the originals' own range (5th-95th percentile of their samples, the thick-slice cases left out: their slab means
        # are smoother than any scanner's slices, and their maps are never scaled): inside it a scan's map stays as fitted
        thin = signals["sharpness"][signals["slab_mm"] == 0]
        band = np.percentile(thin, [SHARPNESS_BAND_PERCENT, 100 - SHARPNESS_BAND_PERCENT])
        cal.fit_sharpness_power(both, np.concatenate([err] + [c[1] for c in copy_parts]), band=band)
        cal.sharpness_reference = reference
        cal.info["augmented"] = [{"subject": e.get("subject"), "scanner": describe_random(e["scanner_seed"])} for e in copies]
        cal.info["augmented_samples"] = int(sum(c[1].size for c in copy_parts))
    from scipy.stats import spearmanr

    cal.info["spearman_voxel_fit"] = float(spearmanr(cal.predict(signals), err)[0])
    cal.info["mean_abs_error"] = float(err.mean())
    cal.info["seconds"] = round(time.time() - t0, 1)
    cal.save(out_path)
    logger.info("uncertainty calibration written to %s (%d samples, weights %s, sharpness power %.3f from %d scanner-augmented copies)", out_path,
                err.size, [round(w, 3) for w in cal.weights], cal.sharpness_power, len(copies))
    return cal
