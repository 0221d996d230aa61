"""prepare: discovery, preprocessing, anatomical positions, splits, bad inputs, atomic outputs."""

from __future__ import annotations

import gzip
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from monai_mrngan.data import prepare as prep
from monai_mrngan.data.datalist import load_split
from monai_mrngan.data.discovery import find_scans, subject_of
from monai_mrngan.data.positions import HEAD_HEIGHT_MM, index_for_position

SPACING = 4.0  # mm: keeps test volumes tiny (64 mm^3 voxels)


def head(depth_mm: float = 280.0, size_mm: float = 240.0, top_gap_mm: float = 20.0, seed: int = 0) -> np.ndarray:
    """A crude head in RAS voxel order at 4 mm: ellipsoid skull + brain over a neck cylinder.

    The vertex lies ``top_gap_mm`` below the top of the array; intensities in scanner-like units.
    """
    rng = np.random.default_rng(seed)
    n, d = int(size_mm / SPACING), int(depth_mm / SPACING)
    x, y, z = np.meshgrid(
        (np.arange(n) - n / 2) * SPACING, (np.arange(n) - n / 2) * SPACING, np.arange(d) * SPACING, indexing="ij"
    )
    ztop = depth_mm - top_gap_mm
    zc = ztop - 90.0
    r = np.sqrt((x / 70) ** 2 + (y / 90) ** 2 + ((z - zc) / 90) ** 2)
    vol = np.where(r < 1, 300.0, 0.0) + np.where(r < 0.9, 400.0, 0.0)
    vol += np.where((z < zc) & (np.sqrt(x**2 + y**2) < 45), 350.0, 0.0) * (r >= 1)
    vol += np.where(np.sqrt((x / 12) ** 2 + (y / 25) ** 2 + ((z - zc - 10) / 20) ** 2) < 1, -500.0, 0.0)
    vol = np.clip(vol, 0, None) + rng.normal(0, 2.0, vol.shape).clip(0)
    return vol.astype(np.float32)


def ras_affine(spacing: float = SPACING) -> np.ndarray:
    return np.diag([spacing, spacing, spacing, 1.0])


def save(vol: np.ndarray, path: Path, affine: np.ndarray | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(vol, ras_affine() if affine is None else affine), str(path))
    return path


def tree_digest(folder: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        h.update(str(p.relative_to(folder)).encode())
        if p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()


@pytest.fixture
def bids(tmp_path) -> Path:
    """Six subjects; sub-01 has two sessions; one scan stored LAS instead of RAS."""
    src = tmp_path / "bids"
    for i in range(1, 7):
        sessions = ["ses-a", "ses-b"] if i == 1 else [None]
        for ses in sessions:
            folder = src / f"sub-0{i}" / (ses or "") / "anat"
            name = f"sub-0{i}{'_' + ses if ses else ''}_T1w.nii.gz"
            vol = head(seed=i)
            if i == 2:  # LAS storage: flip x and give the matching affine
                affine = ras_affine()
                affine[0, 0] = -SPACING
                affine[0, 3] = (vol.shape[0] - 1) * SPACING
                save(vol[::-1].copy(), folder / name, affine)
            else:
                save(vol, folder / name)
    (src / "dataset_description.json").write_text('{"Name": "t", "BIDSVersion": "1.8.0"}')
    (src / "sub-01" / "ses-a" / "anat" / "sub-01_ses-a_T1w.json").write_text("{}")
    return src


def test_discovery_bids_and_folder(bids, tmp_path):
    scans, _ = find_scans(bids)
    assert len(scans) == 7
    assert {s.session for s in scans if s.subject == "sub-01"} == {"ses-a", "ses-b"}
    assert subject_of(Path("IXI013-HH-1212_T1.nii.gz")) == ("IXI013", None)
    assert subject_of(Path("patientA_T1w.nii")) == ("patientA", None)
    folder = tmp_path / "plain"
    save(head(), folder / "a" / "x.nii.gz")
    (folder / "notes.txt").write_text("hello")
    scans, ignored = find_scans(folder)
    assert [s.subject for s in scans] == ["x"] and [p.name for p in ignored] == ["notes.txt"]


def test_prepare_bids_outputs(bids, tmp_path):
    before = tree_digest(bids)
    dst = tmp_path / "prepared"
    report = prep.prepare_dataset(bids, dst, spacing=SPACING, size=48, seed=3, progress=False)
    assert tree_digest(bids) == before, "inputs must never be modified"
    assert {r["status"] for r in report["inputs"]} == {"ok"}

    datalist = json.loads((dst / "datalist.json").read_text())
    subjects = {k: {e["subject"] for e in datalist[k]} for k in ("training", "validation", "test")}
    assert subjects["training"] and subjects["validation"] and subjects["test"]
    assert not (subjects["training"] & subjects["validation"] or subjects["training"] & subjects["test"]
                or subjects["validation"] & subjects["test"])
    sessions = [e for k in datalist if isinstance(datalist[k], list) for e in datalist[k] if e["subject"] == "sub-01"]
    assert len(sessions) == 2  # both sessions of sub-01, in the same split by construction
    for entry in load_split(dst, "training") + load_split(dst, "test"):
        img = nib.load(entry["image"])
        data = img.get_fdata()
        assert data.ndim == 3 and data.shape[:2] == (48, 48) and data.shape[2] == entry["num_slices"]
        assert nib.aff2axcodes(img.affine) == ("R", "A", "S")
        assert np.allclose(np.abs(np.diag(img.affine)[:3]), SPACING)
        assert img.get_data_dtype() == np.float32 and data.min() >= 0 and data.max() <= 1 and data.max() > 0.5  # the head's 75th percentile lands at HEAD_LEVEL (0.66)
        pos = np.asarray(entry["positions"])
        assert len(pos) == data.shape[2] and pos.min() >= 0 and pos.max() <= 1 and np.all(np.diff(pos) < 0)
    assert not list(dst.rglob(".tmp*")), "no temporary files left behind"
    assert (dst / "prepare_report.json").is_file()


def test_las_input_matches_ras(tmp_path):
    vol = head(seed=5)
    affine = ras_affine()
    affine[0, 0] = -SPACING
    affine[0, 3] = (vol.shape[0] - 1) * SPACING
    ras = prep.prepare_volume(save(vol, tmp_path / "ras.nii.gz"), SPACING, 48)
    las = prep.prepare_volume(save(vol[::-1].copy(), tmp_path / "las.nii.gz", affine), SPACING, 48)
    assert np.allclose(ras.data, las.data, atol=1e-5)
    assert np.allclose(ras.affine, las.affine)


def test_positions_follow_anatomy_not_field_of_view(tmp_path):
    """The same head cut lower or higher in the neck: p = 0.5 must be the same anatomy."""
    full = head(depth_mm=320.0, seed=7)
    cut = full[:, :, 10:]  # the scanner's field of view starts 40 mm higher in the neck
    a = prep.prepare_volume(save(full, tmp_path / "full.nii.gz"), SPACING, 48)
    b = prep.prepare_volume(save(cut, tmp_path / "cut.nii.gz"), SPACING, 48)
    for p in (0.1, 0.5, 0.9):
        ia, ib = index_for_position(a.positions, p), index_for_position(b.positions, p)
        # equal up to the tiny intensity-scaling change the different neck coverage causes
        assert np.allclose(a.data[:, :, ia], b.data[:, :, ib], atol=5e-3)
        assert not np.allclose(a.data[:, :, ia], b.data[:, :, ib + 1], atol=5e-3)
    # kept slices span at most HEAD_HEIGHT_MM from the vertex, the vertex being p = 0
    assert a.positions.max() <= 1.0 and a.positions.min() == 0.0
    assert a.data.shape[2] == int(HEAD_HEIGHT_MM / SPACING) + 1


def _bad_inputs(folder: Path) -> dict[str, str]:
    """Write one file per kind of bad input; return name -> expected problem text."""
    folder.mkdir(parents=True, exist_ok=True)
    good = save(head(seed=1), folder / "good.nii.gz")
    raw = gzip.decompress(good.read_bytes())
    (folder / "truncated.nii.gz").write_bytes(gzip.compress(raw)[: len(raw) // 20])
    save(np.stack([head(seed=2)] * 3, axis=-1), folder / "series4d.nii.gz")
    save(np.random.rand(32, 32).astype(np.float32), folder / "flat2d.nii.gz")
    nan = head(seed=3)
    nan[:] = np.nan
    save(nan, folder / "nans.nii.gz")
    save(np.zeros((20, 20, 20), np.float32), folder / "zeros.nii.gz")
    (folder / "text.nii.gz").write_text("this is not an image")
    no_vertex = head(seed=4)[:, :, :40]  # field of view cuts through the middle of the head
    save(no_vertex, folder / "novertex.nii.gz")
    return {
        "truncated": "truncated",
        "series4d": "4D series",
        "flat2d": "2D image",
        "nans": "NaN",
        "zeros": "empty volume",
        "text": "not a readable NIfTI",
        "novertex": "no vertex",
    }


def test_bad_inputs_reported_and_skipped(tmp_path, capsys):
    src = tmp_path / "src"
    expected = _bad_inputs(src)
    before = tree_digest(src)
    report = prep.prepare_dataset(src, tmp_path / "dst", spacing=SPACING, size=48, progress=False)
    err = capsys.readouterr().err
    by_name = {Path(r["source"]).name.split(".")[0]: r for r in report["inputs"]}
    assert by_name["good"]["status"] == "ok"
    for name, problem in expected.items():
        rec = by_name[name]
        assert rec["status"] == "skipped", name
        assert problem in rec["reason"] and f"{name}.nii.gz" in rec["reason"], rec["reason"]
        lines = [l for l in err.splitlines() if f"{name}.nii.gz" in l and "skipped" in l]
        assert len(lines) == 1 and problem in lines[0]
    assert tree_digest(src) == before


def test_noisy_scan_skipped(tmp_path):
    rng = np.random.default_rng(0)
    vol = head(seed=8)
    vol += (rng.random(vol.shape) < 0.2) * 400.0
    save(vol, tmp_path / "src" / "noisy.nii.gz")
    save(head(seed=9), tmp_path / "src" / "clean.nii.gz")
    report = prep.prepare_dataset(tmp_path / "src", tmp_path / "dst", spacing=SPACING, size=48, progress=False)
    status = {Path(r["source"]).name: (r["status"], r.get("reason", "")) for r in report["inputs"]}
    assert status["clean.nii.gz"][0] == "ok"
    assert status["noisy.nii.gz"][0] == "skipped" and "noisy" in status["noisy.nii.gz"][1]


def test_refusals_and_overwrite(bids, tmp_path):
    dst = tmp_path / "dst"
    prep.prepare_dataset(bids, dst, spacing=SPACING, size=48, progress=False)
    with pytest.raises(FileExistsError, match="not empty"):
        prep.prepare_dataset(bids, dst, spacing=SPACING, size=48, progress=False)
    report = prep.prepare_dataset(bids, dst, spacing=SPACING, size=48, split="0,0,1", overwrite=True, progress=False)
    assert report["splits"]["test"]["volumes"] == 7 and report["splits"]["training"]["volumes"] == 0
    assert len(list((dst / "volumes").glob("*.nii.gz"))) == 7
    with pytest.raises(ValueError, match="inside the source"):
        prep.prepare_dataset(bids, bids / "derivatives" / "x", spacing=SPACING, size=48, progress=False)
    assert not (bids / "derivatives").exists()


def test_interrupted_run_leaves_no_datalist(bids, tmp_path, monkeypatch):
    calls = {"n": 0}
    real = prep.save_nifti

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(prep, "save_nifti", flaky)
    with pytest.raises(KeyboardInterrupt):
        prep.prepare_dataset(bids, tmp_path / "dst", spacing=SPACING, size=48, progress=False)
    assert not (tmp_path / "dst" / "datalist.json").exists()
    assert len(list((tmp_path / "dst" / "volumes").glob("*.nii.gz"))) == 2
    assert not list((tmp_path / "dst").rglob(".tmp*"))


def test_split_is_seeded_and_by_subject():
    subjects = [f"s{i}" for i in range(50)]
    a = prep.split_subjects(subjects, (0.8, 0.1, 0.1), seed=1)
    assert a == prep.split_subjects(subjects, (0.8, 0.1, 0.1), seed=1)
    assert a != prep.split_subjects(subjects, (0.8, 0.1, 0.1), seed=2)
    assert [len(a[k]) for k in ("training", "validation", "test")] == [40, 5, 5]
    assert prep.parse_split("0.7,0.2,0.1") == (0.7, 0.2, 0.1) and prep.parse_split((0, 0, 1)) == (0, 0, 1)
    with pytest.raises(ValueError):
        prep.parse_split("0.5,0.5")


def test_cli_exit_status_and_one_line_error(tmp_path):
    src = tmp_path / "src"
    save(np.zeros((20, 20, 20), np.float32), src / "zeros.nii.gz")
    proc = subprocess.run(
        [sys.executable, "-m", "monai_mrngan", "prepare", "--src", str(src), "--dst", str(tmp_path / "dst"),
         "--spacing", "4", "--size", "48"],
        capture_output=True, text=True,
    )
    assert proc.returncode != 0
    assert "zeros.nii.gz: empty volume" in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error:") and "no usable" in last and "Traceback" not in proc.stderr


@pytest.mark.ixi
def test_prepare_real_ixi(ixi_dir, tmp_path):
    src = tmp_path / "ixi"
    src.mkdir()
    for f in sorted(ixi_dir.glob("*.nii.gz"))[:5]:
        (src / f.name).symlink_to(f)
    report = prep.prepare_dataset(src, tmp_path / "dst", spacing=2.0, size=128, seed=0, progress=False)
    assert [r["status"] for r in report["inputs"]] == ["ok"] * 5
    entries = [e for k in ("training", "validation", "test") for e in load_split(tmp_path / "dst", k)]
    assert len({e["subject"] for e in entries}) == 5
    for e in entries:
        img = nib.load(e["image"])
        data = img.get_fdata()
        assert nib.aff2axcodes(img.affine) == ("R", "A", "S") and data.shape[:2] == (128, 128)
        assert 90 <= data.shape[2] <= 101 and 0 <= data.min() and data.max() <= 1
        # anatomy: the top kept slice is a small skull cap, p = 0.5 a large brain section
        area = (data > prep.HEAD_THRESHOLD).sum(axis=(0, 1))
        mid = index_for_position(e["positions"], 0.5)
        assert area[-1] < 0.5 * area[mid]


def test_phantom_cohort_prepares_like_real_data(tmp_path):
    from monai_mrngan.data.phantoms import write_phantom_cohort

    write_phantom_cohort(tmp_path / "bids", subjects=4, size=48, seed=1, progress=False)
    report = prep.prepare_dataset(tmp_path / "bids", tmp_path / "dst", spacing=SPACING * 1.4, size=40, progress=False)
    assert report["layout"] == "bids" and [r["status"] for r in report["inputs"]] == ["ok"] * 4
    entry = load_split(tmp_path / "dst", "training")[0]
    assert entry["subject"].startswith("sub-") and min(entry["positions"]) == 0.0


def test_any_cut_through_the_top_of_the_head_is_skipped(tmp_path):
    """Losing even a few millimetres of the top of the head to the field of view is caught."""
    vol = head(seed=5)
    area = (vol > 0.1 * vol.max()).sum(axis=(0, 1))
    vertex = int(np.nonzero(area)[0].max())
    src = tmp_path / "src"
    src.mkdir()
    for cut in (2, 4, 8):
        save(vol[:, :, : vertex + 1 - cut], src / f"cut{cut}.nii.gz")
    reasons = {}
    for f in sorted(src.iterdir()):
        with pytest.raises(prep.SkipScan, match="cut at the top of the field of view") as err:
            prep.prepare_volume(f, spacing=2.0, size=128)
        reasons[f.name] = str(err.value)
    assert len(reasons) == 3 and all("mm^2 of head" in r for r in reasons.values())


@pytest.mark.ixi
def test_ixi_scans_cut_10_to_30_mm_from_the_top_are_skipped(ixi_dir, tmp_path):
    import nibabel as nib

    for scan in sorted(ixi_dir.glob("*.nii*"))[:2]:
        img = nib.as_closest_canonical(nib.load(str(scan)))
        data = np.asanyarray(img.dataobj)
        zoom = float(img.header.get_zooms()[2])
        pv = prep.prepare_volume(scan, spacing=zoom, size=128)  # the uncut scan is accepted
        top = pv.steps["vertex_index"]
        for mm in (10, 20, 30):
            keep = top + 1 - int(round(mm / zoom))
            path = tmp_path / f"{scan.name.split('.')[0]}_cut{mm}.nii.gz"
            nib.save(nib.Nifti1Image(data[:, :, :keep], img.affine), str(path))
            with pytest.raises(prep.SkipScan, match="cut at the top"):
                prep.prepare_volume(path, spacing=2.0, size=128)



@pytest.mark.ixi
def test_cut_scans_are_placed_with_a_localizer(ixi_dir, tmp_path):
    """prepare's placer: every slice localized, one offset fitted; positions near the uncut scan's at the same height."""
    import functools

    import nibabel as nib

    from monai_mrngan.atlas.bank import build_bank, mean_brain
    from monai_mrngan.atlas.prior import BrainPrior, TemplateLocalizer
    from monai_mrngan.inference.localize import localize_with_offset

    scans = sorted(ixi_dir.glob("*.nii*"))
    atlases = []
    for i, scan in enumerate(scans[2:12]):
        pv = prep.prepare_volume(scan, spacing=2.0, size=128)
        atlases.append({"image": str(save(pv.data, tmp_path / f"a{i}.nii.gz", pv.affine)), "positions": pv.positions.tolist()})
    bank, grid = build_bank(atlases, 101)
    place = functools.partial(localize_with_offset, TemplateLocalizer(BrainPrior(mean_brain(bank), grid)))
    for scan in scans[:2]:
        uncut = prep.prepare_volume(scan, spacing=2.0, size=128)
        img = nib.as_closest_canonical(nib.load(str(scan)))
        data = np.asanyarray(img.dataobj)
        for mm in (10, 20, 30):
            path = tmp_path / f"cut{mm}.nii.gz"
            nib.save(nib.Nifti1Image(data[:, :, : uncut.steps["vertex_index"] + 1 - mm // 2], img.affine), str(path))
            placed = prep.prepare_volume(path, spacing=2.0, size=128, place=place)
            assert placed.steps["vertex_index"] is None and "offset_p" in placed.steps["placement"]
            # the same world height in both: compare p slice by slice
            z_cut = placed.affine[2, 3] + placed.affine[2, 2] * np.arange(placed.data.shape[2])
            z_ref = uncut.affine[2, 3] + uncut.affine[2, 2] * np.arange(uncut.data.shape[2])
            ref_at = np.interp(z_cut, z_ref, uncut.positions[np.argsort(z_ref)] if z_ref[0] > z_ref[-1] else uncut.positions)
            err_mm = float(np.mean(np.abs(placed.positions - ref_at)) * 200)
            print(scan.name, mm, "mm cut: mean position error", round(err_mm, 1), "mm")
            assert err_mm <= 4.0  # the target, met here even by the untrained template localizer
