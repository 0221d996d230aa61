"""Command-line entry points: ``python -m monai_mrngan <command> --help``.

Every command reports bad input as one line on stderr (``error: <file>: <problem>``) and exits
with status 2, without a traceback.
"""

from __future__ import annotations

import logging
import sys
import warnings
from typing import Sequence

import fire

from .data.io import InputError

USER_ERRORS = (InputError, FileNotFoundError, FileExistsError, ValueError, RuntimeError, KeyError)


def prepare(
    src: str,
    dst: str,
    spacing: float = 1.0,
    size: int = 256,
    seed: int = 0,
    split: str | Sequence[float] = "0.8,0.1,0.1",
    overwrite: bool = False,
) -> None:
    """Prepare a BIDS tree or folder of NIfTI scans into DST (volumes/, datalist.json, report).

    Args:
        src: BIDS root (``sub-*/[ses-*/]anat/*_T1w.nii[.gz]``) or any folder of .nii/.nii.gz.
        dst: output folder; must be empty unless ``--overwrite``.
        spacing: isotropic voxel size in mm (paper: 1; the shared IXI data: 2).
        size: in-plane size in pixels (paper: 256; the shared IXI data: 128).
        seed: seed of the subject-level split.
        split: training,validation,test fractions by subject; ``0,0,1`` puts a whole cohort in test.
        overwrite: replace a prepared dataset already in DST.
    """
    from .data.prepare import prepare_dataset

    report = prepare_dataset(src, dst, spacing=spacing, size=size, seed=seed, split=split, overwrite=overwrite)
    ok = sum(r["status"] == "ok" for r in report["inputs"])
    splits = ", ".join(f"{k} {v['subjects']} subjects/{v['volumes']} volumes" for k, v in report["splits"].items())
    print(f"prepared {ok} of {len(report['inputs'])} scans into {dst}: {splits}")


def phantoms(dst: str, subjects: int = 24, size: int = 128, seed: int = 0, overwrite: bool = False) -> None:
    """Write a synthetic cohort of brain-like T1 head phantoms as a BIDS tree in DST.

    Args:
        dst: output folder (a BIDS root, ready for ``prepare``).
        subjects: number of subjects.
        size: grid size in voxels (isotropic, 256 mm field of view).
        seed: cohort seed; subject i is the same whatever the cohort size.
        overwrite: write into a non-empty DST.
    """
    from .data.phantoms import write_phantom_cohort

    files = write_phantom_cohort(dst, subjects=subjects, size=size, seed=seed, overwrite=overwrite)
    print(f"wrote {len(files)} phantom subjects to {dst}")


COMMANDS = {"prepare": prepare, "phantoms": phantoms}


def main(argv: Sequence[str] | None = None) -> None:
    """Run a command; user errors become one line on stderr and exit status 2."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    try:
        fire.Fire(COMMANDS, command=list(argv) if argv is not None else None, name="python -m monai_mrngan")
    except USER_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
