"""Dataset completion (``python -m monai_mrngan complete``): volumes with missing slices and stacks
of a few slices with known positions, completed with every real slice kept bit-exact.

The work folder holds every stage with small, randomly initialised networks built from the real
bundle configs (and the tiny dataset's atlas bank as the prior), so the whole MRNGAN path runs in
seconds; the quality of the generated slices is not what is tested here.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from scipy import ndimage

from monai_mrngan.apps import cli
from monai_mrngan.data.datalist import load_split
from monai_mrngan.data.io import InputError, save_json, save_nifti
from monai_mrngan.apps.complete import REPORT_NAME, complete_dataset, complete_file
from monai_mrngan.apps.complete_io import check_folders
from monai_mrngan.inference.components import Components, load_bundle_network, reference_grid
from overlay import overlay_correlation  # tests/ helper

REPO = Path(__file__).resolve().parents[1]
BUNDLES = REPO / "bundles"
STAGE_OVERRIDES = {
    "slice_localization": {"network_def": {"_target_": "monai_mrngan.networks.localizers.LocalizerCNN", "spatial_size": [32, 32],
                                           "filters": [8, 8, 4, 1], "hidden": 16}},
    "flow_generation": {"unet_channels": [8, 16, 32]},
    "mrngan": {"network_def#hidden_channels": 4, "network_def#features": 4},
}
ZEROED = [3, 4, 5, 10, 20]  # slices blanked in the float volume
EMPTY = [22, 23]  # the tiny test volume's own all-zero slices (above the head): empty counts as missing
THIN_MISSING = list(range(10, 18))  # blanked in the twice-finer volume: four grid slices' worth


@pytest.fixture(scope="module")
def workdir(tiny_dataset, tmp_path_factory) -> Path:
    """A pipeline work folder: every stage's weights (random init, small networks) and pipeline.json."""
    from monai_mrngan.atlas.bank import build_mean_prior

    wd = tmp_path_factory.mktemp("complete_workdir")
    torch.manual_seed(0)
    for stage in ("slice_localization", "flow_generation", "mrngan"):
        net = load_bundle_network(BUNDLES / stage / "configs" / "inference.json", None, overrides=STAGE_OVERRIDES[stage])
        (wd / stage / "models").mkdir(parents=True)
        torch.save(net.state_dict(), wd / stage / "models" / "model.pt")
    models = wd / "brain_generalization" / "models"
    build_mean_prior(tiny_dataset, models / "mean_brain.nii.gz", num_positions=24, bank_path=models / "atlas_bank.pt", max_atlases=4)
    save_json({"dataset_dir": str(tiny_dataset), "preset": "test", "extra_overrides": STAGE_OVERRIDES,
               "stage_overrides": STAGE_OVERRIDES}, wd / "pipeline.json")
    return wd


@pytest.fixture(scope="module")
def scan(tiny_dataset):
    entry = load_split(tiny_dataset, "test")[0]
    img = nib.load(entry["image"])
    return np.asanyarray(img.dataobj), img.affine, [float(p) for p in entry["positions"]]


def _hash_tree(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def _loaded(path: Path) -> np.ndarray:
    return np.asanyarray(nib.load(str(path)).dataobj)


def _good_inputs(src: Path, scan) -> dict:
    """A float volume (localizer positions), an int16 volume (sidecar first_position), an int16 stack."""
    vol, affine, positions = scan
    v = vol.copy()
    v[:, :, ZEROED] = 0
    save_nifti(v, affine, src / "vol_float.nii.gz")
    raw = np.rint(vol * 800).astype(np.int16)
    raw[:, :, 7:12] = 0
    (src / "sub").mkdir(parents=True)
    nib.save(nib.Nifti1Image(raw, affine), str(src / "sub" / "vol_int.nii"))
    save_json({"first_position": positions[0]}, src / "sub" / "vol_int.json")
    picks = [4, 12, 20]
    stack = np.rint(vol[:, :, picks] * 1000).astype(np.int16)
    nib.save(nib.Nifti1Image(stack, np.eye(4)), str(src / "stack.nii.gz"))
    save_json({"positions": [positions[i] for i in picks]}, src / "stack.json")
    # off the prepared grid: a thick-slice scan (every 3rd slice, twice the in-plane resolution, raw int16, LPS-like axes)
    fine = ndimage.zoom(vol[:, :, ::3], (2, 2, 1), order=1)
    aff = affine.copy()
    aff[:3, :2] /= 2.0
    aff[:3, 2] *= 3
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    flip[0, 3], flip[1, 3] = fine.shape[0] - 1, fine.shape[1] - 1
    nib.save(nib.Nifti1Image(np.rint(fine[::-1, ::-1] * 900).astype(np.int16), aff @ flip), str(src / "thick.nii.gz"))
    # ... and a volume sampled twice finer along the axis than the grid, with a few slices missing
    thin = np.repeat(vol, 2, axis=2)
    thin[:, :, THIN_MISSING] = 0
    aff = affine.copy()
    aff[:3, 2] /= 2
    aff[:3, 3] -= 0.25 * affine[:3, 2]
    save_nifti(thin, aff, src / "thin.nii.gz")
    return {"picks": picks}


def _bad_inputs(src: Path, scan) -> dict[str, str]:
    """Bad files and the text their one-line reason must contain."""
    vol, affine, positions = scan
    save_nifti(np.stack([vol] * 3, axis=3), affine, src / "series4d.nii.gz")
    save_nifti(np.full(vol.shape, np.nan, np.float32), affine, src / "allnan.nii.gz")
    save_nifti(ndimage.zoom(vol[:, :, [4, 12, 20]], (1.25, 1.25, 1), order=1), np.eye(4), src / "big.nii.gz")  # a stack: no geometry
    save_json({"positions": [positions[i] for i in (4, 12, 20)]}, src / "big.json")
    save_nifti(vol[:, :, [4, 12, 20]], np.eye(4), src / "stack_nopos.nii.gz")
    save_nifti(vol[:, :, [4, 12, 20]], np.eye(4), src / "stack_count.nii.gz")
    save_json({"positions": [0.3, 0.5]}, src / "stack_count.json")
    (src / "corrupt.nii.gz").write_bytes(b"not an image at all")
    return {
        "series4d.nii.gz": "4D series",
        "allnan.nii.gz": "every one of its 24 axial slices is missing",
        "big.nii.gz": "in-plane size 40x40 px; the models expect 32x32",
        "stack_nopos.nii.gz": "needs their positions",
        "stack_count.json": "2 positions for a stack of 3 slices",
        "corrupt.nii.gz": "not a readable NIfTI",
    }


def _check_good_outputs(src: Path, dst: Path, scan, picks, tiny_dataset) -> None:
    vol, affine, positions = scan
    # (a) float volume: blanked + empty slices generated, every other slice bit-exact, same grid
    side = json.loads((dst / "vol_float.json").read_text())
    generated = sorted(ZEROED + EMPTY)
    assert side["input_kind"] == "volume" and side["generated_slices"] == generated
    assert side["real_slices"] == [i for i in range(24) if i not in generated]
    assert side["positions_from"] == "localizer" and len(side["positions"]) == 24 and side["method"] == "mrngan"
    assert set(side["models"]) == {"mrngan", "flow_generation", "brain_generalization", "slice_localization"}
    assert all(len(m["sha256"]) == 64 for m in side["models"].values())
    inp, out = _loaded(src / "vol_float.nii.gz"), _loaded(dst / "vol_float.nii.gz")
    assert out.dtype == inp.dtype and out.shape == inp.shape
    assert np.array_equal(out[:, :, side["real_slices"]], inp[:, :, side["real_slices"]])
    assert np.isfinite(out).all() and 0 <= out.min() and out.max() <= 1
    assert all(out[:, :, i].any() for i in ZEROED)  # filled from both neighbours
    np.testing.assert_array_equal(nib.load(str(dst / "vol_float.nii.gz")).affine, nib.load(str(src / "vol_float.nii.gz")).affine)

    # (a) int16 volume with a sidecar: positions from it, values back on the input's scale, int16 kept
    side = json.loads((dst / "sub" / "vol_int.json").read_text())
    assert side["generated_slices"] == [7, 8, 9, 10, 11] + EMPTY and side["positions_from"] == "sidecar first_position"
    np.testing.assert_allclose(side["positions"], positions, atol=1e-5)
    assert "slice_localization" not in side["models"] and side["intensity"]["scale"] > 1
    inp, out = _loaded(src / "sub" / "vol_int.nii"), _loaded(dst / "sub" / "vol_int.nii.gz")
    assert out.dtype == np.int16 and np.array_equal(out[:, :, side["real_slices"]], inp[:, :, side["real_slices"]])
    assert 0 <= out.min() and out.max() <= side["intensity"]["scale"] + 1 and out[:, :, 9].any()

    # (b) stack: the whole prepared grid, the three slices at their grid slices, stored values unchanged
    side = json.loads((dst / "stack.json").read_text())
    ref = reference_grid(tiny_dataset)
    assert side["input_kind"] == "stack" and side["real_slices"] == picks
    assert side["generated_slices"] == [i for i in range(24) if i not in picks]
    assert [p["index"] for p in side["placement"]] == picks
    np.testing.assert_allclose(side["positions"], ref["positions"], atol=1e-6)
    inp, img = _loaded(src / "stack.nii.gz"), nib.load(str(dst / "stack.nii.gz"))
    out = np.asanyarray(img.dataobj)
    assert out.dtype == np.int16 and out.shape == (32, 32, 24)
    for j, i in enumerate(picks):
        assert np.array_equal(out[:, :, i], inp[:, :, j])
    np.testing.assert_allclose(img.affine, ref["affine"], atol=1e-6)


SCAN_FILES = (".nii.gz", ".json", "_model_grid.nii.gz", "_provenance.nii.gz", "_montage.png", "_positions.json")
"""What a scan off the grid completes into (as ``reconstruct`` writes; the test stages have no uncertainty calibration)."""


def _check_scans(src: Path, dst: Path, scan, tiny_dataset) -> None:
    """(c) scans off the grid: read as reconstruct --stack reads them, written so that they overlay the input."""
    vol, affine, positions = scan
    ref = reference_grid(tiny_dataset)
    side = json.loads((dst / "thick.json").read_text())
    # the top of the head is in view: counted from it, as prepare counts, so no localizer was read
    assert side["input_kind"] == "scan" and side["positions_from"] == "placed (vertex in the field of view)"
    assert "slice_localization" not in side["models"] and "mrngan" in side["models"]
    assert sorted(side["input_slices"] + side["input_slices_left_out"]) == list(range(8))  # above the vertex: left out
    assert len(side["real_slices"]) == len(side["input_slices"]) >= 6 and side["shape"] == [32, 32, 24]
    assert side["files"]["model_grid_volume"] == "thick_model_grid.nii.gz" and side["intensity"]["scale"] > 1
    np.testing.assert_allclose(np.diff(sorted(side["real_slices"])), 3)  # 3 grid steps apart, as acquired
    out = nib.load(str(dst / "thick.nii.gz"))
    assert out.shape == (32, 32, 24) and 0 <= out.get_fdata().min() and out.get_fdata().max() <= 1
    for k in (2, 4, 6):  # each real slice lies where it was acquired
        assert overlay_correlation(dst / "thick.nii.gz", src / "thick.nii.gz", k) >= 0.9
    np.testing.assert_allclose(nib.load(str(dst / "thick_model_grid.nii.gz")).affine, ref["affine"], atol=1e-4)
    side = json.loads((dst / "thin.json").read_text())
    assert side["input_kind"] == "scan" and not set(side["input_slices"]) & set(THIN_MISSING)
    assert len(side["real_slices"]) == len(side["input_slices"]) and side["generated_slices"]  # one input per grid slice
    report = json.loads((dst / REPORT_NAME).read_text())
    listed = next(v for v in report["volumes"] if v["output"] == "thin.nii.gz")
    assert sorted(listed["files"]) == sorted(f"thin{s}" for s in SCAN_FILES if s != ".json")


def test_complete_cli_end_to_end(workdir, scan, tiny_dataset, tmp_path):
    """The three kinds and every kind of bad file in one folder, through `python -m monai_mrngan complete`."""
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    good = _good_inputs(src, scan)
    bad = _bad_inputs(src, scan)
    (src / "notes.txt").write_text("not an image")
    before = _hash_tree(src)
    proc = subprocess.run([sys.executable, "-m", "monai_mrngan", "complete", "--src", src, "--dst", dst, "--workdir", workdir],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert _hash_tree(src) == before  # SRC untouched
    assert "completed 5 of 11 files" in proc.stdout
    skipped_lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("complete: skipped ")]
    assert len(skipped_lines) == len(bad)
    for name, text in bad.items():
        line = next(ln for ln in skipped_lines if name.split(".")[0] + "." in ln)
        assert text in line, line
    assert any("complete: 11/11" in ln for ln in proc.stderr.splitlines())  # progress

    report = json.loads((dst / REPORT_NAME).read_text())
    assert sorted(v["output"] for v in report["volumes"]) == ["stack.nii.gz", "sub/vol_int.nii.gz", "thick.nii.gz", "thin.nii.gz",
                                                              "vol_float.nii.gz"]
    assert len(report["skipped"]) == len(bad) and all(s["reason"] for s in report["skipped"])
    assert report["ignored_files"] == [str(src / "notes.txt")]
    assert report["options"]["method"] == "mrngan" and report["options"]["workdir"] == str(workdir)
    scans = [f"{name}{suffix}" for name in ("thick", "thin") for suffix in SCAN_FILES]
    assert sorted(p.name for p in dst.rglob("*") if p.is_file()) == sorted(
        ["complete_report.json", "stack.json", "stack.nii.gz", "vol_float.json", "vol_float.nii.gz", "vol_int.json", "vol_int.nii.gz"] + scans)
    _check_good_outputs(src, dst, scan, good["picks"], tiny_dataset)
    _check_scans(src, dst, scan, tiny_dataset)
    check_folders(src, dst, overwrite=True)  # what --overwrite does first: every file the report lists is removed, scans' too
    assert [p for p in dst.rglob("*") if p.is_file()] == []


def test_files_completed_side_by_side_give_the_same_outputs(scan, tiny_dataset, tmp_path):
    """Two files at a time (forked workers): the same report, in the same order, and the same files, byte for byte."""
    src = tmp_path / "src"
    src.mkdir()
    _good_inputs(src, scan)
    _bad_inputs(src, scan)
    reports = {}
    for n in (1, 2):
        reports[n] = complete_dataset(src, tmp_path / f"dst{n}", Components(), reference_grid(tiny_dataset), method="linear", progress=False,
                                      workers=n)
        for entry in reports[n]["volumes"]:
            entry.pop("seconds")
        reports[n].pop("seconds")
        reports[n]["dst"] = None
    assert reports[1] == reports[2] and len(reports[1]["volumes"]) >= 3 and reports[1]["skipped"]
    files = sorted(p.relative_to(tmp_path / "dst1") for p in (tmp_path / "dst1").rglob("*") if p.is_file() and p.name != REPORT_NAME)
    assert files == sorted(p.relative_to(tmp_path / "dst2") for p in (tmp_path / "dst2").rglob("*") if p.is_file() and p.name != REPORT_NAME)
    for f in files:
        if f.suffix == ".json":
            other = (tmp_path / "dst2" / f).read_text().replace(str(tmp_path / "dst2"), str(tmp_path / "dst1"))  # paths name their folder
            assert json.loads((tmp_path / "dst1" / f).read_text()) == json.loads(other), f
        elif f.name.endswith(".nii.gz"):
            assert np.array_equal(_loaded(tmp_path / "dst1" / f), _loaded(tmp_path / "dst2" / f)), f
        else:
            assert (tmp_path / "dst1" / f).read_bytes() == (tmp_path / "dst2" / f).read_bytes(), f


def _main(*args) -> int:
    try:
        cli.main([str(a) for a in args])
    except SystemExit as err:
        return int(err.code or 0)
    return 0


def test_dst_rules_and_nothing_usable(workdir, scan, tmp_path, capsys):
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    vol, affine, _ = scan
    v = vol.copy()
    v[:, :, 8] = 0
    save_nifti(v, affine, src / "a.nii.gz")
    base = ["complete", "--src", src, "--workdir", workdir, "--method", "linear"]

    assert _main(*base, "--dst", src / "out") == 2
    assert "inside the source folder" in capsys.readouterr().err
    assert _main(*base, "--dst", dst) == 0
    first = _loaded(dst / "a.nii.gz")
    capsys.readouterr()
    assert _main(*base, "--dst", dst) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error:") and "not empty" in err[-1] and "--overwrite" in err[-1]
    (src / "a.nii.gz").rename(src / "b.nii.gz")
    (dst / "keep.txt").write_text("user file")
    assert _main(*base, "--dst", dst, "--overwrite") == 0  # the previous run's outputs are replaced
    assert sorted(p.name for p in dst.iterdir()) == ["b.json", "b.nii.gz", "complete_report.json", "keep.txt"]
    assert np.array_equal(_loaded(dst / "b.nii.gz"), first)

    bad = tmp_path / "bad"
    bad.mkdir()
    save_nifti(np.full(vol.shape, np.nan, np.float32), affine, bad / "nan.nii.gz")
    capsys.readouterr()
    assert _main("complete", "--src", bad, "--dst", tmp_path / "bad_out", "--workdir", workdir) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert any("nan.nii.gz" in ln and "missing" in ln for ln in err)
    assert err[-1].startswith("error:") and "nothing usable" in err[-1]
    report = json.loads((tmp_path / "bad_out" / REPORT_NAME).read_text())
    assert report["volumes"] == [] and "nan.nii.gz" in report["skipped"][0]["source"]


def test_orientation_missing_rules_and_positions(scan, tiny_dataset, tmp_path):
    """A flipped (LPI) volume completes like its RAS twin; --missing nan / a number; no positions."""
    vol, affine, positions = scan
    ref = reference_grid(tiny_dataset)
    nothing = Components()  # linear needs no model and, without a localizer, no positions

    v = vol.astype(np.float32).copy()
    v[:, :, [6, 7, 15]] = np.nan
    save_nifti(v, affine, tmp_path / "ras.nii.gz")
    flip = np.diag([-1.0, -1.0, -1.0, 1.0])
    flip[:3, 3] = np.array(v.shape) - 1
    save_nifti(v[::-1, ::-1, ::-1], affine @ flip, tmp_path / "lpi.nii.gz")  # the same voxels in world space
    ras = complete_file(tmp_path / "ras.nii.gz", nothing, ref, method="linear", missing="nan")
    lpi = complete_file(tmp_path / "lpi.nii.gz", nothing, ref, method="linear", missing="nan")
    assert ras.meta["generated_slices"] == [6, 7, 15] and ras.meta["positions"] is None
    assert lpi.meta["generated_slices"] == [23 - 15, 23 - 7, 23 - 6] and lpi.meta["axial_axis"] == 2
    np.testing.assert_array_equal(lpi.data, ras.data[::-1, ::-1, ::-1])
    swap = np.zeros((4, 4))
    swap[0, 1] = swap[1, 2] = swap[2, 0] = swap[3, 3] = 1  # stored with the axial axis first
    save_nifti(np.transpose(v, (2, 0, 1)), affine @ swap, tmp_path / "zxy.nii.gz")
    zxy = complete_file(tmp_path / "zxy.nii.gz", nothing, ref, method="linear", missing="nan")
    assert zxy.meta["axial_axis"] == 0 and zxy.meta["generated_slices"] == [6, 7, 15]
    np.testing.assert_array_equal(zxy.data, np.transpose(ras.data, (2, 0, 1)))
    np.testing.assert_allclose(ras.data[:, :, 7], (v[:, :, 5] + 2 * v[:, :, 8]) / 3, atol=1e-6)  # linear across the gap
    assert np.array_equal(ras.data[:, :, 22], np.zeros((32, 32), np.float32))  # zero slices stay real under --missing nan

    w = vol.astype(np.float32).copy()
    w[:, :, 9] = -1.0
    save_nifti(w, affine, tmp_path / "fill.nii.gz")
    out = complete_file(tmp_path / "fill.nii.gz", nothing, ref, method="linear", missing=-1)
    assert out.meta["generated_slices"] == [9] and out.meta["intensity"]["unit_range"]  # the fill value is not data
    assert out.data[:, :, 9].min() >= 0 and np.array_equal(np.delete(out.data, 9, axis=2), np.delete(w, 9, axis=2))

    save_json({"positions": [0.5] * 24}, tmp_path / "ras.json")
    with pytest.raises(InputError, match="do not follow the slice spacing"):
        complete_file(tmp_path / "ras.nii.gz", nothing, ref, method="linear", missing="nan")
    save_json({"positions": positions}, tmp_path / "ras.json")
    assert complete_file(tmp_path / "ras.nii.gz", nothing, ref, method="linear", missing="nan").meta["positions_from"] == "sidecar"
    (tmp_path / "ras.json").unlink()
    prior_only = Components(prior=object())
    with pytest.raises(InputError, match="slice positions unknown") as err:
        complete_file(tmp_path / "ras.nii.gz", prior_only, ref, method="prior", missing="nan")
    assert "ras.nii.gz" in str(err.value) and "\n" not in str(err.value)

    save_nifti(vol[:, :, [4, 5]], np.eye(4), tmp_path / "close.nii.gz")
    save_json({"positions": [positions[4], positions[4] + 0.001]}, tmp_path / "close.json")
    with pytest.raises(InputError, match="same grid slice"):
        complete_file(tmp_path / "close.nii.gz", nothing, ref, method="linear")
    with pytest.raises(ValueError, match="needs model"):
        complete_dataset(tmp_path, tmp_path / "never", nothing, ref, method="mrngan")
    with pytest.raises(ValueError, match="--missing"):
        complete_file(tmp_path / "ras.nii.gz", nothing, ref, method="linear", missing="sometimes")


def test_a_scan_off_the_grid_takes_its_sidecar_positions_and_says_when_nothing_can_place_it(scan, tiny_dataset, tmp_path):
    vol, affine, positions = scan
    ref = reference_grid(tiny_dataset)
    nothing = Components()  # linear: no model; positions from the sidecar or from the vertex in view
    aff = affine.copy()
    aff[:3, 2] *= 3
    save_nifti(vol[:, :, ::3], aff, tmp_path / "thick.nii.gz")  # every 3rd slice: 25 mm apart, the grid's in-plane size
    save_json({"first_position": positions[0]}, tmp_path / "thick.json")
    done = complete_file(tmp_path / "thick.nii.gz", nothing, ref, method="linear")
    assert done.meta["input_kind"] == "scan" and done.meta["positions_from"] == "sidecar"
    assert done.meta["real_slices"] == list(range(0, 24, 3)) and done.meta["models"] == {}
    out = done.reconstructed.rec.volume
    for c in (3, 6, 9):  # each 6 mm slice a slab that the completed volume agrees with (the mean over it)
        np.testing.assert_allclose(out[:, :, c - 1 : c + 2].mean(2), vol[:, :, c], atol=1.2e-2)
    assert done.reconstructed.rec.extra["slab_mm"] == pytest.approx(3 * ref["spacing_mm"], rel=1e-4) == done.meta["slab_mm"]
    save_json({"first_position": positions[0], "slab_mm": 0}, tmp_path / "thick.json")  # thin slices 3 grid slices apart
    thin = complete_file(tmp_path / "thick.nii.gz", nothing, ref, method="linear")
    assert thin.meta["slab_mm"] == 0.0 and "slab_mm" not in thin.reconstructed.rec.extra
    np.testing.assert_allclose(thin.reconstructed.rec.volume[:, :, 1], (2 * vol[:, :, 0] + vol[:, :, 3]) / 3, atol=1e-5)  # linear across each gap
    save_json({"first_position": positions[0], "slab_mm": "thick"}, tmp_path / "thick.json")
    with pytest.raises(InputError, match="slab_mm"):
        complete_file(tmp_path / "thick.nii.gz", nothing, ref, method="linear")
    np.testing.assert_allclose(done.reconstructed.rec.positions, ref["positions"], atol=1e-6)

    save_nifti(vol[:, :, :15:3], aff, tmp_path / "cut.nii.gz")  # the top of the head cut off, and no sidecar
    with pytest.raises(InputError, match="no localizer is there to place it") as err:
        complete_file(tmp_path / "cut.nii.gz", nothing, ref, method="linear")
    assert "cut.nii.gz" in str(err.value) and "\n" not in str(err.value)


def test_dicom_series_folders_are_completed_as_scans(workdir, scan, tiny_dataset, tmp_path):
    """A DICOM series folder under SRC is one input: a thick-slice series is completed, a series on the grid's spacing
    with no file missing is skipped with its reason, and the files of a series are not 'ignored files'."""
    pytest.importorskip("pydicom")
    from dicom_series import write_series  # tests/ helper

    vol, affine, positions = scan
    src, dst = tmp_path / "src", tmp_path / "dst"
    aff = affine.copy()
    aff[:3, 2] *= 3
    write_series(vol[:, :, ::3], aff, src / "sub-1" / "t1_thick", scale=1000.0)  # axial files, 25 mm apart
    write_series(vol, affine, src / "sub-2" / "t1_full", scale=1000.0)  # every slice: nothing to complete
    report = complete_dataset(src, dst, Components(), reference_grid(tiny_dataset), method="linear", progress=False)
    assert [v["output"] for v in report["volumes"]] == ["sub-1/t1_thick.nii.gz"] and report["ignored_files"] == []
    assert len(report["skipped"]) == 1 and "nothing to complete" in report["skipped"][0]["reason"]
    assert report["skipped"][0]["source"].endswith("t1_full")
    side = json.loads((dst / "sub-1" / "t1_thick.json").read_text())
    assert side["input_kind"] == "scan" and side["positions_from"].startswith("placed")
    assert len(side["real_slices"]) == len(side["input_slices"]) >= 6
    np.testing.assert_allclose(np.diff(side["real_slices"]), 3)
    assert nib.load(str(dst / "sub-1" / "t1_thick.nii.gz")).shape == (32, 32, 24)
    assert (dst / "sub-1" / "t1_thick_model_grid.nii.gz").is_file()
    save_nifti(vol[:, :, ::3], aff, tmp_path / "thick_as_nifti.nii.gz")  # the series' voxels in world space
    for k in (1, 3, 5):  # the series' axial slices lie where they were acquired
        assert overlay_correlation(dst / "sub-1" / "t1_thick.nii.gz", tmp_path / "thick_as_nifti.nii.gz", k) >= 0.9
