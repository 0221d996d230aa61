"""The fitted-prior cache: what inference's prior fit gives, computed once before MRNGAN training.

At inference the prior is fitted to the input slice at its localized position, with a subject the
atlases have never seen. Training runs that read that fit would pay one atlas fit per run (about
20 s per iteration on 2 CPU cores), so :func:`build_prior_cache` fits it once per training and
validation volume, at a grid of input positions (default 9, ``p`` = 0.1 .. 0.9):

- the input slice at each grid point is the volume's true slice nearest to it;
- the fit is given the position a localizer would give: the true ``p`` plus Gaussian noise of
  ``position_noise`` (seeded per volume, recorded);
- the volume's own subject is left out of the atlases (``exclude=``), as for a new patient;
- one volume's fits are one :meth:`~monai_mrngan.atlas.prior.BrainPrior.fit_many` call.

Each volume gets one file ``<image stem>.pt`` (written atomically, ``weights_only``-loadable and
memory-mapped when read): ``prior`` (N, P, H, W) uint8 (0..255 for [0, 1]) on the bank's grid of
P positions, ``slice_indices``, ``true_positions``, ``positions`` (the noisy ones the fits got),
``grid`` and the build ``key``. ``manifest.json`` records how the cache was built (bank file
identity, fit settings, positions, noise and seed, dataset). A run that stops continues with the
volumes not done; a changed bank, fit, grid, noise or seed changes the key and the cache is rebuilt.

Training reads it through :class:`LoadPriorCached` (the volume's cached starts and a handle to
its file) and :class:`CachedRunPriord` (a run's prior slices from the fit of its start, at the
run's noisy positions, and the recorded position offset).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
import multiprocessing
import zlib
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict
from pathlib import Path
from typing import Any, Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.transforms import MapTransform

from ..data.datalist import load_split
from ..data.io import InputError, atomic_torch_save, load_state, load_volume, save_json, strip_image_suffix
from ..data.positions import index_for_position
from .fit import apply_lut, bracket, gather_slices, monotone_lut
from .prior import BrainPrior, FitConfig, load_prior

logger = logging.getLogger(__name__)

__all__ = ["MANIFEST_NAME", "CACHE_VERSION", "cache_positions", "bank_identity", "fit_settings", "cache_key", "build_prior_cache",
           "read_manifest", "check_manifest", "CachedPrior", "LoadPriorCached", "CachedRunPriord"]

MANIFEST_NAME = "manifest.json"
CACHE_VERSION = 1
HASH_BYTES = 1 << 20  # the bank's identity hashes its first and last MiB (its header, and what a rewrite changes)


def cache_positions(count: int = 9, low: float = 0.1, high: float = 0.9) -> list[float]:
    """``count`` input positions spread evenly over ``low .. high`` (the head without its ends)."""
    if count < 1:
        raise ValueError(f"need at least one cache position, got {count}")
    return [round(float(p), 6) for p in np.linspace(low, high, count)] if count > 1 else [round((low + high) / 2, 6)]


def bank_identity(path: str | os.PathLike) -> dict:
    """What identifies a prior file: path, size, mtime and a SHA-256 of its first and last MiB."""
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "no such prior file; build the atlas bank first (brain_generalization mean_brain.json)")
    st = path.stat()
    h = hashlib.sha256()
    with open(path, "rb") as f:
        h.update(f.read(HASH_BYTES))
        if st.st_size > 2 * HASH_BYTES:
            f.seek(-HASH_BYTES, os.SEEK_END)
        h.update(f.read(HASH_BYTES))
    return {"path": str(path.resolve()), "size": int(st.st_size), "mtime_ns": int(st.st_mtime_ns), "sha256_ends": h.hexdigest()}


def fit_settings(fit: FitConfig | Mapping | None) -> dict:
    """The fit's settings as recorded and compared: every :class:`FitConfig` field (defaults
    resolved, so changed defaults count) except ``num_threads``, which does not change the result."""
    cfg = fit if isinstance(fit, FitConfig) else FitConfig(**dict(fit or {}))
    out = asdict(cfg)
    out.pop("num_threads", None)
    return out


def cache_key(bank: Mapping, fit: Mapping, positions: Sequence[float], position_noise: float, seed: int, run_slices: int | None = None) -> str:
    """The build key: changes when anything that changes a cached fit changes (the bank's content, not its path or mtime)."""
    what = {"version": CACHE_VERSION, "bank": [bank["size"], bank["sha256_ends"]], "fit": dict(fit), "positions": [float(p) for p in positions],
            "position_noise": float(position_noise), "seed": int(seed)}
    if run_slices is not None:
        what["run_slices"] = int(run_slices)
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:16]


def _volume_name(entry: Mapping) -> str:
    return strip_image_suffix(Path(str(entry["image"])).name) + ".pt"


def _noise(name: str, seed: int, count: int, std: float) -> np.ndarray:
    """The localizer-sized position errors of one volume: seeded by the volume's name, so a resumed build draws the same."""
    rng = np.random.default_rng([int(seed), zlib.crc32(name.encode())])
    return rng.normal(0.0, float(std), count) if std > 0 else np.zeros(count)


def _volume_done(path: Path, key: str) -> bool:
    if not path.is_file():
        return False
    try:
        return load_state(path, mmap=True).get("key") == key
    except ValueError:  # an unreadable file is rebuilt
        return False


def _fit_volume(prior: BrainPrior, entry: Mapping, positions: Sequence[float], noise: np.ndarray, run_slices: int | None = None) -> dict:
    vol, _ = load_volume(entry["image"])  # (H, W, D) as LoadImaged gives it to training
    pos = np.asarray(entry["positions"], dtype=np.float64)
    if pos.shape != (vol.shape[2],):
        raise InputError(entry["image"], f"{pos.size} positions in the datalist for {vol.shape[2]} axial slices")
    if tuple(vol.shape[:2]) != prior.shape:
        raise InputError(entry["image"], f"slices of {vol.shape[0]} x {vol.shape[1]} px, the prior's are {prior.shape[0]} x {prior.shape[1]}")
    idx = np.asarray([index_for_position(pos, p) for p in positions])
    true = pos[idx]
    noisy = true + noise
    refs = torch.from_numpy(np.ascontiguousarray(np.moveaxis(vol[:, :, idx], -1, 0)))[:, None]
    # a run reads its start's fit at most run_slices slices up or down (at the positions the cell is told): only those are warped
    within = None if run_slices is None else \
        [torch.from_numpy(pos[max(0, i - run_slices) : i + run_slices + 1] + e) for i, e in zip(idx.tolist(), noise.tolist())]
    fits = prior.fit_many(refs, torch.from_numpy(noisy), [str(entry.get("subject") or "")] * len(idx), within)
    prior_u8 = torch.stack([(f.float().clamp(0, 1) * 255.0).round().to(torch.uint8).cpu() for f in fits])
    filled = torch.stack([prior.grid_slices_for(w).cpu() for w in (within or [None] * len(idx))])
    return {"slice_indices": torch.from_numpy(idx).long(), "true_positions": torch.from_numpy(true), "positions": torch.from_numpy(noisy),
            "prior": prior_u8, "filled": filled}


_WORKER: dict[str, Any] = {}  # the prior of this process (each build worker loads it once)


def _worker_init(prior_path: str, fit: dict, device: str) -> None:
    _WORKER["prior"] = load_prior(prior_path, fit=fit, device=device)


def _cache_volume(path: Path, entry: Mapping, positions: Sequence[float], noise: np.ndarray, key: str, run_slices: int | None = None) -> str:
    """Fit one volume with this process's prior and write its file atomically; returns the file name."""
    prior = _WORKER["prior"]
    rec = _fit_volume(prior, entry, positions, noise, run_slices)
    rec.update(kind="prior_cache", key=key, grid=prior.positions.clone(), subject=str(entry.get("subject") or ""), image=str(entry["image"]))
    atomic_torch_save(rec, path)
    return path.name


def _clear(cache_dir: Path, old: Mapping | None, keep: set[str]) -> int:
    """Delete the volume files an old manifest lists that are not in ``keep``; returns how many
    (only files the cache wrote: the folder may hold other things)."""
    n = 0
    for name in (old or {}).get("volumes", {}):
        f = cache_dir / name
        if name not in keep and f.is_file() and f.parent == cache_dir:
            f.unlink()
            n += 1
    return n


def build_prior_cache(
    cache_dir: str | os.PathLike,
    dataset_dir: str | os.PathLike,
    prior_path: str | os.PathLike,
    fit: FitConfig | Mapping | None = None,
    positions: Sequence[float] | None = None,
    position_noise: float = 0.02,
    seed: int = 0,
    splits: Sequence[str] = ("training", "validation"),
    limits: Mapping[str, int | None] | None = None,
    device: str | torch.device = "cpu",
    workers: int = 1,
    time_limit_s: float | None = None,
    run_slices: int | None = None,
) -> dict:
    """Fit the prior (``prior_path`` with ``fit``) to every volume of ``splits`` and cache it; returns the manifest.

    Args:
        cache_dir: where the volume files and ``manifest.json`` go.
        dataset_dir: a prepared dataset (its ``datalist.json``).
        prior_path: the atlas bank (or another prior file, see :func:`~monai_mrngan.atlas.prior.load_prior`).
        fit: the :class:`FitConfig` fields of the fit (the bundle's ``prior_fit``: what inference uses).
        positions: input positions ``p`` (default :func:`cache_positions`: 9 over 0.1 .. 0.9).
        position_noise: std in ``p`` of the localizer error added to each fit's position.
        seed: the noise seed (with each volume's name).
        limits: per split, how many of its volumes (the first N, as training's ``val_limit``); None = all, 0 = none.
        device: where the fits run.
        workers: volumes fitted at once, one process each (CPU; the fit runs on ``fit``'s
            ``num_threads`` threads); 1 = in this process (GPU).
        time_limit_s: stop after the volume that crosses it (the manifest then says ``complete: false``;
            the next build continues).
        run_slices: the longest training run (slices from its start, either way); only those grid
            slices of each fit are warped and stored (the rest are 0 and a run reaching them is an
            error): with 12-slice runs about a quarter of a volume, the warp being most of a fit's
            time. None: whole volumes.
    """
    cache_dir = Path(cache_dir)
    positions = [float(p) for p in (positions if positions is not None else cache_positions())]
    if not positions or not all(math.isfinite(p) for p in positions):
        raise ValueError(f"cache positions must be finite numbers, got {positions}")
    bank = bank_identity(prior_path)
    settings = fit_settings(fit)
    run_slices = None if run_slices is None else int(run_slices)
    key = cache_key(bank, settings, positions, position_noise, seed, run_slices)
    limits = {s: (None if n is None else int(n)) for s, n in (limits or {}).items()}
    entries = [(split, e) for split in splits if limits.get(split) != 0 for e in load_split(dataset_dir, split, limits.get(split))]
    names = [_volume_name(e) for _, e in entries]
    if len(set(names)) != len(names):
        raise ValueError(f"{dataset_dir}: two volumes share an image file name; the cache names its files after them")
    manifest = {"version": CACHE_VERSION, "key": key, "complete": False, "bank": bank, "fit": settings, "positions": positions,
                "position_noise": float(position_noise), "seed": int(seed), "dataset_dir": str(Path(dataset_dir).resolve()),
                "splits": list(splits), "limits": limits, "run_slices": run_slices, "volumes": {}}
    old = read_manifest(cache_dir, required=False)
    if old is not None and old.get("key") != key:
        logger.info("prior cache %s: built with another bank or fit (key %s, now %s); rebuilding: %d old files removed",
                    cache_dir, old.get("key"), key, _clear(cache_dir, old, set()))
    elif old is not None:
        _clear(cache_dir, old, set(names))  # volumes no longer in the dataset or the limits
    cache_dir.mkdir(parents=True, exist_ok=True)
    todo = [(s, e, n) for (s, e), n in zip(entries, names) if not _volume_done(cache_dir / n, key)]
    for (split, e), n in zip(entries, names):
        manifest["volumes"][n] = {"split": split, "image": str(e["image"]), "subject": str(e.get("subject") or "")}
    logger.info("prior cache %s: %d volumes, %d already cached, %d to fit (%d positions each)", cache_dir, len(entries),
                len(entries) - len(todo), len(todo), len(positions))
    save_json(manifest, cache_dir / MANIFEST_NAME)  # the settings first: a stopped build resumes under them
    if not todo:
        return _finish(manifest, cache_dir, 0.0)
    _worker_init(str(prior_path), dict(settings), str(device))  # this process's prior: subjects checked, and the fits when workers == 1
    if _WORKER["prior"].subjects is None:
        logger.warning("prior cache: %s records no subjects, so training subjects cannot be left out of its atlases", prior_path)
    jobs = [(cache_dir / n, dict(e), positions, _noise(n, seed, len(positions), position_noise), key, run_slices) for _, e, n in todo]
    t0 = time.time()
    pool = None
    if workers > 1:  # one fit per process and CPU core: the fit is many small operations that threads do not speed up
        _WORKER.clear()
        pool = ProcessPoolExecutor(min(workers, len(jobs)), mp_context=multiprocessing.get_context("spawn"), initializer=_worker_init,
                                   initargs=(str(prior_path), dict(settings), str(device)))
        results = as_completed([pool.submit(_cache_volume, *job) for job in jobs])
        names_done = (f.result() for f in results)
    else:
        names_done = (_cache_volume(*job) for job in jobs)
    try:
        for done, n in enumerate(names_done, 1):
            per = (time.time() - t0) / done
            logger.info("prior cache: %d/%d volumes fitted (%s), %.1f s/volume, ETA %.0f s", done, len(jobs), n, per, per * (len(jobs) - done))
            if time_limit_s is not None and time.time() - t0 > time_limit_s and done < len(jobs):
                logger.warning("prior cache: time limit %.0f s reached after %d/%d volumes; run again to continue", time_limit_s, done, len(jobs))
                return manifest
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
        _WORKER.clear()
    return _finish(manifest, cache_dir, time.time() - t0)


def _finish(manifest: dict, cache_dir: Path, seconds: float) -> dict:
    manifest["complete"] = True
    manifest["seconds"] = round(seconds, 1)
    save_json(manifest, cache_dir / MANIFEST_NAME)
    return manifest


def read_manifest(cache_dir: str | os.PathLike, required: bool = True) -> dict | None:
    """The cache's manifest (None when there is none and not ``required``)."""
    path = Path(cache_dir) / MANIFEST_NAME
    if not path.is_file():
        if required:
            raise InputError(path, "no prior cache here; run the mrngan bundle's prior_cache step (configs/prior_cache.json) first")
        return None
    try:
        return json.loads(path.read_text())
    except ValueError as err:
        raise InputError(path, f"unreadable prior cache manifest ({err})") from err


def check_manifest(cache_dir: str | os.PathLike, prior_path: str | os.PathLike, fit: FitConfig | Mapping | None) -> dict:
    """The manifest of a complete cache built from this bank file with this fit, else :class:`InputError`."""
    manifest = read_manifest(cache_dir)
    path = Path(cache_dir) / MANIFEST_NAME
    if not manifest.get("complete"):
        raise InputError(path, "the prior cache is not complete; run the prior_cache step again to finish it")
    bank = bank_identity(prior_path)
    if [manifest["bank"].get("size"), manifest["bank"].get("sha256_ends")] != [bank["size"], bank["sha256_ends"]]:
        raise InputError(path, f"built from another prior file than {prior_path}; rerun the prior_cache step")
    if manifest.get("fit") != fit_settings(fit):
        raise InputError(path, "built with other fit settings than this config's; rerun the prior_cache step")
    return manifest


class CachedPrior:
    """One volume's cached fits, memory-mapped on first use; shared, never copied (``CacheDataset``
    deep-copies its cached items each epoch: this handle copies as itself)."""

    def __init__(self, path: str | os.PathLike, slice_indices: Sequence[int], true_positions: Sequence[float], positions: Sequence[float]):
        self.path = str(path)
        self.slice_indices = [int(i) for i in slice_indices]
        self.offsets = [float(p) - float(t) for p, t in zip(positions, true_positions)]
        self._state: Mapping[str, Any] | None = None

    def __deepcopy__(self, memo: dict) -> "CachedPrior":
        return self

    def __getstate__(self) -> dict:  # worker processes open their own map
        return {**self.__dict__, "_state": None}

    def _fits(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        if self._state is None:
            self._state = load_state(self.path, mmap=True)
        return self._state["prior"], self._state["grid"], self._state.get("filled")

    def run(self, start: int, positions: torch.Tensor) -> tuple[torch.Tensor, float]:
        """Prior slices (T, H, W) float32 for a run starting at slice ``start`` (one of ``slice_indices``)
        with true ``positions`` (T,), and the recorded position offset of that start's fit.

        The slices are the start's fitted volume at ``positions + offset`` (the positions the cell
        is told), linear along ``p`` between grid slices, as :meth:`BrainPrior.slice_at` reads them.
        """
        if start not in self.slice_indices:
            raise ValueError(f"{self.path}: slice {start} is not a cached input slice ({self.slice_indices})")
        n = self.slice_indices.index(start)
        fits, grid, filled = self._fits()
        offset = self.offsets[n]
        p = torch.as_tensor(positions, dtype=torch.float64).reshape(-1) + offset
        if filled is not None:
            lo, hi, _ = bracket(grid.double(), p)
            if not bool((filled[n][lo] & filled[n][hi]).all()):
                raise ValueError(f"{self.path}: a run of {len(p)} slices from slice {start} reaches beyond the cached fit "
                                 "(built for shorter runs: rerun the prior_cache step with run_slices >= run_length)")
        out = gather_slices(fits[n][None], grid.double(), torch.zeros(len(p), dtype=torch.long), p)
        return out[:, 0].clamp(0, 1), offset


class LoadPriorCached(MapTransform):
    """Adds a volume's cached input slices (``starts_key``) and its :class:`CachedPrior` (``handle_key``).

    Goes before ``LoadImaged`` (it reads the image path). Deterministic (``CacheDataset`` keeps its
    output). Built from a cache checked against ``prior_path`` and ``fit`` (:func:`check_manifest`);
    a volume missing from it is an error naming the image.
    """

    def __init__(self, cache_dir: str | os.PathLike, prior_path: str | os.PathLike, fit: FitConfig | Mapping | None = None,
                 image_key: str = "image", starts_key: str = "prior_starts", handle_key: str = "prior_cache") -> None:
        super().__init__(image_key)
        self.cache_dir = Path(cache_dir)
        self.manifest = check_manifest(cache_dir, prior_path, fit)
        self.image_key, self.starts_key, self.handle_key = image_key, starts_key, handle_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict:
        d = dict(data)
        src = d[self.image_key]
        if not isinstance(src, (str, os.PathLike)):
            raise TypeError(f"LoadPriorCached reads the image path: put it before LoadImaged (got {type(src).__name__})")
        name = _volume_name({"image": str(src)})
        path = self.cache_dir / name
        if name not in self.manifest["volumes"] or not path.is_file():
            raise InputError(str(src), f"not in the prior cache {self.cache_dir}; rerun the prior_cache step for this dataset")
        state = load_state(path, mmap=True)
        if state.get("key") != self.manifest["key"]:
            raise InputError(path, "cached by another build than the manifest's; rerun the prior_cache step")
        d[self.starts_key] = [int(i) for i in state["slice_indices"]]
        d[self.handle_key] = CachedPrior(path, d[self.starts_key], state["true_positions"].tolist(), state["positions"].tolist())
        return d


class CachedRunPriord(MapTransform):
    """After a run sampler that started at a cached slice and carried the handle: adds ``prior``
    (T, H, W), the run's prior slices from the fit of its start (the near end, also for gap runs,
    as inference fits each run's prior to its start slice), and ``position_offset`` (1,), the
    recorded localizer error of that fit, which :class:`~monai_mrngan.engines.recurrent.RunBatch`
    adds to the run's positions; drops the handle.

    ``match_contrast``: the cache was fitted to the un-augmented volume; with scanner augmentation and a
    ``"monotone"`` fit, the run's prior is put through :func:`~monai_mrngan.atlas.fit.monotone_lut`
    fitted between its first slice and the run's (augmented) input slice, as inference's fit to that
    slice would map it (``image_key``: the run's slices, the input first)."""

    def __init__(self, handle_key: str = "prior_cache", prior_key: str = "prior", offset_key: str = "position_offset",
                 match_contrast: bool = False, image_key: str = "image") -> None:
        super().__init__(handle_key)
        self.handle_key, self.prior_key, self.offset_key = handle_key, prior_key, offset_key
        self.match_contrast, self.image_key = bool(match_contrast), image_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict:
        d = dict(data)
        handle = d.pop(self.handle_key)
        prior, offset = handle.run(int(d["slice_index"]), torch.as_tensor(d["positions"]))
        if self.match_contrast:
            prior = apply_lut(prior, monotone_lut(prior[0], torch.as_tensor(d[self.image_key])[0].float()))
        d[self.prior_key] = prior
        d[self.offset_key] = torch.tensor([offset], dtype=torch.float32)
        return d
