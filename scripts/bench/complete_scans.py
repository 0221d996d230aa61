"""``complete`` on scans off the prepared grid, as a researcher's incomplete dataset holds them, scored against the truth.

For each of a few held-out subjects of a prepared dataset, from the subject's source scan brought to 1 mm
(256 px, LAS, int16, as :mod:`scripts.bench.clinical` builds it):

- ``thick_5mm``: 5 mm thick axial slices (each the mean of five 1 mm slices), the head only;
- ``sparse_5mm``: the 1 mm slices at those slabs' centres (1 mm slices 5 mm apart: sharp where the slabs are blurred);
- ``band_1mm``: the 1 mm volume with a 20 mm band of axial slices blanked (0) at mid-head.

All files go into one folder and ``python -m monai_mrngan complete`` runs on it once per method (MRNGAN, linear,
cubic), as a user would. Each generated voxel is scored against the 1 mm scan sampled at its world coordinates
(trilinear; the 5 mm slabs' own blur is part of what a thick scan loses), on every generated slice between the
lowest and the highest real one (filling gaps, not extending the scan), in the output's units (the models'
[0, 1]: the truth divided by the sidecar's ``intensity.scale``), over the head (truth above 0.1): PSNR (data range 1)
and the mean absolute error, per file and method, beside the overlay check (``--out`` sampled at each real input
slice, correlated with it over the head: median and lowest; the lowest is an end slice, half sampled from the slice
generated beyond it), the seconds of each run, and for MRNGAN how its uncertainty map ranks the true absolute error
(Spearman over voxels and over slices) and the mean true error over the mean predicted one.

    python -m scripts.bench.complete_scans --workdir W --dataset_dir D --out OUT [--subjects 3] [--slab_mm X]

The 5 mm files are read as 5 mm slabs by default (their spacing), the volume made to agree with them; ``--slab_mm 0``
writes sidecars that say they are thin slices, as before that step.
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
from scipy.stats import spearmanr

from monai_mrngan.data.datalist import load_split

from .clinical import _canonical, _overlay, _pad_inplane, _sample, _to_1mm, _world

METHODS = ("mrngan", "linear", "cubic")
BAND_MM = 20


def write_inputs(entry: dict, src: Path) -> dict[str, tuple[Path, Path]]:
    """The subject's incomplete files in ``src`` and, for each, the 1 mm truth it was made from."""
    raw, raw_aff = _canonical(entry["source"])
    fine, fine_aff = _to_1mm(raw, raw_aff)
    padded, pad_aff = _pad_inplane(fine / max(float(fine.max()), 1e-6) * 1000.0, fine_aff, 256)
    las = np.array([[-1, 0, 0, padded.shape[0] - 1], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1.0]])
    name = entry["subject"]
    truth = src.parent / "truth" / f"{name}_1mm.nii.gz"
    truth.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(padded.astype(np.float32), pad_aff), str(truth))
    area = (padded > 100).sum(axis=(0, 1))
    head = np.nonzero(area > 2000)[0]
    files = {}
    # 5 mm slabs over the head
    lo, hi = int(head[0]), int(head[-1])
    n = (hi - lo + 1) // 5
    thick = padded[:, :, lo:lo + n * 5].reshape(padded.shape[0], padded.shape[1], n, 5).mean(-1)
    aff = pad_aff.copy()
    aff[:3, 2] *= 5
    aff[:3, 3] += pad_aff[:3, 2] * (lo + 2)  # each slab's centre
    path = src / f"{name}_thick_5mm.nii.gz"
    nib.save(nib.Nifti1Image(np.rint(thick[::-1]).astype(np.int16), aff @ las), str(path))
    files["thick_5mm"] = (path, truth)
    # the same places, 1 mm slices 5 mm apart (a protocol with a slice gap): sharp, where the slabs are blurred
    sparse = padded[:, :, lo + 2:lo + n * 5:5]
    path = src / f"{name}_sparse_5mm.nii.gz"
    nib.save(nib.Nifti1Image(np.rint(sparse[::-1]).astype(np.int16), aff @ las), str(path))
    files["sparse_5mm"] = (path, truth)
    # a blanked band at mid-head
    band = padded.copy()
    mid = (lo + hi) // 2
    band[:, :, mid - BAND_MM // 2: mid + BAND_MM // 2] = 0
    path = src / f"{name}_band_1mm.nii.gz"
    nib.save(nib.Nifti1Image(np.rint(band[::-1]).astype(np.int16), pad_aff @ las), str(path))
    files["band_1mm"] = (path, truth)
    return files


def score(out: Path, side: dict, truth: Path, source: Path) -> dict:
    """PSNR / MAE of the generated voxels against the truth; the overlay correlation of the real ones with the input."""
    img = nib.load(str(out))
    vol = img.get_fdata(dtype=np.float32)
    scale = float(side["intensity"]["scale"])
    real = side["real_slices"]
    gen = [k for k in side["generated_slices"] if min(real) < k < max(real)]  # between real slices: filling, not extrapolating
    if side["input_kind"] != "scan":  # on the input's own grid: the input's units, its own slices
        vol = vol / scale
    files = side.get("files") or {}
    unc = nib.load(str(out.with_name(files["uncertainty"]))).get_fdata(dtype=np.float32) if files.get("uncertainty") else None
    got, want, pred = [], [], []
    for k in gen:
        t = _sample(truth, _world(img.affine, vol.shape[:2], k)).reshape(vol.shape[:2]) / scale
        head = t > 0.1
        got.append(vol[:, :, k][head])
        want.append(t[head])
        if unc is not None:
            pred.append(unc[:, :, k][head])
    g, w = np.concatenate(got), np.concatenate(want)
    mse = float(np.mean((g - w) ** 2))
    trust = {}
    if pred:  # the uncertainty map against the true absolute error, as evaluate scores it (Spearman over voxels and slices)
        err = [np.abs(a - b) for a, b in zip(got, want)]
        pv, ev = np.concatenate(pred), np.concatenate(err)
        trust = {"spearman_voxel": round(float(spearmanr(pv, ev)[0]), 3),
                 "spearman_slice": round(float(spearmanr([p.mean() for p in pred], [e.mean() for e in err])[0]), 3),
                 "true_over_predicted": round(float(ev.mean() / max(pv.mean(), 1e-12)), 3)}
    src = nib.as_closest_canonical(nib.load(str(source)))
    data = np.asanyarray(src.dataobj).astype(np.float32)
    corr = _overlay(out, [(data[:, :, k], src.affine, k) for k in range(data.shape[2])])
    return {"psnr_db": round(10 * np.log10(1.0 / max(mse, 1e-12)), 2), "mae": round(float(np.mean(np.abs(g - w))), 4),
            "generated_slices": len(gen), "head_voxels": int(g.size), **trust,
            "overlay_corr_median": round(float(np.median(corr)), 4) if corr else None, "overlay_corr_min": round(min(corr), 4) if corr else None}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", required=True, type=Path)
    ap.add_argument("--dataset_dir", required=True, type=Path)
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--subjects", type=int, default=3)
    ap.add_argument("--slab_mm", type=float, default=None,
                    help="write a sidecar {\"slab_mm\": X} beside every file (0: read the 5 mm files as thin slices, not slabs)")
    args = ap.parse_args(argv)
    src = args.out / "incomplete"
    src.mkdir(parents=True, exist_ok=True)
    cases = {}
    for entry in load_split(args.dataset_dir, "test", args.subjects):
        for kind, (path, truth) in write_inputs(entry, src).items():
            cases[path] = (entry["subject"], kind, truth)
            if args.slab_mm is not None:
                (src / (path.name.split(".nii")[0] + ".json")).write_text(json.dumps({"slab_mm": args.slab_mm}))
    results: dict = {}
    for method in METHODS:
        dst = args.out / f"completed_{method}"
        t0 = time.time()
        proc = subprocess.run([sys.executable, "-m", "monai_mrngan", "complete", "--src", str(src), "--dst", str(dst), "--workdir",
                               str(args.workdir), "--method", method, "--overwrite"], capture_output=True, text=True)
        (args.out / f"complete_{method}.log").write_text(proc.stdout + proc.stderr)
        report = json.loads((dst / "complete_report.json").read_text())
        results[method] = {"exit_status": proc.returncode, "seconds": round(time.time() - t0, 1),
                           "skipped": [s["reason"] for s in report["skipped"]], "files": {}}
        for vol in report["volumes"]:
            subject, kind, truth = cases[Path(vol["source"])]
            side = json.loads((dst / vol["sidecar"]).read_text())
            row = score(dst / vol["output"], side, truth, Path(vol["source"]))
            results[method]["files"][f"{subject} {kind}"] = {**row, "seconds": vol["seconds"], "input_kind": side["input_kind"]}
        print(f"[complete_scans] {method}: {json.dumps(results[method], indent=1)}", flush=True)
    print("\n| file | " + " | ".join(f"{m} PSNR dB / MAE" for m in METHODS) + " | MRNGAN over linear / cubic dB |")
    print("|---|" + "---:|" * (len(METHODS) + 1))
    for name in results["mrngan"]["files"]:
        r = {m: results[m]["files"].get(name) for m in METHODS}
        cells = [f"{r[m]['psnr_db']:.2f} / {r[m]['mae']:.4f}" if r[m] else "-" for m in METHODS]
        gain = (f"{r['mrngan']['psnr_db'] - r['linear']['psnr_db']:+.2f} / {r['mrngan']['psnr_db'] - r['cubic']['psnr_db']:+.2f}"
                if all(r.values()) else "-")
        print(f"| {name} | " + " | ".join(cells) + f" | {gain} |")
    (args.out / "complete_scans.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
