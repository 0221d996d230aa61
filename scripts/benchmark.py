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
  steps); the same slice rolled out by ``pix2pix_iterative`` in the same run from where the localized
  reconstruction placed it (so both generate the same slices), and the ratio;
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

Targets (issue 12; printed as PASS/FAIL lines with the ratios beside the times, never adjusted), on
the CPU at 128 px with the 120-atlas bank: one slice to a whole volume (localization CNN + atlas
refinement + prior fit + generation, as ``reconstruct_volume`` runs it on a localized slice)
<= 1.5 s (stretch <= 1.0 s) and <= 7 x the pix2pix rollout of the same slice; every 8th slice given
<= 5 s; MRNGAN generation <= 1.5 x the pix2pix rollout; peak RSS of a reconstruction <= 2 GiB
(a fresh process loading the networks and the bank and reconstructing from one localized slice);
fitted priors for 120 training volumes x 9 input positions <= 10 minutes (measured on
``--cache_volumes`` volumes, each subject left out of the bank as training does, and scaled to 120).
A check (exit status 1 when it fails): a one-slice reconstruction runs both directions in one batch
(every pix2pix and cell call has batch size 2).

``--quick``: 64 px only, 1 warm-up + 1 timed iteration, one repeat, an 8-atlas bank and prior fits
cut to 5 + 5 optimisation iterations, short data-loader runs, the prior cache on one volume: a smoke
test (tests/test_benchmark.py), not a measurement.

``--json OUT`` writes the table and the raw figures as JSON, with a top-level ``"summary"`` for the
CPU 128 px column (the 64 px one under ``--quick``), stable keys, seconds unless named:

- ``one_slice_s``: one localized slice to a whole volume (localization + refinement + fit + generation);
- ``rollout_s``: the pix2pix_iterative rollout of the same slice, same run, placed where the localized
  one-slice reconstruction placed it (the same slices generated);
- ``every8_s``: every 8th slice of the volume given (positions known): fits + generation;
- ``generation_ratio``: MRNGAN generation (no localization, no fit) / ``rollout_s``;
- ``peak_rss_gib``: peak resident memory (GiB) of a one-slice reconstruction in a fresh process;
- ``prior_cache_s``: fitted priors for 120 training volumes x 9 positions (measured on a subset and
  scaled: ``"summary_notes"`` says on how many);

and ``"summary_notes"`` (a string) beside it.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the bench package beside this script

warnings.filterwarnings("ignore")  # monai's config-security UserWarning and torch's TorchScript deprecations

import torch  # noqa: E402

from bench.common import BUNDLES, STAGES, load_average, log  # noqa: E402
from bench.data import atlas_bank, bench_loaders, bench_slice_samplers, bench_train, make_datasets  # noqa: E402
from bench.recon import bench_reconstruction, prior_fit_config  # noqa: E402
from bench.report import print_table, print_verdicts  # noqa: E402


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
    ap.add_argument("--skip_train", action="store_true", help="reconstruction figures only (no training iterations, no loaders): to re-measure them")
    ap.add_argument("--cache_volumes", type=int, default=4, help="training volumes the fitted-prior cache is measured on (scaled to 120)")
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
                for stage in STAGES if not args.skip_train else ():
                    log(f"{col}: training iterations of {stage}")
                    r["train"][stage] = bench_train(stage, datasets[size], device, tmp, banks[size][0], args)
                log(f"{col}: reconstruction")
                r["recon"] = bench_reconstruction(datasets[size], device, tmp, banks[size][0], args)
                if device == "cpu" and not args.skip_train:
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
          f"reconstruction times: best of {args.repeats} (each part); memory on CPU: peak process RSS during the part (+ growth over its start), "
          f"on GPU: max allocated; every 8th slice: one run")
    print()
    table = print_table(results)
    print()
    checks, targets, summary, notes = print_verdicts(results, meta)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        out = {"summary": summary, "summary_notes": notes, "meta": meta, "table": table, "checks": checks, "targets": targets, "results": results}
        Path(args.json).write_text(json.dumps(out, indent=2, default=float) + "\n")
        print(f"JSON: {args.json}")
    return 0 if all(c["pass"] for c in checks) else 1

if __name__ == "__main__":
    sys.exit(main())
