"""Command-line entry points: ``python -m monai_mrngan <command> --help``.

Every command reports bad input as one line on stderr (``error: <file>: <problem>``) and exits
with status 2, without a traceback.
"""

from __future__ import annotations

import json
import logging
import sys
import warnings
from typing import Sequence

import fire

from ..data.io import InputError

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
    from ..data.prepare import prepare_dataset

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
    from ..data.phantoms import write_phantom_cohort

    files = write_phantom_cohort(dst, subjects=subjects, size=size, seed=seed, overwrite=overwrite)
    print(f"wrote {len(files)} phantom subjects to {dst}")


def pipeline(
    dataset_dir: str,
    workdir: str,
    preset: str = "demo",
    stages: str | Sequence[str] | None = None,
    time_budget_s: float | None = None,
    force: bool = False,
) -> None:
    """Train and evaluate the four bundles in order under WORKDIR (resumes; skips finished stages).

    Args:
        dataset_dir: a prepared dataset.
        workdir: weights, TensorBoard logs and evaluations of every stage go here.
        preset: demo (phantoms, 64 px, <= 15 CPU minutes), ixi2mm (2 mm / 128 px), paper (256 px, GPU).
        stages: only these stages (comma-separated names).
        time_budget_s: training time limit per stage in seconds (replaces the preset's).
        force: re-run finished stages.
    """
    from .pipeline import run_pipeline

    names = stages.split(",") if isinstance(stages, str) else stages
    results = run_pipeline(dataset_dir, workdir, preset=preset, stages=names, time_budget_s=time_budget_s, force=force)
    print(f"pipeline finished: {', '.join(results)} under {workdir}")


def _components(workdir: str):
    from ..inference.components import components_from_bundles
    from .pipeline import BUNDLES_DIR, read_run_info

    fixed = read_run_info(workdir).get("stage_overrides", {})
    names = {"localizer": "slice_localization", "flow": "flow_generation", "mrngan": "mrngan"}
    overrides = {k: {i: v for i, v in fixed.get(stage, {}).items() if not i.endswith("_overrides")} for k, stage in names.items()}
    return components_from_bundles(BUNDLES_DIR, workdir, overrides=overrides)


def _dataset_of(workdir: str, dataset_dir: str | None) -> str:
    if dataset_dir:
        return dataset_dir
    from .pipeline import read_run_info

    return read_run_info(workdir)["dataset_dir"]


def reconstruct(
    workdir: str,
    input: str | Sequence[str],
    out: str,
    slice_index: int | None = None,
    positions: float | Sequence[float] | None = None,
    dataset_dir: str | None = None,
    method: str = "mrngan",
) -> None:
    """Reconstruct a whole volume from one 2D slice or a few, with the stages trained in WORKDIR.

    Args:
        workdir: a pipeline work folder (trained stages).
        input: one or more slices: PNG, 2D NIfTI, or a 3D NIfTI with --slice-index.
        out: output volume (.nii.gz); a PNG montage and the positions (JSON) are written beside it.
        slice_index: axial index to take from a 3D NIfTI input.
        positions: the anatomical position p of each input slice; localized when omitted.
        dataset_dir: prepared dataset that fixes the output grid (default: the pipeline's).
        method: mrngan, pix2pix_iterative, prior, copy (one slice), linear or cubic (several).
    """
    from ..inference.components import reference_grid
    from ..inference.reconstruct import reconstruct_files

    inputs = [input] if isinstance(input, str) else list(input)
    pos = None if positions is None else ([float(positions)] if isinstance(positions, (int, float)) else [float(p) for p in positions])
    ref = reference_grid(_dataset_of(workdir, dataset_dir))
    result = reconstruct_files(
        inputs, out, _components(workdir), slice_index=slice_index, positions=pos, method=method,
        expected_shape=ref["shape"], spacing_mm=ref["spacing_mm"], reference_affine=ref["affine"],
        reference_positions=ref["positions"],
    )
    for path, p in zip(inputs, result["input_positions"]):
        print(f"{path}: position p = {p:.3f} ({p * 200:.0f} mm below the vertex)")
    print(f"volume:    {result['volume']}\nmontage:   {result['montage']}\npositions: {result['positions']}")


def complete(
    src: str,
    dst: str,
    workdir: str,
    method: str = "mrngan",
    missing: str | float = "empty",
    dataset_dir: str | None = None,
    overwrite: bool = False,
) -> None:
    """Complete a folder of incomplete scans: fill missing axial slices, keep real ones bit-exact.

    SRC holds 3D NIfTI volumes with missing slices (on the prepared grid; optional sidecar
    ``<name>.json`` with ``positions`` or ``first_position``, else the localizer places them) and/or
    stacks of a few slices with a sidecar ``{"positions": [...]}``. DST gets ``<name>.nii.gz``,
    ``<name>.json`` (generated_slices, real_slices, positions, method, models) per file and
    ``complete_report.json``. Bad files are reported on stderr and skipped.

    Args:
        src: folder of incomplete scans (read only; searched recursively).
        dst: output folder; not inside SRC; must be empty unless ``--overwrite``.
        workdir: a pipeline work folder (trained stages).
        method: mrngan, pix2pix_iterative, prior, copy, linear or cubic (no trained model needed).
        missing: what a missing axial slice holds: empty (every voxel 0 or NaN), zero, nan, or a number.
        dataset_dir: prepared dataset that fixes the grid (default: the pipeline's).
        overwrite: write into a non-empty DST, replacing a previous completion.
    """
    from .complete import complete_dataset, model_files
    from ..inference.components import reference_grid

    data = _dataset_of(workdir, dataset_dir)
    report = complete_dataset(
        src, dst, _components(workdir), reference_grid(data), method=method, missing=missing, overwrite=overwrite,
        models=model_files(workdir), options={"workdir": str(workdir), "dataset_dir": str(data)},
    )
    generated = sum(v["generated"] for v in report["volumes"])
    print(f"completed {len(report['volumes'])} of {len(report['volumes']) + len(report['skipped'])} files into {dst} "
          f"({generated} slices generated, {len(report['skipped'])} skipped); report: {dst}/complete_report.json")


def evaluate(workdir: str, dataset_dir: str, out: str, split: str = "test", limit: int | None = None) -> None:
    """Evaluate MRNGAN against copy, prior, pix2pix_iterative, linear and cubic on held-out subjects.

    Writes OUT/report.json, OUT/per_distance.csv and PNG plots of each metric against distance.
    """
    from ..evaluation.reconstruction import evaluate_reconstruction

    report = evaluate_reconstruction(dataset_dir, out, _components(workdir), split=split, limit=limit)
    for name, m in report["single_slice"]["methods"].items():
        print(f"{name:<20} SSIM {m['ssim']:.3f}  head-only SSIM {m['ssim_head']:.3f}  PSNR {m['psnr']:.2f} dB")
    for k, methods in report["few_slices"].items():
        print(f"few slices {k:<4} " + "  ".join(f"{name} {m['ssim_head']:.3f} / {m['psnr']:.2f} dB" for name, m in methods.items()))
    print(f"report: {out}/report.json")


COMMANDS = {
    "prepare": prepare,
    "phantoms": phantoms,
    "pipeline": pipeline,
    "reconstruct": reconstruct,
    "evaluate": evaluate,
    "complete": complete,
}
LIST_FLAGS = ("--input", "--positions")


def _gather_lists(argv: list[str]) -> list[str]:
    """``--input a b c`` -> ``--input '["a", "b", "c"]'`` (fire takes one value per flag)."""
    out, i = [], 0
    while i < len(argv):
        arg = argv[i]
        if arg in LIST_FLAGS:
            values = []
            i += 1
            while i < len(argv) and not (argv[i].startswith("--") and not _is_number(argv[i])):
                values.append(argv[i])
                i += 1
            out += [arg, json.dumps(values) if len(values) != 1 else values[0]]
            continue
        out.append(arg)
        i += 1
    return out


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def main(argv: Sequence[str] | None = None) -> None:
    """Run a command; user errors become one line on stderr and exit status 2."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    try:
        args = _gather_lists(list(sys.argv[1:] if argv is None else argv))
        fire.Fire(COMMANDS, command=args, name="python -m monai_mrngan")
    except USER_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
