#!/usr/bin/env python
"""What the fitted-prior cache costs: building it, and an MRNGAN training iteration that reads it.

    python scripts/bench/prior_cache.py --dataset_dir DIR --bank BANK.pt [--volumes 4] [--iters 10]
        [--build 0] [--workers 1] [--quick_fit] [--json OUT]

1. Builds the cache (:func:`monai_mrngan.atlas.cache.build_prior_cache`) for the first
   ``--volumes`` training volumes with the mrngan bundle's ``prior_fit`` (``--quick_fit``: a cheap
   affine fit, enough for the iteration timing) on ``--workers`` processes: seconds per volume
   (9 input positions, one ``fit_many`` each). ``--build N`` times N volumes instead.
2. Times training iterations of the bundle's own ``train.json`` (default sizes: 4 volumes x 2
   runs of 16 slices; random-init pix2pix; no handlers) twice, the same config with
   ``use_prior_cache`` false (plain prior, random position noise) and true (runs start at cached
   slices and read their prior from the cache): seconds per iteration including data loading
   (``trainer.run``, the first ``--warmup`` iterations not timed), alternately ``--repeats`` times,
   and the ratio of the best of each.
The load average is printed beside the figures: other jobs on the machine slow everything down.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
BUNDLE = REPO / "bundles" / "mrngan"
QUICK_FIT = {"mode": "affine", "top_k": 2, "affine_iters": 5, "work_size": 32, "position_search": 0.0}


def load_average() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def bundle_prior_fit() -> dict:
    return dict(json.loads((BUNDLE / "configs" / "train.json").read_text())["prior_fit"])


def time_iterations(dataset_dir: Path, bank: Path, work: Path, fit: dict, volumes: int, use_cache: bool, warmup: int, iters: int) -> dict:
    """Seconds per training iteration of train.json with or without the cache."""
    from ignite.engine import Events
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(BUNDLE / "configs" / "train.json"))
    overrides = {"bundle_root": str(BUNDLE), "dataset_dir": str(dataset_dir), "ckpt_dir": str(work / "models"), "output_dir": str(work / "eval"),
                 "device": "$torch.device('cpu')", "flow_ckpt": None, "prior_path": str(bank), "cache_prior_fit": fit,
                 "prior_cache_dir": str(work / "cache"), "use_prior_cache": use_cache, "train_limit": volumes, "train#handlers": [],
                 "train#dataset#progress": False, "epochs": 1, "epoch_length": warmup + iters}
    for k, v in overrides.items():
        parser[k] = v
    torch.manual_seed(0)
    trainer = parser.get_parsed_content("train#trainer")
    stamps: list[float] = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: stamps.append(time.perf_counter()))
    trainer.run()
    dt = (stamps[-1] - stamps[warmup - 1]) / iters if warmup > 0 else (stamps[-1] - stamps[0]) / max(1, iters - 1)
    batch = trainer.state.batch
    runs = len(batch) if isinstance(batch, list) else int(batch["image"].shape[0])
    return {"s_per_it": dt, "iters": iters, "warmup": warmup, "runs_per_batch": runs, "use_prior_cache": use_cache}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset_dir", required=True, help="prepared dataset (datalist.json)")
    ap.add_argument("--bank", required=True, help="atlas bank (save_bank .pt)")
    ap.add_argument("--volumes", type=int, default=4, help="training volumes cached and trained on")
    ap.add_argument("--build", type=int, default=0, help="volumes to time the build on (default --volumes)")
    ap.add_argument("--workers", type=int, default=1, help="build processes")
    ap.add_argument("--quick_fit", action="store_true", help="a cheap fit (iteration timing only)")
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2, help="plain and cache timed alternately this many times; best of each")
    ap.add_argument("--threads", type=int, default=None, help="torch threads of the training iterations (default torch's)")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    from monai_mrngan.atlas.cache import build_prior_cache

    if args.threads:
        torch.set_num_threads(args.threads)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="prior_cache_bench_"))
    fit = QUICK_FIT if args.quick_fit else bundle_prior_fit()
    n_build = max(args.build, args.volumes)
    load0 = load_average()
    t0 = time.perf_counter()
    manifest = build_prior_cache(work / "cache", args.dataset_dir, args.bank, fit, limits={"training": n_build, "validation": 0}, workers=args.workers)
    build_s = time.perf_counter() - t0
    size_mb = sum(f.stat().st_size for f in (work / "cache").glob("*.pt")) / 2**20 / n_build
    print(f"cache build: {n_build} volumes x {len(manifest['positions'])} positions, {'quick' if args.quick_fit else 'bundle prior_fit'} fit, "
          f"{args.workers} worker(s): {build_s:.1f} s, {build_s / n_build:.2f} s/volume, {size_mb:.1f} MiB/volume "
          f"(load average before {load0}, after {load_average()})", flush=True)
    res = {"build": {"volumes": n_build, "seconds": build_s, "s_per_volume": build_s / n_build, "mib_per_volume": size_mb, "fit": fit,
                     "workers": args.workers, "load_before": load0, "load_after": load_average()}}
    for rep in range(args.repeats):  # alternated, best of the repeats: a shared machine's load drifts
        for use in (False, True):
            r = time_iterations(Path(args.dataset_dir), Path(args.bank), work, fit, args.volumes, use, args.warmup, args.iters)
            r["load"] = load_average()
            name = "cache" if use else "plain"
            print(f"train iteration, {name} prior, repeat {rep + 1}: {r['s_per_it']:.3f} s/it ({r['runs_per_batch']} runs, {args.iters} timed; "
                  f"load average {r['load']})", flush=True)
            if name not in res or r["s_per_it"] < res[name]["s_per_it"]:
                res[name] = r
    ratio = res["cache"]["s_per_it"] / res["plain"]["s_per_it"]
    res["ratio_cache_over_plain"] = ratio
    print(f"best of {args.repeats}: plain {res['plain']['s_per_it']:.3f} s/it, cache {res['cache']['s_per_it']:.3f} s/it, "
          f"cache / plain {ratio:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
