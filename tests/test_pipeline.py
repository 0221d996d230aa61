"""The end-to-end chain: four bundles trained and evaluated in order, then reconstruct and evaluate.

Runs every stage for one tiny epoch on the tiny prepared dataset (32 px), through the same
``monai.bundle`` processes a user's pipeline runs, and then the ``reconstruct`` command.
"""

from __future__ import annotations

import json
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
import torch

from monai_mrngan.data.datalist import load_split
from monai_mrngan.data.io import save_png
from monai_mrngan.apps.pipeline import PRESETS, STAGES, read_run_info, run_pipeline

TINY = {
    "slice_localization": {
        "network_def": {"_target_": "monai_mrngan.networks.localizers.LocalizerCNN", "spatial_size": [32, 32],
                        "filters": [8, 8, 4, 1], "hidden": 16},
        "slices_per_volume": 4, "volumes_per_batch": 3,
    },
    "brain_generalization": {"g_channels": 16, "d_channels": 4, "samples_per_volume": 4, "val_volumes": 1,
                             "val_latents": 2, "num_positions": 24, "max_atlases": 4},
    "flow_generation": {"unet_channels": [8, 16, 32], "d_channels": 8, "volumes_per_batch": 2, "samples_per_volume": 4,
                        "val_limit": 1, "val_image_index": 0},
    "mrngan": {"run_length": 4, "runs_per_volume": 2, "volumes_per_batch": 2, "val_runs_per_volume": 2,
               "network_def#hidden_channels": 4, "network_def#features": 4, "eval_limit": 1,
               # the fitted-prior cache step runs before train, with a cheap fit
               "use_prior_cache": True, "cache_workers": 1,
               "prior_fit": {"mode": "affine", "top_k": 2, "affine_iters": 5, "work_size": 16, "position_search": 0.0}},
}


@pytest.fixture(scope="module")
def trained(tiny_dataset, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("pipeline")
    PRESETS["tiny-test"] = {stage: {"epochs": 1} for stage in STAGES}
    try:
        # a fractional time budget reaches every train.json's TimeLimit (which takes whole seconds)
        results = run_pipeline(tiny_dataset, workdir, preset="tiny-test", stage_overrides=TINY, time_budget_s=600.5)
    finally:
        PRESETS.pop("tiny-test")
    return workdir, results


def test_every_stage_trains_and_evaluates(trained):
    workdir, results = trained
    assert list(results) == list(STAGES)
    for stage in STAGES:
        assert (workdir / stage / "done.json").is_file()
        assert (workdir / stage / "train.log").is_file()
    assert (workdir / "slice_localization" / "models" / "model.pt").is_file()
    assert (workdir / "brain_generalization" / "models" / "atlas_bank.pt").is_file()
    assert (workdir / "flow_generation" / "models" / "model.pt").is_file()
    assert (workdir / "mrngan" / "models" / "model.pt").is_file()
    assert json.loads((workdir / "mrngan" / "models" / "prior_cache" / "manifest.json").read_text())["complete"]
    assert list(results["mrngan"]["seconds"]) == ["prior_cache", "train", "calibrate", "evaluate"]
    assert (workdir / "mrngan" / "calibrate.log").is_file()  # the uncertainty calibration step runs after training
    assert (workdir / "mrngan" / "models" / "uncertainty_calibration.json").is_file()
    assert json.loads((workdir / "slice_localization" / "eval" / "metrics.json").read_text())
    reports = list((workdir / "mrngan" / "eval").rglob("report.json"))
    assert reports
    scores = json.loads(reports[0].read_text())["uncertainty"]  # the map scored on the test split
    assert set(scores) <= {"single_slice", "k4", "k8", "thick_k3"} and "single_slice" in scores
    for s in scores.values():
        assert -1 <= s["spearman_voxel"] <= 1 and len(s["reliability"]) == 10
    info = read_run_info(workdir)
    assert info["stage_overrides"]["slice_localization"]["spatial_size"] == [32, 32]


def test_finished_stages_are_skipped(trained, tiny_dataset, capsys):
    workdir, _ = trained
    run_pipeline(tiny_dataset, workdir, preset="demo")
    out = capsys.readouterr().out
    assert out.count("already finished") == len(STAGES)


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "monai_mrngan", *map(str, args)], capture_output=True, text=True)


def test_reconstruct_from_png_and_from_few_slices(trained, tiny_dataset, tmp_path):
    workdir, _ = trained
    entry = load_split(tiny_dataset, "test")[0]
    img = nib.load(entry["image"])
    vol = img.get_fdata().astype(np.float32)
    png = save_png(vol[:, :, 12], tmp_path / "slice.png")

    proc = _cli("reconstruct", "--workdir", workdir, "--input", png, "--out", tmp_path / "one.nii.gz")
    assert proc.returncode == 0, proc.stderr
    out = nib.load(str(tmp_path / "one.nii.gz"))
    assert out.shape == vol.shape and np.allclose(out.affine, img.affine, atol=1e-4)  # the prepared grid
    assert (tmp_path / "one_montage.png").is_file() and "position p" in proc.stdout
    assert "uncertainty:" in proc.stdout
    unc = nib.load(str(tmp_path / "one_uncertainty.nii.gz"))  # calibrated by the pipeline's calibrate step
    assert unc.shape == out.shape and np.allclose(unc.affine, out.affine)
    meta = json.loads((tmp_path / "one_positions.json").read_text())
    u = unc.get_fdata()
    assert all(not u[:, :, i].any() for i in meta["input_indices"]) and u.max() > 0 and (u >= 0).all()
    assert all(s["uncertainty_mean"] == 0 for s in meta["slices"] if s["real"])

    a, b = save_png(vol[:, :, 4], tmp_path / "a.png"), save_png(vol[:, :, 16], tmp_path / "b.png")
    proc = _cli("reconstruct", "--workdir", workdir, "--input", a, b,
                "--positions", entry["positions"][4], entry["positions"][16], "--out", tmp_path / "few.nii.gz")
    assert proc.returncode == 0, proc.stderr
    few = nib.load(str(tmp_path / "few.nii.gz")).get_fdata()
    assert few.shape == out.shape and np.isfinite(few).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU (CI has none; run on a GPU machine)")
def test_reconstruct_on_the_gpu_matches_the_cpu(trained, tiny_dataset, tmp_path):
    """Every stage of a CLI reconstruction on CUDA (localization, whole-volume placement, the input
    check, the fit, the cell, the uncertainty map), the same volume as on the CPU up to float noise."""
    workdir, _ = trained
    entry = load_split(tiny_dataset, "test")[0]
    outs = {}
    for device in ("cpu", "cuda"):
        proc = _cli("reconstruct", "--workdir", workdir, "--input", entry["image"], "--slice-index", 12,
                    "--device", device, "--out", tmp_path / device / "r.nii.gz")
        assert proc.returncode == 0, proc.stderr
        outs[device] = nib.load(str(tmp_path / device / "r.nii.gz")).get_fdata()
    assert np.abs(outs["cuda"] - outs["cpu"]).mean() < 0.02 * max(float(np.abs(outs["cpu"]).mean()), 1e-6)


def test_reconstruct_bad_inputs_give_one_line(trained, tiny_dataset, tmp_path):
    workdir, _ = trained
    entry = load_split(tiny_dataset, "test")[0]
    wrong = save_png(np.random.rand(20, 20), tmp_path / "wrong.png")
    for args, text in [
        (["--input", entry["image"]], "pass a slice index"),
        (["--input", wrong], "20x20"),
        (["--input", tmp_path / "missing.png"], "no such file"),
    ]:
        proc = _cli("reconstruct", "--workdir", workdir, *args, "--out", tmp_path / "x.nii.gz")
        assert proc.returncode == 2, proc.stderr
        last = proc.stderr.strip().splitlines()[-1]
        assert last.startswith("error:") and text in last, proc.stderr
    assert not (tmp_path / "x.nii.gz").exists()


def test_prior_cache_step_runs_before_train_when_the_preset_uses_it(tiny_dataset, tmp_path, monkeypatch):
    from monai_mrngan.apps import pipeline

    ran = []

    def run(cmd, log):  # a stand-in for the bundle commands: training leaves its weights
        ran.append((log.parent.name, log.stem, cmd))
        if log.stem == "train":
            (log.parent / "models").mkdir(parents=True, exist_ok=True)
            (log.parent / "models" / "model.pt").touch()

    monkeypatch.setattr(pipeline, "_run_logged", run)
    for use in (True, False):
        ran.clear()
        PRESETS["tiny-test"] = {"mrngan": {"use_prior_cache": use}}
        try:
            run_pipeline(tiny_dataset, tmp_path / f"w{use}", preset="tiny-test", stages=["mrngan"])
        finally:
            PRESETS.pop("tiny-test")
        assert [step for _, step, _ in ran] == (["prior_cache", "train", "calibrate", "evaluate"] if use else ["train", "calibrate", "evaluate"])
    cmd = ran[0][2]
    assert cmd[cmd.index("--use_prior_cache") + 1] == "False"  # a Python literal: fire reads JSON's false as the string 'false'


def test_a_training_stopped_before_its_first_validation_is_not_marked_done(tiny_dataset, tmp_path, monkeypatch):
    """A time limit that ends training inside its first epoch leaves no weights: the pipeline says so, and does not
    mark the stage finished (before, it wrote done.json and the next stage failed on the missing checkpoint)."""
    from monai_mrngan.apps import pipeline

    monkeypatch.setattr(pipeline, "_run_logged", lambda cmd, log: None)  # training that saved nothing
    with pytest.raises(RuntimeError, match="before its first validation, so no weights were saved"):
        run_pipeline(tiny_dataset, tmp_path / "w", preset="demo", stages=["slice_localization"])
    assert not (tmp_path / "w" / "slice_localization" / "done.json").exists()


def test_override_args_reach_the_bundle_with_their_types():
    import fire

    from monai_mrngan.apps.pipeline import _override_args

    values = {"flag": False, "none": None, "fit": {"mode": "affine", "on": True, "w": 0.5}, "sizes": [16, 32], "path": "/a/b"}
    assert fire.Fire(lambda **kw: kw, _override_args(values)) == values
