"""Scanner-shift evaluation: fixed, seeded simulated scanners on the held-out subjects, tables side by side."""

from __future__ import annotations

import json

import numpy as np
import pytest

from monai_mrngan.atlas.prior import mean_prior
from monai_mrngan.data.datalist import load_split
from monai_mrngan.data.io import load_volume
from monai_mrngan.evaluation.shift import evaluate_shifted
from monai_mrngan.transforms.scanners import SHIFTS, simulate
from monai_mrngan.inference.components import Components


def test_every_shift_changes_the_volume_reproducibly(tiny_dataset):
    vol, _ = load_volume(load_split(tiny_dataset, "test")[0]["image"])
    for name in SHIFTS:
        a, b = simulate(vol, name, seed=3), simulate(vol, name, seed=3)
        assert np.array_equal(a, b) and a.shape == vol.shape and 0 <= a.min() and a.max() <= 1
        assert np.abs(a - vol).mean() > 1e-3, name
    with pytest.raises(ValueError, match="unknown scanner shift"):
        simulate(vol, "nope")


def test_side_by_side_report(tiny_dataset, tmp_path):
    comp = Components(prior=mean_prior(tiny_dataset, "training"))
    rows = evaluate_shifted(tiny_dataset, tmp_path, comp, shifts=["gamma_0.7", "noise_3pct"], methods=("prior", "copy"),
                            few_slice_k=(4,), localize_inputs=False, tensorboard=False)
    assert list(rows) == ["original", "gamma_0.7", "noise_3pct"]
    report = json.loads((tmp_path / "shift_report.json").read_text())
    assert set(report["results"]["noise_3pct"]["single_slice"]) == {"prior", "copy"}
    orig, noisy = rows["original"]["single_slice"]["copy"]["psnr"], rows["noise_3pct"]["single_slice"]["copy"]["psnr"]
    assert orig != noisy
    assert "| noise_3pct |" in (tmp_path / "shift_report.md").read_text()


def test_cli_refuses_an_unknown_shift_before_evaluating(tiny_dataset, tmp_path, monkeypatch, capsys):
    from monai_mrngan.apps import cli

    monkeypatch.setattr(cli, "_components", lambda workdir, device="cpu": Components(prior=mean_prior(tiny_dataset, "training")))
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as err:  # fire hands "gamma_0.7,nope" over as a tuple
        cli.main(["evaluate", "--workdir", str(tmp_path), "--dataset_dir", str(tiny_dataset), "--out", str(out),
                  "--shift", "gamma_0.7,nope"])
    assert err.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: unknown scanner shift 'nope'; expected one of")
    assert not out.exists()  # refused before the original subjects were evaluated
    assert cli._names(("gamma_0.7", " noise_3pct")) == cli._names("gamma_0.7, noise_3pct") == ["gamma_0.7", "noise_3pct"]
