#!/usr/bin/env python
"""Speed and memory of the four MRNGAN bundles at several image sizes, as ONE table.

    python scripts/benchmark.py [--sizes 64 128 256] [--dataset_dir DIR] [--device cpu|cuda|auto]
                                [--quick] [--json OUT]

What is measured, for every image size (and on every device: the CPU always, a GPU as well when
``torch.cuda.is_available()`` and ``--device auto``):

- **training iterations/s** of every stage with the bundle's own ``configs/train.json``: networks,
  optimizers, loss functions, default batch sizes and data pipelines are built through
  ``monai.bundle.ConfigParser`` (size overrides only, random initialisation), and the stage's
  trainer runs ``--warmup`` + ``--iters`` real iterations (``trainer._iteration``: forward, losses,
  backward, optimizer steps) on batches drawn from its training data loader; the iterations after
  the warm-up are timed. The MRNGAN stage's iteration is the cell unrolled over its run length with
  the (frozen) pix2pix generator and the plain prior inside, as the bundle trains it;
- **reconstruction of one whole volume** (the prepared test volume's grid: 101 slices at 2 mm for
  the head from the vertex down 200 mm) from one mid-brain slice, with random-init networks built
  from the bundles' ``configs/inference.json`` (localizer, pix2pix, MRNGAN cell) and an atlas bank
  prior fitted as ``bundles/mrngan/configs/inference.json::prior_fit`` says, through
  ``monai_mrngan.inference.reconstruct.reconstruct_volume``. Reported apart: localization of the
  input slice, prior fitting (``BrainPrior.fit``), generation (pix2pix calls, prior slices, cell
  steps); the same slice rolled out by ``pix2pix_iterative`` in the same run, and the ratio;
  the same from every 8th slice of the volume; the one-slice case again on a volume half as long,
  to show which parts grow with the number of slices;
- **peak memory** of each part: on the CPU the process's resident set, sampled every 5 ms during the
  part (``/proc/self/statm``; ``resource.getrusage`` where there is no ``/proc``), shown as the peak
  and its growth over the part's start (tracemalloc is not used: torch's tensors bypass Python's
  allocator, so it would see almost nothing); on a GPU ``torch.cuda.max_memory_allocated``;
- **data-loader throughput** (slices/s) of every bundle's training data pipeline (its
  ``train#dataloader``: sampling and augmentation, volumes cached as in training), plus the three
  raw slice samplers measured by ``scripts/benchmark_slices.py`` (run in-process, not re-implemented).

Data: ``--dataset_dir`` (a prepared dataset with ``datalist.json``: used as is at its own in-plane
size and resized in-plane for the other sizes; or a folder of raw scans: its first ``--subjects``
scans are prepared), else ``$MRNGAN_IXI_DIR`` (raw IXI T1 scans, prepared the same way), else a
phantom cohort written to a temporary folder (``monai_mrngan.data.phantoms``) and prepared with
``monai_mrngan.data.prepare`` at 2 mm and each size. The atlas bank holds the prepared training
volumes repeated up to ``--atlases`` (default: the brain_generalization bundle's ``max_atlases``,
120), so prior fitting costs what it costs with a full IXI bank.

Threads: torch's default (one per core: 2 on the 2-core reference machine); ``--threads N`` or
``OMP_NUM_THREADS`` change it. The load average before and after is printed: other jobs on the
machine slow every figure down (with 2 threads on 2 busy cores, several-fold). Times of the
reconstruction are the best of ``--repeats`` interleaved runs, part by part (the every-8th-slice
case runs once).

Targets (printed as PASS/FAIL lines, never adjusted): a 128 px volume from one slice (localization
+ prior fit + generation) in <= 5 s on the CPU; MRNGAN's generation <= 1.5 x the pix2pix rollout
time (also shown with the prior fit included). A check (exit status 1 when it fails): a one-slice
reconstruction runs both directions in one batch (every pix2pix and cell call has batch size 2).

``--quick``: 64 px only, 1 warm-up + 1 timed iteration, one repeat, an 8-atlas bank and prior fits
cut to 5 + 5 optimisation iterations, short data-loader runs: a smoke test (tests/test_benchmark.py),
not a measurement. ``--json OUT`` writes the table and the raw figures as JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import importlib.util
import io
import json
import logging
import math
import os
import platform
import resource
import shutil
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[1]
BUNDLES = REPO / "bundles"
STAGES = ("slice_localization", "brain_generalization", "flow_generation", "mrngan")
TARGET_SECONDS_128 = 5.0
TARGET_RATIO = 1.5

warnings.filterwarnings("ignore")  # monai's config-security UserWarning and torch's TorchScript deprecations

import numpy as np  # noqa: E402
import torch  # noqa: E402


# ------------------------------------------------------------------------------------------ helpers
def log(msg: str) -> None:
    print(f"[benchmark] {msg}", file=sys.stderr, flush=True)


def rss_mib() -> float:
    """Current resident set of this process (MiB); the peak so far where /proc is missing."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak / 2**20 if sys.platform == "darwin" else peak / 1024.0


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


class PeakMemory:
    """Peak memory during a block. CPU: sampled RSS (MiB, ``peak`` and ``growth`` over the start);
    CUDA: ``torch.cuda.max_memory_allocated`` (MiB, ``peak``; ``growth`` over what was allocated at the start)."""

    def __init__(self, device: str, interval: float = 0.005) -> None:
        self.device, self.interval = device, interval
        self.peak = self.growth = float("nan")
        self._stop = threading.Event()

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self._peak_rss = max(self._peak_rss, rss_mib())

    def __enter__(self) -> "PeakMemory":
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._start = torch.cuda.memory_allocated() / 2**20
        else:
            self._start = self._peak_rss = rss_mib()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() / 2**20
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self._peak_rss, rss_mib())
        self.growth = self.peak - self._start

    def as_dict(self) -> dict:
        kind = "cuda_max_allocated" if self.device.startswith("cuda") else "process_rss_sampled"
        return {"kind": kind, "peak_mib": round(self.peak, 1), "growth_mib": round(self.growth, 1)}


class Clock:
    """Accumulated wall time and number of calls of wrapped callables (synchronising CUDA around each)."""

    def __init__(self, device: str) -> None:
        self.device, self.total, self.calls = device, 0.0, 0

    def wrap(self, fn: Callable) -> Callable:
        def timed(*args: Any, **kwargs: Any) -> Any:
            sync(self.device)
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                sync(self.device)
                self.total += time.perf_counter() - t0
                self.calls += 1

        return timed


def load_average() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def fmt(v: Any) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    if isinstance(v, str):
        return v
    if isinstance(v, int):
        return str(v)
    a = abs(v)
    if a >= 100:
        return f"{v:.0f}"
    if a >= 10:
        return f"{v:.1f}"
    if a >= 1:
        return f"{v:.2f}"
    return f"{v:.3f}"


# --------------------------------------------------------------------------------------------- data
def make_datasets(args: argparse.Namespace, work: Path) -> tuple[dict[int, Path], str]:
    """A prepared dataset per size: ``{size: folder}`` and a description of where it came from."""
    from monai_mrngan.data.datalist import datalist_path

    src = Path(args.dataset_dir) if args.dataset_dir else None
    if src is None and os.environ.get("MRNGAN_IXI_DIR"):
        src = Path(os.environ["MRNGAN_IXI_DIR"])
    if src is not None and datalist_path(src).is_file():
        return {s: resized_subset(src, s, work / f"prepared_{s}", args.subjects) for s in args.sizes}, f"prepared dataset {src} (a subset; resized in-plane where its size differs)"
    raw = work / "raw"
    if src is not None:
        from monai_mrngan.data.discovery import find_scans

        scans, _ = find_scans(src)
        if not scans:
            raise SystemExit(f"{src}: no scans and no datalist.json")
        raw.mkdir(parents=True)
        for scan in scans[: args.subjects]:
            (raw / scan.path.name).symlink_to(scan.path.resolve())
        what = f"first {min(args.subjects, len(scans))} scans of {src}"
    else:
        from monai_mrngan.data.phantoms import write_phantom_cohort

        size = 64 if args.quick else 128
        log(f"writing {args.subjects} phantoms ({size}^3) to {raw}")
        write_phantom_cohort(raw, subjects=args.subjects, size=size, seed=0, progress=False)
        what = f"{args.subjects} synthetic phantoms (monai_mrngan.data.phantoms, {size}^3 voxels)"
    from monai_mrngan.data.prepare import prepare_dataset

    out = {}
    for s in args.sizes:
        log(f"preparing {what} at 2 mm, {s} x {s} px")
        with contextlib.redirect_stderr(io.StringIO()):
            prepare_dataset(raw, work / f"prepared_{s}", spacing=2.0, size=s, progress=False)
        out[s] = work / f"prepared_{s}"
    return out, f"{what}, prepared at 2 mm"


def resized_subset(src: Path, size: int, dst: Path, subjects: int) -> Path:
    """A prepared dataset's first volumes (training ``subjects``, one validation, one test) at ``size`` px in-plane."""
    import nibabel as nib
    import torch.nn.functional as F

    from monai_mrngan.data.datalist import load_split
    from monai_mrngan.data.io import load_volume, save_json, save_nifti

    limits = {"training": subjects, "validation": 1, "test": 1}
    lists: dict[str, list] = {}
    for split, limit in limits.items():
        lists[split] = []
        for e in load_split(src, split, limit):
            h, w = nib.load(e["image"]).shape[:2]
            entry = {k: v for k, v in e.items() if k != "image"}
            if (h, w) == (size, size):
                entry["image"] = str(Path(e["image"]).resolve())
            else:
                vol, affine = load_volume(e["image"])
                t = torch.as_tensor(np.moveaxis(vol, -1, 0))[:, None].float()
                t = F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False)[:, 0]
                affine = np.array(affine, dtype=np.float64)
                affine[:3, 0] *= h / size
                affine[:3, 1] *= w / size
                rel = f"volumes/{Path(e['image']).name}"
                save_nifti(np.moveaxis(t.numpy(), 0, -1).clip(0, 1), affine, dst / rel)
                entry["image"] = rel
            lists[split].append(entry)
    if not lists["test"]:
        lists["test"] = lists["validation"] or lists["training"][-1:]
    dst.mkdir(parents=True, exist_ok=True)
    save_json({"description": f"benchmark subset of {src}", **lists}, dst / "datalist.json")
    return dst


def atlas_bank(dataset_dir: Path, atlases: int, path: Path) -> tuple[Path, dict]:
    """The prepared training volumes as an atlas bank (``save_bank`` format), repeated up to ``atlases``."""
    from monai.bundle import ConfigParser

    from monai_mrngan.data.datalist import load_split
    from monai_mrngan.atlas.bank import build_bank, save_bank
    from monai_mrngan.data.io import atomic_torch_save

    mean_cfg = ConfigParser.load_config_file(str(BUNDLES / "brain_generalization" / "configs" / "mean_brain.json"))
    entries = load_split(dataset_dir, "training")
    bank, grid = build_bank(entries, int(mean_cfg["num_positions"]))
    save_bank(bank, grid, path)
    state = torch.load(path, weights_only=True)
    k = state["bank"].shape[0]
    if atlases > k:
        reps = math.ceil(atlases / k)
        state["bank"] = state["bank"].repeat(reps, 1, 1, 1)[:atlases].contiguous()
        atomic_torch_save(state, path)
    return path, {"volumes": k, "atlases": int(state["bank"].shape[0]), "positions": len(grid)}


# ----------------------------------------------------------------------------------------- bundles
def bundle_parser(stage: str, config: str, dataset_dir: Path, device: str, work: Path):
    """A stage's config through ``monai.bundle.ConfigParser`` with the benchmark's overrides."""
    from monai.bundle import ConfigParser

    from monai_mrngan.apps.pipeline import size_overrides

    parser = ConfigParser()
    parser.read_config(str(BUNDLES / stage / "configs" / config))
    parser["bundle_root"] = str(BUNDLES / stage)
    parser["dataset_dir"] = str(dataset_dir)
    parser["ckpt_dir"] = str(work / "models" / stage)
    parser["output_dir"] = str(work / "eval" / stage)
    parser["device"] = f"$torch.device('{device}')"
    for key, value in size_overrides(dataset_dir).get(stage, {}).items():
        parser[key] = value
    return parser


def train_parser(stage: str, dataset_dir: Path, device: str, work: Path, bank: Path):
    parser = bundle_parser(stage, "train.json", dataset_dir, device, work)
    parser["train#handlers"] = []  # no validation, checkpoints or TensorBoard inside the timed loop
    parser["train#dataset#progress"] = False
    if stage == "mrngan":  # random-init pix2pix (no weights file) and the benchmark's atlas bank
        parser["flow_ckpt"] = None
        parser["prior_path"] = str(bank)
    return parser


def batch_slices(batch: dict) -> tuple[int, int, str]:
    """(samples, slices, description) of a training batch."""
    img = batch.get("image")
    n = int(img.shape[0])
    if "label" in batch and torch.is_tensor(batch.get("label")) and batch["label"].ndim == 4 and "direction" in batch:
        return n, 2 * n, f"{n} slice pairs"
    if img.ndim == 4 and img.shape[1] > 1:  # runs (B, T, H, W)
        return n, n * int(img.shape[1]), f"{n} runs x {int(img.shape[1])} slices"
    return n, n, f"{n} slices"


def bench_train(stage: str, dataset_dir: Path, device: str, work: Path, bank: Path, args: argparse.Namespace) -> dict:
    gc.collect()
    parser = train_parser(stage, dataset_dir, device, work, bank)
    torch.manual_seed(0)
    trainer = parser.get_parsed_content("train#trainer")
    loader = parser.get_parsed_content("train#dataloader")
    batches, it = [], iter(loader)
    while len(batches) < min(3, args.warmup + args.iters):
        try:
            batches.append(next(it))
        except StopIteration:
            it = iter(loader)
            if not batches:
                raise RuntimeError(f"{stage}: the training data loader yields no batch (too few training volumes?)")
    samples, slices, desc = batch_slices(batches[0])
    n = args.warmup + args.iters
    with PeakMemory(device) as mem:
        for i in range(n):
            if i == args.warmup:
                sync(device)
                t0 = time.perf_counter()
            trainer.state.iteration = i + 1  # the GAN trainer updates D on iterations 1, 4, 7, ...
            trainer._iteration(trainer, batches[i % len(batches)])
        sync(device)
        dt = time.perf_counter() - t0
    res = {"it_per_s": args.iters / dt, "s_per_it": dt / args.iters, "iters": args.iters, "warmup": args.warmup,
           "batch": desc, "samples_per_batch": samples, "slices_per_batch": slices, "memory": mem.as_dict()}
    if stage == "mrngan":
        res["run_length"] = int(parser.get_parsed_content("run_length"))
    del trainer, loader, batches
    return res


def bench_loaders(dataset_dir: Path, work: Path, bank: Path, seconds: float) -> dict:
    """Slices/s through every bundle's training data loader (volumes already cached, first batch excluded)."""
    out = {}
    for stage in STAGES:
        loader = train_parser(stage, dataset_dir, "cpu", work, bank).get_parsed_content("train#dataloader")
        it = iter(loader)
        desc = batch_slices(next(it))[2]
        n_slices = n_batches = 0
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            try:
                batch = next(it)
            except StopIteration:
                it = iter(loader)
                continue
            n_slices += batch_slices(batch)[1]
            n_batches += 1
        dt = time.perf_counter() - t0
        out[stage] = {"slices_per_s": n_slices / dt, "batches_per_s": n_batches / dt, "batch": desc}
    return out


def bench_slice_samplers(dataset_dir: Path, seconds: float) -> dict:
    """scripts/benchmark_slices.py, run in-process on the same data; its table parsed."""
    spec = importlib.util.spec_from_file_location("benchmark_slices", REPO / "scripts" / "benchmark_slices.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    argv, buf = sys.argv, io.StringIO()
    sys.argv = ["benchmark_slices.py", "--dataset_dir", str(dataset_dir), "--seconds", str(seconds)]
    try:
        with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(io.StringIO()):
            mod.main()
    finally:
        sys.argv = argv
    rows, started = {}, False
    for line in buf.getvalue().splitlines():
        if line.startswith("sampler"):
            started = True
            continue
        parts = line.split()
        if started and len(parts) > 5:
            rows[" ".join(parts[:-5])] = {"slices_per_s": float(parts[-5]), "ms_per_batch": float(parts[-3]), "slices_per_batch": float(parts[-2])}
    return rows


# ----------------------------------------------------------------------------------- reconstruction
def mrngan_prior_fit() -> dict:
    """How the mrngan bundle fits the prior to the input slice (its inference.json ``prior_fit``)."""
    from monai.bundle import ConfigParser

    return dict(ConfigParser.load_config_file(str(BUNDLES / "mrngan" / "configs" / "inference.json"))["prior_fit"])


QUICK_FIT = {"affine_iters": 5, "deform_iters": 5}


def prior_fit_config(args: argparse.Namespace) -> dict:
    """The bundle's prior fit; ``--quick`` cuts its optimisation iterations (a smoke test, not a measurement)."""
    return {**mrngan_prior_fit(), **(QUICK_FIT if args.quick else {})}


def bench_reconstruction(dataset_dir: Path, device: str, work: Path, bank: Path, args: argparse.Namespace) -> dict:
    from monai_mrngan.data.datalist import load_split
    from monai_mrngan.data.io import load_volume
    from monai_mrngan.inference.localize import localize
    from monai_mrngan.inference.components import load_bundle_network, load_stage_prior
    from monai_mrngan.inference.reconstruct import reconstruct_volume
    from monai_mrngan.networks.contracts import next_fn_for

    from monai_mrngan.apps.pipeline import size_overrides

    def net(stage: str) -> torch.nn.Module:
        """The stage's inference.json network_def, built by the loader the mrngan bundle uses, random init."""
        torch.manual_seed(0)
        config = BUNDLES / stage / "configs" / "inference.json"
        return load_bundle_network(config, None, overrides=size_overrides(dataset_dir).get(stage, {}), device=device)

    gc.collect()
    mem = PeakMemory(device).__enter__()  # networks, prior bank, warm-up and the first one-slice reconstruction
    localizer, generator, model = net("slice_localization"), net("flow_generation"), net("mrngan")
    prior = load_stage_prior(bank, prior_fit_config(args))  # as the mrngan bundle loads its prior
    next_fn = next_fn_for(generator)

    entry = (load_split(dataset_dir, "test") or load_split(dataset_dir, "validation") or load_split(dataset_dir, "training"))[0]
    vol, _ = load_volume(entry["image"])
    grid = np.asarray(entry["positions"], dtype=np.float64)
    depth = len(grid)
    i0 = int(np.argmin(np.abs(grid - 0.5)))
    one = vol[:, :, i0]
    p0 = float(grid[i0])
    half = grid[depth // 4 : depth // 4 + (depth + 1) // 2]  # the same input slice, half the slices

    def mrngan(slices: Any, positions: list[float], ref: np.ndarray) -> dict:
        fresh = prior.with_fit(prior.config)  # a new fit (no cached one)
        fit_clock, prior_clock, next_clock = Clock(device), Clock(device), Clock(device)
        fits = []  # BrainPrior.fit calls that fitted (the others returned its cached fit for the same slice)
        timed_fit = fit_clock.wrap(fresh.fit)

        def fit(*a: Any, **k: Any) -> Any:
            before = fresh.last_fit
            out = timed_fit(*a, **k)
            if fresh.last_fit is not before:
                fits.append(1)
            return out

        fresh.fit = fit
        fresh.slice_at = prior_clock.wrap(fresh.slice_at)
        sync(device)
        t0 = time.perf_counter()
        rec = reconstruct_volume(slices, positions, method="mrngan", model=model, next_fn=next_clock.wrap(next_fn),
                                 prior=fresh, reference_positions=ref, device=device)
        sync(device)
        total = time.perf_counter() - t0
        return {"slices": int(rec.volume.shape[2]), "inputs": len(positions), "total_s": total,
                "prior_fit_s": fit_clock.total, "prior_fits": len(fits), "prior_fit_calls": fit_clock.calls,
                "generation_s": total - fit_clock.total, "pix2pix_s": next_clock.total, "pix2pix_calls": next_clock.calls,
                "prior_slices_s": prior_clock.total - fit_clock.total,
                "cell_and_rest_s": total - prior_clock.total - next_clock.total}

    def pix2pix(ref: np.ndarray) -> dict:
        next_clock = Clock(device)
        sync(device)
        t0 = time.perf_counter()
        rec = reconstruct_volume(one, [p0], method="pix2pix_iterative", next_fn=next_clock.wrap(next_fn), reference_positions=ref, device=device)
        sync(device)
        return {"slices": int(rec.volume.shape[2]), "total_s": time.perf_counter() - t0, "pix2pix_calls": next_clock.calls}

    def best(runs: list[dict]) -> dict:
        """Best of the repeats, part by part (contention from other jobs only ever adds time); ``total_s``
        is the best run's own total, so the parts need not add up to it exactly."""
        out = dict(runs[0])
        for key, value in runs[0].items():
            if key.endswith("_s"):
                out[key] = min(r[key] for r in runs)
        out["repeats"] = len(runs)
        return out

    # warm-up (first calls allocate, pick kernels): generation with an unfitted prior, localization, pix2pix
    warm = prior.with_fit(dataclasses.replace(prior.config, mode="none", intensity="none"))
    reconstruct_volume(one, [p0], method="mrngan", model=model, next_fn=next_fn, prior=warm, reference_positions=half, device=device)
    localize(localizer, torch.as_tensor(one)[None, None].to(device))
    pix2pix(half)

    res: dict = {"input_index": i0, "input_position": round(p0, 4), "grid_slices": depth}
    loc = []
    from monai_mrngan.inference.reconstruct import refine_positions

    for _ in range(max(3, args.repeats)):
        sync(device)
        t0 = time.perf_counter()
        est = localize(localizer, torch.as_tensor(one)[None, None].to(device)).cpu()
        sync(device)
        t1 = time.perf_counter()
        refine_positions(prior, torch.as_tensor(one)[None, None], est)  # the atlas match reconstruct_volume runs on localized inputs
        loc.append((t1 - t0, time.perf_counter() - t1))
    res["localization_cnn_s"] = min(a for a, _ in loc)
    res["localization_refine_s"] = min(b for _, b in loc)
    res["localization_s"] = res["localization_cnn_s"] + res["localization_refine_s"]

    # the batching check: both directions of a one-slice reconstruction go through every network together
    sizes: dict[str, list[int]] = {"pix2pix": [], "cell": []}
    hooks = [generator.register_forward_pre_hook(lambda m, a: sizes["pix2pix"].append(int(a[0].shape[0]))),
             model.cell.register_forward_pre_hook(lambda m, a: sizes["cell"].append(int(a[0].shape[0])))]
    first = mrngan(one, [p0], grid)
    mem.__exit__(None, None, None)
    for h in hooks:
        h.remove()
    res["batch_sizes"] = {k: sorted(set(v)) for k, v in sizes.items()}
    res["batch_calls"] = {k: len(v) for k, v in sizes.items()}
    res["memory"] = mem.as_dict()
    res["prior_bank_mib"] = prior.bank.numel() * prior.bank.element_size() / 2**20
    runs: dict[str, list[dict]] = {"one_slice": [first], "one_slice_half": [], "pix2pix_iterative": [], "pix2pix_iterative_half": []}
    for r in range(args.repeats):  # interleaved, so a burst of load from other jobs hits all of them alike
        if r:
            runs["one_slice"].append(mrngan(one, [p0], grid))
        runs["pix2pix_iterative"].append(pix2pix(grid))
        runs["one_slice_half"].append(mrngan(one, [p0], half))
        runs["pix2pix_iterative_half"].append(pix2pix(half))
    for key, value in runs.items():
        res[key] = best(value)
    res["one_slice"]["total_with_localization_s"] = res["one_slice"]["total_s"] + res["localization_s"]
    every = list(range(0, depth, 8))
    res["every_8th"] = mrngan(vol[:, :, every].transpose(2, 0, 1), [float(grid[i]) for i in every], grid)
    return res


# -------------------------------------------------------------------------------------------- table
def rows_for(results: dict) -> list[tuple[str, str, Callable[[dict], Any]]]:
    """(label, unit, getter(result of one column)) for every table row."""
    def g(*keys: str) -> Callable[[dict], Any]:
        def get(r: dict) -> Any:
            for k in keys:
                if not isinstance(r, dict) or k not in r:
                    return None
                r = r[k]
            return r
        return get

    any_col = next(iter(results.values()))
    rows: list[tuple[str, str, Callable[[dict], Any]]] = [("machine load average (1 min) at the column's start", "", g("load_average_1min"))]
    labels = {"slice_localization": "localizer CNN", "brain_generalization": "brain-generalization GAN (G + D/3)",
              "flow_generation": "pix2pix GAN pair (G + D)", "mrngan": "MRNGAN cell unrolled"}
    for s in STAGES:
        tr = any_col["train"][s]
        extra = f", {tr['run_length'] - 1} steps" if s == "mrngan" else ""
        rows.append((f"train {labels[s]} [{tr['batch']}{extra}]", "it/s", g("train", s, "it_per_s")))
    for s in STAGES:
        rows.append((f"  peak memory: {s}", "MiB", lambda r, s=s: mem_cell(r, "train", s)))
    rec = any_col["recon"]
    d, h = rec["one_slice"]["slices"], rec["one_slice_half"]["slices"]
    rows += [
        (f"1 slice -> {d} slices: localization (CNN + atlas refinement)", "s", g("recon", "localization_s")),
        ("    localizer CNN", "s", g("recon", "localization_cnn_s")),
        ("    refinement by the prior's atlases", "s", g("recon", "localization_refine_s")),
        ("1 slice: prior fit", "s", g("recon", "one_slice", "prior_fit_s")),
        ("1 slice: generation (all below)", "s", g("recon", "one_slice", "generation_s")),
        ("    pix2pix calls", "s", g("recon", "one_slice", "pix2pix_s")),
        ("    prior slices", "s", g("recon", "one_slice", "prior_slices_s")),
        ("    cell steps + placement", "s", g("recon", "one_slice", "cell_and_rest_s")),
        ("1 slice: total (localization + fit + generation)", "s", g("recon", "one_slice", "total_with_localization_s")),
        ("1 slice: pix2pix_iterative rollout", "s", g("recon", "pix2pix_iterative", "total_s")),
        ("ratio mrngan generation / pix2pix", "x", lambda r: ratio(r, "generation_s")),
        ("ratio mrngan fit + generation / pix2pix", "x", lambda r: ratio(r, "total_s")),
        (f"half volume (1 slice -> {h} slices): prior fit", "s", g("recon", "one_slice_half", "prior_fit_s")),
        ("half volume: generation", "s", g("recon", "one_slice_half", "generation_s")),
        ("half volume: pix2pix_iterative rollout", "s", g("recon", "pix2pix_iterative_half", "total_s")),
        (f"every 8th slice ({rec['every_8th']['inputs']} inputs): prior fits", "n", g("recon", "every_8th", "prior_fits")),
        ("every 8th slice: prior fit", "s", g("recon", "every_8th", "prior_fit_s")),
        ("every 8th slice: generation", "s", g("recon", "every_8th", "generation_s")),
        ("every 8th slice: total (fit + generation)", "s", g("recon", "every_8th", "total_s")),
        ("  peak memory: reconstruction (load networks + bank, 1 slice)", "MiB", lambda r: mem_cell(r, "recon")),
        ("  of which the prior bank (CPU, fp16)", "MiB", g("recon", "prior_bank_mib")),
    ]
    for s in STAGES:
        b = any_col.get("loaders", {}).get(s) or next((c["loaders"][s] for c in results.values() if c.get("loaders")), {})
        rows.append((f"data: {s} train loader [{b.get('batch', '?')}]", "slices/s", g("loaders", s, "slices_per_s")))
    samplers = next((c["samplers"] for c in results.values() if c.get("samplers")), {})
    for name in samplers:
        rows.append((f"data: benchmark_slices.py '{name}'", "slices/s", lambda r, n=name: g("samplers", n, "slices_per_s")(r)))
    return rows


def ratio(r: dict, key: str) -> float | None:
    try:
        return r["recon"]["one_slice"][key] / r["recon"]["pix2pix_iterative"]["total_s"]
    except (KeyError, TypeError, ZeroDivisionError):
        return None


def mem_cell(r: dict, *keys: str) -> str | None:
    m = r
    for k in keys:
        m = m.get(k, {}) if isinstance(m, dict) else {}
    m = m.get("memory") if isinstance(m, dict) else None
    if not m:
        return None
    if m["kind"] == "cuda_max_allocated":
        return f"{m['peak_mib']:.0f}"
    return f"{m['peak_mib']:.0f} (+{max(m['growth_mib'], 0):.0f})"


def print_table(results: dict) -> list[dict]:
    cols = list(results)
    rows = rows_for(results)
    width = max(len(lbl) for lbl, _, _ in rows) + 2
    table = []
    header = f"{'measure':<{width}}{'unit':<10}" + "".join(f"{c:>16}" for c in cols)
    print(header)
    print("-" * len(header))
    for label, unit, get in rows:
        vals = [get(results[c]) for c in cols]
        print(f"{label:<{width}}{unit:<10}" + "".join(f"{fmt(v):>16}" for v in vals))
        table.append({"measure": label, "unit": unit, **{c: v for c, v in zip(cols, vals)}})
    return table


def scaling_lines(results: dict) -> list[str]:
    out = []
    for col, r in results.items():
        rec = r["recon"]
        full, half = rec["one_slice"], rec["one_slice_half"]
        steps_full, steps_half = full["pix2pix_calls"], half["pix2pix_calls"]
        sr = steps_full / max(steps_half, 1)

        def grow(a: float, b: float) -> str:
            if max(a, b) < 0.01:
                return f"{fmt(a)} vs {fmt(b)} s (negligible)"
            q = a / b if b > 0 else float("nan")
            kind = "grows with the slices" if q >= 1 + 0.5 * (sr - 1) else "constant" if q <= 1 + 0.25 * (sr - 1) else "in between: noisy?"
            return f"x{q:.2f} ({kind})"

        out.append(
            f"[{col}] {full['slices']} vs {half['slices']} slices ({steps_full} vs {steps_half} generation steps, x{sr:.2f}): "
            f"generation {fmt(full['generation_s'])} vs {fmt(half['generation_s'])} s {grow(full['generation_s'], half['generation_s'])}; "
            f"pix2pix calls {grow(full['pix2pix_s'], half['pix2pix_s'])}; prior slices {grow(full['prior_slices_s'], half['prior_slices_s'])}; "
            f"prior fit {fmt(full['prior_fit_s'])} vs {fmt(half['prior_fit_s'])} s {grow(full['prior_fit_s'], half['prior_fit_s'])}; "
            f"localization: one network call and one atlas match per input slice, independent of the volume's length ({fmt(rec['localization_s'])} s)"
        )
    return out


# --------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[64, 128, 256], help="in-plane sizes (px)")
    ap.add_argument("--dataset_dir", default=None, help="prepared dataset (datalist.json) or raw scans; default $MRNGAN_IXI_DIR, else phantoms")
    ap.add_argument("--device", choices=["cpu", "cuda", "auto"], default="auto",
                    help="auto: the CPU, and the GPU too when available; cpu: CPU only; cuda: GPU only")
    ap.add_argument("--quick", action="store_true", help="smoke test: 64 px, 1+1 iterations, small bank, short loader runs")
    ap.add_argument("--json", default=None, help="also write the table and raw figures as JSON here")
    ap.add_argument("--iters", type=int, default=6, help="timed training iterations per stage (after the warm-up)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed training iterations first")
    ap.add_argument("--repeats", type=int, default=3, help="reconstructions per timing (the best is reported, part by part)")
    ap.add_argument("--atlases", type=int, default=None, help="atlases in the prior bank (default: mean_brain.json max_atlases)")
    ap.add_argument("--subjects", type=int, default=8, help="phantoms / scans to prepare (>= 6: batches of 4 training volumes)")
    ap.add_argument("--seconds", type=float, default=2.0, help="seconds per data-loader measurement")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's, one per core)")
    ap.add_argument("--workdir", default=None, help="keep the prepared data and bank here (default: a temporary folder)")
    args = ap.parse_args(argv)
    if args.quick:
        args.sizes, args.iters, args.warmup, args.repeats = [64], 1, 1, 1
        args.seconds = min(args.seconds, 0.3)
        args.atlases = args.atlases or 8  # and the prior fit's iterations cut (QUICK_FIT)
    if args.atlases is None:
        from monai.bundle import ConfigParser

        args.atlases = int(ConfigParser.load_config_file(str(BUNDLES / "brain_generalization" / "configs" / "mean_brain.json"))["max_atlases"])
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.getLogger().setLevel(logging.WARNING)
    for name in ("monai", "ignite", "monai_mrngan"):
        logging.getLogger(name).setLevel(logging.WARNING)

    devices = ["cpu"]
    if args.device == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: no GPU available")
        devices = ["cuda"]
    elif args.device == "auto" and torch.cuda.is_available():
        devices.append("cuda")

    load_before = load_average()
    t_start = time.perf_counter()
    tmp = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="mrngan_benchmark_"))
    tmp.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict] = {}
    meta: dict = {}
    try:
        datasets, data_desc = make_datasets(args, tmp)
        banks = {}
        for size in args.sizes:
            banks[size] = atlas_bank(datasets[size], args.atlases, tmp / f"atlas_bank_{size}.pt")
        for device in devices:
            for size in args.sizes:
                col = f"{device} {size}px"
                r: dict = {"device": device, "size": size, "load_average_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None, "train": {}}
                for stage in STAGES:
                    log(f"{col}: training iterations of {stage}")
                    r["train"][stage] = bench_train(stage, datasets[size], device, tmp, banks[size][0], args)
                log(f"{col}: reconstruction")
                r["recon"] = bench_reconstruction(datasets[size], device, tmp, banks[size][0], args)
                if device == "cpu":
                    log(f"{col}: data loaders")
                    r["loaders"] = bench_loaders(datasets[size], tmp, banks[size][0], args.seconds)
                    r["samplers"] = bench_slice_samplers(datasets[size], args.seconds)
                results[col] = r
        meta = {
            "python": platform.python_version(), "torch": torch.__version__, "machine": platform.machine(),
            "cpu_cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name(0) if "cuda" in devices else None,
            "dataset": data_desc, "bank": {s: b[1] for s, b in banks.items()},
            "prior_fit": prior_fit_config(args),
            "iters": args.iters, "warmup": args.warmup, "repeats": args.repeats, "quick": args.quick,
            "load_average_before": load_before, "load_average_after": load_average(),
            "seconds": round(time.perf_counter() - t_start, 1),
        }
    finally:
        if not args.workdir:
            shutil.rmtree(tmp, ignore_errors=True)

    # ------------------------------------------------------------------ the table and its verdicts
    nt = meta["torch_threads"]
    print(f"MRNGAN bundle benchmark: torch {meta['torch']}, {meta['cpu_cores']} CPU cores, {nt} torch thread{'s' * (nt != 1)}"
          + (f", GPU: {meta['gpu']}" if meta["gpu"] else ", no GPU"))
    b0 = next(iter(meta["bank"].values()))
    print(f"data: {meta['dataset']}; prior bank: {b0['atlases']} atlases ({b0['volumes']} prepared training volumes"
          f"{', repeated' if b0['atlases'] > b0['volumes'] else ''}) x {b0['positions']} positions; prior fit {meta['prior_fit']}")
    print(f"training: {args.warmup} warm-up + {args.iters} timed iterations per stage at the bundle's default batch; "
          f"reconstruction times: best of {args.repeats} (each part); memory on CPU: peak process RSS during the part (+ growth over its start), on GPU: max allocated; every 8th slice: one run")
    print()
    table = print_table(results)
    print()
    checks, targets = [], []
    for col, r in results.items():
        bs = r["recon"]["batch_sizes"]
        ok = bs["pix2pix"] == [2] and bs["cell"] == [2]
        checks.append({"column": col, "check": "one-slice reconstruction batches both directions", "batch_sizes": bs, "pass": ok})
        print(f"CHECK {'PASS' if ok else 'FAIL'} [{col}] one-slice reconstruction batches both directions together: "
              f"batch sizes of {r['recon']['batch_calls']['pix2pix']} pix2pix calls {bs['pix2pix']}, "
              f"of {r['recon']['batch_calls']['cell']} cell calls {bs['cell']} (expected [2])")
    for line in scaling_lines(results):
        print("SCALING " + line)
    print("SCALING summary: generation (cell steps, pix2pix calls, prior slices) grows linearly with the slices generated "
          "(per direction, both directions in one batch); prior fitting (once per input slice) and localization "
          "(once per input slice) do not depend on the volume's length; with every 8th slice given, the fits grow with the inputs.")
    col128 = "cpu 128px"
    if col128 in results:
        t = results[col128]["recon"]["one_slice"]["total_with_localization_s"]
        ok = t <= TARGET_SECONDS_128
        targets.append({"target": f"128 px volume from one slice <= {TARGET_SECONDS_128} s on CPU", "value_s": t, "pass": ok})
        print(f"TARGET {'PASS' if ok else 'FAIL'}: 128 px volume ({results[col128]['recon']['one_slice']['slices']} slices) from one slice "
              f"on the CPU ({nt} torch thread{'s' * (nt != 1)}) in {t:.2f} s (localization + prior fit + generation; target <= {TARGET_SECONDS_128:g} s)")
    else:
        print(f"TARGET n/a: 128 px volume from one slice <= {TARGET_SECONDS_128:g} s on CPU (128 px not measured)")
    for col, r in results.items():
        for key, what in (("generation_s", "generation"), ("total_s", "prior fit + generation")):
            q = ratio(r, key)
            ok = q is not None and q <= TARGET_RATIO
            targets.append({"target": f"mrngan {what} <= {TARGET_RATIO} x pix2pix rollout", "column": col, "ratio": q, "pass": ok})
            print(f"TARGET {'PASS' if ok else 'FAIL'} [{col}]: mrngan {what} / pix2pix_iterative rollout = {fmt(q)} (target <= {TARGET_RATIO:g})")
    print(f"NOTE: load average before {meta['load_average_before']}, after {meta['load_average_after']} "
          f"({meta['cpu_cores']} cores): other processes running at the same time slow every figure down; {meta['seconds']} s in all")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"meta": meta, "table": table, "checks": checks, "targets": targets, "results": results},
                                              indent=2, default=float) + "\n")
        print(f"JSON: {args.json}")
    return 0 if all(c["pass"] for c in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
