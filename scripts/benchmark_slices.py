#!/usr/bin/env python
"""Slice-sampling throughput and peak memory for the three samplers over a prepared dataset.

    python scripts/benchmark_slices.py --dataset_dir /data/ixi_2mm_128 [--batch 64] [--seconds 10]

Volumes are cached once (MONAI CacheDataset); each sampler then draws ``--samples`` slices per
volume per item. Prints cache time, slices per second through the DataLoader, and peak resident
memory, so loading can be compared with a training step's time.
"""

from __future__ import annotations

import argparse
import resource
import time

import torch
from monai.data import CacheDataset, DataLoader
from monai.transforms import Compose, EnsureTyped, LoadImaged

from monai_mrngan.data.datalist import load_split
from monai_mrngan.transforms import AdjacentSlicePaird, AxialSliced, SliceRund


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset_dir", required=True)
    ap.add_argument("--split", default="training")
    ap.add_argument("--limit", type=int, default=None, help="use the first N volumes")
    ap.add_argument("--batch", type=int, default=4, help="volumes per batch (x samples = slices per batch)")
    ap.add_argument("--samples", type=int, default=16, help="samples drawn per volume per item")
    ap.add_argument("--run_length", type=int, default=8)
    ap.add_argument("--workers", type=int, default=0)
    ap.add_argument("--seconds", type=float, default=5.0, help="time per sampler")
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))

    data = load_split(args.dataset_dir, args.split, limit=args.limit)
    load = [LoadImaged(keys="image", ensure_channel_first=True, image_only=True),
            EnsureTyped(keys="image", dtype=torch.float32, track_meta=False)]
    samplers = {
        "axial slice + p": AxialSliced(num_samples=args.samples),
        "adjacent pair + direction": AdjacentSlicePaird(num_samples=args.samples),
        f"run of {args.run_length} slices": SliceRund(run_length=args.run_length, num_samples=args.samples),
    }
    t0 = time.perf_counter()
    base = CacheDataset(data, transform=Compose(load), progress=True, num_workers=None)
    cache_s = time.perf_counter() - t0
    print(f"cached {len(data)} volumes in {cache_s:.1f} s ({len(data) / cache_s:.1f} volumes/s); "
          f"peak RSS {peak_rss_mib():.0f} MiB")
    print(f"{'sampler':<28}{'slices/s':>12}{'batches/s':>12}{'ms/batch':>10}{'slices/batch':>14}{'peak MiB':>10}")
    for name, sampler in samplers.items():
        ds = CacheDataset(data, transform=Compose(load + [sampler]), progress=False)
        ds._cache = base._cache  # reuse the already loaded volumes
        loader = DataLoader(ds, batch_size=args.batch, shuffle=True, num_workers=args.workers,
                            persistent_workers=args.workers > 0)
        n_slices = n_batches = 0
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < args.seconds:
            for batch in loader:
                img = batch["image"]
                n_slices += img.shape[0] * (img.shape[1] if img.ndim == 4 and img.shape[1] > 1 else 1)
                n_batches += 1
                if time.perf_counter() - t0 >= args.seconds:
                    break
        dt = time.perf_counter() - t0
        print(f"{name:<28}{n_slices / dt:>12.0f}{n_batches / dt:>12.1f}{1000 * dt / n_batches:>10.2f}"
              f"{n_slices / n_batches:>14.0f}{peak_rss_mib():>10.0f}")


if __name__ == "__main__":
    main()
