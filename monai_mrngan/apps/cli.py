"""Command-line entry points: ``python -m monai_mrngan <command> --help``.

Every command reports bad input as one line on stderr (``error: <file>: <problem>``) and exits
with status 2, without a traceback.
"""

from __future__ import annotations

import json
import logging
import sys
import warnings
from pathlib import Path
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
    place_with: str | None = None,
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
        place_with: a pipeline work folder with a trained slice localizer: scans whose field of view
            cuts the top of the head are placed by it (its slices localized, one offset fitted along
            their known spacing) instead of skipped; the report and datalist record how.
    """
    import functools

    from ..data.prepare import prepare_dataset

    place = None
    if place_with:
        from ..inference.localize import localize_with_offset

        from ..inference.components import reference_grid

        grid = reference_grid(_dataset_of(place_with, None))
        if grid["shape"] != (size, size) or abs(grid["spacing_mm"] - spacing) > 1e-3:
            raise ValueError(f"{place_with}: its stages work on {grid['shape'][0]} px at {grid['spacing_mm']:g} mm; "
                             f"prepare with --size {grid['shape'][0]} --spacing {grid['spacing_mm']:g} to place with them")
        localizer, template = _components(place_with).placer()
        if localizer is None:
            raise FileNotFoundError(f"{place_with}: no trained slice localizer here (slice_localization/models/model.pt)")
        place = functools.partial(localize_with_offset, localizer, template=template)
    report = prepare_dataset(src, dst, spacing=spacing, size=size, seed=seed, split=split, overwrite=overwrite, place=place)
    ok = sum(r["status"] == "ok" for r in report["inputs"])
    placed = sum("placement" in r.get("steps", {}) for r in report["inputs"])
    splits = ", ".join(f"{k} {v['subjects']} subjects/{v['volumes']} volumes" for k, v in report["splits"].items())
    print(f"prepared {ok} of {len(report['inputs'])} scans into {dst}: {splits}" + (f"; {placed} cut scans placed by the localizer" if placed else ""))


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

    names = None if stages is None else _names(stages)
    results = run_pipeline(dataset_dir, workdir, preset=preset, stages=names, time_budget_s=time_budget_s, force=force)
    print(f"pipeline finished: {', '.join(results)} under {workdir}")


def _names(value: str | Sequence[str]) -> list[str]:
    """A comma-separated option as a list of names: fire hands ``a,b`` over as a tuple and ``a`` as a string."""
    items = value.split(",") if isinstance(value, str) else value
    return [str(n).strip() for n in items if str(n).strip()]


def _device(device: str) -> str:
    """``auto``: the GPU when torch sees one, else the CPU; anything else as given (``cpu``, ``cuda``, ``cuda:1``)."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: torch sees no CUDA device here")
    return str(device)


def _components(workdir: str, device: str = "cpu"):
    from ..inference.components import components_from_bundles
    from .pipeline import BUNDLES_DIR, read_run_info

    fixed = read_run_info(workdir).get("stage_overrides", {})
    names = {"localizer": "slice_localization", "flow": "flow_generation", "mrngan": "mrngan"}
    overrides = {k: {i: v for i, v in fixed.get(stage, {}).items() if not i.endswith("_overrides")} for k, stage in names.items()}
    return components_from_bundles(BUNDLES_DIR, workdir, device=_device(device), overrides=overrides)


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
    stack: bool = False,
    pixel_mm: float | None = None,
    force: bool = False,
    device: str = "auto",
    slab_mm: float | None = None,
) -> None:
    """Reconstruct a whole volume from one 2D slice or a few, with the stages trained in WORKDIR.

    Args:
        workdir: a pipeline work folder (trained stages).
        input: one or more slices: a DICOM series folder (with --slice-index or --stack) or one axial
            DICOM file, a NIfTI (2D, or 3D with --slice-index or --stack; any size, spacing and
            orientation), or a PNG (at the model size, or any size with --pixel_mm).
        out: output volume (.nii.gz), in the input's space when the input has a geometry (DICOM,
            NIfTI); beside it: OUT_model_grid.nii.gz (the model grid), OUT_provenance.nii.gz (0 on
            real slices, else mm to the nearest one), OUT_montage.png and OUT_positions.json.
        slice_index: axial index of a 3D input, counted from the bottom of the volume reoriented to RAS.
        positions: the anatomical position p of each input slice (of the first one with --stack); localized when omitted.
        dataset_dir: prepared dataset that fixes the model grid (default: the pipeline's).
        method: mrngan, pix2pix_iterative, prior, copy (one slice), linear, cubic or registration (several).
        stack: use every axial slice of one input (a thick-slice stack, or a DICOM series with files left out), or the
            given DICOM files of one series, placed by their geometry.
        pixel_mm: in-plane pixel size of a PNG input that is not at the model size.
        force: reconstruct an input that does not look like an axial T1 head slice (refused otherwise).
        device: auto (a GPU when there is one), cpu or cuda[:N].
        slab_mm: with --stack, how thick its slices are (default: their spacing, when wider than the grid's: each a
            slab that the output is made to agree with); 0 for thin slices with gaps between them.
    """
    from ..inference.components import reference_grid
    from ..inference.reconstruct import reconstruct_files

    inputs = [input] if isinstance(input, str) else list(input)
    pos = None if positions is None else ([float(positions)] if isinstance(positions, (int, float)) else [float(p) for p in positions])
    ref = reference_grid(_dataset_of(workdir, dataset_dir))
    result = reconstruct_files(
        inputs, out, _components(workdir, device), slice_index=slice_index, positions=pos, method=method,
        expected_shape=ref["shape"], spacing_mm=ref["spacing_mm"], reference_affine=ref["affine"],
        reference_positions=ref["positions"], stack=bool(stack), pixel_mm=pixel_mm, force=bool(force),
        slab_mm=None if slab_mm is None else float(slab_mm),
    )
    checks = {c["source"]: c for c in result["input_check"]}
    for source, p in zip(result["sources"], result["input_positions"]):
        c = checks.get(source)
        score = f"; input check {'passed' if c['passed'] else 'FAILED (forced)'}, atlas match {c['axial_match']:.2f}" if c and "passed" in c else ""
        for key, label in (("t1_contrast", "T1 contrast"), ("white_over_grey", "white over grey")):
            score += f", {label} {c[key]:.2f}" if score and c.get(key) is not None else ""
        print(f"{source}: position p = {p:.3f} ({p * 200:.0f} mm below the vertex){score}")
    grid = f"\nmodel grid: {result['model_grid_volume']}" if "model_grid_volume" in result else ""
    unc = f"\nuncertainty: {result['uncertainty']}" if "uncertainty" in result else ""
    print(f"volume:    {result['volume']}{grid}\nprovenance: {result['provenance']}{unc}\nmontage:   {result['montage']}\npositions: {result['positions']}")


def complete(
    src: str,
    dst: str,
    workdir: str,
    method: str = "mrngan",
    missing: str | float = "empty",
    dataset_dir: str | None = None,
    overwrite: bool = False,
    device: str = "auto",
    workers: int = 2,
) -> None:
    """Complete a folder of incomplete scans: fill missing axial slices, keep real ones bit-exact.

    SRC holds 3D NIfTI volumes with missing slices (optional sidecar ``<name>.json`` with ``positions``
    or ``first_position``, else the localizer places them), stacks of a few slices with a sidecar
    ``{"positions": [...]}``, and scans off the prepared grid (thick-slice acquisitions, other sizes and
    spacings, DICOM series folders: completed as ``reconstruct --stack`` does and written as it writes). DST gets
    ``<name>.nii.gz``, ``<name>.json`` (generated_slices, real_slices, positions, method, models) per
    file and ``complete_report.json``. Bad files are reported on stderr and skipped.

    Args:
        src: folder of incomplete scans (read only; searched recursively).
        dst: output folder; not inside SRC; must be empty unless ``--overwrite``.
        workdir: a pipeline work folder (trained stages).
        method: mrngan, pix2pix_iterative, prior, copy, linear, cubic or registration (no trained model needed).
        missing: what a missing axial slice holds: empty (every voxel 0 or NaN), zero, nan, or a number.
        dataset_dir: prepared dataset that fixes the grid (default: the pipeline's).
        overwrite: write into a non-empty DST, replacing a previous completion.
        device: auto (a GPU when there is one), cpu or cuda[:N].
        workers: files completed at once on the CPU, one process each (capped by the cores; the same outputs).
    """
    from .complete import complete_dataset, model_files
    from ..inference.components import reference_grid

    data = _dataset_of(workdir, dataset_dir)
    report = complete_dataset(
        src, dst, _components(workdir, device), reference_grid(data), method=method, missing=missing, overwrite=overwrite,
        models=model_files(workdir), options={"workdir": str(workdir), "dataset_dir": str(data)}, workers=workers,
    )
    generated = sum(v["generated"] for v in report["volumes"])
    print(f"completed {len(report['volumes'])} of {len(report['volumes']) + len(report['skipped'])} files into {dst} "
          f"({generated} slices generated, {len(report['skipped'])} skipped); report: {dst}/complete_report.json")


def evaluate(workdir: str, dataset_dir: str, out: str, split: str = "test", limit: int | None = None, shift: str | None = None,
             device: str = "auto", workers: int = 2) -> None:
    """Evaluate MRNGAN against copy, prior, pix2pix_iterative, linear, cubic and registration on held-out subjects.

    Writes OUT/report.json, OUT/per_distance.csv and PNG plots of each metric against distance.
    ``--shift all`` (or a comma-separated list of names of ``monai_mrngan.evaluation.shift.SHIFTS``)
    runs the same evaluation on the original subjects and under each simulated scanner, and writes
    the tables side by side (OUT/shift_report.md, OUT/shift_report.json). ``--device``: auto (a GPU
    when there is one), cpu or cuda[:N]. ``--workers``: subjects evaluated at once on the CPU, one process each
    (capped by the cores; the report is the same for any number).
    """
    from ..evaluation.reconstruction import evaluate_reconstruction

    if shift:
        from ..evaluation.shift import evaluate_shifted

        names = None if shift == "all" else _names(shift)
        evaluate_shifted(dataset_dir, out, _components(workdir, device), shifts=names, split=split, limit=limit, workers=workers)
        print((Path(out) / "shift_report.md").read_text())
        print(f"report: {out}/shift_report.json")
        return
    report = evaluate_reconstruction(dataset_dir, out, _components(workdir, device), split=split, limit=limit, workers=workers)
    for name, m in report["single_slice"]["methods"].items():
        print(f"{name:<20} SSIM {m['ssim']:.3f}  head-only SSIM {m['ssim_head']:.3f}  PSNR {m['psnr']:.2f} dB")
    for section in ("few_slices", "thick_slices"):
        for k, methods in report.get(section, {}).items():
            print(f"{section.replace('_', ' ')} {k:<4} " + "  ".join(f"{name} {m['ssim_head']:.3f} / {m['psnr']:.2f} dB" for name, m in methods.items()))
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
