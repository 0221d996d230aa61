"""Brain generalization stage: mean brain + patient fit, GAN networks and trainer, the bundle end to end."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from monai_mrngan.data.datalist import load_split
from monai_mrngan.data.io import InputError, load_volume
from monai_mrngan.atlas.bank import build_mean_prior, mean_brain, resample_to_positions
from monai_mrngan.atlas.prior import BrainPrior, FitConfig, load_prior
from monai_mrngan.metrics.image import slice_metrics
from monai_mrngan.networks.gan import (
    DCGANSet,
    GeneralBrain,
    build_generator_from_checkpoint,
    export_generator,
    make_discriminator,
    make_generator,
)

pytestmark = pytest.mark.filterwarnings("ignore")

BUNDLE = Path(__file__).resolve().parents[1] / "bundles" / "brain_generalization"
FAST_FIT = {"work_size": 32, "affine_iters": 20, "deform_iters": 20, "grid_points": 6}


# ---------------------------------------------------------------------------- mean brain
def test_resample_to_positions_interpolates_and_marks_outside():
    vol = np.stack([np.full((4, 4), float(i)) for i in range(5)], -1).astype(np.float32)  # value = index
    positions = [0.8, 0.6, 0.4, 0.2, 0.0]  # RAS: p falls as the index rises
    out = resample_to_positions(vol, positions, [1.0, 0.7, 0.5, 0.0])
    assert out.shape == (4, 4, 4)
    assert np.isnan(out[0]).all()  # p = 1 is below the volume's lowest slice
    assert np.allclose(out[1], 0.5) and np.allclose(out[2], 1.5) and np.allclose(out[3], 4.0)
    bank = np.stack([out, out + 1])
    m = mean_brain(bank)
    assert np.allclose(m[0], 0.0) and np.allclose(m[1], 1.0)


def test_build_mean_prior_roundtrip(tiny_dataset, tmp_path):
    out = build_mean_prior(tiny_dataset, tmp_path / "mean.nii.gz", num_positions=24, bank_path=tmp_path / "bank.pt", max_atlases=3)
    prior = load_prior(out)
    assert prior.bank.shape == (1, 24, 32, 32)
    assert json.loads((tmp_path / "mean.positions.json").read_text())["positions"][0] == 1.0
    bank = load_prior(tmp_path / "bank.pt", device="cpu")
    assert bank.bank.shape == (3, 24, 32, 32) and bank.bank.dtype == torch.uint8  # held as stored, no float copy
    as_float = BrainPrior(bank.bank.float() / 255.0, bank.positions)  # held as fp16: equal within its rounding
    assert torch.allclose(bank.mean, as_float.mean, atol=1e-3)
    assert torch.allclose(bank.plain(torch.tensor([0.3, 0.71])), as_float.plain(torch.tensor([0.3, 0.71])), atol=1e-3)
    # the mean brain at each slice's p is the mean of the training volumes' slices there (up to re-interpolation)
    entries = load_split(tiny_dataset, "training")
    expected = np.mean([load_volume(e["image"])[0] for e in entries], 0)
    got = np.moveaxis(prior.volume(entries[0]["positions"]).numpy(), 0, -1)
    assert np.abs(got - expected).mean() < 0.01
    assert np.abs(got - expected[..., ::-1]).mean() > 0.05  # orientation along p matters


# ---------------------------------------------------------------------------- patient fit
def _bank_of(dataset) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
    """The tiny dataset's training volumes, their grid of p, and all but the last as a (K, P, H, W) bank."""
    entries = load_split(dataset, "training")
    vols = [load_volume(e["image"])[0] for e in entries]
    return vols, np.asarray(entries[0]["positions"]), np.stack([np.moveaxis(v, -1, 0) for v in vols[:-1]])


def _shifted_head(vol: np.ndarray, shift: int, gain: float) -> np.ndarray:
    return np.clip(np.roll(vol, shift, axis=0) * gain, 0, 1)


@pytest.mark.parametrize("mode", ["affine", "deformable"])
def test_fit_from_one_slice_moves_the_head(tiny_dataset, mode):
    """A patient whose head is shifted and brighter: the prior fitted from ONE slice beats the plain prior on the others."""
    vols, grid, bank = _bank_of(tiny_dataset)
    patient = _shifted_head(vols[-1], 5, 1.2)
    prior = BrainPrior(bank, grid, FitConfig(mode=mode, top_k=2, **FAST_FIT))
    i = 10
    ref = torch.from_numpy(patient[..., i])[None, None]
    others = [j for j in range(len(grid)) if j != i and patient[..., j].max() > 0.2]
    truth = torch.from_numpy(np.moveaxis(patient[..., others], -1, 0))[:, None]
    pos = torch.from_numpy(grid[others])
    plain = slice_metrics(prior.slice_at(pos), truth)
    fitted = slice_metrics(prior.slice_at(pos, ref, float(grid[i])), truth)
    assert fitted["psnr"].mean() > plain["psnr"].mean() + 1.0
    assert torch.nanmean(fitted["ssim_head"]) > torch.nanmean(plain["ssim_head"]) + 0.02
    fit = prior.last_fit
    assert fit is not None and len(fit.atlas_index) == 2
    assert float(fit.theta[0, 1, 2].abs()) > 0.15  # moved the head along array axis 0 (5 px of 32 = 0.31 normalised units)


def test_slice_at_contract_and_bad_inputs(tiny_dataset, tmp_path):
    prior = load_prior(build_mean_prior(tiny_dataset, tmp_path / "m.nii.gz", num_positions=12), FAST_FIT)
    out = prior.slice_at(torch.tensor([0.0, 0.33, 1.0]))
    assert out.shape == (3, 1, 32, 32) and out.min() >= 0 and out.max() <= 1
    ref = prior.slice_at(torch.tensor([0.5]))
    fitted = prior.slice_at(torch.tensor([0.2, 0.8]), ref, 0.5)
    assert fitted.shape == (2, 1, 32, 32) and 0 <= float(fitted.min()) and float(fitted.max()) <= 1
    assert prior.slice_at(torch.tensor([0.2, 0.8]), ref, 0.5) is not fitted  # cached fit, fresh slices
    with pytest.raises(ValueError, match="reference slice must be"):
        prior.slice_at(torch.tensor([0.5]), torch.zeros(1, 1, 16, 16), 0.5)
    with pytest.raises(ValueError, match="reference_position"):
        prior.slice_at(torch.tensor([0.5]), ref, None)
    with pytest.raises(ValueError, match="finite"):
        prior.slice_at(torch.tensor([float("nan")]))
    with pytest.raises(ValueError, match="fit mode"):
        FitConfig(mode="elastic")


def test_load_prior_bad_files(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        load_prior(tmp_path / "missing.nii.gz")
    bad = tmp_path / "prior.txt"
    bad.write_text("hello")
    with pytest.raises(InputError, match="unsupported prior file"):
        load_prior(bad)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(InputError, match="junk.pt"):
        load_prior(junk)
    torch.save({"weights": torch.zeros(2)}, tmp_path / "nokind.pt")
    with pytest.raises(InputError, match="no 'kind'"):
        load_prior(tmp_path / "nokind.pt")
    trunc = tmp_path / "t.nii.gz"
    trunc.write_bytes(b"\x1f\x8b\x08\x00garbage")
    with pytest.raises(InputError, match="t.nii.gz"):
        load_prior(trunc)


# ---------------------------------------------------------------------------- GAN networks + trainer
@pytest.mark.parametrize("route", ["cgan", "dcgan", "dcgan_set"])
def test_generators_shapes_range_and_export(route, tmp_path):
    g, d = make_generator(route, 32, 100, 16, num_bins=3), make_discriminator(route, 32, 8, num_bins=3)
    z, p = torch.randn(5, 100), torch.rand(5)
    x = g.generate(z, p)
    assert x.shape == (5, 1, 32, 32) and x.abs().max() <= 1.0
    logits = d(x, p) if route != "dcgan" else d(x)
    assert logits.shape == ((5, 2) if route == "cgan" else (5, 1))  # cgan: AC-GAN [real/fake, position] logits
    if route == "cgan":
        assert make_discriminator(route, 32, 8, aux_position=False)(x, p).shape == (5, 1)
    path = tmp_path / "g.pt"
    torch.save(export_generator(g), path)
    g2, kind, _ = build_generator_from_checkpoint(torch.load(path, weights_only=True))
    assert kind == route
    g.eval(), g2.eval()
    assert torch.allclose(g.generate(z, p), g2.generate(z, p), atol=1e-6)
    brain = GeneralBrain(g, num_samples=3)
    out = brain(torch.tensor([0.1, 0.9]))
    assert out.shape == (2, 1, 32, 32) and 0 <= float(out.min()) and float(out.max()) <= 1
    prior = load_prior(path, num_positions=6, num_samples=2)
    assert prior.bank.shape == (1, 6, 32, 32)


def test_cgan_generator_depends_on_position():
    from monai_mrngan.networks.gan import ConditionalGenerator

    torch.manual_seed(0)
    g = ConditionalGenerator(32, 100, 16, output_bias=0.0).eval()
    z = torch.randn(1, 100).expand(2, -1)
    x = g(z, torch.tensor([0.1, 0.9]))
    assert (x[0] - x[1]).abs().max() > 0.01 * x.abs().max() > 0


def test_dcgan_set_activation_copies_neighbour():
    s = make_generator("dcgan_set", 16, 8, 8, num_bins=3)
    assert s.active.tolist() == [False, True, False] and s.route(0) == 1
    assert s.activate(2) and not s.activate(2)
    for a, b in zip(s.members[2].parameters(), s.members[1].parameters()):
        assert torch.equal(a, b)
    assert s.route(0) == 1 and s.route(2) == 2


@pytest.mark.parametrize("aux", [True, False])
def test_trainer_updates_discriminator_once_per_three_generator_steps(aux):
    from monai_mrngan.engines.cgan import ConditionalGanTrainer

    g, d = make_generator("cgan", 16, 8, 8), make_discriminator("cgan", 16, 4, aux_position=aux)
    go, do = torch.optim.Adam(g.parameters(), 2e-4, betas=(0.5, 0.999)), torch.optim.Adam(d.parameters(), 2e-4, betas=(0.5, 0.999))
    counts = {"g": 0, "d": 0}
    go.register_step_post_hook(lambda *a: counts.__setitem__("g", counts["g"] + 1))
    do.register_step_post_hook(lambda *a: counts.__setitem__("d", counts["d"] + 1))
    data = [{"image": torch.rand(4, 1, 16, 16) * 2 - 1, "position": torch.rand(4, 1)} for _ in range(6)]
    trainer = ConditionalGanTrainer("cpu", 1, data, g, go, d, do, latent_size=8, g_steps_per_d=3)
    trainer.run()
    assert counts == {"g": 6, "d": 2}
    out = trainer.state.output
    assert math.isfinite(out["g_loss"]) and math.isfinite(out["d_loss"]) and out["fakes"].shape == (4, 1, 16, 16)
    with pytest.raises(ValueError, match="g_steps_per_d"):
        ConditionalGanTrainer("cpu", 1, data, g, go, d, do, g_steps_per_d=0)


# ---------------------------------------------------------------------------- bundle end to end
def _workflow(config_files, workflow_type, **override):
    from monai.bundle import ConfigWorkflow

    files = [str(BUNDLE / "configs" / f) for f in config_files]
    wf = ConfigWorkflow(
        workflow_type=workflow_type, config_file=files if len(files) > 1 else files[0],
        logging_file=str(BUNDLE / "configs" / "logging.conf"), meta_file=str(BUNDLE / "configs" / "metadata.json"), **override,
    )
    wf.initialize()
    if workflow_type:
        assert wf.check_properties() == []
    wf.run()
    wf.finalize()
    return wf


TINY = {"image_size": 32, "g_channels": 16, "d_channels": 4, "samples_per_volume": 4, "val_volumes": 1, "val_latents": 2}


def test_bundle_train_infer_evaluate(tiny_dataset, tmp_path):
    common = {"bundle_root": str(BUNDLE), "dataset_dir": str(tiny_dataset), "ckpt_dir": str(tmp_path / "models"), "output_dir": str(tmp_path / "eval")}
    wf = _workflow(["train.json"], "train", **common, **TINY, epochs=1)
    assert wf.parser.get_parsed_content("train#trainer").state.epoch == 1
    assert (tmp_path / "models" / "model.pt").is_file() and (tmp_path / "models" / "last.pt").is_file()
    assert list((tmp_path / "eval" / "train_img").glob("events.*"))
    # resume: a second run with epochs=2 continues from epoch 1
    wf = _workflow(["train.json"], "train", **common, **TINY, epochs=2)
    assert wf.parser.get_parsed_content("train#trainer").state.iteration == 2 * 2  # 6 volumes / 4 per batch = 2 iterations per epoch
    _workflow(["inference.json"], "infer", **common, image_size=32, g_channels=16, num_positions=12, num_samples=2)
    brain = tmp_path / "eval" / "general_brain_cgan.nii.gz"
    assert load_volume(brain)[0].shape == (32, 32, 12)
    assert load_prior(tmp_path / "models" / "generator_cgan.pt", num_positions=5, num_samples=1).bank.shape == (1, 5, 32, 32)
    _workflow(["mean_brain.json"], None, bundle_root=str(BUNDLE), dataset_dir=str(tiny_dataset), ckpt_dir=str(tmp_path / "models"), num_positions=24, max_atlases=4)
    fit = {"mode": "affine", "top_k": 2, "work_size": 32, "affine_iters": 10}
    _workflow(["train.json", "evaluate.json"], "train", **common, **TINY, **{"evaluate#fit": fit, "evaluate#reference_positions": [0.5]})
    res = json.loads((tmp_path / "eval" / "prior_eval" / "metrics.json").read_text())
    assert {"mean_brain", "atlas_bank", "cgan"} <= set(res)
    assert res["atlas_bank"]["fitted"]["overall"]["psnr"] > res["atlas_bank"]["plain"]["overall"]["psnr"]
    assert "bin 4" in (tmp_path / "eval" / "prior_eval" / "metrics.md").read_text()
    # no localizer weights: position consistency falls back to template matching on the mean brain
    assert res["mean_brain"]["position_consistency_template"]["mae"] < 0.05
    assert 0 <= res["cgan"]["position_consistency_template"]["mae"] <= 1
    assert (tmp_path / "eval" / "prior_eval" / "samples.png").stat().st_size > 1000


def test_bundle_dcgan_set_route(tiny_dataset, tmp_path):
    common = {"bundle_root": str(BUNDLE), "dataset_dir": str(tiny_dataset), "ckpt_dir": str(tmp_path / "models"), "output_dir": str(tmp_path / "eval")}
    wf = _workflow(["train.json"], "train", **common, **TINY, epochs=2, route="dcgan_set", num_bins=3, epochs_per_bin=1)
    g = wf.parser.get_parsed_content("gnetwork")
    assert isinstance(g, DCGANSet) and g.active.tolist() == [False, True, True]


def test_bundle_configs_complete():
    meta = json.loads((BUNDLE / "configs" / "metadata.json").read_text())
    assert meta["version"] in meta["changelog"] and "network_data_format" in meta
    for name in ("train.json", "evaluate.json", "inference.json", "multi_gpu_train.json", "mean_brain.json", "logging.conf"):
        assert (BUNDLE / "configs" / name).is_file(), name
    assert (BUNDLE / "docs" / "README.md").is_file() and (BUNDLE / "LICENSE").is_file()


# ---------------------------------------------------------------------------- position search
def _moving_square_volume(offset: float, n: int = 41, size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """(P, H, W) head discs with a bright square whose column moves with ``p + offset``; and the grid ``p``."""
    grid = np.linspace(1.0, 0.0, n)
    yy, xx = np.mgrid[:size, :size]
    disc = ((yy - size / 2) ** 2 + (xx - size / 2) ** 2 < (size * 0.4) ** 2).astype(np.float32) * 0.4
    vols = []
    for p in grid:
        s = disc.copy()
        c = int(round(size / 2 + 20 * (p + offset - 0.5)))
        s[size // 2 - 3 : size // 2 + 3, max(0, c - 3) : c + 3] = 1.0
        vols.append(s)
    return np.stack(vols), grid


def test_locate_and_position_search_correct_a_wrong_position():
    from monai_mrngan.atlas.prior import template_localizer_for
    from monai_mrngan.inference.reconstruct import refine_positions

    atlases = [_moving_square_volume(o)[0] for o in (-0.01, 0.0, 0.01, 0.02)]
    _, grid = _moving_square_volume(0.0)
    fit = dict(mode="affine", top_k=2, **FAST_FIT)
    prior = BrainPrior(np.stack(atlases), grid, FitConfig(**fit, position_search=0.0))
    patient, _ = _moving_square_volume(0.06)  # this head's anatomy sits 0.06 in p away from the atlases'
    i = 20  # p = 0.5; its square is where the atlases have it at p = 0.56
    ref = torch.from_numpy(patient[i])[None, None]
    located = prior.locate(ref, 0.45, window=0.15)
    assert abs(located - 0.56) < 0.04  # from 0.11 off; squares move 0.2 px per 0.01 in p, so 0.03 is pixel-level
    # refinement scans the template's estimate's window too, in the same scan: the best match of both windows
    # (near-tied candidates, e.g. 0.53 and 0.55, can swap with the CPU's float rounding, so compare with that scan)
    also = template_localizer_for(prior)(ref).tolist()
    refined = float(refine_positions(prior, ref, [0.45], 0.15)[0])
    assert refined == pytest.approx(prior.locate(ref, [0.45, also[0]], window=0.15), abs=1e-6)
    assert abs(refined - 0.56) < 0.04
    assert float(refine_positions(prior, ref, [0.45], 0.0)[0]) == pytest.approx(0.45)  # window 0: unchanged
    # a localizer far off (0.5 in p, beyond its window): the mean-brain template's window is scanned too
    assert prior.locate(ref, 0.05, window=0.12) < 0.2  # alone, the search stays near the wrong estimate
    assert abs(prior.locate(ref, [0.05, 0.6], window=0.12) - located) < 1e-6  # one scan over both windows: the better match
    assert abs(prior.locate(ref, [0.6, 0.05], window=0.12) - located) < 1e-6  # whichever estimate comes first
    assert abs(float(refine_positions(prior, ref, [0.05], 0.12)[0]) - 0.56) < 0.04
    one = BrainPrior(atlases[0], grid)
    assert float(refine_positions(one, ref, [0.45], 0.15)[0]) == pytest.approx(0.45)  # one volume: nothing to vote
    # per-atlas position search: the fitted prior follows the patient's anatomy along p
    truth = torch.from_numpy(patient)[:, None]
    plain_fit = slice_metrics(prior.slice_at(torch.from_numpy(grid), ref, 0.5), truth)
    searched = prior.with_fit(FitConfig(**fit, position_search=0.1))
    search_fit = slice_metrics(searched.slice_at(torch.from_numpy(grid), ref, 0.5), truth)
    assert search_fit["psnr"].mean() > plain_fit["psnr"].mean() + 1.0
    assert all(abs(s - 0.06) < 0.04 for s in searched.last_fit.config["shifts"])


def test_fit_leaves_the_subject_out_of_the_bank(tiny_dataset, tmp_path):
    """Training fits the prior with the run's own subject excluded: its atlas must never be chosen."""
    build_mean_prior(tiny_dataset, tmp_path / "mean.nii.gz", num_positions=24, bank_path=tmp_path / "bank.pt", max_atlases=4)
    prior = load_prior(tmp_path / "bank.pt", FitConfig(mode="affine", top_k=2, **FAST_FIT))
    entries = load_split(tiny_dataset, "training")
    assert prior.subjects == [e["subject"] for e in entries[:4]]
    own, _ = load_volume(entries[0]["image"])
    i = own.shape[2] // 2
    ref = torch.from_numpy(own[..., i])[None, None]
    p = float(entries[0]["positions"][i])
    prior.fit(ref, p)
    assert 0 in prior.last_fit.atlas_index.tolist()  # its own scan matches best
    prior.fit(ref, p, exclude=entries[0]["subject"])
    assert 0 not in prior.last_fit.atlas_index.tolist() and len(prior.last_fit.atlas_index) == 2
    with pytest.raises(ValueError, match="atlases"):
        BrainPrior(prior.bank, prior.positions, subjects=["a"])


def test_fit_cache_keeps_several_inputs(tiny_dataset, monkeypatch):
    """A few-slice reconstruction alternates between inputs: each is fitted once, not once per run."""
    entries = load_split(tiny_dataset, "training")
    vols = [load_volume(e["image"])[0] for e in entries]
    grid = np.asarray(entries[0]["positions"])
    prior = BrainPrior(np.stack([np.moveaxis(v, -1, 0) for v in vols[:-1]]), grid, FitConfig(mode="affine", top_k=2, **FAST_FIT))
    import monai_mrngan.atlas.prior as prior_module

    calls = []
    real = prior_module.fit_batch
    monkeypatch.setattr(prior_module, "fit_batch", lambda bank, work, grid, refs, *a, **k: calls.append(len(refs)) or real(bank, work, grid, refs, *a, **k))
    refs = [(torch.from_numpy(vols[-1][..., i])[None, None], float(grid[i])) for i in (8, 12, 16)]
    first = [prior.fit(r, p).clone() for r, p in refs]
    again = [prior.fit(r, p) for r, p in refs[::-1]][::-1]
    assert calls == [1, 1, 1]  # each input fitted once
    assert all(torch.equal(a, b) for a, b in zip(first, again))


def test_fit_cache_holds_a_batch_larger_than_its_size(tiny_dataset, monkeypatch):
    """A stack of more inputs than FIT_CACHE_SIZE is fitted in one call, then each input's slices and spread are read
    back one by one (as a reconstruction and its uncertainty map do): no input is fitted twice."""
    import monai_mrngan.atlas.prior as prior_module

    entries = load_split(tiny_dataset, "training")
    vols = [load_volume(e["image"])[0] for e in entries]
    grid = np.asarray(entries[0]["positions"])
    prior = BrainPrior(np.stack([np.moveaxis(v, -1, 0) for v in vols[:-1]]), grid, FitConfig(mode="affine", top_k=2, **FAST_FIT))
    monkeypatch.setattr(prior_module, "FIT_CACHE_SIZE", 3)
    calls = []
    real = prior_module.fit_batch
    monkeypatch.setattr(prior_module, "fit_batch", lambda bank, work, grid, refs, *a, **k: calls.append(len(refs)) or real(bank, work, grid, refs, *a, **k))
    idx = list(range(4, 16, 2))  # 6 inputs, twice the cache's size
    refs = torch.stack([torch.from_numpy(vols[-1][..., i])[None] for i in idx])
    pos = [float(grid[i]) for i in idx]
    prior.fit_many(refs, pos)
    for r, p in zip(refs, pos):
        prior.slice_at(torch.tensor([p]), r[None], p)
        prior.spread_at(torch.tensor([p]), r[None], p)
    assert sum(calls) == len(idx)
    prior.fit(torch.from_numpy(vols[-1][..., 17])[None, None], float(grid[17]))
    assert len(prior._cache) == 3  # the next fit brings the cache back to its size


# ---------------------------------------------------------------------------- batched fit
def _reference_fit(prior: BrainPrior, ref: torch.Tensor, p0: float) -> tuple[torch.Tensor, list[int]]:
    """The fit written atlas by atlas (no position search, no preselection): align each atlas slice at p0
    alone, keep the top_k, warp every slice of each kept atlas alone, gain-map, average."""
    from monai_mrngan.atlas.registration import SliceFit, intensity_map, register_slices, warp

    cfg = prior.config
    fits = []
    for a in range(prior.bank.shape[0]):
        moving = prior._interp(prior.bank[a].float(), torch.tensor([p0]))
        f = register_slices(moving, ref, cfg)
        fits.append((float(f.score[0]), a, f, moving))
    fits.sort(key=lambda t: -t[0])
    out = torch.zeros_like(prior.mean)
    weight = torch.exp(-(prior.positions - p0).abs() / cfg.decay).float()
    for _, a, f, moving in fits[: cfg.top_k]:
        gain, _ = intensity_map(warp(moving, f.grid(prior.shape)), ref)
        for i in range(len(prior.positions)):
            one = SliceFit(f.theta, f.disp, gain, torch.zeros(1), torch.tensor([a]), f.score)
            out[i] += (warp(prior.bank[a, i].float()[None, None], one.grid(prior.shape, weight[i : i + 1]))[0, 0] * gain[0]).clamp(0, 1)
    return out / cfg.top_k, [a for _, a, _, _ in fits[: cfg.top_k]]


@pytest.mark.parametrize("mode", ["affine", "deformable"])
def test_batched_fit_equals_the_per_atlas_reference(tiny_dataset, mode):
    vols, grid, bank = _bank_of(tiny_dataset)
    prior = BrainPrior(bank, grid, FitConfig(mode=mode, top_k=2, preselect=10, **FAST_FIT))
    ref = torch.from_numpy(_shifted_head(vols[-1], 3, 1.1)[..., 10])[None, None]
    got = prior.fit(ref, float(grid[10]))
    want, kept = _reference_fit(prior, ref, float(grid[10]))
    assert sorted(prior.last_fit.atlas_index.tolist()) == sorted(kept)
    print(f"batched vs per-atlas: mean {float((got - want).abs().mean()):.2e}, max {float((got - want).abs().max()):.2e}")
    assert (got - want).abs().mean() < 1e-3 and (got - want).abs().max() < 0.05  # the work-size bank is fp16


def test_fit_many_equals_one_at_a_time_and_reuses_the_refinement_scan(tiny_dataset, monkeypatch):
    vols, grid, bank = _bank_of(tiny_dataset)
    prior = BrainPrior(bank, grid, FitConfig(mode="deformable", top_k=2, preselect=1, position_search=0.04, **FAST_FIT))
    idx = (8, 12, 16)
    refs = torch.stack([torch.from_numpy(vols[-1][..., i])[None] for i in idx])
    together = prior.with_fit(prior.config).fit_many(refs, [float(grid[i]) for i in idx])
    for j, i in enumerate(idx):
        alone = prior.with_fit(prior.config).fit(refs[j : j + 1], float(grid[i]))
        assert torch.allclose(together[j], alone, atol=1e-5)
    import monai_mrngan.atlas.prior as prior_module

    scans = []
    real = prior_module.scan
    monkeypatch.setattr(prior_module, "scan", lambda *a, **k: scans.append(1) or real(*a, **k))
    fresh = prior.with_fit(prior.config)
    p = fresh.locate(refs[1:2], float(grid[12]) + 0.03, window=0.1)
    fresh.fit(refs[1:2], p)
    assert len(scans) == 1  # the fit's candidates lie inside the refinement's scan: reused


def test_fit_warps_only_the_slices_asked_for_and_the_rest_later(tiny_dataset, monkeypatch):
    """``within`` limits the warp to the grid slices around the asked positions; asking later for others
    warps them from the kept transforms (no refit), and every slice equals the whole-volume fit."""
    vols, grid, bank = _bank_of(tiny_dataset)
    prior = BrainPrior(bank, grid, FitConfig(mode="deformable", top_k=2, preselect=1, **FAST_FIT))
    ref, p0 = torch.from_numpy(vols[-1][..., 10])[None, None], float(grid[10])
    whole = prior.with_fit(prior.config).fit(ref, p0)
    part = prior.with_fit(prior.config)
    ask = torch.tensor([float(grid[11]), (float(grid[12]) + float(grid[13])) / 2])
    got = part.slice_at(ask, ref, p0)
    vol = part.fit_many(ref, [p0], within=[ask])[0]
    warped = vol.flatten(1).abs().sum(1) > 0
    near = [int((part.positions - p).abs().argmin()) for p in (float(grid[11]), float(grid[12]), float(grid[13]))]
    assert warped[near].all() and int(warped.sum()) <= 4  # the grid slices bracketing the asked positions
    assert torch.allclose(got, prior.with_fit(prior.config).slice_at(ask, ref, p0), atol=1e-6)
    import monai_mrngan.atlas.prior as prior_module

    monkeypatch.setattr(prior_module, "fit_batch", lambda *a, **k: pytest.fail("refitted"))
    assert torch.allclose(part.fit(ref, p0), whole, atol=1e-5)


def test_the_displacement_upsampling_is_bicubic_interpolation_in_the_grid_layout():
    """The deformable fit's matrix upsampling of the coarse displacement equals F.interpolate (bicubic, corners
    aligned), laid out as a sampling-grid offset (K, s, s, 2) and contiguous."""
    from torch.nn import functional as F

    from monai_mrngan.atlas.registration import bicubic_matrix, upsample_displacement

    disp = torch.randn(3, 2, 6, 6)
    got = upsample_displacement(disp, bicubic_matrix(6, 20))
    ref = F.interpolate(disp, size=(20, 20), mode="bicubic", align_corners=True).permute(0, 2, 3, 1)
    assert got.is_contiguous()
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)


def test_prior_headroom_carried_miss_counts_what_the_best_gain_removes():
    """The second oracle of scripts/bench/prior_headroom: an error that is twice the input's miss at one distance is
    removed there entirely; an error orthogonal to it at another distance keeps all its squared error."""
    from scripts.bench.prior_headroom import _carried_db

    miss = np.array([1.0, -1.0, 0.0, 0.0])
    carry = {1: np.array([miss @ (2 * miss), miss @ miss, (2 * miss) @ (2 * miss)]),
             2: np.array([miss @ np.array([0.0, 0.0, 1.0, 1.0]), miss @ miss, 2.0])}
    assert _carried_db(carry, 2, 3) == pytest.approx(0.0)
    assert _carried_db(carry, 1, 3) == pytest.approx(-10 * np.log10(2.0 / 10.0))  # 8 of the 10 removed
    assert np.isnan(_carried_db(carry, 5, 9))
