"""The fitted-prior cache (monai_mrngan.atlas.cache): build, resume, invalidation, subjects left out,
runs that start at cached slices, and MRNGAN training reading it through the bundle configs.

A cheap affine fit on the tiny 32 px dataset keeps every build to a few seconds; the atlas bank holds
the training subjects (as the real bank does), so leaving a subject out changes its fit.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from ignite.engine import Events

from monai_mrngan.atlas import cache
from monai_mrngan.atlas.bank import build_mean_prior
from monai_mrngan.atlas.cache import CachedRunPriord, LoadPriorCached, build_prior_cache, check_manifest, read_manifest
from monai_mrngan.atlas.fit import LUT_BINS
from monai_mrngan.atlas.prior import BrainPrior, load_prior
from monai_mrngan.data.positions import HEAD_THRESHOLD
from monai_mrngan.data.datalist import load_split
from monai_mrngan.data.io import InputError, load_volume
from monai_mrngan.engines.recurrent import RecurrentUnroll, RunBatch
from monai_mrngan.networks.recurrent import MRNGAN
from monai_mrngan.transforms.slices import GapRund, SliceRund

FIT = {"mode": "affine", "top_k": 2, "affine_iters": 5, "work_size": 16, "position_search": 0.0}
BUNDLE = Path(__file__).resolve().parents[1] / "bundles" / "mrngan"


@pytest.fixture(scope="module")
def bank(tiny_dataset, tmp_path_factory) -> Path:
    """An atlas bank of the 6 training volumes, with their subjects recorded."""
    out = tmp_path_factory.mktemp("bank")
    build_mean_prior(tiny_dataset, out / "mean_brain.nii.gz", num_positions=24, bank_path=out / "atlas_bank.pt", max_atlases=6)
    return out / "atlas_bank.pt"


@pytest.fixture
def count_fits(monkeypatch):
    """How many volumes the build fits (the one in-process fit function, counted by image)."""
    seen: list[str] = []
    real = cache._fit_volume

    def counted(prior, entry, positions, noise, run_slices=None):
        seen.append(Path(entry["image"]).name)
        return real(prior, entry, positions, noise, run_slices)

    monkeypatch.setattr(cache, "_fit_volume", counted)
    return seen


def _mtimes(folder: Path) -> dict[str, int]:
    return {f.name: f.stat().st_mtime_ns for f in folder.glob("*.pt")}


def test_cache_builds_resumes_and_is_invalidated(tiny_dataset, bank, tmp_path, count_fits):
    out = tmp_path / "cache"
    # a build stopped by its time limit after the first volume: incomplete, refused by training
    m = build_prior_cache(out, tiny_dataset, bank, FIT, position_noise=0.02, time_limit_s=0)
    assert not m["complete"] and len(count_fits) == 1
    with pytest.raises(InputError, match="not complete"):
        check_manifest(out, bank, FIT)
    first = _mtimes(out)
    # the rerun finishes the other volumes and leaves the finished one alone
    m = build_prior_cache(out, tiny_dataset, bank, FIT, position_noise=0.02)
    entries = load_split(tiny_dataset, "training") + load_split(tiny_dataset, "validation")
    assert m["complete"] and len(count_fits) == len(entries) and len(set(count_fits)) == len(entries)
    done = _mtimes(out)
    assert {n: done[n] for n in first} == first and len(done) == len(entries)
    assert check_manifest(out, bank, FIT)["positions"] == pytest.approx([0.1 * i for i in range(1, 10)])
    manifest = read_manifest(out)
    assert manifest["bank"]["size"] == bank.stat().st_size and manifest["fit"]["affine_iters"] == 5 and manifest["seed"] == 0
    assert {v["split"] for v in manifest["volumes"].values()} == {"training", "validation"}

    # one file per volume: uint8 fits on the bank's grid, the nearest slices, the recorded noisy positions
    entry = entries[0]
    state = torch.load(out / "sub-001.pt", weights_only=True, mmap=True)
    assert state["prior"].dtype == torch.uint8 and tuple(state["prior"].shape) == (9, 24, 32, 32)
    pos = np.asarray(entry["positions"])
    np.testing.assert_array_equal(state["slice_indices"].numpy(), [np.abs(pos - p).argmin() for p in np.linspace(0.1, 0.9, 9)])
    np.testing.assert_allclose(state["true_positions"].numpy(), pos[state["slice_indices"].numpy()])
    noise = (state["positions"] - state["true_positions"]).numpy()
    assert 0.002 < np.abs(noise).mean() < 0.06 and len(set(noise.round(8))) == 9

    # a valid cache is not refitted
    build_prior_cache(out, tiny_dataset, bank, FIT, position_noise=0.02)
    assert len(count_fits) == len(entries) and _mtimes(out) == done

    # a changed fit setting rebuilds every volume, and the old fit no longer passes the check
    count_fits.clear()
    build_prior_cache(out, tiny_dataset, bank, {**FIT, "affine_iters": 6}, position_noise=0.02)
    assert len(count_fits) == len(entries) and read_manifest(out)["key"] != manifest["key"]
    with pytest.raises(InputError, match="other fit settings") as err:
        check_manifest(out, bank, FIT)
    assert "\n" not in str(err.value)
    with pytest.raises(InputError, match="no prior cache here"):
        check_manifest(tmp_path / "nowhere", bank, FIT)


def test_cache_leaves_the_subject_out(tiny_dataset, bank, tmp_path):
    """The bank holds every training subject: the cached fit equals a fit without that subject, not one with it."""
    out = tmp_path / "cache"
    build_prior_cache(out, tiny_dataset, bank, FIT, limits={"training": 1, "validation": 0})
    entry = load_split(tiny_dataset, "training")[0]
    state = torch.load(out / "sub-001.pt", weights_only=True)
    vol, _ = load_volume(entry["image"])
    i, p = int(state["slice_indices"][4]), float(state["positions"][4])
    ref = torch.from_numpy(vol[:, :, i])[None, None]
    prior = load_prior(bank, FIT)
    assert entry["subject"] in prior.subjects
    cached = state["prior"][4].float() / 255.0
    left_out = prior.fit(ref, p, exclude=entry["subject"])
    with_own = prior.with_fit(FIT).fit(ref, p)
    assert float((cached - left_out).abs().max()) <= 0.5 / 255 + 1e-6  # the same fit, to uint8 rounding
    assert float((cached - with_own).abs().mean()) > 0.01  # its own scan would be a near-perfect atlas


def _volume(depth: int = 30) -> dict:
    img = torch.arange(depth, dtype=torch.float32).view(1, 1, 1, depth).expand(1, 4, 4, depth).clone()
    return {"image": img, "positions": list(np.linspace(1.0, 0.0, depth)), "prior_starts": [2, 15, 27], "handle": object()}


@pytest.mark.parametrize("sampler", [SliceRund, GapRund])
def test_samplers_start_at_given_slices(sampler):
    data = _volume()
    t = sampler(run_length=6, num_samples=300, starts_key="prior_starts", carry_keys=["handle"])
    t.set_random_state(0)
    out = t(data)
    assert {d["slice_index"] for d in out} == {2, 15, 27} and all(d["handle"] is data["handle"] for d in out)
    for d in out:
        values = d["image"][:, 0, 0]
        assert values[0].item() == d["slice_index"] and torch.all(torch.diff(values) == d["direction"].item())
        assert 0 <= values.min() and values.max() < 30
        if d.get("gap"):
            assert 0 <= d["slice_index"] + d["direction"].item() * d["gap"] < 30
    dirs = {s: {d["direction"].item() for d in out if d["slice_index"] == s} for s in (2, 15, 27)}
    assert dirs == {2: {1.0}, 15: {1.0, -1.0}, 27: {-1.0}}  # only directions in which the run fits
    if sampler is GapRund:
        assert any(d["gap"] for d in out) and any(not d["gap"] for d in out)
    every = sampler(run_length=6, num_samples=None, starts_key="prior_starts")(data)
    assert [d["slice_index"] for d in every if not d.get("gap")] == [2, 15, 27]
    with pytest.raises(KeyError, match="prior_starts"):
        sampler(run_length=6, starts_key="prior_starts")({k: v for k, v in data.items() if k != "prior_starts"})
    with pytest.raises(ValueError, match="no run of 39 slices fits"):  # 39 slices from 2, 15 or 27 leave a 40-slice volume
        sampler(run_length=39, starts_key="prior_starts")(_volume(40))


def test_runs_read_the_cached_fit_at_their_noisy_positions(tiny_dataset, bank, tmp_path):
    out = tmp_path / "cache"
    build_prior_cache(out, tiny_dataset, bank, FIT, position_noise=0.03, limits={"training": 2, "validation": 0})
    entry = load_split(tiny_dataset, "training")[1]
    d = LoadPriorCached(out, bank, FIT)(entry)
    state = torch.load(out / "sub-002.pt", weights_only=True)
    assert d["prior_starts"] == state["slice_indices"].tolist()
    vol = torch.from_numpy(load_volume(entry["image"])[0])[None]
    t = GapRund(run_length=5, num_samples=6, starts_key="prior_starts", carry_keys=["prior_cache"], max_gap=6)
    t.set_random_state(3)
    runs = [CachedRunPriord()(r) for r in t({**d, "image": vol})]
    for r in runs:
        n = d["prior_starts"].index(r["slice_index"])
        offset = float(state["positions"][n] - state["true_positions"][n])
        assert "prior_cache" not in r and r["position_offset"].item() == pytest.approx(offset, abs=1e-6)
        # what BrainPrior.slice_at reads from that fitted volume at the positions the cell is told
        fitted = BrainPrior(state["prior"][n].float() / 255.0, state["grid"])
        expect = fitted.slice_at(torch.as_tensor(r["positions"], dtype=torch.float64) + offset)[:, 0]
        torch.testing.assert_close(r["prior"], expect, atol=1e-5, rtol=0)
    # collated runs: RunBatch takes the recorded offset (no random noise) and hands the slices to the unroll
    batch = {k: torch.stack([torch.as_tensor(r[k]) for r in runs]) for k in ("image", "positions", "direction", "far_image", "far_position", "prior", "position_offset")}
    start, target, _, kw = RunBatch(position_noise=0.5)(batch)
    torch.testing.assert_close(kw["positions"], batch["positions"] + batch["position_offset"])
    assert kw["prior"].shape == (6, 5, 1, 32, 32)
    seen = []
    model = MRNGAN(hidden_channels=4, features=4)
    real = model.unroll
    model.unroll = lambda *a: seen.append(a[4](a[1])) or real(*a)
    RecurrentUnroll(model, lambda x, d: x, prior=None)(start, **kw)
    torch.testing.assert_close(seen[0], kw["prior"])
    with pytest.raises(InputError, match="not in the prior cache"):
        LoadPriorCached(out, bank, FIT)(load_split(tiny_dataset, "training")[3])


def test_cached_run_prior_takes_the_augmented_input_contrast(tiny_dataset, bank, tmp_path):
    """match_contrast: the run's cached prior (fitted to the un-augmented volume) follows a contrast curve applied
    to the run's slices (as scanner augmentation draws one), monotone along intensity, air kept at 0."""
    out = tmp_path / "cache"
    build_prior_cache(out, tiny_dataset, bank, {**FIT, "intensity": "monotone"}, limits={"training": 1, "validation": 0})
    entry = load_split(tiny_dataset, "training")[0]
    d = LoadPriorCached(out, bank, {**FIT, "intensity": "monotone"})(entry)
    vol = torch.from_numpy(load_volume(entry["image"])[0])[None]
    t = GapRund(run_length=5, num_samples=8, starts_key="prior_starts", carry_keys=["prior_cache"], gap_fraction=0.0)
    t.set_random_state(0)
    checked = 0
    for r in t({**d, "image": vol.clamp(0, 1) ** 2.0}):  # the same volume through a gamma curve
        plain = CachedRunPriord()(dict(r))["prior"]
        matched = CachedRunPriord(match_contrast=True)(dict(r))["prior"]
        if int(((plain[0] > HEAD_THRESHOLD) | (r["image"][0] > HEAD_THRESHOLD)).sum()) < 4 * LUT_BINS:
            continue  # a start slice with too little head to fit a table: mapped by the identity (by design)
        checked += 1
        head = plain > 0.1
        assert float((matched[plain == 0]).abs().max()) == 0
        order = plain[head].argsort()
        assert bool((matched[head][order].diff() >= -1e-6).all())  # a monotone function of the plain prior
        err = lambda p: float((p - plain**2.0)[head].abs().mean())  # the gamma curve applied to the prior itself
        assert err(matched) < 0.5 * err(plain)
    assert checked >= 2


def test_a_cache_for_short_runs_warps_only_their_slices_and_refuses_longer_runs(tiny_dataset, bank, tmp_path):
    whole, short = tmp_path / "whole", tmp_path / "short"
    for out, rs in ((whole, None), (short, 4)):
        build_prior_cache(out, tiny_dataset, bank, FIT, limits={"training": 1, "validation": 0}, run_slices=rs)
    entry = load_split(tiny_dataset, "training")[0]
    a, b = (torch.load(out / "sub-001.pt", weights_only=True) for out in (whole, short))
    assert b["filled"].float().mean() < 0.6 and a["filled"].all()
    vol = torch.from_numpy(load_volume(entry["image"])[0])[None]
    for run_length, ok in ((5, True), (9, False)):
        d = LoadPriorCached(short, bank, FIT)(entry)
        t = SliceRund(run_length=run_length, num_samples=4, starts_key="prior_starts", carry_keys=["prior_cache"])
        t.set_random_state(1)
        runs = t({**d, "image": vol})
        if not ok:
            with pytest.raises(ValueError, match="reaches beyond the cached fit"):
                [CachedRunPriord()(r) for r in runs]
            continue
        ref = LoadPriorCached(whole, bank, FIT)(entry)
        for r in runs:  # where the short cache serves a run, it reads what the whole-volume cache reads
            got = CachedRunPriord()(r)["prior"]
            want = CachedRunPriord()({**r, "prior_cache": ref["prior_cache"]})["prior"]
            torch.testing.assert_close(got, want, atol=2 / 255, rtol=0)


def test_bundle_builds_the_cache_and_trains_on_it(tiny_dataset, bank, tmp_path):
    from monai.bundle import ConfigWorkflow

    from test_mrngan import _train_overrides

    cfg = BUNDLE / "configs"
    ov = {**_train_overrides(tiny_dataset, tmp_path), "prior_path": str(bank), "prior_fit": FIT, "use_prior_cache": True, "cache_workers": 1}
    build = ConfigWorkflow(workflow_type="train", config_file=[str(cfg / "train.json"), str(cfg / "prior_cache.json")], **ov)
    build.initialize()
    build.run()
    build.finalize()
    manifest = json.loads((tmp_path / "models" / "prior_cache" / "manifest.json").read_text())
    assert manifest["complete"] and len(manifest["volumes"]) == 7 and manifest["fit"]["mode"] == "affine"

    train = ConfigWorkflow(workflow_type="train", config_file=str(cfg / "train.json"), **ov)
    train.initialize()
    trainer = train.parser.get_parsed_content("train#trainer")
    batches = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: batches.append(e.state.batch))
    train.run()
    train.finalize()
    assert len(batches) == 3 and (tmp_path / "models" / "model.pt").is_file()
    runs = batches[0]  # decollated: one dict per run
    assert len(runs) == 4 and all(r["prior"].shape == (4, 32, 32) and r["position_offset"].shape == (1,) for r in runs)
    assert sum(abs(float(r["position_offset"])) for r in runs) > 0

    stale = ConfigWorkflow(workflow_type="train", config_file=str(cfg / "train.json"), **{**ov, "prior_fit": {**FIT, "top_k": 3}})
    stale.initialize()
    with pytest.raises(RuntimeError) as err:  # MONAI wraps what the component raised
        stale.parser.get_parsed_content("train#dataset")
    assert isinstance(err.value.__cause__, InputError) and "other fit settings" in str(err.value.__cause__)
