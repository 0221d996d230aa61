"""How far to trust each voxel of a reconstruction: a calibrated map of its expected absolute error.

Signals per generated voxel (:func:`uncertainty_signals`), all computed from what the run already has:

- ``spread``: how much the kept warped atlases disagree there (their per-voxel standard deviation
  around the fitted prior, :meth:`~monai_mrngan.atlas.prior.BrainPrior.spread_at`);
- ``spread_local``: ``spread`` averaged over its neighbourhood (Gaussian, 2 px in-plane, 1 slice
  axially, :func:`neighbourhood`): a voxel near atlases that disagree is at risk too, as an edge a
  few pixels off lands on it (on IXI it raised the voxel and slice ranking in every case);
- ``distance_mm``: distance to the nearest real slice (the provenance map);
- ``gap_mm``: the width of the bounded gap between the two real slices around the voxel's slice
  (0 beyond the outermost real slices: an open run, whose error ``distance_mm`` carries), so every
  8th slice given is told apart from every 4th at the same distance;
- ``disagreement``: ``|output - prior|``, how far the cell moved away from the prior (towards
  pix2pix, the previous slice or the far end);
- ``prior_weight``: the MRNGAN cell's mean weight on the prior for that slice (0 for other methods);
- ``run_spread``: inside a gap filled from both ends, how much the two runs disagree there
  (``|a - b|``, from :func:`~monai_mrngan.inference.volume.fill_volume`); 0 where one run fills it
  (beyond the outermost real slices, one slice given, or a cell that fills a gap in one pass);
- ``candidate_spread``: how much the slices the MRNGAN cell blends disagree where it trusts them,
  ``sum_i w_i |c_i - output|`` over its candidates (previous output, pix2pix, prior, far end) with its
  blend weights ``w_i``, per pixel and step (runs blended like the slices; 0 for other methods);
- ``intensity``: the output itself (error scales with tissue brightness; air is nearly exact);
- ``misfit_xy``: how far the fitted prior misses the real slice a voxel's run started from, at the
  voxel's in-plane place: ``disagreement`` on that input slice (``|input - fitted prior|`` at its
  position), Gaussian-smoothed in-plane (:data:`MISFIT_SIGMA_PX`, :func:`neighbourhood`) and carried along the axial axis to every slice that input's prior serves
  (a region where the atlases miss this head at the input, e.g. larger ventricles, tends to stay
  missed in the slices around it; a noisy or differently contrasted input raises it everywhere);
- ``head_area``: per slice, the share of the in-plane field the output's head covers (> ``HEAD_THRESHOLD``): on IXI a
  voxel of a large mid-brain section erred more than one near the crown or neck with the same voxel signals (mrngan docs);
- ``edge_xy``: the output's in-plane gradient magnitude (Gaussian, 1 px): errors gather at tissue
  boundaries, where a slightly misplaced edge costs the most. (Its predecessor ``edge`` was scipy's
  ``gaussian_gradient_magnitude`` with sigma 0 along the axial axis, which skips that axis's
  derivative and so added the smoothed intensity itself: 0.7 on a flat 0.7 volume. Calibrations
  fitted on it are not used; the calibrate step refits one.)

:class:`Calibration` maps them to the expected absolute error in output intensity units: a
log-linear model ``exp(b + sum_i w_i f_i)`` with ``w_i >= 0`` on increasing transforms ``f_i`` of
the signals (so more of any signal, alone, predicts no less error), fitted by Poisson deviance (its
fitted mean matches the mean error); optionally (``hidden``, the calibrate step's default) a small
network on the same transforms adds a correction to that log prediction, fitted by the same deviance
from zero (it learns what a sum of monotone terms cannot: how the signals interact, e.g. atlas spread
counting differently beside one slice than inside a short gap); then a monotone (isotonic)
recalibration of the prediction against the binned true error. It is fitted on the validation split
after MRNGAN training (:func:`monai_mrngan.evaluation.uncertainty.calibrate`) and stored as JSON
beside the weights.

The voxel signals may be computed on a coarser in-plane grid (the calibration's ``stride``: means over
``stride`` x ``stride`` blocks, :func:`pool_inplane`); the predicted error is then brought back to the
volume's grid bilinearly (:func:`upsample_inplane`). Expected error varies smoothly, so on IXI a stride of 2
ranked voxels and slices as well as the full grid at about half the map's cost (mrngan docs).
"""

from __future__ import annotations

import logging
import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from ..atlas.registration import torch_threads
from ..data.io import InputError, save_json
from ..data.positions import HEAD_THRESHOLD
from .volume import Reconstruction

logger = logging.getLogger(__name__)

__all__ = ["FEATURES", "MAP_STORED", "CALIBRATION_NAME", "MISFIT_SIGMA_PX", "Calibration", "uncertainty_signals", "uncertainty_map", "slice_means",
           "pool_inplane", "upsample_inplane", "load_calibration", "neighbourhood", "track_spread"]

FEATURES = ("spread", "spread_local", "distance_mm", "gap_mm", "disagreement", "prior_weight", "run_spread", "intensity", "edge_xy", "misfit_xy",
            "candidate_spread", "head_area")
RETIRED = {"edge": "its 'edge' signal held the intensity too"}
"""Signals a calibration may have been fitted on that are no longer computed, and why."""
MAP_STORED = np.uint8
"""How an uncertainty map is stored in its NIfTI: scaled uint8 (``scl_slope``, the map's maximum / 255), within half a
step of the float map (IXI, 128 px: within 5e-4 of a map reaching 0.24, 0.05 % of the intensity range), written in
0.033 CPU s against scaled int16's 0.071 (within 2e-6) and float32's 0.2 (``reconstruct`` and ``complete`` alike)."""
CALIBRATION_NAME = "uncertainty_calibration.json"
"""The calibration's file name in the mrngan bundle's models folder."""
EPS = 0.01  # floor inside the logs: 1 % of the intensity range
ISOTONIC_BINS = 50
MISFIT_SIGMA_PX = (3.0, 3.0)
"""In-plane Gaussian of ``misfit_xy``, chosen on IXI (5 validation, 8 test subjects; ``bundles/mrngan/docs/README.md``):
1.5 px ranked the voxels a little better, 6 px the slices; 3 px sits between and held best under the scanner shift."""
NET_CHUNK = 65536
"""Voxels per pass of the correction network: a 128 px volume's 1.6 M voxels in one pass took 0.31 s, in chunks 0.09 s (2 cores)."""
MAX_PASSES = 50
"""At most this many passes over the samples when fitting the correction network (IXI: 4.7 M samples, 3,000
batches are 2.6 passes; a test's 40,000 samples get 500 batches instead of 3,000)."""
NEGLIGIBLE_WEIGHT = 1e-6
"""A weight below this is left out of :meth:`Calibration.linear`: it moves the log prediction by < 1e-5 (the fit's
non-negative weights reach 1e-9 for signals it does not use, e.g. ``intensity`` on IXI)."""


def _design(name: str, x: np.ndarray) -> np.ndarray:
    """The increasing transform of one signal the log-linear model uses (NaN counts as 0)."""
    x = np.asarray(x, dtype=np.float32)
    if name == "prior_weight":
        return np.nan_to_num(x, nan=0.0)
    if name in ("distance_mm", "gap_mm"):
        return np.log1p(np.fmax(x, 0.0))  # fmax: NaN -> 0 without nan_to_num's extra passes over a volume
    return np.log(np.fmax(x, 0.0) + EPS)


def _mlp(widths: Sequence[int], n_in: int) -> torch.nn.Sequential:
    """The correction network: ``n_in`` standardised signals -> SiLU layers of ``widths`` -> one log correction."""
    layers: list[torch.nn.Module] = []
    for width in widths:
        layers += [torch.nn.Linear(n_in, int(width)), torch.nn.SiLU()]
        n_in = int(width)
    return torch.nn.Sequential(*layers, torch.nn.Linear(n_in, 1))


@dataclass
class Calibration:
    """Signals -> expected absolute error (see the module docstring); ``iso_x`` (ascending log prediction)
    and ``iso_y`` (non-decreasing error) are the isotonic table. ``net``: the correction network, or None
    (log-linear alone, as every calibration before it): ``mean`` / ``std`` standardise the transformed
    signals and ``layers`` holds each linear layer's ``weight`` and ``bias`` (SiLU between). ``stride``: the
    in-plane block size of the voxel signals it was fitted on, and so of the maps it makes (1: every voxel,
    as every calibration before it)."""

    bias: float
    weights: list[float]
    iso_x: list[float]
    iso_y: list[float]
    features: list[str] = field(default_factory=lambda: list(FEATURES))
    info: dict = field(default_factory=dict)
    net: dict | None = None
    stride: int = 1

    def linear(self, signals: Mapping[str, np.ndarray], designs: Mapping[str, np.ndarray] | None = None) -> np.ndarray:
        """``b + sum_i w_i f_i`` (the log of the log-linear prediction), shaped like the signals (per-slice (D,)
        signals beside (H, W, D) ones broadcast along the last axis, after their transform); ``designs``:
        the transforms ``f_i`` already computed, by name.

        Summed in place, and a signal whose weight the fit drove to (nearly) 0 is not transformed at all
        (:data:`NEGLIGIBLE_WEIGHT`): a 128 px volume's sum took 0.13 s with a new array per term."""
        shape = np.broadcast_shapes(*(np.shape(signals[n]) for n in self.features))
        out = np.full(shape, np.float32(self.bias), dtype=np.float32)
        for name, w in zip(self.features, self.weights):
            if w >= NEGLIGIBLE_WEIGHT:
                if designs is None:
                    term = _design(name, signals[name])
                    term *= np.float32(w)
                else:
                    term = designs[name] * np.float32(w)
                out += term
        return out

    def score(self, signals: Mapping[str, np.ndarray]) -> np.ndarray:
        """The log prediction before the isotonic table: :meth:`linear` plus the network's correction, if any.

        The network's first layer is linear: per-slice signals enter it once per slice, the voxel signals
        chunk by chunk (:data:`NET_CHUNK` voxels), so no signal is broadcast to the volume first."""
        if self.net is None:
            return self.linear(signals)
        designs = {n: _design(n, signals[n]) for n in self.features}
        out = self.linear(signals, designs)
        shape = out.shape
        first, rest = self._module()
        voxel = [i for i, n in enumerate(self.features) if designs[n].shape == shape]
        per_slice = [i for i in range(len(self.features)) if i not in voxel]
        lead = (-1, shape[-1]) if per_slice else (-1, 1)  # rows of voxels x the slice axis
        with torch.inference_mode(), torch_threads(1):  # see _fit_correction
            w, b = first.weight, first.bias  # standardisation folded in (see _module)
            base = b + sum(torch.from_numpy(np.asarray(designs[self.features[i]], np.float32)).reshape(-1, 1) * w[:, i] for i in per_slice)  # (D, hidden)
            cols = [designs[self.features[i]].reshape(lead) for i in voxel]
            flat = out.reshape(lead)
            step = max(1, NET_CHUNK // flat.shape[1])
            for r in range(0, flat.shape[0], step):
                z = torch.from_numpy(np.stack([c[r : r + step] for c in cols], -1))
                flat[r : r + step] += rest(z @ w[:, voxel].T + base)[..., 0].numpy()
        return out

    def _module(self) -> tuple[torch.nn.Linear, torch.nn.Sequential]:
        """The correction network built from ``net`` (cached): its first linear layer on the *unstandardised*
        transforms (``mean`` / ``std`` folded into its weights) and the layers after it."""
        if getattr(self, "_built", None) is None:
            module = _mlp([len(layer["bias"]) for layer in self.net["layers"][:-1]], len(self.features))
            linear = [m for m in module if isinstance(m, torch.nn.Linear)]
            mean, std = (torch.tensor(self.net[k], dtype=torch.float32) for k in ("mean", "std"))
            with torch.no_grad():
                for m, layer in zip(linear, self.net["layers"]):
                    m.weight.copy_(torch.tensor(layer["weight"]))
                    m.bias.copy_(torch.tensor(layer["bias"]))
                linear[0].weight /= std  # W (x - mean) / std + b = (W / std) x + (b - (W / std) mean)
                linear[0].bias -= linear[0].weight @ mean
            self._built = (linear[0], module[1:].eval())
        return self._built

    def predict(self, signals: Mapping[str, np.ndarray]) -> np.ndarray:
        """Expected absolute error (float32, shaped like the signals; broadcast per-slice signals first)."""
        return np.interp(self.score(signals), self.iso_x, self.iso_y).astype(np.float32)

    def save(self, path: str | os.PathLike) -> Path:
        return save_json({"kind": "uncertainty_calibration", **asdict(self)}, path)

    @classmethod
    def fit(cls, signals: Mapping[str, np.ndarray], abs_error: np.ndarray, iters: int = 200, info: dict | None = None,
            features: Sequence[str] = FEATURES, hidden: Sequence[int] = (), steps: int = 3000, seed: int = 0) -> "Calibration":
        """Fit on flat samples (``signals[name]`` (N,), ``abs_error`` (N,)) of generated voxels, using ``features``;
        ``hidden``: widths of the correction network's layers (none: log-linear alone), trained ``steps`` batches."""
        features = list(features)
        y = np.asarray(abs_error, dtype=np.float64).reshape(-1)
        if y.size < 100:
            raise ValueError(f"too few samples to calibrate the uncertainty ({y.size})")
        X = torch.from_numpy(np.stack([_design(n, signals[n]).reshape(-1) for n in features], 1).astype(np.float64))
        mu, sd = X.mean(0), X.std(0).clamp_min(1e-6)
        Z, t = (X - mu) / sd, torch.from_numpy(y)
        raw = torch.zeros(len(features), dtype=torch.float64, requires_grad=True)
        b = torch.tensor([math.log(max(float(y.mean()), 1e-6))], dtype=torch.float64, requires_grad=True)
        opt = torch.optim.LBFGS([raw, b], max_iter=iters, line_search_fn="strong_wolfe")

        def closure():  # Poisson deviance with a log link; softplus keeps every weight >= 0 (monotone)
            opt.zero_grad()
            eta = b + Z @ torch.nn.functional.softplus(raw)
            loss = (torch.exp(eta) - t * eta).mean()
            loss.backward()
            return loss

        opt.step(closure)
        with torch.no_grad():
            w = torch.nn.functional.softplus(raw) / sd  # back to the unstandardised features
            bias = float(b - (w * mu).sum())
        cal = cls(bias, [float(v) for v in w], [0.0], [0.0], features=features, info=dict(info or {}))
        flat = {n: np.asarray(signals[n]).reshape(-1) for n in features}
        if hidden:
            cal.net = _fit_correction(Z.float(), torch.from_numpy(cal.linear(flat)), t.float(), hidden, steps, seed)
            cal.net.update(mean=[float(v) for v in mu], std=[float(v) for v in sd])
        cal.iso_x, cal.iso_y = _isotonic_table(cal.score(flat).astype(np.float64), y)
        return cal


def _fit_correction(z: torch.Tensor, base: torch.Tensor, y: torch.Tensor, hidden: Sequence[int], steps: int, seed: int,
                    batch: int = 4096, lr: float = 3e-3) -> dict:
    """The correction network on standardised signals ``z`` (N, F): ``base + net(z)`` is the log prediction, fitted
    by the Poisson deviance with Adam from a zero output (the log-linear model's prediction), ``steps`` batches in
    shuffled passes (at most :data:`MAX_PASSES` passes: a small sample needs no more), the rate falling to 2 % of
    ``lr`` (x 0.6 every eighth of the steps); its layers as JSON lists.

    On one torch thread: the network is so small that a second thread mostly waits on the first (on 2 shared
    cores a step took 1-3 ms on one thread and up to 50 ms on two; predicting a 128 px map, :meth:`Calibration.score`,
    0.041 CPU s against 0.057, 6 ms more wall time)."""
    steps = min(int(steps), MAX_PASSES * -(-len(y) // batch))
    with torch_threads(1):
        return _train_correction(z, base, y, hidden, steps, seed, batch, lr)


def _train_correction(z: torch.Tensor, base: torch.Tensor, y: torch.Tensor, hidden: Sequence[int], steps: int, seed: int,
                      batch: int, lr: float) -> dict:
    gen = torch.Generator().manual_seed(int(seed))
    with torch.random.fork_rng():
        torch.manual_seed(int(seed))
        net = _mlp(hidden, z.shape[1])
    with torch.no_grad():  # starts at the log-linear model
        net[-1].weight.zero_()
        net[-1].bias.zero_()
    opt = torch.optim.Adam(net.parameters(), lr)
    sched = torch.optim.lr_scheduler.StepLR(opt, max(1, int(steps) // 8), 0.6)
    done = 0
    while done < int(steps):
        for b in torch.randperm(len(y), generator=gen).split(batch)[: int(steps) - done]:
            eta = base[b] + net(z[b])[:, 0]
            loss = (torch.exp(eta) - y[b] * eta).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            done += 1
    linear = [m for m in net if isinstance(m, torch.nn.Linear)]
    return {"layers": [{"weight": m.weight.detach().tolist(), "bias": m.bias.detach().tolist()} for m in linear]}


def _isotonic_table(lin: np.ndarray, y: np.ndarray) -> tuple[list[float], list[float]]:
    """Quantile bins of ``lin``: mean ``lin`` per bin and the non-decreasing fit of the mean error per bin.

    scipy's ``isotonic_regression`` (pool adjacent violators) on the bin means, weighted by counts.
    """
    from scipy.optimize import isotonic_regression

    edges = np.unique(np.quantile(lin, np.linspace(0, 1, ISOTONIC_BINS + 1)))
    which = np.clip(np.searchsorted(edges, lin, side="right") - 1, 0, max(len(edges) - 2, 0))
    count = np.bincount(which, minlength=max(len(edges) - 1, 1)).astype(np.float64)
    ok = count > 0
    xs = np.bincount(which, lin, minlength=len(count))[ok] / count[ok]
    ys = np.bincount(which, y, minlength=len(count))[ok] / count[ok]
    fitted = isotonic_regression(ys, weights=count[ok], increasing=True).x
    return [float(v) for v in xs], [float(max(v, 0.0)) for v in fitted]


def load_calibration(path: str | os.PathLike | None) -> Calibration | None:
    """The calibration at ``path``; None when ``path`` is None or no such file (one-line error when unreadable)."""
    if path is None or not Path(path).is_file():
        return None
    import json

    try:
        data = json.loads(Path(path).read_text())
        if data.pop("kind", None) != "uncertainty_calibration":
            raise ValueError("not an uncertainty calibration (kind)")
        cal = Calibration(**data)
    except (ValueError, TypeError) as err:
        raise InputError(path, f"unreadable uncertainty calibration ({err})") from err
    retired = [f for f in cal.features if f in RETIRED]
    if retired:  # not used: its predictions would be off; reconstructions say there is no map and why
        logger.warning("%s: not used (%s); re-run the mrngan calibrate step", path, "; ".join(RETIRED[f] for f in retired))
        return None
    # a calibration fitted before a signal was added uses the signals it knows
    if not set(cal.features) <= set(FEATURES) or len(cal.weights) != len(cal.features) or len(cal.iso_x) != len(cal.iso_y) or not cal.iso_x:
        raise InputError(path, f"uncertainty calibration for features {cal.features}, expected some of {list(FEATURES)}")
    if not isinstance(cal.stride, int) or cal.stride < 1:
        raise InputError(path, f"uncertainty calibration with stride {cal.stride!r}, expected a whole number >= 1")
    if cal.net is not None:
        try:
            cal._module()
        except (KeyError, TypeError, ValueError, RuntimeError) as err:
            raise InputError(path, f"unreadable correction network in the uncertainty calibration ({type(err).__name__}: {err})") from err
    return cal


class track_spread:
    """Context: the prior's fits keep the atlas spread while reconstructing (no refit for the map)."""

    def __init__(self, prior: Any, on: bool = True):
        self.prior, self.on = prior, bool(on) and hasattr(prior, "keep_spread")

    def __enter__(self):
        if self.on:
            self.old, self.prior.keep_spread = self.prior.keep_spread, True
        return self

    def __exit__(self, *exc):
        if self.on:
            self.prior.keep_spread = self.old


def _sources(num_slices: int, inputs: Sequence[int], one_pass: bool) -> np.ndarray:
    """Per output slice the input whose fitted prior its run used: the lower input of a gap when each
    gap is one run from its lower slice (``one_pass``), else the nearest one (the larger blend weight)."""
    idx = np.sort(np.asarray(inputs))
    k = np.arange(num_slices)
    if one_pass:
        return idx[np.clip(np.searchsorted(idx, k, side="right") - 1, 0, len(idx) - 1)]
    return idx[np.abs(k[:, None] - idx[None]).argmin(1)]


@torch.no_grad()
def uncertainty_signals(rec: Reconstruction, prior: Any, spacing_mm: float, fit_prior: bool = True, one_pass: bool = False,
                        stride: int = 1) -> dict[str, np.ndarray]:
    """The signals of the module docstring for every voxel of ``rec`` (each (H, W, D) float32, or (D,) per slice);
    with ``stride`` > 1 the voxel signals lie on the coarser grid of :func:`pool_inplane` (block means of the
    output, the atlas spread and ``|output - prior|``; the filters' widths scaled to that grid).

    The prior's fits are read from its cache when the reconstruction ran inside :class:`track_spread`.
    """
    stride = max(1, int(stride))
    vol = rec.volume
    h, w, d = vol.shape
    idx = [int(i) for i in rec.input_indices]
    dist = (np.abs(np.arange(d)[:, None] - np.asarray(idx)[None]).min(1) * float(spacing_mm)).astype(np.float32)
    given = np.sort(np.asarray(idx))
    hi = np.searchsorted(given, np.arange(d))  # the first real slice at or above each slice
    inside = (hi > 0) & (hi < len(given))
    gap = np.zeros(d, dtype=np.float32)
    gap[inside] = (given[hi[inside]] - given[hi[inside] - 1]) * float(spacing_mm)
    weight = np.asarray(rec.extra.get("prior_weight", np.zeros(d)), dtype=np.float32)
    runs = rec.extra.get("run_spread")
    runs = np.zeros(d, dtype=np.float32) if runs is None else pool_inplane(np.asarray(runs, dtype=np.float32), stride)
    blend = rec.extra.get("candidate_spread")  # NaN on the given slices
    blend = np.zeros(d, dtype=np.float32) if blend is None else pool_inplane(np.nan_to_num(np.asarray(blend, dtype=np.float32), nan=0.0), stride)
    coarse = pool_inplane(vol, stride)
    spread = np.zeros_like(coarse)
    prior_vol = np.zeros_like(vol)
    src = None
    if prior is not None and hasattr(prior, "slice_at"):
        src = _sources(d, idx, one_pass)  # every input is its own source: its fitted prior at its position is read too
        for s in np.unique(src):
            ks = np.nonzero(src == s)[0]
            pos = torch.as_tensor(np.asarray(rec.positions)[ks], dtype=torch.float64)
            kw = {}
            if fit_prior and hasattr(prior, "fit_many"):
                kw = {"reference": torch.from_numpy(np.ascontiguousarray(vol[:, :, s]))[None, None], "reference_position": float(np.float32(rec.positions[s]))}  # as the run passed it (float32): a cache hit
            prior_vol[:, :, ks] = prior.slice_at(pos, **kw)[:, 0].float().cpu().numpy().transpose(1, 2, 0)
            if hasattr(prior, "spread_at"):
                spread[:, :, ks] = _pool_slices(prior.spread_at(pos, **kw)[:, 0].float().cpu(), stride)
    disagreement = np.abs(vol - prior_vol)
    misfit = np.zeros_like(coarse)
    if src is not None:  # each input's disagreement, smoothed, carried to the slices its prior serves
        for s in np.unique(src):
            misfit[:, :, src == s] = pool_inplane(neighbourhood(disagreement[:, :, s], MISFIT_SIGMA_PX)[:, :, None], stride)
    with ThreadPoolExecutor(max_workers=1) as pool:  # scipy's filters release the GIL: the two run side by side (2 cores: 0.11 -> 0.07 s)
        local = pool.submit(neighbourhood, spread, (2.0 / stride, 2.0 / stride, 1.0))
        edges = edge_strength(coarse, 1.0 / stride)
        spread_local = local.result()
    return {
        "spread": spread,
        "spread_local": spread_local,
        "distance_mm": dist,
        "gap_mm": gap,
        "disagreement": pool_inplane(disagreement, stride),
        "prior_weight": np.nan_to_num(weight, nan=0.0),
        "run_spread": runs,
        "intensity": coarse,
        "edge_xy": edges,
        "misfit_xy": misfit,
        "candidate_spread": blend,
        "head_area": ((vol > HEAD_THRESHOLD).sum((0, 1)) / np.float32(h * w)).astype(np.float32),
    }


def pool_inplane(vol: np.ndarray, stride: int) -> np.ndarray:
    """``vol`` (H, W, D) averaged over ``stride`` x ``stride`` in-plane blocks: (ceil(H / stride), ceil(W / stride), D)
    float32 (a block cut by the far edge holds the mean of its voxels); ``vol`` itself for ``stride`` 1."""
    if stride <= 1:
        return vol
    vol = np.asarray(vol, np.float32)
    h, w, d = vol.shape
    if h % stride == 0 and w % stride == 0:
        # the usual model grid: the block's strided views summed, in whatever memory order the volume has (a
        # reconstruction's is slice-major, where a reshaped mean first copied it: 1 ms against 17 ms at 128 px)
        total = sum(vol[i::stride, j::stride] for i in range(stride) for j in range(stride))
        return np.ascontiguousarray(total * np.float32(1.0 / (stride * stride)))
    pooled = torch.nn.functional.avg_pool3d(torch.from_numpy(np.ascontiguousarray(vol))[None, None], (stride, stride, 1), ceil_mode=True)
    return pooled[0, 0].numpy()


def _pool_slices(slices: torch.Tensor, stride: int) -> np.ndarray:
    """(D, H, W) slices -> :func:`pool_inplane`'s (h, w, D) array (torch's average pooling: ceil mode, no padding,
    so a block cut by the edge divides by the voxels it holds)."""
    if stride > 1:
        slices = torch.nn.functional.avg_pool2d(slices[:, None], stride, ceil_mode=True)[:, 0]
    return np.ascontiguousarray(slices.numpy().transpose(1, 2, 0))


def upsample_inplane(coarse: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """A coarse (h, w, D) map back on the (H, W) in-plane grid of ``shape`` (bilinear between block centres,
    the edge blocks' values held to the border); ``coarse`` itself when it already has that grid.

    The result is slice-major in memory (a (D, H, W) array seen as (H, W, D)), as a reconstruction's volume is:
    bilinear over the slices as channels took 2 ms at 128 px against 10 ms trilinear with the axial size kept, and
    sums over a slice of both (:func:`slice_means`) run 6 times faster on a shared layout."""
    if tuple(coarse.shape[:2]) == tuple(shape[:2]):
        return np.asarray(coarse, dtype=np.float32)
    t = torch.from_numpy(np.ascontiguousarray(np.moveaxis(np.asarray(coarse, np.float32), 2, 0)))[None]  # (1, D, h, w): a quarter of the map copied
    up = torch.nn.functional.interpolate(t, size=(int(shape[0]), int(shape[1])), mode="bilinear", align_corners=False)[0]
    return np.moveaxis(up.numpy(), 0, 2)


def neighbourhood(vol: np.ndarray, sigma_px: tuple[float, ...] = (2.0, 2.0, 1.0)) -> np.ndarray:
    """``vol`` (H, W, D) averaged over each voxel's neighbourhood: a Gaussian of ``sigma_px`` (in-plane, in-plane, axial);
    a slice (H, W) with two in-plane sigmas."""
    from scipy import ndimage

    return ndimage.gaussian_filter(np.asarray(vol, dtype=np.float32), sigma_px)


def edge_strength(vol: np.ndarray, sigma_px: float = 1.0) -> np.ndarray:
    """In-plane gradient magnitude (H, W, D) of a volume: Gaussian derivatives (``sigma_px``) along the two in-plane
    axes, none along the axial one (scipy's ``gaussian_gradient_magnitude`` would differentiate all three)."""
    from scipy import ndimage

    vol = np.asarray(vol, dtype=np.float32)
    sigma = (sigma_px, sigma_px, 0.0)
    gx = ndimage.gaussian_filter(vol, sigma, order=(1, 0, 0))
    gy = ndimage.gaussian_filter(vol, sigma, order=(0, 1, 0))
    return np.sqrt(gx * gx + gy * gy)


def broadcast(signals: Mapping[str, np.ndarray], shape: Sequence[int]) -> dict[str, np.ndarray]:
    """Per-slice (D,) signals broadcast to the volume's (H, W, D)."""
    return {k: np.broadcast_to(v, tuple(shape)) if v.ndim == 1 else v for k, v in signals.items()}


def uncertainty_map(rec: Reconstruction, prior: Any, calibration: Calibration, spacing_mm: float, fit_prior: bool = True,
                    one_pass: bool = False) -> np.ndarray:
    """Expected absolute error (H, W, D) float32 in the output's [0, 1] units; 0 on the real slices. Predicted on the
    calibration's grid (its ``stride``) and brought to the volume's."""
    sig = uncertainty_signals(rec, prior, spacing_mm, fit_prior, one_pass, calibration.stride)
    pred = calibration.predict(sig)  # per-slice signals transformed per slice
    unc = upsample_inplane(np.broadcast_to(pred, sig["intensity"].shape), rec.volume.shape)
    if not unc.flags.writeable:  # stride 1: the broadcast prediction itself
        unc = np.array(unc)
    unc[:, :, [int(i) for i in rec.input_indices]] = 0.0
    return unc


def slice_means(unc: np.ndarray, volume: np.ndarray, head_threshold: float = HEAD_THRESHOLD) -> np.ndarray:
    """Per slice (D,) the mean expected error over the output's head voxels (> ``head_threshold``; all when none)."""
    head = volume > head_threshold
    n = head.sum((0, 1))
    inside = (unc * head).sum((0, 1)) / np.maximum(n, 1)
    return np.where(n > 0, inside, unc.mean((0, 1))).astype(np.float32)
