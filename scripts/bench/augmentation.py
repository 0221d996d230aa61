#!/usr/bin/env python
"""What scanner augmentation (``intensity_augmentation``) costs the training chains, per volume drawn.

    python scripts/bench/augmentation.py --dataset_dir DIR [--volumes 4] [--repeats 3]

For each stage bundle with the flag (localizer, pix2pix, MRNGAN without the prior cache), the
training chain (``train#preprocessing``) runs on the first ``--volumes`` training volumes, loaded
once (as ``CacheDataset`` keeps them), with the flag off and on; prints the best-of-``--repeats``
seconds per volume and the ratio on / off, beside the load average (the machine is shared).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from monai.bundle import ConfigParser
from monai.transforms import Compose

from monai_mrngan.data.datalist import load_split

BUNDLES = Path(__file__).resolve().parents[2] / "bundles"
STAGES = {"slice_localization": "load_transforms", "flow_generation": "volume_transforms", "mrngan": "volume_transforms"}


def chain_seconds(stage: str, loads: str, dataset_dir: str, augment: bool, volumes: int, repeats: int) -> float:
    """Best-of-``repeats`` seconds per volume of the stage's training chain after its (cached) loading transforms."""
    parser = ConfigParser()
    parser.read_config(str(BUNDLES / stage / "configs" / "train.json"))
    parser["dataset_dir"] = dataset_dir
    parser["intensity_augmentation"] = augment
    chain = parser.get_parsed_content("train#preprocessing")
    n_load = len(parser.get_parsed_content(loads))
    n_load += 1 if stage == "mrngan" and chain.transforms[0].__class__.__name__ == "LoadPriorCached" else 0
    load, rest = Compose(chain.transforms[:n_load]), Compose(chain.transforms[n_load:])
    vols = [load(dict(e)) for e in load_split(dataset_dir, "training", volumes)]
    rest.set_random_state(0)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for v in vols:
            rest(dict(v))
        best = min(best, (time.perf_counter() - t0) / len(vols))
    return best


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset_dir", required=True)
    ap.add_argument("--volumes", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    print(f"load average {os.getloadavg()[0]:.2f}; seconds per training volume (best of {args.repeats}, {args.volumes} volumes)")
    for stage, loads in STAGES.items():
        off, on = (chain_seconds(stage, loads, args.dataset_dir, a, args.volumes, args.repeats) for a in (False, True))
        print(f"{stage:20s} off {off:.3f} s  on {on:.3f} s  ratio {on / off:.1f}x  (+{on - off:.3f} s per volume)")
    print(f"load average {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
