"""What the uncertainty map costs: ``reconstruct`` of one slice with and without it, time and peak memory.

    python -m scripts.bench.uncertainty --workdir RUN [--dataset_dir DIR] [--repeat 3] [--position 0.5]

Each variant runs in its own process (peak memory is per process): the trained stages of the
pipeline work folder ``RUN`` are loaded as ``python -m monai_mrngan reconstruct`` loads them, then
``reconstruct_files`` reconstructs the test split's first volume's slice nearest ``--position``
(a PNG, localized and refined, as a user's input) ``--repeat`` times, the prior's fit caches cleared
before each run so every run fits from scratch. ``with``: the work folder's calibration (the map,
its NIfTI and the montage rows are written); ``without``: the calibration left out (no map). Prints
the best time of each, the peak resident set during the runs and its growth over the loaded
process, and the ratios with/without.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .common import REPO, PeakMemory, log


def _child(args: argparse.Namespace) -> None:
    import numpy as np

    from monai_mrngan.apps.cli import _components, _dataset_of
    from monai_mrngan.data.datalist import load_split
    from monai_mrngan.data.io import load_volume, save_png
    from monai_mrngan.data.positions import index_for_position
    from monai_mrngan.inference.components import reference_grid
    from monai_mrngan.inference.reconstruct import reconstruct_files

    comp = _components(args.workdir)
    if args.variant == "without":
        comp.calibration = None
    elif comp.calibration is None:
        raise SystemExit(f"{args.workdir}: no uncertainty calibration (run the mrngan calibrate step)")
    dataset = _dataset_of(args.workdir, args.dataset_dir)
    ref = reference_grid(dataset)
    entry = load_split(dataset, "test")[0]
    vol, _ = load_volume(entry["image"])
    out = Path(tempfile.mkdtemp(prefix="bench_unc_"))
    png = save_png(vol[:, :, index_for_position(np.asarray(entry["positions"]), args.position)], out / "slice.png")
    times = []
    with PeakMemory("cpu") as mem:
        for _ in range(args.repeat):
            for cache in ("_cache", "_scans", "_spread"):
                getattr(comp.prior, cache, {}).clear()
            t0 = time.perf_counter()
            res = reconstruct_files([str(png)], str(out / "r.nii.gz"), comp, expected_shape=ref["shape"], spacing_mm=ref["spacing_mm"],
                                    reference_affine=ref["affine"], reference_positions=ref["positions"])
            times.append(time.perf_counter() - t0)
    print(json.dumps({"variant": args.variant, "seconds": times, "best_s": min(times), **mem.as_dict(), "map": "uncertainty" in res}))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workdir", required=True)
    p.add_argument("--dataset_dir", default=None)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--position", type=float, default=0.5)
    p.add_argument("--variant", choices=("with", "without"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.variant:
        return _child(args)
    res = {}
    for variant in ("without", "with"):
        log(f"uncertainty cost: {variant} the map, {args.repeat} runs")
        cmd = [sys.executable, "-m", "scripts.bench.uncertainty", "--workdir", args.workdir, "--repeat", str(args.repeat),
               "--position", str(args.position), "--variant", variant] + (["--dataset_dir", args.dataset_dir] if args.dataset_dir else [])
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"{variant}: failed")
        res[variant] = json.loads(proc.stdout.strip().splitlines()[-1])
    w, wo = res["with"], res["without"]
    print(f"{'':10s} {'best time (s)':>14s} {'peak RSS (MiB)':>15s} {'RSS growth (MiB)':>17s}")
    for v in ("without", "with"):
        r = res[v]
        print(f"{v:10s} {r['best_s']:14.2f} {r['peak_mib']:15.1f} {r['growth_mib']:17.1f}   runs {[round(s, 2) for s in r['seconds']]}")
    print(f"{'ratio':10s} {w['best_s'] / wo['best_s']:14.3f} {w['peak_mib'] / wo['peak_mib']:15.3f} "
          f"{w['growth_mib'] / max(wo['growth_mib'], 1e-9):17.3f}   (with / without; target <= 1.10)")
    print(json.dumps({"uncertainty_cost": res}))


if __name__ == "__main__":
    main()
