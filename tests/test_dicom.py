"""DICOM input: series in any orientation read with their scanner geometry; bad series refused in one line."""

from __future__ import annotations

import numpy as np
import pytest

pydicom = pytest.importorskip("pydicom")

from dicom_series import write_series  # noqa: E402  (tests/ helper)

from monai_mrngan.data.dicom import (  # noqa: E402
    is_dicom, read_dicom, read_dicom_file, read_dicom_series_slots, series_folders, slice_normal_angle)
from monai_mrngan.data.inputs import read_inputs  # noqa: E402
from monai_mrngan.data.io import InputError  # noqa: E402


def _volume(shape=(12, 10, 8)):
    rng = np.random.default_rng(0)
    return rng.integers(0, 1000, size=shape).astype(np.float32)


def _affine():
    # 1.5 x 1.2 x 2 mm voxels, a small rotation about z, an offset origin (RAS)
    c, s = np.cos(0.1), np.sin(0.1)
    rot = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1.0]])
    aff = np.eye(4)
    aff[:3, :3] = rot @ np.diag([1.5, 1.2, 2.0])
    aff[:3, 3] = [-10.0, 20.0, -30.0]
    return aff


def _world(vol_shape, affine):
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in vol_shape], indexing="ij"), -1).reshape(-1, 3)
    return idx @ affine[:3, :3].T + affine[:3, 3]


@pytest.mark.parametrize("slice_axis", [2, 0, 1])
def test_series_in_any_orientation_keeps_voxels_and_world_positions(tmp_path, slice_axis):
    vol, aff = _volume(), _affine()
    write_series(vol, aff, tmp_path / "series", slice_axis=slice_axis)
    assert is_dicom(tmp_path / "series")
    data, affine = read_dicom(tmp_path / "series")
    # the same voxels at the same world coordinates, whatever the acquisition axis
    got = dict(zip(map(tuple, np.round(_world(data.shape, affine), 3)), data.reshape(-1)))
    want = dict(zip(map(tuple, np.round(_world(vol.shape, aff), 3)), vol.reshape(-1)))
    assert got.keys() == want.keys()
    assert all(got[k] == want[k] for k in want)


def test_single_file_is_one_slice_and_its_tilt_is_known(tmp_path):
    vol, aff = _volume(), _affine()
    axial = write_series(vol, aff, tmp_path / "ax", slice_axis=2)
    sag = write_series(vol, aff, tmp_path / "sag", slice_axis=0)
    data, affine = read_dicom_file(axial[3])
    assert data.shape == (12, 10, 1) and np.array_equal(data[..., 0], vol[:, :, 3])
    assert slice_normal_angle(affine) < 1.0
    _, affine_sag = read_dicom_file(sag[0])
    assert slice_normal_angle(affine_sag) > 80.0


def test_bad_series_get_one_line_errors(tmp_path):
    vol, aff = _volume(), _affine()
    mixed = tmp_path / "mixed"
    write_series(vol[..., :3], aff, mixed, series_uid="1.2.3")
    write_series(vol[..., :3], aff, mixed / "x", series_uid="1.2.4")
    for f in (mixed / "x").iterdir():
        f.rename(mixed / f"b_{f.name}")
    with pytest.raises(InputError, match="mixed DICOM series"):
        read_dicom(mixed)

    one = write_series(vol[..., :2], aff, tmp_path / "mf")[0]
    ds = pydicom.dcmread(str(one))
    ds.NumberOfFrames = 4
    ds.save_as(str(one))
    with pytest.raises(InputError, match="multi-frame"):
        read_dicom(one)

    comp = write_series(vol[..., :1], aff, tmp_path / "jp2")[0]
    ds = pydicom.dcmread(str(comp))
    ds.file_meta.TransferSyntaxUID = pydicom.uid.JPEG2000
    ds.PixelData = pydicom.encaps.encapsulate([b"\x00\x01garbage"])
    ds["PixelData"].VR = "OB"
    ds.save_as(str(comp), enforce_file_format=True)
    with pytest.raises(InputError, match="cannot decode the pixel data") as err:
        read_dicom(comp)
    assert str(comp) in str(err.value) and "\n" not in str(err.value)

    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"\x00" * 128 + b"DICM" + b"\x01" * 20)
    with pytest.raises(InputError, match=str(junk.name)):
        read_dicom(junk)


def test_a_series_with_missing_files_keeps_each_slice_at_its_place(tmp_path):
    """Files left out of an evenly spaced series leave empty places; spacing that is not whole steps is refused."""
    vol, aff = _volume((12, 10, 9)), _affine()
    files = write_series(vol, aff, tmp_path / "gaps")
    for k in (1, 2, 6):
        files[k].unlink()
    data, affine, present, placed, thickness = read_dicom_series_slots(tmp_path / "gaps")
    assert thickness == pytest.approx(2.0)  # the test writer's SliceThickness: the slice step
    assert present.tolist() == [k not in (1, 2, 6) for k in range(9)]
    assert [p.name if p else None for p in placed] == [None if k in (1, 2, 6) else files[k].name for k in range(9)]
    np.testing.assert_allclose(affine, aff, atol=1e-4)  # the step is the series' own, not the widest gap
    np.testing.assert_allclose(data[:, :, present], vol[:, :, present], atol=0.5)
    assert not data[:, :, ~present].any()
    with pytest.raises(InputError, match="3 of the series' 9 evenly spaced slices are missing"):
        read_dicom(tmp_path / "gaps")
    moved = sorted((tmp_path / "gaps").iterdir())[-1]
    ds = pydicom.dcmread(str(moved))
    ds.ImagePositionPatient = [float(v) + 0.8 * float(n) for v, n in zip(ds.ImagePositionPatient, [0, 0, -1])]  # 0.4 of a 2 mm step
    ds.save_as(str(moved))
    with pytest.raises(InputError, match="uneven slice spacing"):
        read_dicom_series_slots(tmp_path / "gaps")


def test_a_study_folder_names_the_series_folders_in_it(tmp_path):
    """A PACS export's patient / study folder holds series in subfolders: the error names them."""
    vol, aff = _volume(), _affine()
    for name in ("2_t1_mprage", "1_localizer"):
        write_series(vol[..., :3], aff, tmp_path / "patient" / "study" / name)
    (tmp_path / "patient" / "notes.txt").write_text("not an image")
    assert series_folders(tmp_path / "patient") == [tmp_path / "patient" / "study" / n for n in ("1_localizer", "2_t1_mprage")]
    with pytest.raises(InputError, match="its DICOM series are in subfolders such as .*1_localizer.*2_t1_mprage.*: pass one of them") as err:
        read_inputs([tmp_path / "patient"], 8, 2.0)
    assert "\n" not in str(err.value)
    with pytest.raises(InputError, match="unsupported input"):
        read_inputs([tmp_path / "patient" / "notes.txt"], 8, 2.0)


def test_files_without_the_preamble_or_a_suffix_are_read_as_dicom(tmp_path):
    """Some exports write DICOM without the 128-byte preamble and name files without ``.dcm``: read all the same."""
    vol, aff = _volume(), _affine()
    files = write_series(vol, aff, tmp_path / "with")
    bare = tmp_path / "bare"
    bare.mkdir()
    for f in files:  # the file meta and the data set, without preamble and 'DICM'; no suffix
        (bare / f.stem).write_bytes(f.read_bytes()[132:])
    (bare / "notes.txt").write_text("not DICOM")  # other files beside them are still skipped
    assert is_dicom(bare) and is_dicom(bare / files[0].stem) and not is_dicom(bare / "notes.txt")
    want, want_aff, *_ = read_dicom_series_slots(tmp_path / "with")
    got, got_aff, present, *_ = read_dicom_series_slots(bare)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_allclose(got_aff, want_aff)
    assert present.all()
    one, _ = read_dicom_file(bare / files[3].stem)
    np.testing.assert_array_equal(one[:, :, 0], want[:, :, 3])


def test_an_axial_series_says_how_thick_its_slices_are(tmp_path):
    """A stack's slabs (:func:`~monai_mrngan.inference.stacks.slab_thickness_mm`): an axial series' SliceThickness, so
    thin slices with gaps between them are not taken for slabs; a sagittal series' thickness is not along the axis."""
    from monai_mrngan.inference.stacks import slab_thickness_mm

    vol, aff = _volume((12, 10, 6)), np.diag([1.5, 1.5, 5.0, 1.0])
    write_series(vol, aff, tmp_path / "slabs", slice_axis=2)
    write_series(vol, aff, tmp_path / "gapped", slice_axis=2, thickness=1.0)
    write_series(_volume((6, 10, 12)), np.diag([1.0, 1.5, 1.5, 1.0]), tmp_path / "sag", slice_axis=0)
    slabs = read_inputs([tmp_path / "slabs"], 16, 2.0, stack=True)
    gapped = read_inputs([tmp_path / "gapped"], 16, 2.0, stack=True)
    sag = read_inputs([tmp_path / "sag"], 16, 2.0, stack=True)
    assert slabs.thickness_mm == pytest.approx(5.0) and gapped.thickness_mm == pytest.approx(1.0) and sag.thickness_mm is None
    assert slab_thickness_mm(slabs, 2.0) == pytest.approx(5.0) and slab_thickness_mm(gapped, 2.0) == 0.0
    assert slab_thickness_mm(gapped, 2.0, slab_mm=4.0) == 4.0 and slab_thickness_mm(slabs, 2.0, slab_mm=0.0) == 0.0
    with pytest.raises(ValueError, match=">= 0 mm"):
        slab_thickness_mm(slabs, 2.0, slab_mm=-1.0)


def test_a_series_is_read_once_file_by_file(tmp_path, monkeypatch):
    """``--stack`` on a series folder reads each file once (its header and pixels together), thickness included."""
    vol, aff = _volume((12, 10, 6)), _affine()
    files = write_series(vol, aff, tmp_path / "series", slice_axis=2, thickness=5.0)
    reads: list[str] = []
    real = pydicom.dcmread

    def counting(path, *args, **kwargs):
        reads.append(str(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(pydicom, "dcmread", counting)
    got = read_inputs([tmp_path / "series"], 8, 2.0, stack=True)
    assert sorted(reads) == sorted(str(f) for f in files)
    assert got.thickness_mm == pytest.approx(5.0)
