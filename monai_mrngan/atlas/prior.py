"""The general-brain prior: what a brain looks like at position ``p``, fitted to one patient.

A :class:`BrainPrior` holds a bank (:mod:`monai_mrngan.atlas.bank`). Fitting to a patient
(:meth:`BrainPrior.fit`) uses ONLY the one input slice ``r`` at ``p0``:

1. each atlas slice at ``p0`` is aligned to ``r`` (:func:`~monai_mrngan.atlas.registration.register_slices`:
   affine, then a smooth displacement);
2. the atlases whose aligned slice correlates best with ``r`` are kept (``top_k``), each with an
   intensity gain fitted on that slice;
3. every position's slice of every kept atlas is warped with that atlas' transform (the
   displacement optionally fading with ``|p - p0|``), intensity-mapped, and averaged.

In-plane moment alignment alone gains nothing on IXI (see issue 4): the deformation moves the head
outline and inner structures themselves, and choosing atlases that look like the patient gives a
prior sharper than the population mean. ``slice_at`` / ``load_prior`` are the contract the
end-to-end stage relies on. The plain population mean is a one-volume ``BrainPrior`` too
(:func:`mean_prior`).
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections import OrderedDict
from dataclasses import dataclass
from weakref import WeakKeyDictionary
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..data.datalist import load_split
from ..data.io import InputError, is_nifti, load_state, load_volume
from ..data.positions import HEAD_THRESHOLD
from .bank import build_bank, gan_general_brain, mean_brain, position_grid, sidecar_path
from .fit import ScanResult, WorkBank, bracket, fit_batch, gather_slices, scan, to_unit, warp_fits
from .registration import FitConfig, SliceFit, gauss_blur, torch_threads

logger = logging.getLogger(__name__)

FIT_BATCH = 8  # input slices fitted together (8 x 120 atlases: a few hundred MB of work tensors)
FIT_CACHE_SIZE = 32  # fitted volumes (and atlas scans) kept per prior (128 px, 101 positions: 6.6 MB a volume)

__all__ = ["BrainPrior", "FitConfig", "load_prior", "mean_prior", "TemplateLocalizer", "template_localizer_for", "FIT_CACHE_SIZE"]


@dataclass
class _FitEntry:
    """One cached fit: the prior volume (D, H, W), which of its grid slices are warped yet, the fit's
    transforms (to warp the rest without refitting) and, when asked for, the atlas spread (fp16)."""

    volume: torch.Tensor
    filled: torch.Tensor
    fit: SliceFit
    spread: torch.Tensor | None = None


class BrainPrior:
    """Prior slices at any ``p``, optionally fitted to a patient from one input slice.

    Args:
        bank: (K, P, H, W) or (P, H, W) volumes on the position grid ``positions`` (P,): float in
            [0, 1], or uint8 quantised (``save_bank``: 0..255 for [0, 1], held as is).
        positions: ``p`` of each of the P grid slices (any monotonic order).
        fit: a :class:`FitConfig` or dict of its fields.
        name: a label for reports.
        subjects: the subject of each bank volume (atlas banks record them), for ``fit(exclude=...)``.
        device: where the bank lives and the fit runs (``"cpu"``, ``"cuda"``); results come back there.
    """

    def __init__(self, bank: torch.Tensor | np.ndarray, positions: Sequence[float] | torch.Tensor, fit: FitConfig | dict | None = None, name: str = "prior",
                 subjects: Sequence[str] | None = None, device: str | torch.device = "cpu"):
        bank = bank if torch.is_tensor(bank) else torch.from_numpy(np.ascontiguousarray(bank))
        if bank.ndim == 3:
            bank = bank[None]
        if bank.ndim != 4:
            raise ValueError(f"prior bank must be (K, P, H, W) or (P, H, W), got {tuple(bank.shape)}")
        pos = torch.as_tensor(np.asarray(positions, dtype=np.float64))
        if pos.numel() != bank.shape[1]:
            raise ValueError(f"{pos.numel()} positions for {bank.shape[1]} prior slices")
        order = torch.argsort(pos)
        self.device = torch.device(device)
        self.positions = pos[order]
        self._grid = self.positions.to(self.device)
        # one compact copy: uint8 banks stay uint8 (120 IXI atlases at 128 px: 200 MB), several float
        # atlases become fp16, a single volume stays float32; converted slice by slice when read
        if bank.dtype == torch.uint8:
            self.bank = bank[:, order].to(self.device).contiguous()
        else:
            dtype = torch.float16 if bank.shape[0] > 1 else torch.float32
            self.bank = torch.empty(bank.shape, dtype=dtype, device=self.device)
            for j in range(bank.shape[0]):
                self.bank[j] = bank[j, order].float().nan_to_num(0.0).clamp(0, 1).to(self.device, dtype)
        self.mean = self.bank.sum(0, dtype=torch.int32 if self.bank.dtype == torch.uint8 else torch.float32).float()
        self.mean /= self.bank.shape[0] * (255.0 if self.bank.dtype == torch.uint8 else 1.0)
        self.config = fit if isinstance(fit, FitConfig) else FitConfig(**(fit or {}))
        self.name = name
        self.subjects = [str(s) for s in subjects] if subjects is not None else None
        if self.subjects is not None and len(self.subjects) != self.bank.shape[0]:
            raise ValueError(f"{len(self.subjects)} subjects for {self.bank.shape[0]} atlases")
        # the bank at the registration's work size, per (size, blur): shared by with_fit copies
        self._work: dict[tuple, WorkBank] = {}
        # fits by input slice, most recent last: a few-slice reconstruction alternates between its
        # inputs (runs up and down from each), so one entry would refit every time; each holds the
        # fitted volume, which of its grid slices are warped yet, the fit's transforms and (fp16,
        # with keep_spread: for the uncertainty map) the kept atlases' per-voxel spread
        self._cache: OrderedDict[tuple, _FitEntry] = OrderedDict()
        self.keep_spread = False
        self._plain_spread: torch.Tensor | None = None
        # atlas scans by input slice (the refinement's, reused by the fit of the same slice)
        self._scans: OrderedDict[tuple, ScanResult] = OrderedDict()
        self.last_fit: SliceFit | None = None
        self._warned_subjects = False

    def with_fit(self, fit: FitConfig | dict | None, name: str | None = None) -> "BrainPrior":
        """The same bank with another fitting configuration (shares the tensors)."""
        new = object.__new__(BrainPrior)
        new.__dict__.update(self.__dict__)
        new.config = fit if isinstance(fit, FitConfig) else FitConfig(**(fit or {}))
        new.name = name or self.name
        new._cache, new._scans, new.last_fit = OrderedDict(), OrderedDict(), None
        return new

    def subset(self, indices: Sequence[int]) -> "BrainPrior":
        """A prior over some of the bank's volumes."""
        subjects = [self.subjects[i] for i in indices] if self.subjects is not None else None
        return BrainPrior(self.bank[list(indices)], self.positions, self.config, self.name, subjects, self.device)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.bank.shape[-2:])

    def _interp(self, vol: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Linear interpolation of (P, H, W) along the grid at ``positions`` -> (B, 1, H, W)."""
        p = torch.as_tensor(positions, dtype=torch.float64).reshape(-1).to(self.device)
        if not bool(torch.isfinite(p).all()):
            raise ValueError("positions must be finite")
        return gather_slices(vol[None], self._grid, torch.zeros(len(p), dtype=torch.long, device=self.device), p)

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
        if not bool(torch.isfinite(ref).all()):
            raise ValueError("reference slice contains NaN or infinite values")
        return ref.to(self.device).clamp(0, 1)

    def _work_bank(self) -> WorkBank:
        key = (int(self.config.work_size), float(self.config.blur_sigma))
        if key not in self._work:
            self._work[key] = WorkBank(self.bank, *key)
        return self._work[key]

    @staticmethod
    def _ref_key(ref: torch.Tensor) -> tuple:
        w = torch.linspace(0, 1, ref.numel(), device=ref.device).view_as(ref)
        return tuple(torch.stack([ref.sum(), (ref * ref).sum(), (ref * w).sum()]).tolist())

    def _candidates(self, p0: float | Sequence[float], window: float, step: float) -> torch.Tensor:
        """Positions within ``+- window`` of the estimate ``p0`` (or of each of several), on the first one's
        lattice of ``step`` (overlapping windows share their candidates), clamped to the bank's range, ascending."""
        starts = torch.as_tensor(p0, dtype=torch.float64).reshape(-1).tolist()
        n = int(round(window / step))
        k = torch.cat([torch.arange(-n, n + 1) + round((s - starts[0]) / step) for s in starts]).unique()
        return (starts[0] + step * k.double()).clamp(float(self.positions[0]), float(self.positions[-1])).unique().to(self.device)

    @torch.no_grad()
    def _scan(self, ref: torch.Tensor, cands: torch.Tensor, mode: str = "affine") -> ScanResult:
        """:func:`~monai_mrngan.atlas.fit.scan`, remembered per input slice so the fit reuses the refinement's."""
        key = (self._ref_key(ref), int(self.config.work_size), float(self.config.blur_sigma), mode)
        old = self._scans.get(key)
        hit = old.columns(cands) if old is not None else None
        if hit is not None:
            return hit
        res = scan(self._work_bank(), self._grid, ref, cands, mode)
        self._scans[key] = res
        while len(self._scans) > FIT_CACHE_SIZE:
            self._scans.popitem(last=False)
        return res

    @torch.no_grad()
    def scan(self, reference: torch.Tensor, reference_position: float | Sequence[float], window: float, step: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
        """How well each atlas matches ``reference`` at positions around ``reference_position``.

        Returns the candidate positions (C,) within ``+- window`` of the estimate (of any of several
        estimates: one scan over the union of their windows), clamped to the bank's range, and the NCC
        (K, C) of every atlas slice there with the input, after the head-moment (centroid and size)
        alignment of :func:`register_slices`, at ``work_size``; all atlases and candidates in one batch
        (:func:`~monai_mrngan.atlas.fit.scan`).
        """
        starts = torch.as_tensor(reference_position, dtype=torch.float64).reshape(-1)
        ref = self._check_reference(reference, float(starts[0]))
        res = self._scan(ref, self._candidates(starts, window, step))
        return res.cands, res.score

    def locate(self, reference: torch.Tensor, reference_position: float | Sequence[float], window: float = 0.12, step: float = 0.01,
               top_k: int | None = None) -> float:
        """Refine an estimated position of ``reference``: the ``p`` within ``+- window`` of the estimate
        (or of any of several, in one :meth:`scan`) where the ``top_k`` best-matching atlases (default:
        the fit's ``top_k``) match it best on average.

        Matching the input against 120 atlases' slices corrects most of a CNN localizer's error
        (on IXI test subjects, 2 mm data: mean error 10.7 mm -> 4.1 mm). The scan is kept: a fit of
        the same slice at the found position reuses it.
        """
        with torch_threads(self.config.num_threads):
            cands, score = self.scan(reference, reference_position, window, step)
        k = min(int(top_k or self.config.top_k), score.shape[0])
        return float(cands[score.topk(k, dim=0).values.mean(0).argmax()])

    def fit(self, reference: torch.Tensor, reference_position: float, exclude: str | None = None) -> torch.Tensor:
        """Fit the prior to the input slice; returns and caches the fitted (P, H, W) volume on the grid.

        ``exclude``: a subject whose own volume is in the bank (a training subject) is left out, so
        training sees the prior a new patient would get, not the subject's own scan.
        """
        return self.fit_many(reference, [reference_position], None if exclude is None else [exclude])[0]

    def fit_many(self, references: torch.Tensor, reference_positions: Sequence[float] | torch.Tensor,
                 exclude: Sequence[str | None] | None = None, within: Sequence[torch.Tensor | None] | None = None) -> list[torch.Tensor]:
        """:meth:`fit` for several input slices (N, 1, H, W) at once (one batch for those not cached yet).

        ``within[n]``: the positions input n's prior is wanted at (None: all). Only the grid slices
        around them are warped (the rest of the returned volume is 0 until asked for): a gap of a
        few-slice reconstruction needs a few slices of its input's fit, not the whole volume.
        """
        refs = torch.as_tensor(references, dtype=torch.float32)
        if refs.ndim == 3:
            refs = refs[:, None]
        pos = reference_positions.reshape(-1).tolist() if torch.is_tensor(reference_positions) else list(reference_positions)
        if refs.ndim != 4 or len(pos) != refs.shape[0]:
            raise ValueError(f"{tuple(refs.shape)} reference slices for {len(pos)} positions")
        checked = [self._check_reference(r[None], p) for r, p in zip(refs, pos)]
        exclude = list(exclude) if exclude is not None else [None] * len(pos)
        within = list(within) if within is not None else [None] * len(pos)
        with torch_threads(self.config.num_threads):
            return self._fit_many(checked, [float(p) for p in pos], exclude, [self.grid_slices_for(w) for w in within])

    def grid_slices_for(self, positions: torch.Tensor | None) -> torch.Tensor:
        """Grid slices (P,) bool that linear interpolation at ``positions`` reads (all for None)."""
        need = torch.zeros(len(self._grid), dtype=torch.bool, device=self.device)
        if positions is None:
            return need.fill_(True)
        lo, hi, _ = bracket(self._grid, torch.as_tensor(positions, dtype=torch.float64).reshape(-1).to(self.device))
        need[lo] = True
        need[hi] = True
        return need

    def _allowed(self, exclude: str | None) -> torch.Tensor:
        if exclude and self.subjects is None and not self._warned_subjects:
            logger.warning("%s records no subjects: cannot leave %s out of its atlases (rebuild the bank)", self.name, exclude)
            self._warned_subjects = True
        allowed = torch.ones(self.bank.shape[0], dtype=torch.bool, device=self.device)
        if exclude and self.subjects and exclude in self.subjects:
            allowed[[j for j, s in enumerate(self.subjects) if s == exclude]] = False
        if not bool(allowed.any()):
            raise ValueError(f"no atlas left after excluding {exclude!r}")
        return allowed

    def _fit_key(self, ref: torch.Tensor, position: float, exclude: str | None) -> tuple:
        """The fit cache's key: the slice, its position and the subject left out (when the bank has it). The position is
        rounded to 1e-6 in p (0.2 µm): a run hands its start position over as float32, a caller holding it as float64 asks
        for the same fit."""
        return (round(float(position), 6), exclude if self.subjects and exclude in self.subjects else None, *self._ref_key(ref))

    def _fit_many(self, refs: list[torch.Tensor], pos: list[float], exclude: list[str | None], need: list[torch.Tensor]) -> list[torch.Tensor]:
        cfg = self.config
        if cfg.mode == "none" and cfg.intensity == "none":
            return [self.mean] * len(refs)
        allowed = [self._allowed(e) for e in exclude]
        keys = [self._fit_key(r, p, e) for r, p, e in zip(refs, pos, exclude)]
        first = [keys.index(k) for k in keys]  # the same slice twice in one call: fitted once, warped where either asks
        for i, f in enumerate(first):
            if f != i:
                need[f] = need[f] | need[i]
        todo = [i for i, k in enumerate(keys) if k not in self._cache and first[i] == i]
        window = cfg.position_search if cfg.position_search > 0 else 0.0
        for start in range(0, len(todo), FIT_BATCH):
            part = todo[start : start + FIT_BATCH]
            scans = [self._scan(refs[i], self._candidates(pos[i], window, cfg.position_step), "none" if cfg.mode == "none" else "affine")
                     for i in part]
            rows = torch.stack([need[i] for i in part])
            vols, fits, spreads = fit_batch(self.bank, self._work_bank(), self._grid, torch.cat([refs[i] for i in part]),
                                            torch.as_tensor([pos[i] for i in part], dtype=torch.float64, device=self.device),
                                            torch.stack([allowed[i] for i in part]), scans, cfg, rows, self.keep_spread)
            for j, i in enumerate(part):
                self._cache[keys[i]] = _FitEntry(vols[j], rows[j].clone(), fits[j], spreads[j].half() if spreads is not None else None)
            self.last_fit = fits[-1]
        self._warp_missing([(keys[i], need[i]) for i in range(len(keys)) if first[i] == i])
        out = []
        for k in keys:
            self._cache.move_to_end(k)
            out.append(self._cache[k].volume)
        # trimmed only when this call added fits, and never below this call's own inputs: a stack of more than
        # FIT_CACHE_SIZE slices is fitted in one batch and then read back (and its spread) one input at a time; a
        # fixed size evicted the first inputs before they were read, and each read refitted one the read before had
        # evicted. The next call that fits brings the cache back to FIT_CACHE_SIZE.
        if todo:
            limit = max(FIT_CACHE_SIZE, len(set(keys)))
            while len(self._cache) > limit:
                self._cache.popitem(last=False)
        return out

    def _warp_missing(self, wanted: list[tuple[tuple, torch.Tensor]]) -> None:
        """Warp, from the kept transforms (no refit), the grid slices of cached fits asked for now but not
        before; with ``keep_spread``, the spread of entries fitted without it (all their warped slices)."""
        jobs = []
        for key, need in wanted:
            entry = self._cache[key]
            rows = (entry.filled | need) if self.keep_spread and entry.spread is None else need & ~entry.filled
            if bool(rows.any()):
                jobs.append((key, rows))
        if not jobs:
            return
        rows = torch.stack([r for _, r in jobs])
        vols, spreads = warp_fits(self.bank, self._grid, [self._cache[k].fit for k, _ in jobs], rows, self.config.decay,
                                  self.keep_spread or any(self._cache[k].spread is not None for k, _ in jobs))
        for j, (key, r) in enumerate(jobs):
            entry = self._cache[key]
            entry.volume[r] = vols[j][r]
            entry.filled |= r
            if spreads is not None:
                if entry.spread is None:
                    entry.spread = torch.zeros_like(entry.volume, dtype=torch.float16)
                entry.spread[r] = spreads[j][r].half()

    @torch.no_grad()
    def spread_at(self, positions: torch.Tensor, reference: torch.Tensor | None = None, reference_position: float | None = None) -> torch.Tensor:
        """How much the atlases disagree: per-voxel standard deviation (B, 1, H, W) at ``positions`` (B,).

        With ``reference``: of the ``top_k`` kept warped atlases of :meth:`fit` around the fitted
        prior (a cached fit made without ``keep_spread`` is warped again from its transforms, not
        refitted); without: of the whole unaligned bank around :attr:`mean` (0 for a one-volume prior).
        """
        positions = torch.as_tensor(positions, dtype=torch.float64).reshape(-1)
        cfg = self.config
        if reference is None or (cfg.mode == "none" and cfg.intensity == "none"):
            if self._plain_spread is None:
                sq = torch.zeros_like(self.mean)
                for j in range(self.bank.shape[0]):
                    sq += (to_unit(self.bank[j]) - self.mean) ** 2
                self._plain_spread = (sq / self.bank.shape[0]).sqrt()
            return self._interp(self._plain_spread, positions)
        ref = self._check_reference(reference, reference_position)
        keep, self.keep_spread = self.keep_spread, True
        try:
            with torch_threads(cfg.num_threads):
                self._fit_many([ref], [float(reference_position)], [None], [self.grid_slices_for(positions)])
        finally:
            self.keep_spread = keep
        return self._interp(self._cache[self._fit_key(ref, reference_position, None)].spread.float(), positions)

    @torch.no_grad()
    def slice_at(self, positions: torch.Tensor, reference: torch.Tensor | None = None, reference_position: float | None = None, exclude: str | None = None) -> torch.Tensor:
        """Prior slices (B, 1, H, W) in [0, 1] at ``positions`` (B,); fitted when ``reference`` is given (``exclude``: see :meth:`fit`)."""
        positions = torch.as_tensor(positions, dtype=torch.float64).reshape(-1)
        if reference is None:
            return self.plain(positions)
        vol = self.fit_many(reference, [reference_position], [exclude], [positions])[0]
        return self._interp(vol, positions).clamp(0, 1)

    @torch.no_grad()
    def volume(self, positions: Sequence[float] | torch.Tensor, reference: torch.Tensor | None = None, reference_position: float | None = None) -> torch.Tensor:
        """The prior at each of ``positions`` stacked as (N, H, W)."""
        return self.slice_at(torch.as_tensor(np.asarray(positions, dtype=np.float64)), reference, reference_position)[:, 0]


def load_prior(path: str | os.PathLike, fit: FitConfig | dict | None = None, num_positions: int = 101, num_samples: int = 8,
               device: str | torch.device = "cpu") -> BrainPrior:
    """Load a prior written by the brain generalization bundle.

    - ``*.nii`` / ``*.nii.gz``: a general-brain volume over ``p`` (positions from the
      ``.positions.json`` sidecar, else ``p`` from 1 at index 0 to 0 at the last index);
    - ``*.pt``: an atlas bank (``save_bank``) or generator weights (cGAN / DCGAN set), from which
      the general brain is drawn on ``num_positions`` positions averaging ``num_samples`` latents.

    ``device``: where the prior's bank lives and its fits run (an atlas bank stays uint8 there).
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "no such file; train or build the brain generalization prior first")
    if is_nifti(path):
        vol, _ = load_volume(path)
        sidecar = sidecar_path(path)
        if sidecar.is_file():
            try:
                positions = json.loads(sidecar.read_text())["positions"]
            except (ValueError, KeyError) as err:
                raise InputError(sidecar, f"unreadable positions sidecar ({type(err).__name__})") from err
            if len(positions) != vol.shape[2]:
                raise InputError(sidecar, f"{len(positions)} positions for a volume with {vol.shape[2]} slices")
        else:
            positions = position_grid(vol.shape[2])
        return BrainPrior(np.moveaxis(vol, -1, 0), positions, fit, name=path.name, device=device)
    if path.suffix != ".pt":
        raise InputError(path, "unsupported prior file; expected a .nii/.nii.gz general brain or a .pt checkpoint")
    try:
        state = load_state(path, mmap=True)
    except ValueError as err:
        raise InputError(path, str(err).split(": ", 1)[-1]) from err
    if not isinstance(state, dict) or "kind" not in state:
        raise InputError(path, "not a brain generalization checkpoint (no 'kind' entry)")
    if state["kind"] == "atlas_bank":
        bank = state["bank"]
        if not torch.is_tensor(bank) or bank.dtype != torch.uint8 or bank.ndim != 4:
            raise InputError(path, f"atlas bank must be a (K, P, H, W) uint8 tensor, got {getattr(bank, 'dtype', type(bank).__name__)}")
        return BrainPrior(bank, state["positions"], fit, name=path.name, subjects=state.get("subjects"), device=device)
    grid = position_grid(num_positions)
    return BrainPrior(gan_general_brain(state, grid, num_samples), grid, fit, name=path.name, device=device)



def mean_prior(dataset_dir: str | os.PathLike, split: str = "training", bins: int = 101, limit: int | None = None) -> BrainPrior:
    """The plain population mean over ``p`` of a prepared split, as a one-volume prior that is never fitted.

    The unaligned "mean brain" floor of BASELINES.md, and a stand-in prior for tests and for runs
    before the brain generalization stage is trained.
    """
    entries = load_split(dataset_dir, split, limit)
    if not entries:
        raise ValueError(f"{dataset_dir}: split {split!r} is empty")
    bank, grid = build_bank(entries, bins)
    return BrainPrior(mean_brain(bank), grid, FitConfig(mode="none", intensity="none"), name=f"mean brain ({split})")


_TEMPLATES: "WeakKeyDictionary[BrainPrior, TemplateLocalizer]" = WeakKeyDictionary()


def template_localizer_for(prior: BrainPrior) -> "TemplateLocalizer":
    """The :class:`TemplateLocalizer` of ``prior``'s mean brain, built once per prior."""
    if prior not in _TEMPLATES:
        _TEMPLATES[prior] = TemplateLocalizer(prior)
    return _TEMPLATES[prior]


class TemplateLocalizer(torch.nn.Module):
    """Stand-in localizer when no slice localization weights exist: ``p`` of the mean-brain slice that
    correlates best (normalised cross-correlation, after blurring) with each input slice.

    Crude (no alignment), so its own error on real slices is reported beside what it measures.
    """

    def __init__(self, prior: BrainPrior, num_positions: int = 101):
        super().__init__()
        self.grid = torch.linspace(0, 1, num_positions, dtype=torch.float64)
        t = prior.plain(self.grid).float()
        self.register_buffer("templates", self._norm(t))

    @staticmethod
    def _norm(x: torch.Tensor) -> torch.Tensor:
        x = gauss_blur(F.interpolate(x.float(), size=(64, 64), mode="area"), 1.5).flatten(1)
        x = x - x.mean(1, keepdim=True)
        return x / x.norm(dim=1, keepdim=True).clamp_min(1e-8)

    def forward(self, slices: torch.Tensor) -> torch.Tensor:
        """``p`` (B,) on the CPU of (B, 1, H, W) slices, matched where the templates live (the prior's device)."""
        ncc = self._norm(torch.as_tensor(slices).to(self.templates.device)) @ self.templates.T
        return self.grid[ncc.argmax(1).cpu()].float()

    @torch.no_grad()
    def fit_offset(self, slices: torch.Tensor, offsets_p: Sequence[float], p0: float, window: float = 0.25,
                   step: float = 0.0025) -> float:
        """The one offset ``p0`` of slices whose places relative to each other are known
        (``p_k = p0 + offsets_p[k]``), where the whole stack matches the mean brain best: the mean,
        over the slices that show head and land on the grid, of each slice's NCC with the template at
        its position, searched within ``p0 +- window``. A whole stack pins its offset far more tightly
        than any one slice does (held-out volumes: 0-4 mm on IXI and the phantoms, against 8-12 mm for
        the median of per-slice answers).
        """
        x = torch.as_tensor(slices, dtype=torch.float32).cpu()
        x = x[:, None] if x.ndim == 3 else x
        head = (x > HEAD_THRESHOLD).flatten(1).float().mean(1) >= 0.02
        rel = torch.as_tensor(np.asarray(offsets_p, dtype=np.float64))[head]
        if rel.numel() == 0:
            return float(p0)
        ncc = (self._norm(x[head].to(self.templates.device)) @ self.templates.T).double().cpu()  # (K, P) on the template grid
        cands = torch.arange(p0 - window, p0 + window + step / 2, step, dtype=torch.float64)
        at = cands[:, None] + rel[None]  # (C, K) positions of each slice for each candidate
        inside = (at >= 0) & (at <= 1)
        f = at.clamp(0, 1) * (len(self.grid) - 1)
        lo = f.floor().long().clamp(max=len(self.grid) - 2)
        w = f - lo
        k = torch.arange(len(rel))[None].expand_as(lo)
        score = (1 - w) * ncc[k, lo] + w * ncc[k, lo + 1]
        mean = (score * inside).sum(1) / inside.sum(1).clamp_min(1)
        mean[inside.sum(1) < max(1, len(rel) // 2)] = -math.inf  # most of the stack must land on the grid
        return float(cands[int(mean.argmax())])
