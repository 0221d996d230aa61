"""What the uncertainty map costs: ``reconstruct`` of one slice with and without it, time and peak memory.

    python -m scripts.bench.uncertainty --workdir RUN [--dataset_dir DIR] [--repeat 3] [--position 0.5] [--threads N] [--alternate 8]

Each variant runs in its own process (peak memory is per process): the trained stages of the
pipeline work folder ``RUN`` are loaded as ``python -m monai_mrngan reconstruct`` loads them, then
``reconstruct_files`` reconstructs the test split's first volume's slice nearest ``--position``
(a PNG, localized and refined, as a user's input) ``--repeat`` times, the prior's fit caches cleared
before each run so every run fits from scratch. ``with``: the work folder's calibration (the map,
its NIfTI and the montage rows are written); ``without``: the calibration left out (no map). Prints
the best wall and CPU time of each, the peak resident set during the runs and its growth over the
loaded process, and the ratios with/without. On a shared machine whole-run times vary by more than
the map costs, so the parts the map adds are also timed in CPU seconds inside the runs: the prior
fit (``fit_batch``, which keeps the atlas spread with the map), ``uncertainty_map`` and the writing
(``save_reconstruction``: the extra NIfTI and the montage rows); ``map_parts_s`` is what the map
adds (its ``uncertainty_map`` plus the growth of the other two over the run without it), shown
against the reconstruction's CPU time.

Then (``--alternate N``, default 8; 0 skips it) one more process times ``N`` runs of each, with and without
the map taking turns (the order swapped every other pair), so that the machine's drift between two
processes does not land on one side: median and best wall and CPU time of each, and their ratios.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .common import REPO, PeakMemory, log


def _child(args: argparse.Namespace) -> None:
    import numpy as np
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)  # one thread: CPU time is not inflated by threads spinning on a shared machine

    from monai_mrngan.apps.cli import _components, _dataset_of
    from monai_mrngan.data.datalist import load_split
    from monai_mrngan.data.io import load_volume, save_png
    from monai_mrngan.data.positions import index_for_position
    from monai_mrngan.inference.components import reference_grid
    from monai_mrngan.inference.reconstruct import reconstruct_files

    import monai_mrngan.atlas.prior as prior_module
    import monai_mrngan.inference.output as output_module
    import monai_mrngan.inference.reconstruct as recon_module

    parts: dict[str, float] = {}

    def timed(module, name):  # CPU seconds spent in module.name, summed over the runs
        real = getattr(module, name)

        def call(*a, **k):
            t0 = time.process_time()
            try:
                return real(*a, **k)
            finally:
                parts[name] = parts.get(name, 0.0) + time.process_time() - t0

        setattr(module, name, call)

    timed(prior_module, "fit_batch")
    timed(recon_module, "uncertainty_map")
    timed(output_module, "save_reconstruction")
    comp = _components(args.workdir)
    calibration = comp.calibration
    if calibration is None and args.variant != "without":
        raise SystemExit(f"{args.workdir}: no uncertainty calibration (run the mrngan calibrate step)")
    if args.variant == "without":
        comp.calibration = None
    dataset = _dataset_of(args.workdir, args.dataset_dir)
    ref = reference_grid(dataset)
    entry = load_split(dataset, "test")[0]
    vol, _ = load_volume(entry["image"])
    out = Path(tempfile.mkdtemp(prefix="bench_unc_"))
    png = save_png(vol[:, :, index_for_position(np.asarray(entry["positions"]), args.position)], out / "slice.png")
    def run() -> tuple[dict, float, float]:
        for cache in ("_cache", "_scans", "_spread"):
            getattr(comp.prior, cache, {}).clear()
        t0, c0 = time.perf_counter(), time.process_time()
        res = reconstruct_files([str(png)], str(out / "r.nii.gz"), comp, expected_shape=ref["shape"], spacing_mm=ref["spacing_mm"],
                                reference_affine=ref["affine"], reference_positions=ref["positions"])
        return res, time.perf_counter() - t0, time.process_time() - c0

    if args.variant == "alternate":
        runs: dict[str, list[tuple[float, float]]] = {"with": [], "without": []}
        for i in range(args.alternate + 1):  # the first pair warms both up and is not counted
            for name in (("with", "without") if i % 2 == 0 else ("without", "with")):
                comp.calibration = calibration if name == "with" else None
                _, wall, used = run()
                if i:
                    runs[name].append((wall, used))
        print(json.dumps({"alternate": runs}))
        return
    times, cpu = [], []
    with PeakMemory("cpu") as mem:
        for _ in range(args.repeat):
            res, wall, used = run()
            times.append(wall)
            cpu.append(used)
    print(json.dumps({"variant": args.variant, "seconds": times, "best_s": min(times), "cpu_s": cpu, "best_cpu_s": min(cpu),
                      "parts_cpu_s_per_run": {k: v / args.repeat for k, v in parts.items()}, **mem.as_dict(), "map": "uncertainty" in res}))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workdir", required=True)
    p.add_argument("--dataset_dir", default=None)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--position", type=float, default=0.5)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--alternate", type=int, default=8, help="runs of each, taking turns in one process (0: none)")
    p.add_argument("--variant", choices=("with", "without", "alternate"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.variant:
        return _child(args)
    res = {}
    for variant in ("without", "with"):
        log(f"uncertainty cost: {variant} the map, {args.repeat} runs")
        cmd = [sys.executable, "-m", "scripts.bench.uncertainty", "--workdir", args.workdir, "--repeat", str(args.repeat),
               "--position", str(args.position), "--threads", str(args.threads), "--variant", variant] + (["--dataset_dir", args.dataset_dir] if args.dataset_dir else [])
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"{variant}: failed")
        res[variant] = json.loads(proc.stdout.strip().splitlines()[-1])
    w, wo = res["with"], res["without"]
    print(f"{'':10s} {'best wall (s)':>14s} {'best CPU (s)':>13s} {'peak RSS (MiB)':>15s} {'RSS growth (MiB)':>17s}")
    for v in ("without", "with"):
        r = res[v]
        print(f"{v:10s} {r['best_s']:14.2f} {r['best_cpu_s']:13.2f} {r['peak_mib']:15.1f} {r['growth_mib']:17.1f}   "
              f"wall {[round(s, 2) for s in r['seconds']]}, parts (CPU s/run) { {k: round(x, 3) for k, x in r['parts_cpu_s_per_run'].items()} }")
    print(f"{'ratio':10s} {w['best_s'] / wo['best_s']:14.3f} {w['best_cpu_s'] / wo['best_cpu_s']:13.3f} {w['peak_mib'] / wo['peak_mib']:15.3f} "
          f"{w['growth_mib'] / max(wo['growth_mib'], 1e-9):17.3f}   (with / without; target <= 1.10)")
    pw, po = w["parts_cpu_s_per_run"], wo["parts_cpu_s_per_run"]
    added = pw.get("uncertainty_map", 0.0) + sum(max(0.0, pw.get(k, 0.0) - po.get(k, 0.0)) for k in ("fit_batch", "save_reconstruction"))
    res["map_parts_s"] = added
    print(f"the map's own parts: {added:.3f} CPU s per reconstruction = {added / wo['best_cpu_s']:.3f} of the best CPU time without it "
          f"({wo['best_cpu_s']:.2f} s)")
    if args.alternate > 0:
        log(f"uncertainty cost: {args.alternate} runs each, with and without the map taking turns")
        cmd = [sys.executable, "-m", "scripts.bench.uncertainty", "--workdir", args.workdir, "--position", str(args.position), "--threads",
               str(args.threads), "--alternate", str(args.alternate), "--variant", "alternate"] + (["--dataset_dir", args.dataset_dir] if args.dataset_dir else [])
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "alternate: failed")
        runs = json.loads(proc.stdout.strip().splitlines()[-1])["alternate"]
        stats = {v: {f"{stat}_{k}": fn([r[i] for r in runs[v]]) for i, k in enumerate(("wall_s", "cpu_s"))
                     for stat, fn in (("median", statistics.median), ("best", min))} for v in runs}
        res["alternate"] = stats
        print(f"taking turns in one process ({args.alternate} runs each): median wall / CPU, best wall / CPU (s)")
        for v in ("without", "with"):
            x = stats[v]
            print(f"{v:10s} {x['median_wall_s']:8.2f} {x['median_cpu_s']:8.2f} {x['best_wall_s']:8.2f} {x['best_cpu_s']:8.2f}")
        w, wo = stats["with"], stats["without"]
        print(f"{'ratio':10s} " + " ".join(f"{w[k] / wo[k]:8.3f}" for k in ("median_wall_s", "median_cpu_s", "best_wall_s", "best_cpu_s"))
              + "   (with / without; target <= 1.10)")
    print(json.dumps({"uncertainty_cost": res}))


if __name__ == "__main__":
    main()
