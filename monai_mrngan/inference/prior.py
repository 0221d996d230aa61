"""The general-brain prior: what a brain looks like at position ``p``, fitted to one patient.

A prior is a *template bank*: ``K`` brain volumes sampled on a common grid of positions ``p``
(``(K, P, H, W)`` in [0, 1]). ``K = 1`` is the population mean brain (or a GAN's general brain);
``K > 1`` keeps (a subset of) the training volumes themselves as atlases.

Fitting to a patient (:meth:`BrainPrior.fit`) uses ONLY the one input slice ``r`` at ``p0``:

1. each atlas slice at ``p0`` is aligned to ``r`` by an affine transform (initialised from the
   head masks' moments, refined by maximising the normalised cross-correlation), then by a
   smooth displacement field (a coarse control grid upsampled bicubically, i.e. a B-spline-like
   free-form deformation optimised with torch, with a smoothness penalty);
2. the atlases whose aligned slice correlates best with ``r`` are kept (``top_k``), each with an
   intensity gain fitted on that slice;
3. every position's slice of every kept atlas is warped with that atlas' transform (the
   displacement optionally fading with ``|p - p0|``), intensity-mapped, and averaged.

In-plane moment alignment alone gains nothing on IXI (see issue 4): the deformation moves the head
outline and inner structures themselves, and choosing atlases that look like the patient gives a
prior sharper than the population mean. ``slice_at`` / ``load_prior`` are the contract the
end-to-end stage relies on.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..data.io import InputError, load_volume, save_json, save_nifti

logger = logging.getLogger(__name__)

HEAD_THRESHOLD = 0.1
PRIOR_SIDECAR_SUFFIX = ".positions.json"
FIT_CACHE_SIZE = 32  # fitted volumes kept per prior (128 px, 101 positions: 6.6 MB each)


# ----------------------------------------------------------------------------------------------
# building the population prior
# ----------------------------------------------------------------------------------------------
def position_grid(num_positions: int) -> np.ndarray:
    """The common grid of positions in array-index order: ``p`` from 1 down to 0 (RAS: index grows to the vertex)."""
    if num_positions < 2:
        raise ValueError(f"need at least 2 positions, got {num_positions}")
    return np.linspace(1.0, 0.0, int(num_positions))


def resample_to_positions(volume: np.ndarray, positions: Sequence[float], grid: Sequence[float]) -> np.ndarray:
    """Resample a (H, W, D) volume whose axial index ``i`` lies at ``positions[i]`` onto ``grid``.

    Returns (len(grid), H, W); linear interpolation along ``p``, NaN where ``grid`` leaves the
    volume's range of positions (so averages can ignore it).
    """
    vol = np.asarray(volume, dtype=np.float32)
    pos = np.asarray(positions, dtype=np.float64)
    grid = np.asarray(grid, dtype=np.float64)
    if vol.ndim != 3 or pos.size != vol.shape[2]:
        raise ValueError(f"volume {vol.shape} and {pos.size} positions do not match")
    order = np.argsort(pos)
    pos, vol = pos[order], vol[..., order]
    x = np.interp(grid, pos, np.arange(pos.size))  # fractional index of each grid position
    lo = np.clip(np.floor(x).astype(int), 0, pos.size - 1)
    hi = np.clip(lo + 1, 0, pos.size - 1)
    w = (x - lo).astype(np.float32)
    out = vol[..., lo] * (1 - w) + vol[..., hi] * w
    outside = (grid < pos[0] - 1e-6) | (grid > pos[-1] + 1e-6)
    out[..., outside] = np.nan
    return np.ascontiguousarray(np.moveaxis(out, -1, 0))


def build_bank(entries: Sequence[dict], num_positions: int = 101, max_volumes: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Training volumes resampled onto the common position grid: ``(K, P, H, W)`` float32 with NaNs, and the grid."""
    grid = position_grid(num_positions)
    entries = list(entries)[: max_volumes or None]
    if not entries:
        raise ValueError("no training volumes to build the prior from")
    vols = []
    for i, e in enumerate(entries):
        vol, _ = load_volume(e["image"])
        if "positions" not in e:
            raise InputError(e["image"], "datalist entry has no 'positions'; prepare the dataset with `python -m monai_mrngan prepare`")
        vols.append(resample_to_positions(vol, e["positions"], grid))
        if (i + 1) % 20 == 0:
            logger.info("resampled %d/%d training volumes", i + 1, len(entries))
    shapes = {v.shape for v in vols}
    if len(shapes) != 1:
        raise ValueError(f"training volumes differ in shape after resampling: {sorted(shapes)}")
    return np.stack(vols), grid


def mean_brain(bank: np.ndarray) -> np.ndarray:
    """Mean over subjects of a ``(K, P, H, W)`` bank, ignoring NaNs (0 where no subject reaches)."""
    with np.errstate(invalid="ignore"):
        counts = np.isfinite(bank).sum(0)
        total = np.nansum(bank, 0)
    return np.where(counts > 0, total / np.maximum(counts, 1), 0.0).astype(np.float32)


def save_prior_volume(volume_phw: np.ndarray, grid: Sequence[float], path: str | os.PathLike, spacing_mm: float = 2.0) -> Path:
    """Write a (P, H, W) prior as a RAS NIfTI (H, W, P) plus a ``.positions.json`` sidecar with each index's ``p``."""
    grid = np.asarray(grid, dtype=np.float64)
    step_mm = abs(float(grid[0] - grid[-1])) / max(len(grid) - 1, 1) * 200.0
    affine = np.diag([spacing_mm, spacing_mm, step_mm or spacing_mm, 1.0])
    vol = np.clip(np.nan_to_num(np.moveaxis(np.asarray(volume_phw, dtype=np.float32), 0, -1)), 0, 1)
    path = Path(path)
    save_nifti(vol, affine, path)
    save_json({"positions": [round(float(p), 6) for p in grid]}, _sidecar(path))
    return path


def save_bank(bank: np.ndarray, grid: Sequence[float], path: str | os.PathLike, subjects: Sequence[str] | None = None) -> Path:
    """Write an atlas bank (K, P, H, W) compactly (uint8) with its grid (and each volume's subject), for ``load_prior``."""
    from ..engines.checkpoint import atomic_torch_save

    q = np.clip(np.nan_to_num(bank, nan=0.0), 0, 1) * 255.0 + 0.5
    return atomic_torch_save(
        {"kind": "atlas_bank", "bank": torch.from_numpy(q.astype(np.uint8)), "positions": torch.as_tensor(np.asarray(grid, np.float64)),
         "subjects": [str(s) for s in subjects] if subjects is not None else None},
        path,
    )


def _sidecar(path: Path) -> Path:
    name = path.name
    for suffix in (".nii.gz", ".nii"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    return path.with_name(name + PRIOR_SIDECAR_SUFFIX)


def build_mean_prior(
    dataset_dir: str | os.PathLike, output: str | os.PathLike, num_positions: int = 101, split: str = "training",
    bank_path: str | os.PathLike | None = None, max_atlases: int | None = 40,
) -> Path:
    """Build the population mean brain from a prepared dataset's ``split`` and write it (NIfTI over ``p``).

    With ``bank_path`` also writes the first ``max_atlases`` resampled training volumes as an atlas bank.
    """
    from ..data.datalist import load_split

    entries = load_split(dataset_dir, split)
    bank, grid = build_bank(entries, num_positions)
    spacing = float(entries[0].get("spacing", [2.0])[0]) if entries else 2.0
    out = save_prior_volume(mean_brain(bank), grid, output, spacing_mm=spacing)
    if bank_path:
        subjects = [str(e.get("subject") or e["image"]) for e in entries]
        save_bank(bank[: max_atlases or None], grid, bank_path, subjects[: max_atlases or None])
    logger.info("mean brain of %d volumes over %d positions written to %s", len(bank), len(grid), out)
    return out


# ----------------------------------------------------------------------------------------------
# registration of one slice to another (batched over atlases)
# ----------------------------------------------------------------------------------------------
@dataclass
class FitConfig:
    """How :meth:`BrainPrior.fit` adapts the prior to one input slice.

    mode: ``"none"`` (plain prior), ``"affine"``, or ``"deformable"`` (affine + smooth displacement).
    top_k: atlases kept (by correlation after alignment); only for banks with several volumes.
    preselect: with ``mode="deformable"``, only the ``preselect * top_k`` atlases that correlate
        best after the affine step are deformed (saves time on large banks).
    intensity: ``"linear"`` (least-squares gain per atlas on the input slice's head; air stays black) or ``"none"``.
    decay: the displacement is scaled by ``exp(-|p - p0| / decay)``; ``0`` applies it everywhere.
    position_search: half-width in ``p`` of a search, per atlas, for the atlas slice that best
        matches the input (``0``: every atlas is taken at the input's ``p``). Heads differ in
        where their anatomy sits along the axis, and the input's ``p`` is itself an estimate, so
        each atlas is shifted along ``p`` to its best match (NCC after centroid/size alignment,
        on a grid of ``position_step``) before the in-plane fit. On IXI test subjects (localized
        inputs) 0.04 (the mrngan bundle's setting) lifts the fitted prior from 0.269 to 0.275 head SSIM and 19.93 to 20.03 dB;
        on near-uniform phantoms, whose slices look alike after size alignment, it can pick wrong shifts.
    num_threads: torch threads while fitting (0: leave as is). The fit is hundreds of small
        operations; with two threads on a busy 2-core machine one fit took 30 s instead of 2.3 s.
    """

    mode: str = "deformable"
    top_k: int = 10
    preselect: int = 2
    intensity: str = "linear"
    work_size: int = 64
    affine_iters: int = 60
    deform_iters: int = 80
    grid_points: int = 10
    smooth_weight: float = 0.05
    lr_affine: float = 0.01
    lr_deform: float = 0.05
    decay: float = 0.1
    blur_sigma: float = 1.0
    position_search: float = 0.0
    position_step: float = 0.01
    num_threads: int = 1

    def __post_init__(self) -> None:
        if self.mode not in ("none", "affine", "deformable"):
            raise ValueError(f"fit mode must be 'none', 'affine' or 'deformable', got {self.mode!r}")
        if self.intensity not in ("none", "linear"):
            raise ValueError(f"intensity must be 'none' or 'linear', got {self.intensity!r}")
        if self.top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {self.top_k}")
        if self.position_search < 0 or self.position_step <= 0:
            raise ValueError(f"position_search must be >= 0 and position_step > 0, got {self.position_search}, {self.position_step}")


@contextmanager
def _threads(n: int):
    """At most ``n`` torch threads inside the block (0: unchanged)."""
    old = torch.get_num_threads()
    if 0 < int(n) < old:
        torch.set_num_threads(int(n))
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _gauss_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    if sigma <= 0:
        return x
    r = max(1, int(math.ceil(2.5 * sigma)))
    t = torch.arange(-r, r + 1, dtype=x.dtype)
    k = torch.exp(-(t**2) / (2 * sigma**2))
    k = k / k.sum()
    x = F.conv2d(F.pad(x, (r, r, 0, 0), mode="replicate"), k.view(1, 1, 1, -1))
    return F.conv2d(F.pad(x, (0, 0, r, r), mode="replicate"), k.view(1, 1, -1, 1))


def _moments(img: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Centroid (B, 2) in normalised (x, y) coordinates and sqrt(head area) (B,) of head masks."""
    b, _, h, w = img.shape
    mask = (img > HEAD_THRESHOLD).float()[:, 0]
    ys = torch.linspace(-1, 1, h).view(1, h, 1)
    xs = torch.linspace(-1, 1, w).view(1, 1, w)
    area = mask.sum((1, 2)).clamp_min(1.0)
    cx = (mask * xs).sum((1, 2)) / area
    cy = (mask * ys).sum((1, 2)) / area
    return torch.stack([cx, cy], 1), area.sqrt()


def _ncc(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    a = a.flatten(1) - a.flatten(1).mean(1, keepdim=True)
    b = b.flatten(1) - b.flatten(1).mean(1, keepdim=True)
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1)).clamp_min(1e-8)


def _warp(img: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    return F.grid_sample(img, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


@dataclass
class SliceFit:
    """Per-atlas transforms mapping fixed (patient) coordinates to atlas coordinates."""

    theta: torch.Tensor  # (K, 2, 3) affine
    disp: torch.Tensor  # (K, 2, g, g) coarse displacement (normalised units), zeros for affine mode
    gain: torch.Tensor  # (K,)
    offset: torch.Tensor  # (K,)
    atlas_index: torch.Tensor  # (K,) indices into the bank
    score: torch.Tensor  # (K,) NCC after alignment
    reference_position: float = 0.0
    config: dict = field(default_factory=dict)

    def grid(self, size: tuple[int, int], scale: torch.Tensor | float = 1.0) -> torch.Tensor:
        """Sampling grid (K, H, W, 2) at ``size``; ``scale`` (K,) or scalar multiplies the displacement."""
        k = self.theta.shape[0]
        base = F.affine_grid(self.theta, [k, 1, *size], align_corners=False)
        if self.disp.abs().sum() == 0:
            return base
        d = F.interpolate(self.disp, size=size, mode="bicubic", align_corners=True).permute(0, 2, 3, 1)
        scale = torch.as_tensor(scale, dtype=d.dtype).reshape(-1, 1, 1, 1) if torch.is_tensor(scale) else scale
        return base + d * scale


def register_slices(moving: torch.Tensor, fixed: torch.Tensor, cfg: FitConfig, theta_init: torch.Tensor | None = None) -> SliceFit:
    """Align each of ``moving`` (K, 1, H, W) to ``fixed`` (1, 1, H, W); returns transforms (not applied).

    Affine initialised by the head masks' centroids and sizes, refined by NCC of blurred images at
    ``work_size``; then (``mode="deformable"``) a displacement on a ``grid_points``^2 control grid,
    upsampled bicubically, maximising NCC with a first-difference smoothness penalty.
    ``theta_init`` (K, 2, 3) replaces the moment initialisation.
    """
    k = moving.shape[0]
    s = int(cfg.work_size)
    with torch.no_grad():
        mv = _gauss_blur(F.interpolate(moving.float(), size=(s, s), mode="area"), cfg.blur_sigma)
        fx = _gauss_blur(F.interpolate(fixed.float(), size=(s, s), mode="area"), cfg.blur_sigma).expand(k, -1, -1, -1)
        cm, sm = _moments(F.interpolate(moving.float(), size=(s, s), mode="area"))
        cf, sf = _moments(F.interpolate(fixed.float(), size=(s, s), mode="area"))
        ratio = (sm / sf.clamp_min(1.0)).clamp(0.5, 2.0)  # fixed coords -> moving coords scale
    theta0 = torch.zeros(k, 2, 3)
    if cfg.mode == "none":
        ratio, cm, cf = torch.ones(k), torch.zeros(k, 2), torch.zeros(1, 2)
    theta0[:, 0, 0] = ratio
    theta0[:, 1, 1] = ratio
    theta0[:, :, 2] = cm - ratio[:, None] * cf  # x_m = r * x_f + t maps the fixed centroid onto the moving one
    if theta_init is not None:
        theta0 = theta_init.clone().float()
    theta = theta0.clone()
    disp = torch.zeros(k, 2, cfg.grid_points, cfg.grid_points)
    if cfg.mode != "none":
        return _optimise(mv, fx, theta0, disp, cfg)
    with torch.no_grad():
        fit = SliceFit(theta, disp, torch.ones(k), torch.zeros(k), torch.arange(k), torch.zeros(k))
        fit.score = _ncc(_warp(mv, fit.grid((s, s))), fx)
    return fit


@torch.enable_grad()
def _optimise(mv: torch.Tensor, fx: torch.Tensor, theta0: torch.Tensor, disp: torch.Tensor, cfg: FitConfig) -> SliceFit:
    """Affine refinement (``affine_iters``), then the smooth displacement (``mode="deformable"``), by Adam on NCC."""
    k, s = mv.shape[0], mv.shape[-1]
    theta = theta0.clone().requires_grad_(True)
    opt = torch.optim.Adam([theta], lr=cfg.lr_affine)
    for _ in range(cfg.affine_iters):
        opt.zero_grad()
        g = F.affine_grid(theta, [k, 1, s, s], align_corners=False)
        loss = (1 - _ncc(_warp(mv, g), fx)).sum()
        loss.backward()
        opt.step()
    theta = theta.detach()
    if cfg.mode == "deformable":
        base = F.affine_grid(theta, [k, 1, s, s], align_corners=False)
        disp = disp.requires_grad_(True)
        opt = torch.optim.Adam([disp], lr=cfg.lr_deform / cfg.grid_points)
        for _ in range(cfg.deform_iters):
            opt.zero_grad()
            d = F.interpolate(disp, size=(s, s), mode="bicubic", align_corners=True).permute(0, 2, 3, 1)
            sim = 1 - _ncc(_warp(mv, base + d), fx)
            smooth = (disp[:, :, 1:] - disp[:, :, :-1]).pow(2).mean((1, 2, 3)) + (disp[..., 1:] - disp[..., :-1]).pow(2).mean((1, 2, 3))
            loss = (sim + cfg.smooth_weight * smooth * cfg.grid_points**2).sum()
            loss.backward()
            opt.step()
        disp = disp.detach()
    with torch.no_grad():
        fit = SliceFit(theta, disp, torch.ones(k), torch.zeros(k), torch.arange(k), torch.zeros(k))
        warped = _warp(mv, fit.grid((s, s)))
        fit.score = _ncc(warped, fx)
    return fit


def _intensity_map(warped: torch.Tensor, fixed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Least-squares gain per atlas (through the origin, so air stays black) mapping ``warped`` (K,1,H,W) onto ``fixed``.

    Fitted over the union of both head masks; returned with a zero offset.
    """
    fx = fixed.expand_as(warped)
    m = ((fx > HEAD_THRESHOLD) | (warped > HEAD_THRESHOLD)).float()
    gain = ((warped * fx * m).flatten(1).sum(1) / (warped * warped * m).flatten(1).sum(1).clamp_min(1e-8)).clamp(0.5, 2.0)
    return gain, torch.zeros_like(gain)


# ----------------------------------------------------------------------------------------------
# the prior
# ----------------------------------------------------------------------------------------------
class BrainPrior:
    """Prior slices at any ``p``, optionally fitted to a patient from one input slice.

    Args:
        bank: (K, P, H, W) or (P, H, W) volumes in [0, 1] on the position grid ``positions`` (P,).
        positions: ``p`` of each of the P grid slices (any monotonic order).
        fit: a :class:`FitConfig` or dict of its fields.
        name: a label for reports.
        subjects: the subject of each bank volume (atlas banks record them), for ``fit(exclude=...)``.
    """

    def __init__(self, bank: torch.Tensor | np.ndarray, positions: Sequence[float] | torch.Tensor, fit: FitConfig | dict | None = None, name: str = "prior",
                 subjects: Sequence[str] | None = None):
        bank = torch.as_tensor(np.nan_to_num(np.asarray(bank, dtype=np.float32), nan=0.0) if not torch.is_tensor(bank) else bank.float().nan_to_num(0.0))
        if bank.ndim == 3:
            bank = bank[None]
        if bank.ndim != 4:
            raise ValueError(f"prior bank must be (K, P, H, W) or (P, H, W), got {tuple(bank.shape)}")
        pos = torch.as_tensor(np.asarray(positions, dtype=np.float64))
        if pos.numel() != bank.shape[1]:
            raise ValueError(f"{pos.numel()} positions for {bank.shape[1]} prior slices")
        order = torch.argsort(pos)
        self.positions = pos[order]
        # several atlases are kept in half precision (120 IXI atlases: 400 MB instead of 800 MB)
        self.bank = bank[:, order].clamp(0, 1).to(torch.float16 if bank.shape[0] > 1 else torch.float32).contiguous()
        self.mean = sum(v.float() for v in self.bank) / self.bank.shape[0]
        self.config = fit if isinstance(fit, FitConfig) else FitConfig(**(fit or {}))
        self.name = name
        self.subjects = [str(s) for s in subjects] if subjects is not None else None
        if self.subjects is not None and len(self.subjects) != self.bank.shape[0]:
            raise ValueError(f"{len(self.subjects)} subjects for {self.bank.shape[0]} atlases")
        # fitted volumes by input slice, most recent last: a few-slice reconstruction alternates
        # between its inputs (runs up and down from each), so one entry would refit every time
        self._cache: OrderedDict[tuple, torch.Tensor] = OrderedDict()
        self.last_fit: SliceFit | None = None
        self._warned_subjects = False

    def with_fit(self, fit: FitConfig | dict | None, name: str | None = None) -> "BrainPrior":
        """The same bank with another fitting configuration (shares the tensors)."""
        new = object.__new__(BrainPrior)
        new.__dict__.update(self.__dict__)
        new.config = fit if isinstance(fit, FitConfig) else FitConfig(**(fit or {}))
        new.name = name or self.name
        new._cache, new.last_fit = OrderedDict(), None
        return new

    def subset(self, indices: Sequence[int]) -> "BrainPrior":
        """A prior over some of the bank's volumes."""
        subjects = [self.subjects[i] for i in indices] if self.subjects is not None else None
        return BrainPrior(self.bank[list(indices)], self.positions, self.config, self.name, subjects)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.bank.shape[-2:])

    def _interp(self, vol: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Linear interpolation of (P, H, W) along the grid at ``positions`` -> (B, 1, H, W)."""
        p = torch.as_tensor(positions, dtype=torch.float64).reshape(-1)
        if not torch.isfinite(p).all():
            raise ValueError("positions must be finite")
        p = p.clamp(float(self.positions[0]), float(self.positions[-1]))
        hi = torch.searchsorted(self.positions, p).clamp(1, len(self.positions) - 1)
        lo = hi - 1
        w = ((p - self.positions[lo]) / (self.positions[hi] - self.positions[lo]).clamp_min(1e-12)).float().view(-1, 1, 1)
        return (vol[lo] * (1 - w) + vol[hi] * w)[:, None]

    @torch.no_grad()
    def plain(self, positions: torch.Tensor) -> torch.Tensor:
        """The unfitted prior (mean of the bank) at ``positions``: (B, 1, H, W)."""
        return self._interp(self.mean, positions)

    def _check_reference(self, reference: torch.Tensor, reference_position: float | None) -> torch.Tensor:
        ref = torch.as_tensor(reference, dtype=torch.float32)
        while ref.ndim < 4:
            ref = ref[None]
        if ref.shape[:2] != (1, 1) or tuple(ref.shape[-2:]) != self.shape:
            raise ValueError(f"reference slice must be (1, 1, {self.shape[0]}, {self.shape[1]}), got {tuple(reference.shape)}")
        if reference_position is None or not math.isfinite(float(reference_position)):
            raise ValueError("reference_position (the input slice's p) is required with a reference slice")
        if not torch.isfinite(ref).all():
            raise ValueError("reference slice contains NaN or infinite values")
        return ref.clamp(0, 1)

    @torch.no_grad()
    def scan(self, reference: torch.Tensor, reference_position: float, window: float, step: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
        """How well each atlas matches ``reference`` at positions around ``reference_position``.

        Returns the candidate positions (C,) within ``reference_position +- window`` (clamped to the
        bank's range) and the NCC (K, C) of every atlas slice there with the input, after the
        head-moment (centroid and size) alignment of :func:`register_slices`, at ``work_size``.
        """
        ref = self._check_reference(reference, reference_position)
        n = int(round(window / step))
        cands = (float(reference_position) + step * torch.arange(-n, n + 1, dtype=torch.float64)).clamp(float(self.positions[0]), float(self.positions[-1]))
        s = int(self.config.work_size)
        k = self.bank.shape[0]
        moving = torch.stack([F.interpolate(self._interp(v, cands).float(), size=(s, s), mode="area") for v in self.bank])  # (K, C, 1, s, s)
        fixed = F.interpolate(ref, size=(s, s), mode="area")
        cfg = replace(self.config, mode="affine", affine_iters=0, work_size=s)
        fit = register_slices(moving.reshape(-1, 1, s, s), fixed, cfg)
        return cands, fit.score.reshape(k, len(cands))

    def locate(self, reference: torch.Tensor, reference_position: float, window: float = 0.12, step: float = 0.01, top_k: int | None = None) -> float:
        """Refine an estimated position of ``reference``: the ``p`` within ``+- window`` where the
        ``top_k`` best-matching atlases (default: the fit's ``top_k``) match it best on average.

        Matching the input against 120 atlases' slices corrects most of a CNN localizer's error
        (on IXI test subjects, 2 mm data: mean error 10.7 mm -> 4.1 mm).
        """
        with _threads(self.config.num_threads):
            cands, score = self.scan(reference, reference_position, window, step)
        k = min(int(top_k or self.config.top_k), score.shape[0])
        return float(cands[score.topk(k, dim=0).values.mean(0).argmax()])

    def fit(self, reference: torch.Tensor, reference_position: float, exclude: str | None = None) -> torch.Tensor:
        """Fit the prior to the input slice; returns and caches the fitted (P, H, W) volume on the grid.

        ``exclude``: a subject whose own volume is in the bank (a training subject) is left out, so
        training sees the prior a new patient would get, not the subject's own scan.
        """
        with _threads(self.config.num_threads):
            return self._fit(reference, reference_position, exclude)

    def _fit(self, reference: torch.Tensor, reference_position: float, exclude: str | None = None) -> torch.Tensor:
        ref = self._check_reference(reference, reference_position)
        p0 = float(reference_position)
        if exclude and self.subjects is None and not self._warned_subjects:
            logger.warning("%s records no subjects: cannot leave %s out of its atlases (rebuild the bank)", self.name, exclude)
            self._warned_subjects = True
        if not (exclude and self.subjects and exclude in self.subjects):
            exclude = None  # nothing to leave out
        allowed = torch.as_tensor([j for j, s in enumerate(self.subjects) if s != exclude] if exclude else range(self.bank.shape[0]), dtype=torch.long)
        if len(allowed) == 0:
            raise ValueError(f"no atlas left after excluding {exclude!r}")
        key = (p0, exclude, float(ref.sum()), float((ref * ref).sum()), float((ref * torch.linspace(0, 1, ref.numel()).view_as(ref)).sum()))
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        cfg = self.config
        if cfg.mode == "none" and cfg.intensity == "none":
            return self.mean
        # atlas slices at p0 (the mean brain itself when the bank has one volume), or each atlas
        # at its own best-matching position near p0 (``shift``: that position minus p0)
        shift = torch.zeros(self.bank.shape[0], dtype=torch.float64)
        if cfg.position_search > 0:
            cands, score = self.scan(ref, p0, cfg.position_search, cfg.position_step)
            shift = cands[score.argmax(1)] - p0
        moving = torch.stack([self._interp(self.bank[j], p0 + shift[j : j + 1]).float() for j in allowed.tolist()])[:, 0]  # (K, 1, H, W)
        m = cfg.preselect * cfg.top_k
        if cfg.mode == "deformable" and len(moving) > m:
            aff = register_slices(moving, ref, replace(cfg, mode="affine"))
            sel = torch.argsort(aff.score, descending=True)[:m]
            fit = register_slices(moving[sel], ref, replace(cfg, affine_iters=0), theta_init=aff.theta[sel])
            order = torch.argsort(fit.score, descending=True)[: cfg.top_k]
            keep = sel[order]
            fit = SliceFit(fit.theta[order], fit.disp[order], fit.gain[order], fit.offset[order], keep, fit.score[order])
        else:
            fit = register_slices(moving, ref, cfg)
            keep = torch.argsort(fit.score, descending=True)[: min(cfg.top_k, len(fit.score))]
            fit = SliceFit(fit.theta[keep], fit.disp[keep], fit.gain[keep], fit.offset[keep], keep, fit.score[keep])
        with torch.no_grad():
            fit.reference_position, fit.config = p0, asdict(cfg)
            warped0 = _warp(moving[keep], fit.grid(self.shape))
            keep = allowed[keep]  # bank indices
            fit.atlas_index = keep
            if cfg.intensity == "linear":
                fit.gain, fit.offset = _intensity_map(warped0, ref)
            out = torch.zeros_like(self.mean)
            weight = torch.exp(-(self.positions - p0).abs() / cfg.decay).float() if cfg.decay > 0 else torch.ones(len(self.positions))
            for j in range(len(keep)):
                a = int(keep[j])
                vol = self._interp(self.bank[a], self.positions + shift[a]).float() if shift[a] != 0 else self.bank[a].float()[:, None]  # (P, 1, H, W)
                one = SliceFit(fit.theta[j : j + 1].expand(len(vol), -1, -1), fit.disp[j : j + 1].expand(len(vol), -1, -1, -1),
                               fit.gain[j : j + 1], fit.offset[j : j + 1], keep[j : j + 1], fit.score[j : j + 1])
                w = _warp(vol, one.grid(self.shape, weight))
                w = w * fit.gain[j] + fit.offset[j]
                out += w[:, 0].clamp(0, 1)
            out /= len(keep)
        fit.config["shifts"] = shift[keep].tolist()
        self.last_fit, self._cache[key] = fit, out
        while len(self._cache) > FIT_CACHE_SIZE:
            self._cache.popitem(last=False)
        return out

    @torch.no_grad()
    def slice_at(self, positions: torch.Tensor, reference: torch.Tensor | None = None, reference_position: float | None = None, exclude: str | None = None) -> torch.Tensor:
        """Prior slices (B, 1, H, W) in [0, 1] at ``positions`` (B,); fitted when ``reference`` is given (``exclude``: see :meth:`fit`)."""
        positions = torch.as_tensor(positions, dtype=torch.float64).reshape(-1)
        if reference is None:
            return self.plain(positions)
        return self._interp(self.fit(reference, reference_position, exclude), positions).clamp(0, 1)

    @torch.no_grad()
    def volume(self, positions: Sequence[float] | torch.Tensor, reference: torch.Tensor | None = None, reference_position: float | None = None) -> torch.Tensor:
        """The prior at each of ``positions`` stacked as (N, H, W)."""
        return self.slice_at(torch.as_tensor(np.asarray(positions, dtype=np.float64)), reference, reference_position)[:, 0]


# ----------------------------------------------------------------------------------------------
# GAN priors: the generator's general brain becomes a one-volume bank
# ----------------------------------------------------------------------------------------------
@torch.no_grad()
def gan_general_brain(checkpoint: dict, positions: Sequence[float], num_samples: int = 8, seed: int = 0) -> np.ndarray:
    """Average ``num_samples`` generated slices per position for a cGAN or DCGAN-set checkpoint -> (N, H, W) in [0, 1]."""
    from ..networks.gan import build_generator_from_checkpoint

    gen, kind, extra = build_generator_from_checkpoint(checkpoint)
    gen.eval()
    g = torch.Generator().manual_seed(seed)
    p = torch.as_tensor(np.asarray(positions, dtype=np.float32))
    out = []
    for start in range(0, len(p), 32):
        pb = p[start : start + 32]
        acc = 0.0
        for _ in range(num_samples):
            z = torch.randn(len(pb), gen.latent_size, generator=g)
            acc = acc + gen.generate(z, pb)
        out.append(((acc / num_samples) + 1.0) / 2.0)
    return torch.cat(out)[:, 0].clamp(0, 1).numpy()


def load_prior(path: str | os.PathLike, fit: FitConfig | dict | None = None, num_positions: int = 101, num_samples: int = 8) -> BrainPrior:
    """Load a prior written by the brain generalization bundle.

    - ``*.nii`` / ``*.nii.gz``: a general-brain volume over ``p`` (positions from the
      ``.positions.json`` sidecar, else ``p`` from 1 at index 0 to 0 at the last index);
    - ``*.pt``: an atlas bank (``save_bank``) or generator weights (cGAN / DCGAN set), from which
      the general brain is drawn on ``num_positions`` positions averaging ``num_samples`` latents.
    """
    from ..data.io import is_nifti
    from ..engines.checkpoint import load_state

    path = Path(path)
    if not path.is_file():
        raise InputError(path, "no such file; train or build the brain generalization prior first")
    if is_nifti(path):
        vol, _ = load_volume(path)
        sidecar = _sidecar(path)
        if sidecar.is_file():
            try:
                positions = json.loads(sidecar.read_text())["positions"]
            except (ValueError, KeyError) as err:
                raise InputError(sidecar, f"unreadable positions sidecar ({type(err).__name__})") from err
            if len(positions) != vol.shape[2]:
                raise InputError(sidecar, f"{len(positions)} positions for a volume with {vol.shape[2]} slices")
        else:
            positions = position_grid(vol.shape[2])
        return BrainPrior(np.moveaxis(vol, -1, 0), positions, fit, name=path.name)
    if path.suffix != ".pt":
        raise InputError(path, "unsupported prior file; expected a .nii/.nii.gz general brain or a .pt checkpoint")
    try:
        state = load_state(path)
    except ValueError as err:
        raise InputError(path, str(err).split(": ", 1)[-1]) from err
    if not isinstance(state, dict) or "kind" not in state:
        raise InputError(path, "not a brain generalization checkpoint (no 'kind' entry)")
    if state["kind"] == "atlas_bank":
        return BrainPrior(state["bank"].float() / 255.0, state["positions"], fit, name=path.name, subjects=state.get("subjects"))
    grid = position_grid(num_positions)
    return BrainPrior(gan_general_brain(state, grid, num_samples), grid, fit, name=path.name)


def position_items(num_positions: int) -> list[dict]:
    """Dataset items ``{"position": (1,) tensor, "index": i}`` over the common grid (inference input)."""
    return [{"position": torch.tensor([float(p)]), "index": i} for i, p in enumerate(position_grid(num_positions))]


class GeneralBrainWriter:
    """Evaluator handler: collect the general brain slice per position and write it when the run completes.

    Writes ``output_file`` (NIfTI over ``p`` + ``.positions.json``, readable by :func:`load_prior`) and,
    with ``generator`` and ``generator_file``, the self-describing generator checkpoint.
    """

    def __init__(self, output_file: str, generator: torch.nn.Module | None = None, generator_file: str | None = None, spacing_mm: float = 2.0):
        self.output_file, self.generator, self.generator_file, self.spacing_mm = output_file, generator, generator_file, spacing_mm
        self._slices: list[torch.Tensor] = []
        self._pos: list[torch.Tensor] = []

    def attach(self, engine) -> "GeneralBrainWriter":
        from ignite.engine import Events

        engine.add_event_handler(Events.STARTED, lambda e: (self._slices.clear(), self._pos.clear()))
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._collect)
        engine.add_event_handler(Events.COMPLETED, self._write)
        return self

    def _collect(self, engine) -> None:
        out = engine.state.output
        items = out if isinstance(out, list) else [out]
        for o in items:
            pred, pos = torch.as_tensor(o["pred"]).detach().cpu(), torch.as_tensor(o["image"]).detach().cpu()
            self._slices.append(pred.reshape(-1, *pred.shape[-2:]))
            self._pos.append(pos.reshape(-1))

    def _write(self, engine) -> None:
        from ..engines.checkpoint import atomic_torch_save
        from ..networks.gan import export_generator

        pos = torch.cat(self._pos).double()
        order = torch.argsort(pos, descending=True)
        vol = torch.cat(self._slices)[order].float().numpy()
        save_prior_volume(vol, pos[order].numpy(), self.output_file, self.spacing_mm)
        logger.info("general brain over %d positions written to %s", len(pos), self.output_file)
        if self.generator is not None and self.generator_file:
            atomic_torch_save(export_generator(self.generator), self.generator_file)
