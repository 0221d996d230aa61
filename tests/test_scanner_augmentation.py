"""Training that does not learn one scanner: each stage's ``intensity_augmentation`` flag and its transforms."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from monai_mrngan.apps.pipeline import PRESETS
from monai_mrngan.data.datalist import load_split
from monai_mrngan.transforms.scanners import SHIFTS

BUNDLES = Path(__file__).resolve().parents[1] / "bundles"
STAGES = ("slice_localization", "flow_generation", "mrngan")
SAMPLER = {"slice_localization": "AxialSliced", "flow_generation": "AdjacentSlicePaird", "mrngan": "GapRund"}
AUGMENTS = {"RandBiasFieldd", "RandAdjustContrastd", "RandHistogramShiftd", "RandGaussianSmoothd", "RandGaussianNoised", "RandScaleIntensityd"}


def _parser(stage: str, dataset: Path | None = None, **overrides):
    """The stage's train.json; ``dataset``: its ``dataset_dir`` (none: the config's own, for reading settings)."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(BUNDLES / stage / "configs" / "train.json"))
    if dataset is not None:
        parser["dataset_dir"] = str(dataset)
    for k, v in overrides.items():
        parser[k] = v
    return parser


def _names(transforms) -> list[str]:
    return [type(t).__name__ for t in transforms]


@pytest.mark.parametrize("stage", STAGES)
def test_flag_switches_the_volume_augmentation(stage, tiny_dataset):
    """Off (the default): no scanner transform in the training chain; on: all of them, before the slice sampler;
    validation never has them."""
    assert _parser(stage, tiny_dataset).get("intensity_augmentation") is False
    off = _names(_parser(stage, tiny_dataset).get_parsed_content("train#preprocessing").transforms)
    on = _names(_parser(stage, tiny_dataset, intensity_augmentation=True).get_parsed_content("train#preprocessing").transforms)
    # before the sampler (one draw per volume; the localizer keeps its own slice-level gain / gamma after it)
    assert not AUGMENTS & set(off[: off.index(SAMPLER[stage])])
    assert AUGMENTS <= set(on[: on.index(SAMPLER[stage])])
    assert off == [n for n in on if n not in AUGMENTS | {"Lambdad"}] or stage == "slice_localization"
    val = _names(_parser(stage, tiny_dataset, intensity_augmentation=True).get_parsed_content("validate#preprocessing").transforms
                 if stage != "flow_generation" else
                 _parser(stage, tiny_dataset, intensity_augmentation=True).get_parsed_content("validate#dataset_up").transform.transforms)
    assert not AUGMENTS & set(val)


def test_presets_switch_it_on_for_ixi2mm_only():
    for stage in STAGES:
        assert PRESETS["ixi2mm"][stage].get("intensity_augmentation") is True
        assert not PRESETS["demo"][stage].get("intensity_augmentation", False)


def test_training_gammas_are_not_the_shift_evaluations():
    """The evaluation's fixed gamma curves lie outside the training draw."""
    for stage in STAGES:
        parser = _parser(stage)
        lo, hi = next(t["gamma"] for t in parser["scanner_augmentation"] if t["_target_"] == "RandAdjustContrastd")
        for name, steps in SHIFTS.items():
            for step, arg in steps:
                if step.__name__ == "_gamma" and name.startswith("gamma"):
                    assert not lo <= arg <= hi, (stage, name)


def _always(stage: str, dataset: Path, **extra):
    """The stage's training chain with augmentation on and every scanner transform firing."""
    parser = _parser(stage, dataset, intensity_augmentation=True, **extra)
    for i, t in enumerate(parser["scanner_augmentation"]):
        if "prob" in t:
            parser[f"scanner_augmentation#{i}#prob"] = 1.0
    return parser


def _run(chain, entry, seed: int = 0):
    from monai.transforms.transform import apply_transform

    chain.set_random_state(seed)
    return apply_transform(chain, dict(entry))


def test_flow_pairs_share_the_volume_draw(tiny_dataset, monkeypatch):
    """A pair's input and target are slices of ONE augmented volume (in [0, 1], changed by the draw)."""
    from monai_mrngan.transforms.slices import AdjacentSlicePaird

    seen = []
    real = AdjacentSlicePaird.__call__
    monkeypatch.setattr(AdjacentSlicePaird, "__call__", lambda self, d: seen.append(d) or real(self, d))
    parser = _always("flow_generation", tiny_dataset, **{"train#random_transforms": []})
    chain = parser.get_parsed_content("train#preprocessing")
    entry = load_split(tiny_dataset, "training")[0]
    pairs = _run(chain, entry)
    vol = torch.as_tensor(seen[-1]["image"])[0]
    raw = parser.get_parsed_content("volume_transforms")[0](dict(entry))["image"][0]
    assert float(vol.min()) >= 0 and float(vol.max()) <= 1
    assert float((vol - torch.as_tensor(raw)).abs().mean()) > 0.01  # the draw changed the volume
    for p in pairs:
        img, lab = (p["image"][0] + 1) / 2, (p["label"][0] + 1) / 2  # back from the GAN range
        i = int(np.argmin([float((img - vol[..., k]).abs().max()) for k in range(vol.shape[-1])]))
        assert torch.allclose(img, vol[..., i], atol=1e-5)
        assert torch.allclose(lab, vol[..., i + int(p["direction"][0])], atol=1e-5)  # the target: the same draw's next slice


def test_mrngan_runs_share_the_volume_draw(tiny_dataset, monkeypatch):
    """A run's slices and its far end are slices of ONE augmented volume, in [0, 1]."""
    from monai_mrngan.transforms.slices import GapRund

    seen = []
    real = GapRund.__call__
    monkeypatch.setattr(GapRund, "__call__", lambda self, d: seen.append(d) or real(self, d))
    parser = _always("mrngan", tiny_dataset, run_length=4, max_gap=6, gap_fraction=1.0, runs_per_volume=3)
    chain = parser.get_parsed_content("train#preprocessing")
    runs = _run(chain, load_split(tiny_dataset, "training")[0], seed=3)
    vol = torch.as_tensor(seen[-1]["image"])[0]
    for r in runs:
        d, img = int(r["direction"][0]), r["image"]
        assert float(img.min()) >= 0 and float(img.max()) <= 1
        start = int(np.argmin([float((img[0] - vol[..., k]).abs().max()) for k in range(vol.shape[-1])]))
        for t in range(img.shape[0]):
            assert torch.allclose(img[t], vol[..., start + d * t], atol=1e-5)
        far = [k for k in range(vol.shape[-1]) if torch.allclose(r["far_image"][0], vol[..., k], atol=1e-5)]
        assert far and (far[0] - start) * d > 0  # the far end: a slice of the same draw, ahead of the run's start


def test_localizer_slices_stay_in_unit_range(tiny_dataset):
    chain = _always("slice_localization", tiny_dataset).get_parsed_content("train#preprocessing")
    for s in _run(chain, load_split(tiny_dataset, "training")[0]):
        assert float(s["image"].min()) >= 0 and float(s["image"].max()) <= 1


@pytest.mark.parametrize("augment", [False, True])
@pytest.mark.parametrize("intensity", ["linear", "monotone"])
def test_mrngan_cached_prior_follows_the_augmented_contrast_only_with_a_monotone_fit(tiny_dataset, augment, intensity):
    parser = _parser("mrngan", tiny_dataset, use_prior_cache=True, intensity_augmentation=augment, **{"prior_fit#intensity": intensity})
    (run_prior,) = parser.get_parsed_content("run_prior")
    assert run_prior.match_contrast == (augment and intensity == "monotone")
    (val_prior,) = parser.get_parsed_content("val_run_prior")
    assert not val_prior.match_contrast and "@val_run_prior" in parser["validate"]["preprocessing"]["transforms"]  # not augmented


@pytest.mark.parametrize("stage", STAGES)
def test_bias_field_has_no_axial_trend(stage):
    """The bias field draw is neutral on average along the axial axis: with positive-only coefficients (MONAI's
    default range) every drawn field brightens one end of the volume, and a cell trained on such runs learns to
    brighten the slices far from its input (measured: +0.006 over the fitted prior beyond d = 16)."""
    parser = _parser(stage)
    (cfg,) = [t for t in parser["scanner_augmentation"] if t["_target_"] == "RandBiasFieldd"]
    parser["scanner_augmentation"] = [dict(cfg, prob=1.0)]
    (field,) = parser.get_parsed_content("scanner_augmentation")
    profiles = []
    for seed in range(100):
        field.set_random_state(seed)
        out = field({"image": torch.ones(1, 8, 8, 41)})["image"][0].mean((0, 1))
        profiles.append(out / out[20])  # against the centre slice, where an input would sit
    mean = torch.stack(profiles).mean(0)
    assert float((mean - 1).abs().max()) < 0.02, mean


@pytest.mark.parametrize("prob", [0.0, 1.0])
def test_mrngan_prior_mismatch_moves_only_the_run_prior_and_only_in_training(tiny_dataset, prob):
    """prior_mismatch_prob: training runs' cached prior is moved in-plane by one draw for all of its slices (MONAI's
    RandAffined), the run's real slices are not; 0 (the default) adds nothing; validation never has it."""
    parser = _parser("mrngan", tiny_dataset, use_prior_cache=True, prior_mismatch_prob=prob)
    chain = parser.get_parsed_content("prior_augmentation")
    assert "@prior_augmentation" in parser["train"]["preprocessing"]["transforms"]
    assert "@prior_augmentation" not in parser["validate"]["preprocessing"]["transforms"]
    if prob == 0:
        assert chain == []
        return
    assert _names(chain) == ["RandAffined", "EnsureTyped"]
    yy, xx = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    blob = ((yy - 14) ** 2 + (xx - 17) ** 2 < 49).float()
    data = {"prior": torch.stack([blob, 0.5 * blob, 0.8 * blob]), "image": torch.stack([blob] * 3)}
    chain[0].set_random_state(3)
    moved = data
    for t in chain:
        moved = t(moved)
    out = moved["prior"]
    assert type(out) is torch.Tensor and out.dtype == torch.float32 and out.shape == (3, 32, 32)
    assert torch.equal(moved["image"], data["image"])
    assert float((out - data["prior"]).abs().sum()) > 1.0  # moved
    for t in range(1, 3):  # one draw for the whole run: each slice moved as the first
        assert torch.allclose(out[t], out[0] * float(data["prior"][t].max()), atol=1e-5)


def test_mrngan_prior_mismatch_on_open_runs_only(tiny_dataset):
    """prior_mismatch_runs 'open': the mismatch reaches one-slice (open) runs only; a gap run's prior passes untouched."""
    parser = _parser("mrngan", tiny_dataset, use_prior_cache=True, prior_mismatch_prob=1.0, prior_mismatch_runs="open")
    wrapper, last = parser.get_parsed_content("prior_augmentation")
    assert _names(wrapper.transforms.transforms) == ["RandAffined"] and _names([last]) == ["EnsureTyped"]
    yy, xx = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    blob = ((yy - 14) ** 2 + (xx - 17) ** 2 < 49).float()
    wrapper.set_random_state(3)
    prior = MetaTensor(torch.stack([blob] * 3))  # as the cached run prior may come
    gap = last(wrapper({"prior": prior, "far_position": torch.tensor([0.4])}))["prior"]
    assert type(gap) is torch.Tensor and torch.equal(gap, prior.as_tensor())  # untouched, and collates with the others
    for far in (torch.tensor([float("nan")]), None):
        run = {"prior": prior} | ({"far_position": far} if far is not None else {})
        out = last(wrapper(run))["prior"]
        assert type(out) is torch.Tensor and float((out - gap).abs().sum()) > 1.0
