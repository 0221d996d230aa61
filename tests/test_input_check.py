"""The input check: real axial head slices pass; noise, gradients, empty, coronal and sagittal slices are refused."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from monai_mrngan.atlas.bank import build_bank
from monai_mrngan.atlas.input_check import (MAX_FLIP_GAIN, MIN_CONTRAST, MIN_WHITE_OVER_GREY, ContrastCheck, InputChecker, contrast_check,
                                             fitted_contrast, flip_reason)
from monai_mrngan.atlas.prior import BrainPrior, mean_prior
from monai_mrngan.data.datalist import load_split
from monai_mrngan.data.io import InputError, load_volume, save_nifti, save_png
from monai_mrngan.inference.components import Components, reference_grid
from monai_mrngan.inference.reconstruct import reconstruct_files
from monai_mrngan.transforms.scanners import reweight


def test_nonsense_is_refused_and_force_records_it(tiny_dataset, tmp_path):
    prior = mean_prior(tiny_dataset, "training")
    checker = InputChecker(prior)
    entry = load_split(tiny_dataset, "test")[0]
    vol, affine = load_volume(entry["image"])
    assert checker.check(vol[:, :, 12]).passed
    rng = np.random.default_rng(0)
    for image in (rng.random((32, 32)), np.zeros((32, 32)), np.tile(np.linspace(0, 1, 32), (32, 1))):
        assert not checker.check(image).passed

    ref = reference_grid(tiny_dataset)
    kw = dict(expected_shape=ref["shape"], spacing_mm=ref["spacing_mm"], reference_affine=ref["affine"], reference_positions=ref["positions"])
    noise = save_png(rng.random((32, 32)), tmp_path / "noise.png")
    with pytest.raises(InputError, match="does not look like a head slice") as err:
        reconstruct_files([str(noise)], str(tmp_path / "x.nii.gz"), Components(prior=prior), positions=[0.5], method="copy", **kw)
    assert str(noise) in str(err.value) and "--force" in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "x.nii.gz").exists()
    res = reconstruct_files([str(noise)], str(tmp_path / "x.nii.gz"), Components(prior=prior), positions=[0.5], method="copy", force=True, **kw)
    meta = json.loads((tmp_path / "x_positions.json").read_text())
    assert meta["input_check"][0]["passed"] is False and res["input_check"][0]["axial_match"] < 0.75


@pytest.mark.ixi
def test_real_ixi_slices_pass_other_planes_do_not(ixi_dir, tmp_path):
    """Held-out real slices at p = 0.15 .. 0.85 are accepted, as T1 too; most of them given a T2 or PD tissue ranking, and
    some given a FLAIR one, are not; coronal / sagittal / noise / gradient / empty refused."""
    from monai_mrngan.data.prepare import prepare_volume

    scans = sorted(ixi_dir.glob("*.nii*"))[:14]
    prepared = [prepare_volume(s, spacing=2.0, size=128) for s in scans]
    entries = []
    for i, pv in enumerate(prepared[:12]):  # the atlases
        path = save_nifti(pv.data, pv.affine, tmp_path / f"a{i}.nii.gz")
        entries.append({"image": str(path), "positions": pv.positions.tolist(), "subject": f"a{i}"})
    bank, grid = build_bank(entries, 101)
    prior = BrainPrior(bank, grid, {"top_k": 5, "intensity": "monotone"}, subjects=[e["subject"] for e in entries])
    checker = InputChecker(prior)
    refused = {name: 0 for name in ("t1", "t2", "pd", "flair")}
    for pv in prepared[12:]:  # held out
        for p in np.arange(0.15, 0.851, 0.1):
            k = int(np.argmin(np.abs(pv.positions - p)))
            res = checker.check(pv.data[:, :, k])
            assert res.passed, (p, res)
            for name in refused:  # the same slice as T1, and with a T2 / PD tissue ranking
                image = pv.data[:, :, k] if name == "t1" else reweight(pv.data[:, :, k], name)
                refused[name] += bool(fitted_contrast(prior, image, pv.positions[k], 2.0).reason)
    assert refused["t1"] == 0 and refused["t2"] >= 12 and refused["pd"] >= 9 and refused["flair"] >= 3, refused  # of 16 each (15, 12, 6 here)
    for pv in prepared[12:]:  # upside down: its mirror image ranks tissues as the atlases fitted there do, the slice as given does not
        for p in (0.3, 0.5, 0.7):
            k = int(np.argmin(np.abs(pv.positions - p)))
            image, p_k = pv.data[:, :, k], float(pv.positions[k])
            given, mirror = (fitted_contrast(prior, x, p_k, 2.0).t1_contrast for x in (image, np.ascontiguousarray(image[:, ::-1])))
            assert flip_reason(given, mirror) == "" and "upside down" in flip_reason(mirror, given), (p, given, mirror)
    turned = checker.check(np.rot90(prepared[12].data[:, :, int(np.argmin(np.abs(prepared[12].positions - 0.6)))]).copy())
    assert not turned.passed and "turned on its side" in turned.reason, turned
    vol = prepared[12].data
    bad = {"noise": np.random.default_rng(0).random((128, 128)), "gradient": np.tile(np.linspace(0, 1, 128), (128, 1)),
           "empty": np.zeros((128, 128))}
    for j in (45, 64, 85):
        for name, plane in ((f"coronal{j}", vol[:, j, :]), (f"sagittal{j}", vol[j, :, :])):
            canvas = np.zeros((128, 128), np.float32)
            canvas[: plane.shape[0], : min(128, plane.shape[1])] = plane[:, :128]
            bad[name] = canvas
    for name, image in bad.items():
        assert not checker.check(image).passed, name


def _fitted_prior(dataset) -> BrainPrior:
    entries = load_split(dataset, "training")
    vols = [np.moveaxis(load_volume(e["image"])[0], -1, 0) for e in entries]
    fit = {"mode": "affine", "top_k": 2, "work_size": 32, "affine_iters": 20, "grid_points": 6, "intensity": "monotone"}
    return BrainPrior(np.stack(vols), np.asarray(entries[0]["positions"]), fit)


def _tissue_slice(fluid: float, grey: float, white: float, scalp: float, size: int = 64) -> np.ndarray:
    """A 2 mm head slice: scalp ring, cortex ring, white matter, two ventricles."""
    y, x = np.mgrid[-1:1:size * 1j, -1:1:size * 1j]
    r = np.hypot(x, y / 1.2)
    img = np.where(r < 0.95, scalp, 0.0)
    img = np.where(r < 0.85, 0.05, img)  # skull
    img = np.where(r < 0.8, grey, img)
    img = np.where(r < 0.5, white, img)
    img = np.where((np.abs(np.abs(x) - 0.15) < 0.07) & (np.abs(y) < 0.35), fluid, img)
    return img.astype(np.float32)


def test_the_contrast_scores_tell_t1_from_flair():
    """Against a T1 prior, T1 passes both scores; FLAIR (fluid dark like T1, white below grey) passes the rank
    correlation's floor or not, but not white over grey; on coarse voxels white over grey is not judged."""
    t1 = _tissue_slice(0.2, 0.45, 0.7, 0.9)
    flair = _tissue_slice(0.1, 0.65, 0.45, 0.6)
    ok = contrast_check(t1, t1, 2.0)
    assert ok.t1_contrast > 0.9 and ok.white_over_grey > 0.5 and ok.reason == ""
    bad = contrast_check(flair, t1, 2.0)
    assert bad.white_over_grey < MIN_WHITE_OVER_GREY and "T1-weighted" in bad.reason and "\n" not in bad.reason
    assert "white over grey 0.00" in ContrastCheck(0.8, 0.0).reason and ContrastCheck(0.8, None).reason == ""
    assert contrast_check(flair, t1, 8.0).white_over_grey is None


def test_a_slice_of_another_weighting_is_refused_and_force_records_it(tiny_dataset, tmp_path):
    """A T1 slice ranks its tissues as the T1 atlases fitted to it do; the same slice given a T2 ranking (fluid bright)
    is refused once placed, with one line naming the file and its score; --force records the score and the failure."""
    prior = _fitted_prior(tiny_dataset)
    entry = load_split(tiny_dataset, "test")[0]
    vol, affine = load_volume(entry["image"])
    k = 12
    p = float(entry["positions"][k])
    spacing = float(entry["spacing"][0])
    for image, low, high in ((vol[:, :, k], 0.7, 1.0), (reweight(vol[:, :, k], "t2"), -1.0, 0.0)):
        assert low < fitted_contrast(prior, image, p, spacing).t1_contrast < high
    assert fitted_contrast(prior, vol[:, :, k], p, spacing).white_over_grey is None  # 8 mm voxels: white and grey not resolved
    assert contrast_check(np.zeros((32, 32)), np.zeros((32, 32)), spacing).t1_contrast is None  # no head: not judged
    assert fitted_contrast(mean_prior(tiny_dataset, "training"), vol[:, :, k], p, spacing).t1_contrast is None  # a prior never fitted: not judged

    ref = reference_grid(tiny_dataset)
    kw = dict(expected_shape=ref["shape"], spacing_mm=ref["spacing_mm"], reference_affine=ref["affine"], reference_positions=ref["positions"])
    paths = {}
    for name in ("t1", "t2"):
        image = vol[:, :, k] if name == "t1" else reweight(vol[:, :, k], name)
        paths[name] = save_nifti(image[:, :, None], affine, tmp_path / f"{name}.nii.gz")
    res = reconstruct_files([str(paths["t1"])], str(tmp_path / "t1_out.nii.gz"), Components(prior=prior), positions=[p], method="copy", **kw)
    assert res["input_check"][0]["passed"] and res["input_check"][0]["t1_contrast"] > MIN_CONTRAST
    before = paths["t2"].read_bytes()
    with pytest.raises(InputError, match="does not look T1-weighted") as err:
        reconstruct_files([str(paths["t2"])], str(tmp_path / "x.nii.gz"), Components(prior=prior), positions=[p], method="copy", **kw)
    assert str(paths["t2"]) in str(err.value) and "--force" in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "x.nii.gz").exists() and paths["t2"].read_bytes() == before
    reconstruct_files([str(paths["t2"])], str(tmp_path / "x.nii.gz"), Components(prior=prior), positions=[p], method="copy", force=True, **kw)
    check = json.loads((tmp_path / "x_positions.json").read_text())["input_check"][0]
    assert check["passed"] is False and check["t1_contrast"] < MIN_CONTRAST and "T1-weighted" in check["reason"]


def test_the_contrast_check_shares_its_fit_with_the_reconstruction(tiny_dataset, tmp_path, monkeypatch):
    """The contrast check judges a slice where the reconstruction places it (its output grid slice), so the prior it
    fits there is the one the reconstruction then uses: one fit, not two, for a slice placed between grid slices."""
    import monai_mrngan.atlas.prior as prior_module

    prior = _fitted_prior(tiny_dataset)
    entry = load_split(tiny_dataset, "test")[0]
    vol, affine = load_volume(entry["image"])
    k = 12
    p = float(entry["positions"][k]) + 0.3 * float(entry["positions"][k + 1] - entry["positions"][k])
    path = save_nifti(vol[:, :, k : k + 1], affine, tmp_path / "t1.nii.gz")
    ref = reference_grid(tiny_dataset)
    calls = []
    real = prior_module.fit_batch
    monkeypatch.setattr(prior_module, "fit_batch", lambda bank, work, grid, refs, *a, **k: calls.append(len(refs)) or real(bank, work, grid, refs, *a, **k))
    res = reconstruct_files([str(path)], str(tmp_path / "r.nii.gz"), Components(prior=prior), positions=[p], method="prior",
                            expected_shape=ref["shape"], spacing_mm=ref["spacing_mm"], reference_affine=ref["affine"],
                            reference_positions=ref["positions"])
    assert res["input_check"][0]["t1_contrast"] is not None and calls == [1]


class _At(torch.nn.Module):
    """A localizer that answers one position for every slice."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.full((x.shape[0], 1), self.p)


def test_a_png_is_checked_the_right_way_up_and_refused_upside_down(tiny_dataset, tmp_path, monkeypatch):
    """A localized PNG (no orientation of its own) is scored beside its top-to-bottom mirror image (``t1_contrast_flipped``);
    when the mirror image scores more than MAX_FLIP_GAIN better it is refused with one line naming the file, --force records
    it. A NIfTI (its header orients it) and a PNG given its position are not compared."""
    import monai_mrngan.inference.reconstruct as reconstruct_module

    assert flip_reason(0.80, 0.80 + MAX_FLIP_GAIN / 2) == "" and flip_reason(None, 0.9) == "" and "upside down" in flip_reason(0.7, 0.8)
    prior = _fitted_prior(tiny_dataset)
    entry = load_split(tiny_dataset, "test")[0]
    vol, affine = load_volume(entry["image"])
    k = 12
    ref = reference_grid(tiny_dataset)
    kw = dict(expected_shape=ref["shape"], spacing_mm=ref["spacing_mm"], reference_affine=ref["affine"], reference_positions=ref["positions"])
    comp = Components(prior=prior, localizer=_At(float(entry["positions"][k])))
    png = save_png(vol[:, :, k], tmp_path / "s.png")
    res = reconstruct_files([str(png)], str(tmp_path / "a.nii.gz"), comp, method="copy", **kw)
    check = res["input_check"][0]
    assert check["passed"] and check["t1_contrast_flipped"] is not None and check["t1_contrast"] is not None
    nifti = save_nifti(vol[:, :, k : k + 1], affine, tmp_path / "s.nii.gz")
    assert "t1_contrast_flipped" not in reconstruct_files([str(nifti)], str(tmp_path / "b.nii.gz"), comp, method="copy", **kw)["input_check"][0]
    given = reconstruct_files([str(png)], str(tmp_path / "c.nii.gz"), comp, positions=[float(entry["positions"][k])], method="copy", **kw)
    assert "t1_contrast_flipped" not in given["input_check"][0]
    monkeypatch.setattr(reconstruct_module, "flip_reason", lambda a, b: "looks upside down (a test's verdict)")
    with pytest.raises(InputError, match="upside down") as err:
        reconstruct_files([str(png)], str(tmp_path / "d.nii.gz"), comp, method="copy", **kw)
    assert str(png) in str(err.value) and "--force" in str(err.value) and not (tmp_path / "d.nii.gz").exists()
    forced = reconstruct_files([str(png)], str(tmp_path / "d.nii.gz"), comp, method="copy", force=True, **kw)["input_check"][0]
    assert forced["passed"] is False and "upside down" in forced["reason"]


def test_complete_skips_a_volume_of_another_weighting(tiny_dataset, tmp_path):
    """complete judges a volume's real slice nearest mid-head as reconstruct judges an input: a T1 volume completes with
    its score recorded, the same volume with a T2 ranking is refused, naming the file."""
    from monai_mrngan.apps.complete import complete_file
    from monai_mrngan.data.io import save_json

    prior = _fitted_prior(tiny_dataset)
    entry = load_split(tiny_dataset, "test")[0]
    vol, affine = load_volume(entry["image"])
    ref = reference_grid(tiny_dataset)
    for name, v in (("t1", vol.copy()), ("t2", reweight(vol, "t2"))):
        v[:, :, [6, 7, 15]] = np.nan
        save_nifti(v, affine, tmp_path / f"{name}.nii.gz")
        save_json({"positions": entry["positions"]}, tmp_path / f"{name}.json")
    done = complete_file(tmp_path / "t1.nii.gz", Components(prior=prior), ref, method="linear", missing="nan")
    assert done.meta["t1_contrast"] > MIN_CONTRAST and done.meta["generated_slices"] == [6, 7, 15]
    with pytest.raises(InputError, match="does not look T1-weighted") as err:
        complete_file(tmp_path / "t2.nii.gz", Components(prior=prior), ref, method="linear", missing="nan")
    assert "t2.nii.gz" in str(err.value)


def test_bad_slab_thickness_is_refused_before_any_input_is_read(tmp_path):
    """A negative --slab_mm, or one without --stack, is refused at once: the (absent) input is never read or placed."""
    missing = str(tmp_path / "never_read.nii.gz")
    with pytest.raises(ValueError, match="slab thickness must be >= 0 mm, got -1"):
        reconstruct_files([missing], str(tmp_path / "x.nii.gz"), Components(), stack=True, slab_mm=-1.0, expected_shape=(32, 32))
    with pytest.raises(ValueError, match="applies to a --stack only"):
        reconstruct_files([missing], str(tmp_path / "x.nii.gz"), Components(), slab_mm=5.0, expected_shape=(32, 32))
    assert not list(tmp_path.iterdir())
