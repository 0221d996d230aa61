"""Synthetic head phantoms: geometry, orientation, realism of the axial progression, BIDS writer."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from monai_mrngan.data import phantoms
from monai_mrngan.data.phantoms import make_phantom, write_phantom_cohort


def _canonical(vol: np.ndarray, affine: np.ndarray) -> np.ndarray:
    img = nib.as_closest_canonical(nib.Nifti1Image(vol, affine))
    assert nib.aff2axcodes(img.affine) == ("R", "A", "S")
    return np.asarray(img.dataobj)


def _foreground(ras: np.ndarray) -> np.ndarray:
    return ras > 0.2 * ras.max()


@pytest.fixture(scope="module")
def heads48() -> list[np.ndarray]:
    """Three subjects at 48 px, reoriented to RAS."""
    return [_canonical(*make_phantom(48, np.random.default_rng(s))) for s in range(3)]


def test_shape_dtype_affine_orientation():
    vol, aff = make_phantom(32, np.random.default_rng(0))
    assert vol.shape == (32, 32, 32) and vol.dtype == np.float32
    assert np.isfinite(vol).all() and vol.min() >= 0
    assert vol.max() > 100  # scanner range, not already normalised to [0, 1]
    assert aff.shape == (4, 4)
    np.testing.assert_allclose(np.linalg.norm(aff[:3, :3], axis=0), 8.0)  # 256 mm / 32
    assert nib.aff2axcodes(aff) == ("P", "S", "R")
    # the FOV is centred on the world origin
    centre = aff @ np.array([15.5, 15.5, 15.5, 1.0])
    np.testing.assert_allclose(centre[:3], 0.0, atol=1e-9)
    # PSR -> RAS: x <- axis 2, y <- reversed axis 0, z <- axis 1
    np.testing.assert_array_equal(_canonical(vol, aff), np.transpose(vol, (2, 0, 1))[:, ::-1, :])
    vol2, aff2 = make_phantom(32, np.random.default_rng(0), fov_mm=320.0)
    np.testing.assert_allclose(np.linalg.norm(aff2[:3, :3], axis=0), 10.0)
    with pytest.raises(ValueError):
        make_phantom(4)


def test_reproducible_and_distinct_subjects():
    a, _ = make_phantom(32, np.random.default_rng(7))
    b, _ = make_phantom(32, np.random.default_rng(7))
    c, _ = make_phantom(32, np.random.default_rng(8))
    np.testing.assert_array_equal(a, b)
    diff = np.abs(a / a.max() - c / c.max()).mean()
    assert diff > 0.01


def test_axial_profile_vertex_to_neck(heads48):
    for ras in heads48:
        n = ras.shape[2]
        area = _foreground(ras).sum((0, 1)) / n**2  # fraction of each axial slice
        top = int(np.argmax(area))
        assert area[-2:].max() < 0.01, "air above the vertex"
        assert 0.5 * n <= top <= 0.8 * n, "largest cross-section in the middle-upper head"
        assert area[top] > 0.25
        # the skull cap shrinks towards the vertex
        assert area[int(0.85 * n)] < 0.8 * area[top]
        assert np.all(np.diff(area[top:]) <= 0.02)
        # a neck runs to the bottom: present but narrower than the head
        neck = area[:3]
        assert neck.min() > 0.05 and neck.max() < 0.6 * area[top]


def test_face_is_anterior(heads48):
    """Between neck and brain the face sticks out in front of the neck more than the occiput
    sticks out behind it (fails if the anterior-posterior axis is flipped)."""
    for ras in heads48:
        n = ras.shape[2]
        fg = _foreground(ras).any(0)  # (A, S) silhouette
        extent = [np.nonzero(fg[:, k])[0] for k in range(n)]
        neck = extent[: int(0.1 * n) + 1]
        neck_front = np.mean([e.max() for e in neck])
        neck_back = np.mean([e.min() for e in neck])
        levels = range(int(0.25 * n), int(0.45 * n) + 1)
        front = np.mean([extent[k].max() - neck_front for k in levels])
        back = np.mean([neck_back - extent[k].min() for k in levels])
        assert front > back + 0.5


def test_middle_slices_have_csf_and_white_matter(heads48):
    for ras in heads48:
        n = ras.shape[2]
        fg = _foreground(ras)
        top = int(np.argmax(fg.sum((0, 1))))
        largest_dark, bright = 0, []
        for k in range(top - 2, top + 5):
            sl = ras[:, :, k]
            head = ndimage.binary_fill_holes(fg[:, :, k])
            inner = ndimage.binary_erosion(head, iterations=3)  # skip scalp fat and skull
            ii, jj = np.nonzero(head)
            ci, cj, hi, hj = ii.mean(), jj.mean(), np.ptp(ii), np.ptp(jj)
            box = np.zeros_like(head)  # central part of the slice
            rows = slice(int(ci - 0.2 * hi), int(ci + 0.2 * hi) + 1)
            box[rows, int(cj - 0.25 * hj): int(cj + 0.25 * hj) + 1] = True
            ref = np.percentile(sl[inner], 95)
            labels, count = ndimage.label((sl < 0.4 * ref) & box & inner)
            if count:
                largest_dark = max(largest_dark, int(np.bincount(labels.ravel())[1:].max()))
            bright.append((sl[inner] > 0.85 * ref).mean())
        assert largest_dark >= 8, "ventricles / CSF in the centre of the brain"
        assert min(bright) > 0.1, "white matter"


def test_cohort_bids_layout(tmp_path, capsys):
    dst = tmp_path / "bids"
    files = write_phantom_cohort(dst, subjects=3, size=32, seed=5)
    assert files == [dst / f"sub-00{i}" / "anat" / f"sub-00{i}_T1w.nii.gz" for i in (1, 2, 3)]
    assert all(f.is_file() for f in files)
    desc = json.loads((dst / "dataset_description.json").read_text())
    assert desc["BIDSVersion"] == "1.8.0" and desc["DatasetType"] == "raw" and desc["Name"]
    assert desc["GeneratedBy"]
    rows = (dst / "participants.tsv").read_text().splitlines()
    assert rows[0].split("\t") == ["participant_id", "age", "sex"]
    assert [r.split("\t")[0] for r in rows[1:]] == ["sub-001", "sub-002", "sub-003"]
    for row in rows[1:]:
        _, age, sex = row.split("\t")
        assert sex in ("F", "M") and 18 <= int(age) <= 90
    err = capsys.readouterr().err
    assert "phantoms: 1/3 sub-001" in err and "phantoms: 3/3 sub-003" in err

    img = nib.load(files[1])
    assert img.shape == (32, 32, 32)
    assert int(img.header["qform_code"]) == 1 and int(img.header["sform_code"]) == 1
    assert img.header.get_xyzt_units()[0] == "mm"
    assert nib.aff2axcodes(img.affine) == ("P", "S", "R")
    np.testing.assert_allclose(img.affine, phantoms.phantom_affine(32))
    data = np.asarray(img.dataobj)
    assert data.max() > 100

    # subject i depends only on (seed, i), not on how many subjects are written
    fewer = write_phantom_cohort(tmp_path / "fewer", subjects=2, size=32, seed=5, progress=False)
    np.testing.assert_array_equal(np.asarray(nib.load(fewer[1]).dataobj), data)
    assert capsys.readouterr().err == ""
    other = write_phantom_cohort(tmp_path / "other", subjects=2, size=32, seed=6, progress=False)
    assert not np.array_equal(np.asarray(nib.load(other[1]).dataobj), data)


def test_refuses_non_empty_destination(tmp_path):
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError) as err:
        write_phantom_cohort(dst, subjects=1, size=32, progress=False)
    assert str(dst) in str(err.value) and "\n" not in str(err.value)
    assert sorted(p.name for p in dst.iterdir()) == ["keep.txt"]
    files = write_phantom_cohort(dst, subjects=1, size=32, progress=False, overwrite=True)
    assert files[0].is_file() and (dst / "keep.txt").is_file()
    # an existing empty folder is fine
    (tmp_path / "empty").mkdir()
    assert write_phantom_cohort(tmp_path / "empty", subjects=1, size=32, progress=False)


def test_atomic_writes_leave_no_temporaries(tmp_path, monkeypatch):
    dst = tmp_path / "ok"
    write_phantom_cohort(dst, subjects=2, size=32, progress=False)
    assert not [p for p in dst.rglob("*") if p.name.startswith(".tmp")]

    # a save that dies half-way leaves neither the final file nor a temporary behind
    seen = []

    def broken_save(img, filename):
        seen.append(Path(filename))
        Path(filename).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(nib, "save", broken_save)  # the one NIfTI writer (data.io.save_nifti) calls nibabel.save
    bad = tmp_path / "bad"
    with pytest.raises(OSError, match="disk full"):
        write_phantom_cohort(bad, subjects=1, size=32, progress=False)
    assert seen and seen[0].name.startswith(".tmp-") and seen[0].name.endswith(".nii.gz")
    assert seen[0].parent == bad / "sub-001" / "anat"
    assert not [p for p in bad.rglob("*") if p.is_file()]
