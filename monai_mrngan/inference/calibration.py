"""The uncertainty map's calibration: its signals (:data:`FEATURES`, computed by
:func:`monai_mrngan.inference.uncertainty.uncertainty_signals`) -> expected absolute error.

:class:`Calibration` maps the signals to the expected absolute error in output intensity units: a
log-linear model ``exp(b + sum_i w_i f_i)`` with ``w_i >= 0`` on increasing transforms ``f_i`` of
the signals (so more of any signal, alone, predicts no less error), fitted by Poisson deviance (its
fitted mean matches the mean error); optionally (``hidden``, the calibrate step's default) a small
network on the same transforms adds a correction to that log prediction, fitted by the same deviance
from zero (it learns what a sum of monotone terms cannot: how the signals interact, e.g. atlas spread
counting differently beside one slice than inside a short gap); then a monotone (isotonic)
recalibration of the prediction against the binned true error. Last, optionally, the whole map of a scan whose
``sharpness`` (its real slices' fine detail against the atlas bank's at the same positions,
:func:`~monai_mrngan.inference.uncertainty.relative_sharpness`) lies outside the range of the scans the map was
fitted on is scaled by a power of how far it lies out, the power fitted on scanner-augmented copies of validation
subjects; inside that range a map stays as fitted. It is
fitted on the validation split after MRNGAN training (:func:`monai_mrngan.evaluation.uncertainty.calibrate`) and
stored as JSON beside the weights.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch

from ..atlas.registration import torch_threads
from ..data.io import InputError, save_json

logger = logging.getLogger(__name__)

__all__ = ["FEATURES", "CALIBRATION_NAME", "Calibration", "load_calibration"]

FEATURES = ("spread", "spread_local", "distance_mm", "gap_mm", "disagreement", "prior_weight", "run_spread", "intensity", "edge_xy", "misfit_xy",
            "candidate_spread", "head_area", "slab_change", "slab_mm")
"""The signals a calibration can use, by name (:mod:`monai_mrngan.inference.uncertainty` says what each is)."""
RETIRED = {"edge": "its 'edge' signal held the intensity too"}
"""Signals a calibration may have been fitted on that are no longer computed, and why."""
CALIBRATION_NAME = "uncertainty_calibration.json"
"""The calibration's file name in the mrngan bundle's models folder."""
EPS = 0.01  # floor inside the logs: 1 % of the intensity range
MIN_SHARPNESS = 1e-3  # floor of the sharpness before its power (an input with no detail at all)
MAX_SHARPNESS_POWER = 5.0  # the fitted power's upper bound (IXI: 0.4)
ISOTONIC_BINS = 50
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
    if name in ("distance_mm", "gap_mm", "slab_mm"):
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
    as every calibration before it). ``sharpness_power``: the map is multiplied by a power of how far a scan's
    ``sharpness`` lies outside ``sharpness_band`` (the range of the scans the map was fitted on; see
    :meth:`sharpness_scale`; power 0: not scaled, as every calibration before it), ``sharpness`` measured against
    ``sharpness_reference`` (``{"p": ascending positions, "value": the bank's sharpness there}``)."""

    bias: float
    weights: list[float]
    iso_x: list[float]
    iso_y: list[float]
    features: list[str] = field(default_factory=lambda: list(FEATURES))
    info: dict = field(default_factory=dict)
    net: dict | None = None
    stride: int = 1
    sharpness_power: float = 0.0
    sharpness_band: list[float] = field(default_factory=lambda: [1.0, 1.0])
    sharpness_reference: dict | None = None

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
        """Expected absolute error (float32, shaped like the signals; broadcast per-slice signals first). With a
        ``sharpness_power``, ``signals["sharpness"]`` (per sample, or per slice) scales it, except where
        ``signals["slab_mm"]`` is above 0 (see :meth:`sharpness_scale`)."""
        out = np.interp(self.score(signals), self.iso_x, self.iso_y).astype(np.float32)
        if self.sharpness_power > 0:
            out *= self.sharpness_scale(signals["sharpness"], signals.get("slab_mm")).astype(np.float32)
        return out

    def _outside_band(self, sharpness: np.ndarray, slab_mm: np.ndarray | None = None) -> np.ndarray:
        """``log(s / hi)`` above the band, ``log(s / lo)`` below it, 0 inside, and 0 where ``slab_mm`` > 0."""
        s = np.fmax(np.asarray(sharpness, np.float64), MIN_SHARPNESS)
        lo, hi = self.sharpness_band
        out = np.log(s / np.clip(s, lo, hi))
        return out if slab_mm is None else np.where(np.asarray(slab_mm) > 0, 0.0, out)

    def sharpness_scale(self, sharpness: np.ndarray, slab_mm: np.ndarray | None = None) -> np.ndarray:
        """The factor on a scan's map: ``(s / hi) ** power`` above the band, ``(s / lo) ** power`` below it, 1 inside
        (within the band the measure varies as much between the fit's own scans as it says, and their maps are as
        fitted). 1 where ``slab_mm`` (per sample or slice, as ``sharpness``) is above 0: the real slices of a thick-slice
        scan are slab means, whose fine detail says how thick the slabs are, not how sharp the scanner is (the
        calibration learns thick slabs from its own thick-slice cases)."""
        return np.exp(self.sharpness_power * self._outside_band(sharpness, slab_mm))

    def fit_sharpness_power(self, signals: Mapping[str, np.ndarray], abs_error: np.ndarray, band: Sequence[float] = (1.0, 1.0)) -> float:
        """Fit ``sharpness_power`` (>= 0) on flat samples that hold ``sharpness`` (scanner-augmented copies beside
        the originals), the rest of the calibration fixed: Poisson deviance of ``predict * sharpness_scale``, with
        ``band`` the fit's own scans' range of sharpness."""
        from scipy.optimize import minimize_scalar

        self.sharpness_power, self.sharpness_band = 0.0, [float(band[0]), float(band[1])]
        base = np.log(np.fmax(self.predict(signals), 1e-6)).astype(np.float64)
        x = self._outside_band(signals["sharpness"], signals.get("slab_mm"))
        y = np.asarray(abs_error, dtype=np.float64)

        def deviance(power: float) -> float:
            eta = base + power * x
            return float(np.mean(np.exp(eta) - y * eta))

        # convex in the power: at 0 unless the deviance falls from there (every sample inside the band: no slope)
        if np.mean(x * (np.exp(base) - y)) < 0:
            self.sharpness_power = float(minimize_scalar(deviance, bounds=(0.0, MAX_SHARPNESS_POWER), method="bounded").x)
        return self.sharpness_power

    def save(self, path: str | os.PathLike) -> Path:
        return save_json({"kind": "uncertainty_calibration", **asdict(self)}, path)

    @classmethod
    def fit(cls, signals: Mapping[str, np.ndarray], abs_error: np.ndarray, iters: int = 200, info: dict | None = None,
            features: Sequence[str] = FEATURES, hidden: Sequence[int] = (), steps: int = 3000, seed: int = 0) -> "Calibration":
        """Fit on flat samples (``signals[name]`` (N,), ``abs_error`` (N,)) of generated voxels, using ``features``;
        ``hidden``: widths of the correction network's layers (none: log-linear alone), trained ``steps`` batches.
        A signal that is the same in every sample is left out (``info["constant_signals"]``): e.g. the slab signals of
        a fit without thick-slice cases, which a thick-slice scan would otherwise push far outside what was fitted."""
        features = list(features)
        y = np.asarray(abs_error, dtype=np.float64).reshape(-1)
        if y.size < 100:
            raise ValueError(f"too few samples to calibrate the uncertainty ({y.size})")
        designs = {n: _design(n, signals[n]).reshape(-1) for n in features}
        constant = [n for n in features if np.ptp(designs[n]) == 0]
        if constant:  # nothing to learn from, and standardised by a zero spread any other value would swamp the network
            features = [n for n in features if n not in constant]
            info = {**(info or {}), "constant_signals": constant}
        X = torch.from_numpy(np.stack([designs[n] for n in features], 1).astype(np.float64))
        mu, sd = X.mean(0), X.std(0).clamp_min(1e-6)
        Z, t = (X - mu) / sd, torch.from_numpy(y)
        raw = torch.zeros(len(features), dtype=torch.float64, requires_grad=True)
        b = torch.tensor([math.log(max(float(y.mean()), 1e-6))], dtype=torch.float64, requires_grad=True)
        opt = torch.optim.LBFGS([raw, b], max_iter=iters, line_search_fn="strong_wolfe")
        best = [math.inf, raw.detach().clone(), b.detach().clone()]

        def closure():  # Poisson deviance with a log link; softplus keeps every weight >= 0 (monotone)
            opt.zero_grad()
            eta = b + Z @ torch.nn.functional.softplus(raw)
            loss = (torch.exp(eta) - t * eta).mean()
            loss.backward()
            if float(loss.detach()) < best[0]:
                best[:] = [float(loss.detach()), raw.detach().clone(), b.detach().clone()]
            return loss

        opt.step(closure)
        with torch.no_grad():
            # the best point evaluated: once unused weights sink into softplus's flat tail, the curvature L-BFGS
            # estimates can send one step to exp() overflow and every later one to NaN (seen on 9,600 samples)
            raw.copy_(best[1])
            b.copy_(best[2])
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
    ref = cal.sharpness_reference
    if cal.sharpness_power and not (isinstance(ref, dict) and len(ref.get("p", [])) == len(ref.get("value", [])) > 1):
        raise InputError(path, "uncertainty calibration scales by sharpness but holds no sharpness_reference {'p': [...], 'value': [...]}")
    if len(cal.sharpness_band) != 2 or not 0 < cal.sharpness_band[0] <= cal.sharpness_band[1]:
        raise InputError(path, f"uncertainty calibration with sharpness_band {cal.sharpness_band}, expected [low, high] with 0 < low <= high")
    if not isinstance(cal.stride, int) or cal.stride < 1:
        raise InputError(path, f"uncertainty calibration with stride {cal.stride!r}, expected a whole number >= 1")
    if cal.net is not None:
        try:
            cal._module()
        except (KeyError, TypeError, ValueError, RuntimeError) as err:
            raise InputError(path, f"unreadable correction network in the uncertainty calibration ({type(err).__name__}: {err})") from err
    return cal
