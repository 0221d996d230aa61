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
- ``sharpness`` (only for a calibration that scales by it, ``Calibration.sharpness_power``): per reconstruction, how
  much fine detail the real slices hold against the atlases at the same positions, the median over the inputs of
  :func:`~monai_mrngan.metrics.image.slice_sharpness` over the bank's (:func:`~monai_mrngan.atlas.bank.sharpness_profile`,
  stored in the calibration): about 1 on the scanner the atlases came from, 0.4 on a smoother one (a 1 mm scan
  brought to 2 mm), above 1 on a noisier one. The same anatomy is easier to match on a smooth scan, so the error
  the other signals predict is too high there; outside the range of the scans it was fitted on, the calibration
  scales a scan's whole map by a power of how far it lies out (``Calibration.sharpness_scale``);
- ``slab_change``, ``slab_mm`` (a thick-slice scan, ``reconstruct_volume(..., slab_mm=X)``): how much the step that made
  the output agree with the slabs (:func:`~monai_mrngan.transforms.slabs.slab_consistent`) changed each voxel
  (``|output - fill|``), and the slab thickness in mm per slice (both 0 without that step). Every other signal is
  computed on the method's fill before that step (``extra["slab_fill"]``), whose real slices are the inputs the prior's
  fits were keyed by: computed on the consistent volume they missed the cache and cost 12 s. The step lowers the error
  (on IXI 6 mm slabs by about a fifth), which the fill's signals alone cannot see; a calibration fitted with thick-slice
  cases learns it from these two;
- ``edge_xy``: the output's in-plane gradient magnitude (Gaussian, 1 px): errors gather at tissue
  boundaries, where a slightly misplaced edge costs the most. (Its predecessor ``edge`` was scipy's
  ``gaussian_gradient_magnitude`` with sigma 0 along the axial axis, which skips that axis's
  derivative and so added the smoothed intensity itself: 0.7 on a flat 0.7 volume. Calibrations
  fitted on it are not used; the calibrate step refits one.)

:mod:`monai_mrngan.inference.calibration` maps them to the expected absolute error (:class:`~.calibration.Calibration`,
fitted on the validation split after MRNGAN training and stored beside the weights).

The voxel signals may be computed on a coarser in-plane grid (the calibration's ``stride``: means over
``stride`` x ``stride`` blocks, :func:`pool_inplane`); the predicted error is then brought back to the
volume's grid bilinearly (:func:`upsample_inplane`). Expected error varies smoothly, so on IXI a stride of 2
ranked voxels and slices as well as the full grid at about half the map's cost (mrngan docs).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from ..data.positions import HEAD_THRESHOLD
from ..metrics.image import slice_sharpness
from .calibration import Calibration
from .volume import Reconstruction

__all__ = ["MAP_STORED", "MISFIT_SIGMA_PX", "filled_volume", "uncertainty_signals", "uncertainty_map", "slice_means", "pool_inplane", "upsample_inplane",
           "neighbourhood", "track_spread", "broadcast", "relative_sharpness"]

MAP_STORED = np.uint8
"""How an uncertainty map is stored in its NIfTI: scaled uint8 (``scl_slope``, the map's maximum / 255), within half a
step of the float map (IXI, 128 px: within 5e-4 of a map reaching 0.24, 0.05 % of the intensity range), written in
0.033 CPU s against scaled int16's 0.071 (within 2e-6) and float32's 0.2 (``reconstruct`` and ``complete`` alike)."""
SPREAD_AXIAL_SIGMA = 1.0
"""Axial Gaussian (slices) of ``spread_local``."""
SPREAD_REACH = int(4.0 * SPREAD_AXIAL_SIGMA + 0.5)
"""How many slices away a slice's atlas spread still reaches ``spread_local`` (scipy truncates its Gaussian at 4 sigma)."""
MISFIT_SIGMA_PX = (3.0, 3.0)
"""In-plane Gaussian of ``misfit_xy``, chosen on IXI (5 validation, 8 test subjects; ``bundles/mrngan/docs/README.md``):
1.5 px ranked the voxels a little better, 6 px the slices; 3 px sits between and held best under the scanner shift."""


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


def filled_volume(rec: Reconstruction) -> np.ndarray:
    """``rec``'s volume as its method filled it: before the step that made it agree with thick slabs, if one ran
    (``extra["slab_fill"]``), else the volume itself. Its real slices are the inputs as given."""
    fill = rec.extra.get("slab_fill")
    return rec.volume if fill is None else fill


def relative_sharpness(rec: Reconstruction, reference: Mapping[str, Sequence[float]]) -> float:
    """The ``sharpness`` signal: the median over ``rec``'s real slices of their sharpness over ``reference``'s at their
    positions (``{"p": ascending, "value": ...}``); 1.0 when no input shows enough head to measure."""
    idx = [int(i) for i in rec.input_indices]
    own = slice_sharpness(torch.from_numpy(np.ascontiguousarray(np.moveaxis(filled_volume(rec)[:, :, idx], 2, 0)))).numpy()
    ref = np.interp(np.asarray(rec.positions, dtype=np.float64)[idx], np.asarray(reference["p"], np.float64), np.asarray(reference["value"], np.float64))
    ratio = own / np.where(ref > 0, ref, np.nan)
    ratio = ratio[np.isfinite(ratio)]
    return float(np.median(ratio)) if ratio.size else 1.0


@torch.no_grad()
def uncertainty_signals(rec: Reconstruction, prior: Any, spacing_mm: float, fit_prior: bool = True, one_pass: bool = False,
                        stride: int = 1, sharpness_reference: Mapping[str, Sequence[float]] | None = None) -> dict[str, np.ndarray]:
    """The signals of the module docstring for every voxel of ``rec`` (each (H, W, D) float32, or (D,) per slice);
    with ``stride`` > 1 the voxel signals lie on the coarser grid of :func:`pool_inplane` (block means of the
    output, the atlas spread and ``|output - prior|``; the filters' widths scaled to that grid). ``sharpness`` is
    given only with a ``sharpness_reference`` (:func:`relative_sharpness`).

    The prior's fits are read from its cache when the reconstruction ran inside :class:`track_spread`.
    """
    stride = max(1, int(stride))
    vol = filled_volume(rec)
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
        generated = np.setdiff1d(np.arange(d), idx)
        for s in np.unique(src):
            if generated.size == 0 or np.abs(generated - s).min() > SPREAD_REACH:
                # a real slice amid real slices (a volume with a few missing): its prior reaches no generated voxel's
                # signals, and fitting it cost 0.2 s per slice (a 1 mm volume with one blanked band: 21 of 30 s)
                continue
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
        local = pool.submit(neighbourhood, spread, (2.0 / stride, 2.0 / stride, SPREAD_AXIAL_SIGMA))
        edges = edge_strength(coarse, 1.0 / stride)
        spread_local = local.result()
    out = {
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
        "slab_change": np.zeros_like(coarse) if vol is rec.volume else pool_inplane(np.abs(rec.volume - vol), stride),
        "slab_mm": np.full(d, float(rec.extra.get("slab_mm", 0.0)), dtype=np.float32),  # set beside the fill, by the step
    }
    if sharpness_reference is not None:
        out["sharpness"] = np.full(d, relative_sharpness(rec, sharpness_reference), dtype=np.float32)
    return out


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
    calibration's grid (its ``stride``) and brought to the volume's. A thick-slice scan's slices are slabs, not the
    thin slices the output holds there (the step that made it agree with the slabs set them): they are predicted too."""
    reference = calibration.sharpness_reference if calibration.sharpness_power > 0 else None
    sig = uncertainty_signals(rec, prior, spacing_mm, fit_prior, one_pass, calibration.stride, reference)
    pred = calibration.predict(sig)  # per-slice signals transformed per slice
    unc = upsample_inplane(np.broadcast_to(pred, sig["intensity"].shape), rec.volume.shape)
    if not unc.flags.writeable:  # stride 1: the broadcast prediction itself
        unc = np.array(unc)
    if filled_volume(rec) is rec.volume:  # no slab step: thin real slices, where the output is the input
        unc[:, :, [int(i) for i in rec.input_indices]] = 0.0
    return unc


def slice_means(unc: np.ndarray, volume: np.ndarray, head_threshold: float = HEAD_THRESHOLD) -> np.ndarray:
    """Per slice (D,) the mean expected error over the output's head voxels (> ``head_threshold``; all when none)."""
    head = volume > head_threshold
    n = head.sum((0, 1))
    inside = (unc * head).sum((0, 1)) / np.maximum(n, 1)
    return np.where(n > 0, inside, unc.mean((0, 1))).astype(np.float32)
