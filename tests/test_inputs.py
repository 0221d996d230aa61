"""Clinical inputs: DICOM, NIfTI and PNG of any geometry onto the model grid, outputs that overlay the input."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import torch
from scipy import ndimage

from monai_mrngan.atlas.prior import mean_prior
from monai_mrngan.data.datalist import load_split
from monai_mrngan.data.inputs import read_inputs
from monai_mrngan.data.io import InputError, load_volume, save_nifti, save_png
from monai_mrngan.inference.components import Components, reference_grid
from monai_mrngan.inference.reconstruct import reconstruct_files
from monai_mrngan.inference.volume import linear_fill
from monai_mrngan.transforms.slabs import slab_mean

pydicom = pytest.importorskip("pydicom")
from dicom_series import write_series  # noqa: E402  (tests/ helper)
from overlay import overlay_correlation, world_samples  # noqa: E402  (tests/ helper)


@pytest.fixture(scope="module")
def scan(tiny_dataset, tmp_path_factory):
    """A test volume as a scanner would store it: twice the in-plane resolution, LPS-like axes
    (x and y flipped, axes permuted to P, S, L order), raw intensities, an offset origin."""
    entry = load_split(tiny_dataset, "test")[0]
    vol, affine = load_volume(entry["image"])
    fine = ndimage.zoom(vol, (2, 2, 1), order=1)
    aff = affine.copy()
    aff[:3, :2] /= 2.0
    aff[:3, 3] += [17.0, -9.0, 4.0]
    # RAS (x, y, z) -> stored as (y flipped, z, x flipped): axes P, S, L
    data = np.transpose(fine[::-1, ::-1, :], (1, 2, 0)) * 800.0
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    flip[0, 3], flip[1, 3] = fine.shape[0] - 1, fine.shape[1] - 1
    ras_from_stored = aff @ flip @ np.array([[0, 0, 1, 0], [1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 0, 1.0]])
    path = tmp_path_factory.mktemp("scan") / "scan.nii.gz"
    save_nifti(data, ras_from_stored, path)
    return path, vol, affine, entry


def test_nifti_of_any_geometry_reaches_the_model_grid(scan, tiny_dataset):
    path, vol, affine, entry = scan
    ref = reference_grid(tiny_dataset)
    got = read_inputs([path], ref["shape"][0], ref["spacing_mm"], slice_index=12)
    assert got.slices.shape == (1, 32, 32) and got.has_geometry and 0 <= got.slices.min() and got.slices.max() <= 1
    # the model-grid pixels sit at the right world coordinates: sampling the source there gives them back
    ii, jj = np.meshgrid(np.arange(32), np.arange(32), indexing="ij")
    world = (got.affine @ np.c_[ii.ravel(), jj.ravel(), np.zeros(ii.size), np.ones(ii.size)].T)[:3].T
    src = world_samples(path, world).reshape(32, 32) / got.scale
    head = got.slices[0] > 0.1
    assert np.corrcoef(src[head], got.slices[0][head])[0, 1] > 0.99
    with pytest.raises(InputError, match="pass a slice index"):
        read_inputs([path], 32, ref["spacing_mm"])
    with pytest.raises(InputError, match="outside the volume"):
        read_inputs([path], 32, ref["spacing_mm"], slice_index=99)


def test_a_volume_in_unit_range_is_scaled_as_prepare_scales_it(scan, tiny_dataset, tmp_path):
    """A scan normalised to [0, 1] by its maximum (bright voxels far above the head) reaches the models as the
    same scan stored raw does, not several times darker."""
    path, _, _, _ = scan
    img = nib.load(str(path))
    raw = img.get_fdata().astype(np.float32)
    unit = tmp_path / "unit.nii.gz"
    save_nifti(raw / raw.max(), img.affine, unit)
    ref = reference_grid(tiny_dataset)
    a = read_inputs([path], ref["shape"][0], ref["spacing_mm"], slice_index=12)
    b = read_inputs([unit], ref["shape"][0], ref["spacing_mm"], slice_index=12)
    assert np.abs(a.slices - b.slices).max() < 1e-4


def test_dicom_series_any_orientation_and_single_files(scan, tiny_dataset, tmp_path):
    path, vol, affine, entry = scan
    spacing = reference_grid(tiny_dataset)["spacing_mm"]
    img = nib.load(str(path))
    write_series(np.asanyarray(img.dataobj), img.affine, tmp_path / "sag", slice_axis=0)  # stored axis 0 is P: coronal files
    write_series(np.asanyarray(img.dataobj), img.affine, tmp_path / "ax", slice_axis=1)  # stored axis 1 is S: axial files
    nifti = read_inputs([path], 32, spacing, slice_index=10)
    for folder in ("sag", "ax"):
        dcm = read_inputs([tmp_path / folder], 32, spacing, slice_index=10)
        np.testing.assert_allclose(dcm.slices, nifti.slices, atol=2e-3)  # 16-bit rounding of the stored values
        np.testing.assert_allclose(dcm.affine, nifti.affine, atol=1e-3)
    axial_file = sorted((tmp_path / "ax").iterdir())[10]
    assert read_inputs([axial_file], 32, spacing).slices.shape == (1, 32, 32)
    with pytest.raises(InputError, match="degrees from axial") as err:
        read_inputs([sorted((tmp_path / "sag").iterdir())[20]], 32, spacing)
    assert "sag" in str(err.value) and "\n" not in str(err.value)


def test_a_slice_and_its_volume_are_read_from_one_read_of_the_file(scan, tiny_dataset, tmp_path, monkeypatch):
    """--slice-index needs the slice and the whole volume that places it: one read of the file gives both, each equal to
    what read_inputs gives on its own, the volume's intensity scale found once; anything else gets read_inputs' one-line
    error."""
    import monai_mrngan.data.grid as grid_module
    import monai_mrngan.data.inputs as inputs_module
    from monai_mrngan.data.inputs import read_slice_and_volume

    path, vol, affine, entry = scan
    spacing = reference_grid(tiny_dataset)["spacing_mm"]
    img = nib.load(str(path))
    write_series(np.asanyarray(img.dataobj), img.affine, tmp_path / "sag", slice_axis=0)
    for source in (path, tmp_path / "sag"):
        alone, whole = read_inputs([source], 32, spacing, slice_index=10), read_inputs([source], 32, spacing, stack=True)
        reads, scales = [], []
        real, real_scale = inputs_module._volume, grid_module.scale_intensity
        monkeypatch.setattr(inputs_module, "_volume", lambda *a: reads.append(a) or real(*a))
        monkeypatch.setattr(grid_module, "scale_intensity", lambda *a: scales.append(a) or real_scale(*a))
        got, got_whole = read_slice_and_volume(source, 32, spacing, 10)
        monkeypatch.setattr(inputs_module, "_volume", real)
        monkeypatch.setattr(grid_module, "scale_intensity", real_scale)
        assert len(reads) == 1 and len(scales) == 1
        for a, b in ((got, alone), (got_whole, whole)):
            np.testing.assert_array_equal(a.slices, b.slices)
            np.testing.assert_array_equal(a.affine, b.affine)
            assert (a.sources, a.indices, a.offsets_mm, a.scale) == (b.sources, b.indices, b.offsets_mm, b.scale)
    save_png(vol[:, :, 10], tmp_path / "s.png")
    with pytest.raises(InputError, match="a PNG, JPEG or TIFF picture is one slice"):
        read_slice_and_volume(tmp_path / "s.png", 32, spacing, 10)


def test_an_output_name_that_is_not_nifti_an_unknown_method_and_a_position_outside_the_head_are_refused_first(scan, tiny_dataset, tmp_path):
    """``--out recon`` (no suffix) left an empty ``recon`` and the volume in a hidden temporary ``.nii`` beside it: now
    a one-line error naming it, before anything is read or written; the NIfTI writer refuses such a name too. An unknown
    method (refused after the inputs were read and checked) and ``--positions 1.5`` (reconstructed "300 mm below the
    vertex") are refused as early."""
    from monai_mrngan.data.io import save_nifti

    path, vol, affine, entry = scan
    ref = reference_grid(tiny_dataset)
    with pytest.raises(InputError, match="ending in .nii.gz") as err:
        reconstruct_files([str(path)], str(tmp_path / "out" / "recon"), Components(), slice_index=12, positions=[0.5], method="copy",
                          expected_shape=ref["shape"], spacing_mm=ref["spacing_mm"])
    assert str(tmp_path / "out" / "recon") in str(err.value) and "\n" not in str(err.value)
    for bad, message in (({"method": "foo"}, "unknown method"), ({"positions": [1.5]}, "outside 0..1")):  # refused as early
        with pytest.raises(ValueError, match=message):
            reconstruct_files([str(path)], str(tmp_path / "out" / "r.nii.gz"), Components(), slice_index=12,
                              **{"positions": [0.5], "method": "copy", **bad}, expected_shape=ref["shape"], spacing_mm=ref["spacing_mm"])
    assert not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match=".nii"):
        save_nifti(np.zeros((2, 2, 2)), np.eye(4), tmp_path / "volume")
    assert list(tmp_path.iterdir()) == []


def test_png_needs_a_pixel_size_unless_at_model_size(scan, tmp_path):
    _, vol, _, _ = scan
    big = save_png(ndimage.zoom(vol[:, :, 12], 3, order=1), tmp_path / "big.png")
    with pytest.raises(InputError, match="pass pixel_mm"):
        read_inputs([big], 32, 8.0)
    got = read_inputs([big], 32, 8.0, pixel_mm=8.0 / 3)
    assert got.slices.shape == (1, 32, 32) and not got.has_geometry
    small = save_png(vol[:, :, 12], tmp_path / "small.png")
    np.testing.assert_allclose(read_inputs([small], 32, 8.0).slices[0], vol[:, :, 12], atol=1 / 255)
    assert got.scaled_alone and not read_inputs([small], 32, 8.0).scaled_alone  # at the model size: a prepared slice, as it is


def test_a_jpeg_or_tiff_is_read_as_a_png_is(scan, tmp_path):
    """A viewer's or PACS's JPEG / TIFF export is a picture like a PNG (display orientation, no geometry): the same slice,
    within JPEG's loss; a grey slice saved in colour is grey; a coloured one is refused."""
    from PIL import Image

    from monai_mrngan.data.io import slice_to_display

    _, vol, _, _ = scan
    png = read_inputs([save_png(vol[:, :, 12], tmp_path / "s.png")], 32, 8.0).slices
    grey = (np.clip(slice_to_display(vol[:, :, 12]), 0, 1) * 255).round().astype(np.uint8)
    Image.fromarray(grey).save(tmp_path / "s.jpg", quality=95)
    Image.fromarray(np.stack([grey] * 3, -1)).save(tmp_path / "rgb.jpeg", quality=95)
    Image.fromarray(grey.astype(np.uint16) * 257).save(tmp_path / "s16.tif")
    for name, tol in (("s.jpg", 0.1), ("rgb.jpeg", 0.1), ("s16.tif", 1e-6)):
        got = read_inputs([tmp_path / name], 32, 8.0)
        assert not got.has_geometry and float(np.abs(got.slices - png).max()) <= tol, name
    tinted = np.stack([grey, grey, (grey * 0.5).astype(np.uint8)], -1)
    Image.fromarray(tinted).save(tmp_path / "tinted.tif")
    with pytest.raises(InputError, match="colour image"):
        read_inputs([tmp_path / "tinted.tif"], 32, 8.0)


def test_a_png_is_scaled_by_its_head_whatever_the_viewer_window(scan, tmp_path):
    """A viewer's PNG holds display values: a darker or brighter window of the same slice reaches the models alike."""
    _, vol, _, _ = scan
    sl = ndimage.zoom(vol[:, :, 12], 3, order=1)
    dark = read_inputs([save_png(0.5 * sl / sl.max(), tmp_path / "dark.png")], 32, 8.0, pixel_mm=8.0 / 3).slices[0]
    full = read_inputs([save_png(sl / sl.max(), tmp_path / "full.png")], 32, 8.0, pixel_mm=8.0 / 3).slices[0]
    head = full > 0.1
    assert abs(float(dark[head].mean()) / float(full[head].mean()) - 1.0) < 0.02  # taken as they were: 0.5
    # a 2D NIfTI normalised to [0, 1] is a lone slice too, not a prepared one: scaled as its raw twin
    aff = np.diag([8.0 / 3, 8.0 / 3, 8.0, 1.0])
    raw = read_inputs([save_nifti(800.0 * sl[:, :, None], aff, tmp_path / "raw.nii.gz")], 32, 8.0)
    unit = read_inputs([save_nifti(0.4 * sl[:, :, None] / sl.max(), aff, tmp_path / "unit.nii.gz")], 32, 8.0)
    np.testing.assert_allclose(unit.slices, raw.slices, atol=2e-3)
    assert unit.scaled_alone and raw.scaled_alone


def test_output_overlays_the_input_and_says_what_is_real(scan, tiny_dataset, tmp_path):
    path, vol, affine, entry = scan
    ref = reference_grid(tiny_dataset)
    comp = Components(prior=mean_prior(tiny_dataset, "training"))
    kw = dict(expected_shape=ref["shape"], spacing_mm=ref["spacing_mm"], reference_affine=ref["affine"], reference_positions=ref["positions"])
    res = reconstruct_files([str(path)], str(tmp_path / "rec.nii.gz"), comp, slice_index=12, positions=[entry["positions"][12]],
                            method="prior", **kw)
    out = nib.load(res["volume"])
    grid = nib.load(res["model_grid_volume"])
    assert np.array_equal(out.get_fdata(), grid.get_fdata()) and np.allclose(grid.affine, ref["affine"], atol=1e-4)
    # sampling OUT at the input slice's world coordinates gives the input slice back (over the head)
    assert overlay_correlation(res["volume"], path, 12) >= 0.9
    meta = json.loads((tmp_path / "rec_positions.json").read_text())
    k = meta["input_indices"][0]
    assert meta["volume"]["space"] == "input" and meta["slices"][k]["real"] and meta["slices"][k]["distance_mm"] == 0
    assert not meta["slices"][k + 2]["real"] and meta["slices"][k + 2]["distance_mm"] == pytest.approx(2 * ref["spacing_mm"], rel=1e-3)
    prov = nib.load(res["provenance"]).get_fdata()
    assert prov.shape == out.shape and (prov[:, :, k] == 0).all() and prov[0, 0, k + 3] == pytest.approx(3 * ref["spacing_mm"], rel=1e-3)
    assert nib.load(res["provenance"]).affine.tolist() == out.affine.tolist()
    from PIL import Image

    assert min(Image.open(res["montage"]).size) >= 128


def test_thick_slice_stack_uses_every_slice_at_its_place(scan, tiny_dataset, tmp_path):
    path, vol, affine, entry = scan
    ref = reference_grid(tiny_dataset)
    sharp = torch.from_numpy(np.ascontiguousarray(vol, dtype=np.float32))
    thick = torch.stack([slab_mean(sharp, i, 3.0) for i in range(0, vol.shape[2], 3)], -1).numpy()  # a thick-slice acquisition
    aff = affine.copy()
    aff[:3, 2] *= 3
    save_nifti(thick, aff, tmp_path / "thick.nii.gz")  # on the model grid in-plane: used as it is
    got = read_inputs([tmp_path / "thick.nii.gz"], 32, ref["spacing_mm"], stack=True)
    assert got.slices.shape[0] == thick.shape[2]
    np.testing.assert_allclose(got.offsets_mm, np.arange(thick.shape[2]) * 3 * ref["spacing_mm"], rtol=1e-5)
    comp = Components(prior=mean_prior(tiny_dataset, "training"))
    res = reconstruct_files([str(tmp_path / "thick.nii.gz")], str(tmp_path / "stack.nii.gz"), comp, stack=True,
                            positions=[entry["positions"][0]], method="linear", expected_shape=ref["shape"],
                            spacing_mm=ref["spacing_mm"], reference_affine=ref["affine"], reference_positions=ref["positions"])
    assert res["input_indices"] == list(range(0, vol.shape[2], 3))  # real slices where they were acquired
    assert json.loads((tmp_path / "stack_positions.json").read_text())["slab_mm"] == pytest.approx(3 * ref["spacing_mm"], rel=1e-4)
    out = nib.load(res["volume"]).get_fdata()
    for n, c in enumerate(range(3, vol.shape[2] - 1, 3)):  # each slab is the mean of the output over it
        np.testing.assert_allclose(out[:, :, c - 1 : c + 2].mean(2), thick[:, :, n + 1], atol=1.2e-2)  # 1/255 steps, clipped at 0
    given = list(range(0, vol.shape[2], 3))
    lin = linear_fill(np.moveaxis(thick, 2, 0), given, vol.shape[2]).permute(1, 2, 0).numpy()  # through the slabs, as if thin
    inner = slice(0, given[-1] + 1)
    assert np.mean((out[:, :, inner] - vol[:, :, inner]) ** 2) < np.mean((lin[:, :, inner] - vol[:, :, inner]) ** 2)


def test_a_slice_of_a_volume_is_placed_by_the_whole_volume(scan, tiny_dataset, tmp_path):
    """With the vertex in the field of view the position is counted from it, as prepare counts: no model needed."""
    path, vol, affine, entry = scan
    ref = reference_grid(tiny_dataset)
    comp = Components(prior=mean_prior(tiny_dataset, "training"))  # no localizer at all
    res = reconstruct_files([str(path)], str(tmp_path / "v.nii.gz"), comp, slice_index=12, method="prior", expected_shape=ref["shape"],
                            spacing_mm=ref["spacing_mm"], reference_affine=ref["affine"], reference_positions=ref["positions"])
    meta = json.loads((tmp_path / "v_positions.json").read_text())
    assert meta["placement"]["method"] == "vertex in the field of view"
    grid = read_inputs([path], 32, ref["spacing_mm"], stack=True).slices  # the volume as the models see it
    area = (grid > 0.1).sum(axis=(1, 2)) * ref["spacing_mm"] ** 2
    vertex = int(np.nonzero(area >= 1000.0)[0].max())
    assert vertex < len(area) - 1  # the top of the head is inside the field of view
    assert res["input_positions"][0] == pytest.approx((vertex - 12) * ref["spacing_mm"] / 200.0, abs=0.01)


def test_stack_slices_beyond_the_grid_are_left_out(scan, tiny_dataset, tmp_path):
    path, vol, affine, entry = scan
    ref = reference_grid(tiny_dataset)
    aff = affine.copy()
    aff[:3, 2] *= 3
    save_nifti(vol[:, :, ::3], aff, tmp_path / "thick.nii.gz")
    comp = Components(prior=mean_prior(tiny_dataset, "training"))
    # the first slice placed at p = 0.3: the slices above it would lie above the vertex (p < 0)
    res = reconstruct_files([str(tmp_path / "thick.nii.gz")], str(tmp_path / "s.nii.gz"), comp, stack=True, positions=[0.3],
                            method="linear", expected_shape=ref["shape"], spacing_mm=ref["spacing_mm"],
                            reference_affine=ref["affine"], reference_positions=ref["positions"])
    assert min(res["input_positions"]) >= -0.01 and len(res["input_positions"]) < vol[:, :, ::3].shape[2]
    assert res["input_positions"][0] == pytest.approx(0.3)


def test_a_stack_thinner_than_the_grid_takes_one_slice_per_grid_slice(scan, tiny_dataset, tmp_path):
    """Slices half the grid's spacing apart (a 1 mm scan on a 2 mm grid): one per grid slice, not 'same grid slice'."""
    path, vol, affine, entry = scan
    ref = reference_grid(tiny_dataset)
    aff = affine.copy()
    aff[:3, 2] /= 2
    aff[:3, 3] -= 0.25 * affine[:3, 2]  # voxel centres of the twice-finer sampling
    save_nifti(np.repeat(vol, 2, axis=2), aff, tmp_path / "thin.nii.gz")
    comp = Components(prior=mean_prior(tiny_dataset, "training"))
    res = reconstruct_files([str(tmp_path / "thin.nii.gz")], str(tmp_path / "s.nii.gz"), comp, stack=True, positions=[entry["positions"][0]],
                            method="linear", expected_shape=ref["shape"], spacing_mm=ref["spacing_mm"],
                            reference_affine=ref["affine"], reference_positions=ref["positions"])
    assert len(res["input_indices"]) == len(set(res["input_indices"])) == vol.shape[2]  # every grid slice holds one
    out = nib.load(str(tmp_path / "s_model_grid.nii.gz")).get_fdata()
    assert np.corrcoef(out.ravel(), vol.ravel())[0, 1] > 0.99


def test_an_axial_series_with_missing_files_is_a_stack_of_the_slices_it_has(scan, tiny_dataset, tmp_path, caplog):
    """An axial DICOM series with gaps (files left out): with --stack every slice it has, at its place; a slice
    index of a missing slice, and gaps in a sagittal series, are refused in one line."""
    path, vol, affine, entry = scan
    spacing = reference_grid(tiny_dataset)["spacing_mm"]
    img = nib.load(str(path))
    files = write_series(np.asanyarray(img.dataobj), img.affine, tmp_path / "ax", slice_axis=1)  # stored axis 1 is S: axial files
    full = read_inputs([tmp_path / "ax"], 32, spacing, stack=True)
    for k in (0, 3, 4, 5, 9, 10, 11, 12, 17):
        files[k].unlink()
    got = read_inputs([tmp_path / "ax"], 32, spacing, stack=True)
    assert len(got.indices) == len(files) - 9 and got.step_mm == pytest.approx(full.step_mm)
    np.testing.assert_allclose(got.offsets_mm, (np.asarray(got.indices) - got.indices[0]) * got.step_mm, atol=1e-4)
    ii, jj = np.meshgrid(np.arange(32), np.arange(32), indexing="ij")
    corr = []
    for k in range(len(got.indices)):  # every slice where it was acquired: the source sampled there gives it back
        steps = got.offsets_mm[k] / got.step_mm
        world = (got.affine @ np.c_[ii.ravel(), jj.ravel(), np.full(ii.size, steps), np.ones(ii.size)].T)[:3].T
        src = world_samples(path, world).reshape(32, 32) / got.scale
        head = got.slices[k] > 0.1
        if head.sum() > 20:
            corr.append(np.corrcoef(src[head], got.slices[k][head])[0, 1])
    assert len(corr) >= len(got.indices) // 2 and min(corr) > 0.99, corr
    missing = sorted(set(range(got.indices[0], got.indices[-1])) - set(got.indices))
    with pytest.raises(InputError, match=f"slice {missing[2]} is one of the series' missing slices"):
        read_inputs([tmp_path / "ax"], 32, spacing, slice_index=missing[2])
    one = read_inputs([tmp_path / "ax"], 32, spacing, slice_index=got.indices[3])
    assert one.indices == [got.indices[3]] and np.corrcoef(one.slices[0].ravel(), got.slices[3].ravel())[0, 1] > 0.999

    listed = read_inputs(sorted((tmp_path / "ax").iterdir()), 32, spacing, stack=True)  # the files themselves, no folder
    np.testing.assert_array_equal(listed.slices, got.slices)
    assert listed.offsets_mm == got.offsets_mm and listed.indices == got.indices
    kept = [f for k, f in enumerate(files) if k not in (0, 3, 4, 5, 9, 10, 11, 12, 17)]
    assert sorted(listed.sources) == sorted(str(f) for f in kept)  # each slice named by its own file
    heads = [k for k in range(len(listed.sources)) if listed.slices[k].max() > 0.1]
    assert len(heads) >= 8
    for k in heads:  # ... the file that holds it: of all the slices, its own matches it best
        alone = read_inputs([listed.sources[k]], 32, spacing).slices[0].ravel()
        corr = [np.corrcoef(alone, sl.ravel())[0, 1] if sl.any() else -1.0 for sl in listed.slices]
        assert int(np.argmax(corr)) == k and corr[k] > 0.95, (k, corr)
    with pytest.raises(InputError, match="--stack takes one input"):
        read_inputs([tmp_path / "ax", path], 32, spacing, stack=True)
    with caplog.at_level("WARNING", logger="monai_mrngan.data.inputs"):
        apart = read_inputs(sorted((tmp_path / "ax").iterdir())[:2], 32, spacing)  # without --stack: each on its own, and a hint
    assert len(apart.slices) == 2 and not apart.has_geometry and "--stack places them together" in caplog.text

    sag = write_series(np.asanyarray(img.dataobj), img.affine, tmp_path / "sag", slice_axis=0)
    sag[5].unlink()
    with pytest.raises(InputError, match="only an axial series may have gaps") as err:
        read_inputs([tmp_path / "sag"], 32, spacing, slice_index=4)
    assert "\n" not in str(err.value)


def test_the_vertex_is_not_read_across_missing_slices():
    """Slices above the head but past a gap do not give the vertex: it could lie anywhere in the gap."""
    from monai_mrngan.inference.localize import place_slices

    slices = np.zeros((4, 32, 32), np.float32)
    slices[:3, 4:28, 4:28] = 0.5  # 24 x 24 px of head at 2 mm: 2304 mm^2 on each of the lower three
    pos, info = place_slices(None, slices, [0.0, 2.0, 4.0, 6.0], 2.0)  # the empty slice one step above: the vertex
    assert info["method"] == "vertex in the field of view" and pos[2] == pytest.approx(0.0)
    with pytest.raises(ValueError, match="vertex cannot be read"):
        place_slices(None, slices, [0.0, 2.0, 4.0, 14.0], 2.0)  # 10 mm up to the empty one


def test_a_lone_raw_slice_is_brought_to_its_volume_scale_at_its_position(scan, tiny_dataset, tmp_path):
    """A one-slice input with raw intensities is scaled by its own head; multiplied by the bank's slice-scale profile at
    its position it matches the slice as its whole volume is scaled (here the bank is the subject's own volume)."""
    from monai_mrngan.atlas.bank import slice_scale_profile
    from monai_mrngan.atlas.prior import BrainPrior
    from monai_mrngan.inference.reconstruct import to_volume_scale

    _, vol, affine, entry = scan
    ref = reference_grid(tiny_dataset)
    prior = BrainPrior(np.moveaxis(vol, 2, 0), entry["positions"])
    profile = slice_scale_profile(prior.bank)
    factors = np.interp(entry["positions"], prior.positions.numpy(), np.nan_to_num(profile, nan=1.0))
    area = (vol > 0.1).sum(axis=(0, 1))
    k = int(np.argmax(np.where(area >= area.max() / 2, np.abs(factors - 1.0), 0.0)))  # a mid-head slice scaled alone furthest off
    one = affine.copy()
    one[:3, 3] += affine[:3, 2] * k
    save_nifti(vol * 800.0, affine, tmp_path / "raw.nii.gz")  # the volume as a scanner stores it
    save_nifti(vol[:, :, k] * 800.0, one, tmp_path / "raw_slice.nii.gz")  # one axial slice of it
    alone = read_inputs([tmp_path / "raw_slice.nii.gz"], 32, ref["spacing_mm"])
    whole = read_inputs([tmp_path / "raw.nii.gz"], 32, ref["spacing_mm"], slice_index=k)  # the same slice, scaled with its volume
    assert alone.scaled_alone and not whole.scaled_alone
    assert not read_inputs([entry["image"]], 32, ref["spacing_mm"], slice_index=k).scaled_alone  # prepared: as it is
    p = float(entry["positions"][k])
    fixed, info = to_volume_scale(prior, alone, [p])
    factor = float(factors[k])
    assert info == {"scaled_alone": True, "position_scale_factor": [round(factor, 4)]} and abs(factor - 1.0) > 0.03
    head = whole.slices[0] > 0.1
    before = np.abs(alone.slices[0] - whole.slices[0])[head].mean()
    after = np.abs(fixed.slices[0] - whole.slices[0])[head].mean()
    assert after < 0.2 * before and fixed.scale == pytest.approx(alone.scale / factor)
    assert to_volume_scale(prior, whole, [p]) == (whole, None)
    two = read_inputs([tmp_path / "raw_slice.nii.gz"] * 2, 32, ref["spacing_mm"])  # several lone slices: each at its own position
    both, info2 = to_volume_scale(prior, two, [p, 0.5])
    assert two.scaled_alone and info2["position_scale_factor"][0] == info["position_scale_factor"][0]
    np.testing.assert_allclose(both.slices[0], fixed.slices[0])
    res = reconstruct_files([str(tmp_path / "raw_slice.nii.gz")], str(tmp_path / "r.nii.gz"), Components(prior=prior), positions=[p],
                            method="prior", expected_shape=ref["shape"], spacing_mm=ref["spacing_mm"])
    meta = json.loads((tmp_path / "r_positions.json").read_text())
    assert meta["intensity"] == info and res["input_positions"] == pytest.approx([p])


def test_a_stack_is_resampled_slice_by_slice_in_one_call():
    """prepare_slices resamples every picked slice with one grid (the slices as channels): each slice of a stack equals
    that slice prepared alone, bit for bit, on an oblique geometry (slices that share their centre of mass, so both
    crops are the same), and no slice leaks into another."""
    from monai_mrngan.data.grid import prepare_slices

    rng = np.random.default_rng(3)
    pattern = ndimage.gaussian_filter(rng.uniform(0, 1, (70, 60)), 3) * np.outer(np.hanning(70), np.hanning(60))
    levels = rng.uniform(0.5, 1.5, 9)
    vol = (pattern[:, :, None] * levels[None, None, :] * 400).astype(np.float32)
    c, s = np.cos(0.3), np.sin(0.3)
    affine = np.array([[1.1 * c, -0.9 * s, 0.2, -30.0], [1.1 * s, 0.9 * c, 0.0, 12.0], [0.0, 0.05, 4.0, 7.0], [0, 0, 0, 1.0]])
    whole = prepare_slices(vol, affine, 2.0, 32)
    assert whole.slices.shape == (9, 32, 32) and whole.indices == list(range(9))
    for k in (0, 4, 8):
        alone = prepare_slices(vol, affine, 2.0, 32, [k], top=whole.scale)
        np.testing.assert_array_equal(whole.slices[k], alone.slices[0])
