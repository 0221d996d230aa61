"""The input check: real axial head slices pass; noise, gradients, empty, coronal and sagittal slices are refused."""

from __future__ import annotations

import json

import numpy as np
import pytest

from monai_mrngan.atlas.bank import build_bank
from monai_mrngan.atlas.input_check import InputChecker
from monai_mrngan.atlas.prior import BrainPrior, mean_prior
from monai_mrngan.data.datalist import load_split
from monai_mrngan.data.io import InputError, load_volume, save_nifti, save_png
from monai_mrngan.inference.components import Components, reference_grid
from monai_mrngan.inference.reconstruct import reconstruct_files


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
    """Held-out real slices at p = 0.15 .. 0.85 are accepted; coronal / sagittal / noise / gradient / empty refused."""
    from monai_mrngan.data.prepare import prepare_volume

    scans = sorted(ixi_dir.glob("*.nii*"))[:14]
    prepared = [prepare_volume(s, spacing=2.0, size=128) for s in scans]
    entries = []
    for i, pv in enumerate(prepared[:12]):  # the atlases
        path = save_nifti(pv.data, pv.affine, tmp_path / f"a{i}.nii.gz")
        entries.append({"image": str(path), "positions": pv.positions.tolist(), "subject": f"a{i}"})
    bank, grid = build_bank(entries, 101)
    checker = InputChecker(BrainPrior(bank, grid, {"top_k": 5}, subjects=[e["subject"] for e in entries]))
    for pv in prepared[12:]:  # held out
        for p in np.arange(0.15, 0.851, 0.1):
            k = int(np.argmin(np.abs(pv.positions - p)))
            res = checker.check(pv.data[:, :, k])
            assert res.passed, (p, res)
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
