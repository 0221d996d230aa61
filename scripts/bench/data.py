"""Benchmark data (prepared datasets, the atlas bank) and the training / data-loader measurements."""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.util
import io
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch


from .common import BUNDLES, REPO, STAGES, PeakMemory, log, sync


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
    """The prepared training volumes as an atlas bank (``save_bank`` format), repeated up to ``atlases``.

    The bank records its subjects (repeats under their own names, ``<subject>#copy<r>``), so the prior
    cache can leave a training volume's subject out as training does: 119 atlases per fit, as with IXI."""
    from monai.bundle import ConfigParser

    from monai_mrngan.data.datalist import load_split
    from monai_mrngan.atlas.bank import bank_subjects, build_bank, save_bank
    from monai_mrngan.data.io import atomic_torch_save

    mean_cfg = ConfigParser.load_config_file(str(BUNDLES / "brain_generalization" / "configs" / "mean_brain.json"))
    entries = load_split(dataset_dir, "training")
    bank, grid = build_bank(entries, int(mean_cfg["num_positions"]))
    subjects = bank_subjects(entries)
    save_bank(bank, grid, path, subjects)
    state = torch.load(path, weights_only=True)
    k = state["bank"].shape[0]
    if atlases > k:
        reps = math.ceil(atlases / k)
        state["bank"] = state["bank"].repeat(reps, 1, 1, 1)[:atlases].contiguous()
        state["subjects"] = [s if r == 0 else f"{s}#copy{r}" for r in range(reps) for s in subjects][:atlases]
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
