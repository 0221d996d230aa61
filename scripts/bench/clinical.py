"""The clinical-input check of issue #14 with trained stages: inputs as a scanner gives them, no hand step.

For each of a few held-out subjects of a prepared dataset, from the subject's source scan:

- ``dicom_sagittal``: a 1 mm sagittal DICOM series (the scan resampled to 1 mm, 176 sagittal files,
  uint16), reconstructed from one axial slice of it (``--slice-index``);
- ``nifti_1mm_256``: a 1 mm, 256 x 256 px axial NIfTI in LAS orientation, int16, under the
  ``combined`` scanner simulation of :mod:`monai_mrngan.evaluation.shift` (no scan from another
  scanner is available here; this is the nearest stand-in), one axial slice of it;
- ``stack_5mm``: 5 mm thick axial slices of that NIfTI (each the mean of five 1 mm slices), ``--stack``;
- ``single_sagittal_file``: one file of the sagittal series, which must be refused.

Each case runs ``python -m monai_mrngan reconstruct`` as a user would and reports: exit status, the
placed position against the true one (mm), and the overlay check of the issue: ``--out`` sampled at
each input slice's world coordinates, correlated with that input slice over the head.

    python -m scripts.bench.clinical --workdir W --dataset_dir D --out OUT [--subjects 2]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests"))  # the DICOM writer of the tests (pydicom)

from dicom_series import write_series  # noqa: E402

from monai_mrngan.data.datalist import load_split  # noqa: E402
from monai_mrngan.transforms.scanners import simulate  # noqa: E402


def _canonical(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    img = nib.as_closest_canonical(nib.load(str(path)))
    return np.asanyarray(img.dataobj).astype(np.float32), img.affine


def _to_1mm(vol: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    zooms = np.sqrt((affine[:3, :3] ** 2).sum(0))
    fine = ndimage.zoom(vol, zooms, order=1)
    aff = affine.copy()
    aff[:3, :3] = affine[:3, :3] / zooms
    return fine, aff


def _pad_inplane(vol: np.ndarray, affine: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    pads = [max(0, size - n) for n in vol.shape[:2]]
    out = np.pad(vol, [(p // 2, p - p // 2) for p in pads] + [(0, 0)])[:size, :size]
    aff = affine.copy()
    aff[:3, 3] -= affine[:3, :2] @ np.array([p // 2 for p in pads], dtype=float)
    return out, aff


def _world(affine: np.ndarray, shape2d: tuple[int, int], k: float) -> np.ndarray:
    ii, jj = np.meshgrid(np.arange(shape2d[0]), np.arange(shape2d[1]), indexing="ij")
    return (affine @ np.c_[ii.ravel(), jj.ravel(), np.full(ii.size, k), np.ones(ii.size)].T)[:3].T


def _sample(path: str | Path, world: np.ndarray) -> np.ndarray:
    img = nib.load(str(path))
    ijk = (np.linalg.inv(img.affine) @ np.c_[world, np.ones(len(world))].T)[:3]
    return ndimage.map_coordinates(img.get_fdata(dtype=np.float32), ijk, order=1, mode="constant", cval=0.0)


def _true_p(entry: dict, world_z: float) -> float:
    """The prepared volume's position p at world height ``world_z`` (prepare counts it from the vertex)."""
    img = nib.load(entry["image"])
    z = img.affine[2, 3] + img.affine[2, 2] * np.arange(img.shape[2])
    pos = np.asarray(entry["positions"], dtype=float)
    order = np.argsort(z)
    return float(np.interp(world_z, z[order], pos[order]))


def _run(workdir: Path, args: list[str], log: Path) -> tuple[int, str, float]:
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-m", "monai_mrngan", "reconstruct", "--workdir", str(workdir), *args],
                          capture_output=True, text=True, cwd=REPO)
    log.write_text(proc.stdout + proc.stderr)
    return proc.returncode, (proc.stderr.strip().splitlines() or [""])[-1], time.time() - t0


def _overlay(out: Path, slices: list[tuple[np.ndarray, np.ndarray, float]]) -> list[float]:
    """Per input slice (plane, affine, index): correlation of OUT sampled there with the plane over the head (above a
    tenth of the brightest input slice's maximum: a plane's own maximum would count the noise of a slab above the
    vertex as head)."""
    corr = []
    top = max(float(plane.max()) for plane, _, _ in slices)
    for plane, affine, k in slices:
        got = _sample(out, _world(affine, plane.shape, k)).reshape(plane.shape)
        head = plane > 0.1 * top
        if head.sum() < 100 or float(got[head].std()) == 0.0:
            continue  # no head here, or a slice left out of the output (beyond the model grid)
        corr.append(float(np.corrcoef(got[head], plane[head])[0, 1]))
    return corr


def check_subject(entry: dict, workdir: Path, out: Path, p_target: float = 0.45) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    raw, raw_aff = _canonical(entry["source"])
    fine, fine_aff = _to_1mm(raw, raw_aff)  # 1 mm, RAS
    rows = {}

    # the axial index (1 mm) whose true p is nearest p_target
    z = fine_aff[2, 3] + fine_aff[2, 2] * np.arange(fine.shape[2])
    k = int(np.argmin([abs(_true_p(entry, zz) - p_target) for zz in z]))

    # (1) sagittal DICOM series, 176 files
    x0 = max(0, (fine.shape[0] - 176) // 2)
    sag, sag_aff = fine[x0:x0 + 176], fine_aff.copy()
    sag_aff[:3, 3] += fine_aff[:3, 0] * x0
    series = out / "dicom_sagittal"
    scale = 4000.0 / max(float(sag.max()), 1e-6)
    files = write_series(sag, sag_aff, series, slice_axis=0, scale=scale)
    rc, err, sec = _run(workdir, ["--input", str(series), "--slice-index", str(k), "--out", str(out / "dicom.nii.gz")], out / "dicom.log")
    rows["dicom_sagittal"] = _case(rc, err, sec, out / "dicom.nii.gz", [(sag[:, :, k] * scale, sag_aff, k)],
                                   entry, z[k], n_files=len(files))

    # (2) 1 mm 256 px axial NIfTI, LAS, int16, under the combined scanner simulation
    shifted = simulate(fine / max(float(fine.max()), 1e-6), "combined", seed=7) * 1000.0
    padded, pad_aff = _pad_inplane(shifted, fine_aff, 256)
    las = padded[::-1]
    las_aff = pad_aff @ np.array([[-1, 0, 0, padded.shape[0] - 1], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1.0]])
    nii = out / "t1_1mm_256px.nii.gz"
    nib.save(nib.Nifti1Image(np.rint(las).astype(np.int16), las_aff), str(nii))
    rc, err, sec = _run(workdir, ["--input", str(nii), "--slice-index", str(k), "--out", str(out / "nifti.nii.gz")], out / "nifti.log")
    rows["nifti_1mm_256"] = _case(rc, err, sec, out / "nifti.nii.gz", [(padded[:, :, k], pad_aff, k)], entry, z[k])

    # (3) 5 mm thick axial stack of that NIfTI
    n = padded.shape[2] // 5
    thick = padded[:, :, : n * 5].reshape(padded.shape[0], padded.shape[1], n, 5).mean(-1)
    thick_aff = pad_aff.copy()
    thick_aff[:3, 2] *= 5
    thick_aff[:3, 3] += pad_aff[:3, 2] * 2  # slice centres: the middle of each 5 mm slab
    head = (thick > 0.1 * thick.max()).sum(axis=(0, 1)) > 2000  # slices with head (a stack covers the head)
    keep = np.nonzero(head)[0]
    thick, thick_aff2 = thick[:, :, keep[0]:keep[-1] + 1], thick_aff.copy()
    thick_aff2[:3, 3] += thick_aff[:3, 2] * keep[0]
    stack = out / "thick_5mm.nii.gz"
    nib.save(nib.Nifti1Image(np.rint(thick).astype(np.int16), thick_aff2), str(stack))
    rc, err, sec = _run(workdir, ["--input", str(stack), "--stack", "--out", str(out / "stack.nii.gz")], out / "stack.log")
    mid_z = float((thick_aff2 @ np.array([0, 0, thick.shape[2] // 2, 1.0]))[2])
    rows["stack_5mm"] = _case(rc, err, sec, out / "stack.nii.gz", [(thick[:, :, j], thick_aff2, j) for j in range(thick.shape[2])],
                              entry, mid_z, step_mm=5.0)

    # (4) one file of the sagittal series: must be refused
    rc, err, sec = _run(workdir, ["--input", str(files[len(files) // 2]), "--out", str(out / "single.nii.gz")], out / "single.log")
    rows["single_sagittal_file"] = {"exit_status": rc, "refused": rc != 0 and not (out / "single.nii.gz").exists(), "message": err}
    return rows


def _case(rc: int, err: str, sec: float, out: Path, slices: list, entry: dict, world_z: float, step_mm: float = 0.0, **extra) -> dict:
    """``world_z``: height of the input slice whose placement is checked; for a stack (``step_mm`` > 0)
    its middle slice, placed at the stack's fitted offset minus its distance from the first slice."""
    row = {"exit_status": rc, "seconds": round(sec, 1), **extra}
    if rc != 0:
        return {**row, "message": err}
    corr = _overlay(out, slices)
    meta = json.loads(out.with_name(out.name.replace(".nii.gz", "_positions.json")).read_text())
    if step_mm > 0:
        placed = float(meta["placement"].get("offset_p", meta["input_positions"][0])) - (len(slices) // 2) * step_mm / 200.0
    else:
        placed = float(meta["input_positions"][0])
    true = _true_p(entry, world_z)
    row.update(overlay_corr_min=round(min(corr), 4), overlay_corr_mean=round(float(np.mean(corr)), 4), slices_scored=len(corr),
               n_inputs=len(slices), placed_p=round(placed, 4), true_p=round(true, 4), placement_error_mm=round(abs(placed - true) * 200, 1))
    return row


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", required=True, type=Path)
    ap.add_argument("--dataset_dir", required=True, type=Path)
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--subjects", type=int, default=2)
    args = ap.parse_args(argv)
    results = {}
    for entry in load_split(args.dataset_dir, "test", args.subjects):
        print(f"[clinical] {entry['subject']}", file=sys.stderr, flush=True)
        results[entry["subject"]] = check_subject(entry, args.workdir, args.out / entry["subject"])
        print(json.dumps(results[entry["subject"]], indent=1), flush=True)
    (args.out / "clinical.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
