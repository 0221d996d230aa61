"""The calibrated uncertainty map (issue 18): atlas spread, calibration, the map beside a reconstruction, its scores."""

from __future__ import annotations

import json
import logging

import nibabel as nib
import numpy as np
import pytest
import torch

from monai_mrngan.atlas.prior import BrainPrior, FitConfig
from monai_mrngan.data.datalist import load_split
from monai_mrngan.data.io import InputError, load_volume, save_png
from monai_mrngan.inference.components import Components, reference_grid
from monai_mrngan.inference.output import montage, save_reconstruction
from monai_mrngan.inference.reconstruct import reconstruct_files
from monai_mrngan.inference.calibration import FEATURES, Calibration, load_calibration
from monai_mrngan.inference.uncertainty import edge_strength, neighbourhood
from monai_mrngan.inference.volume import Reconstruction
from monai_mrngan.networks.pix2pix import Pix2PixGenerator
from monai_mrngan.networks.recurrent import MRNGAN

FAST_FIT = {"mode": "affine", "top_k": 2, "work_size": 32, "affine_iters": 20, "deform_iters": 20, "grid_points": 6}


def _atlas_prior(dataset) -> BrainPrior:
    entries = load_split(dataset, "training")
    vols = [np.moveaxis(load_volume(e["image"])[0], -1, 0) for e in entries]
    return BrainPrior(np.stack(vols), np.asarray(entries[0]["positions"]), FitConfig(**FAST_FIT), subjects=[e["subject"] for e in entries])


def _components(dataset, calibration=None) -> Components:
    torch.manual_seed(0)
    return Components(model=MRNGAN(far_end=True, hidden_channels=4, features=4), generator=Pix2PixGenerator(channels=(4, 8), strides=(2,)),
                      prior=_atlas_prior(dataset), calibration=calibration)


@pytest.fixture(scope="module")
def calibration(tiny_dataset, tmp_path_factory):
    from monai_mrngan.evaluation.uncertainty import calibrate

    path = tmp_path_factory.mktemp("cal") / "uncertainty_calibration.json"
    cal = calibrate(tiny_dataset, _components(tiny_dataset), path, input_positions=(0.5,), few_slice_k=(4,), localize_inputs=False, voxels=5000,
                    augment=1)
    assert path.is_file() and cal.info["split"] == "validation" and cal.info["samples"] > 100
    # one scanner-augmented copy of the first validation subject scales the map by a power of the scan's sharpness
    assert [a["subject"] for a in cal.info["augmented"]] == cal.info["subjects"][:1] and cal.info["augmented"][0]["scanner"]
    assert cal.info["augmented_samples"] > 100 and cal.sharpness_power >= 0
    assert len(cal.sharpness_reference["p"]) == len(cal.sharpness_reference["value"]) == 24
    assert load_calibration(path).sharpness_reference == cal.sharpness_reference
    cal.sharpness_power = max(cal.sharpness_power, 0.1)  # scaled, whatever the tiny fit found: the map's tests below read sharpness
    cal.save(path)
    assert cal.stride == 2 and load_calibration(path).stride == 2  # the bundle's default: signals on 2 x 2 blocks
    assert cal.info["selection"]["optional"] == ["head_area"] and cal.info["selection"]["kept"] in ([], ["head_area"])
    # every 3rd slice as 3-slice slabs too (the default): the map learns how much making the volume agree with them lowers the error
    assert cal.info["thick_slice_k"] == [3] and {"slab_change", "slab_mm"} <= set(cal.features)
    return path


def test_atlas_spread_beside_the_fitted_prior(tiny_dataset):
    """The kept atlases' per-voxel spread: >= 0, larger inside the head than in air; the fit itself is unchanged."""
    prior = _atlas_prior(tiny_dataset)
    vol, _ = load_volume(load_split(tiny_dataset, "test")[0]["image"])
    grid = prior.positions
    ref, p0 = torch.from_numpy(vol[:, :, 12])[None, None], float(grid[12])
    plain_fit = prior.fit(ref, p0).clone()
    pos = grid[[4, 12, 20]]
    spread = prior.spread_at(pos, ref, p0)
    assert spread.shape == (3, 1, *prior.shape) and (spread >= 0).all() and spread.max() > 0.01
    assert torch.equal(prior.fit(ref, p0), plain_fit)  # the refit that kept the spread gives the same prior
    head = prior.slice_at(pos, ref, p0) > 0.1
    assert spread[head].mean() > spread[~head].mean()
    assert (prior.spread_at(pos) >= 0).all()  # unfitted: the whole bank's spread
    one = BrainPrior(np.moveaxis(vol, -1, 0), grid)
    assert not one.spread_at(pos).any()  # a one-volume prior has nothing to disagree with


def test_per_slice_signals_distance_and_gap():
    from monai_mrngan.inference.uncertainty import uncertainty_signals
    from monai_mrngan.inference.volume import Reconstruction

    rec = Reconstruction(np.zeros((4, 4, 10), np.float32), np.linspace(0.9, 0.1, 10), [2, 6], [0.74, 0.42], extra={"prior_weight": np.full(10, np.nan)})
    sig = uncertainty_signals(rec, None, spacing_mm=2.0)
    np.testing.assert_array_equal(sig["distance_mm"], [4, 2, 0, 2, 4, 2, 0, 2, 4, 6])
    np.testing.assert_array_equal(sig["gap_mm"], [0, 0, 0, 8, 8, 8, 8, 0, 0, 0])  # open runs beyond the ends: no gap
    assert not sig["prior_weight"].any() and not sig["spread"].any() and not sig["spread_local"].any()  # no prior: nothing to disagree with
    assert not sig["run_spread"].any()  # no runs recorded: nothing to disagree
    runs = np.zeros((4, 4, 10), np.float32)
    runs[:, :, 3:6] = 0.2
    rec.extra["run_spread"] = runs
    np.testing.assert_array_equal(uncertainty_signals(rec, None, spacing_mm=2.0)["run_spread"], runs)
    assert not sig["head_area"].any()  # an empty output has no head section
    rec.volume[:2, :, 3] = 0.5  # half of slice 3's field is head
    rec.volume[0, 0, 7] = 0.1  # at the threshold: not head
    np.testing.assert_array_equal(uncertainty_signals(rec, None, spacing_mm=2.0)["head_area"], [0, 0, 0, 0.5, 0, 0, 0, 0, 0, 0])


def test_only_the_inputs_whose_prior_reaches_a_generated_slice_are_fitted():
    """A volume with one missing slice: the priors of real slices amid real slices are never read (each was a 0.2 s fit)."""
    from monai_mrngan.inference.uncertainty import SPREAD_REACH, uncertainty_signals

    read = []

    class _Counting:  # a prior that records where it is read
        def slice_at(self, positions, reference=None, reference_position=None):
            read.append(round(float(reference_position), 4))
            return torch.full((len(positions), 1, 4, 4), 0.5)

        def spread_at(self, positions, reference=None, reference_position=None):
            return torch.full((len(positions), 1, 4, 4), 0.1)

        def fit_many(self, *a, **k):
            raise AssertionError("not called here")

    grid = np.linspace(0.9, 0.1, 30)
    inputs = [i for i in range(30) if i != 15]
    rec = Reconstruction(np.full((4, 4, 30), 0.3, np.float32), grid, inputs, [float(grid[i]) for i in inputs])
    sig = uncertainty_signals(rec, _Counting(), spacing_mm=2.0)
    near = [i for i in inputs if abs(i - 15) <= SPREAD_REACH]
    assert sorted(read, reverse=True) == [round(float(np.float32(grid[i])), 4) for i in near]
    assert sig["spread_local"][0, 0, 15] == pytest.approx(0.1) and sig["spread"][0, 0, 15] == pytest.approx(0.1)


def test_candidate_spread_is_the_cells_weighted_disagreement_and_reaches_the_volume():
    """``candidate_spread``: per pixel and step sum_i w_i |c_i - output| over the candidates the cell blends; 0 where they
    all agree; runs blended into the volume like the slices, NaN on the given slices (0 in the signals)."""
    from monai_mrngan.inference.runners import mrngan_runner
    from monai_mrngan.inference.uncertainty import uncertainty_signals
    from monai_mrngan.inference.volume import Reconstruction, fill_volume

    torch.manual_seed(0)
    model = MRNGAN(hidden_channels=4, features=4, far_end=True).eval()
    model.record_spread = True
    start, pos = torch.full((1, 1, 8, 8), 0.5), torch.linspace(0.5, 0.3, 6)[None]
    with torch.no_grad():
        model.unroll(start, pos, torch.ones(1), lambda x, d: x, lambda p: torch.full((1, p.shape[1], 1, 8, 8), 0.5))
        assert model.last_candidate_spread.shape == (1, 5, 8, 8) and float(model.last_candidate_spread.abs().max()) < 1e-6
        out = model.unroll(start, pos, torch.ones(1), lambda x, d: x, lambda p: torch.full((1, p.shape[1], 1, 8, 8), 0.9))
    w, prev, last = model.last_weights, out[:, -2:-1], out[:, -1:]  # the last step's candidates: prev, pix2pix (= prev), prior
    expected = (w[:, 0:1] + w[:, 1:2]) * (prev - last).abs() + w[:, 2:3] * (0.9 - last).abs()
    torch.testing.assert_close(model.last_candidate_spread[:, -1:], expected)
    assert float(model.last_candidate_spread.min()) > 0
    model.record_spread = False
    with torch.no_grad():
        model.unroll(start, pos, torch.ones(1), lambda x, d: x, lambda p: torch.full((1, p.shape[1], 1, 8, 8), 0.9))
    assert model.last_candidate_spread is None  # training pays nothing for it

    def run(starts, start_positions, directions, steps, step_p, far=None):  # run n's spread is n + 1 everywhere
        run.last_signals = {"candidate_spread": torch.arange(1.0, starts.shape[0] + 1).view(-1, 1, 1, 1).expand(-1, steps, 4, 4)}
        return starts[:, None].expand(-1, steps, -1, -1, -1)

    signals = {}
    fill_volume(run, torch.rand(2, 1, 4, 4), [2, 6], 10, np.linspace(0.9, 0.1, 10), -0.1, signals=signals)
    spread = signals["candidate_spread"]
    assert spread.shape == (10, 4, 4) and bool(spread[[2, 6]].isnan().all())
    # runs: down from 2 (1), up from 6 (2), up from 2 into the gap (3), down from 6 into it (4), blended by distance
    np.testing.assert_allclose(spread[[0, 1, 9], 0, 0], [1.0, 1.0, 2.0])
    np.testing.assert_allclose(spread[3:6, 0, 0], [0.75 * 3 + 0.25 * 4, 3.5, 0.25 * 3 + 0.75 * 4])
    rec = Reconstruction(np.zeros((4, 4, 10), np.float32), np.linspace(0.9, 0.1, 10), [2, 6], [0.74, 0.42],
                         extra={"candidate_spread": spread.permute(1, 2, 0).numpy()})
    sig = uncertainty_signals(rec, None, spacing_mm=2.0)["candidate_spread"]
    assert sig.shape == (4, 4, 10) and not sig[:, :, [2, 6]].any() and sig[0, 0, 4] == pytest.approx(3.5)

    class _Flat:  # a prior that is 0.9 everywhere
        def slice_at(self, positions, **kw):
            return torch.full((len(positions), 1, 8, 8), 0.9)

    runner = mrngan_runner(model, lambda x, d: x, _Flat(), fit_prior=False)
    runner(start.expand(2, -1, -1, -1), torch.tensor([0.5, 0.5]), torch.tensor([1.0, -1.0]), 3, 0.05)
    assert runner.last_signals["candidate_spread"].shape == (2, 3, 8, 8) and runner.last_signals["prior_weight"].shape == (2, 3)
    assert not model.record_spread  # the runner records only during its own rollout


def test_signals_on_blocks_and_the_map_brought_back_to_the_volume_grid():
    """``stride``: voxel signals are block means (a block cut by the edge: the mean of its voxels), per-slice
    signals unchanged; the map is predicted on the blocks, brought back bilinearly to (H, W, D), 0 on the inputs."""
    from monai_mrngan.inference.uncertainty import pool_inplane, uncertainty_map, uncertainty_signals, upsample_inplane
    from monai_mrngan.inference.volume import Reconstruction

    vol = np.arange(5 * 6 * 2, dtype=np.float32).reshape(5, 6, 2)
    pooled = pool_inplane(vol, 2)
    assert pooled.shape == (3, 3, 2) and pool_inplane(vol, 1) is vol
    assert pooled[0, 0, 1] == pytest.approx(vol[:2, :2, 1].mean()) and pooled[2, 1, 0] == pytest.approx(vol[4, 2:4, 0].mean())
    assert upsample_inplane(np.full((3, 3, 2), 0.25, np.float32), (5, 6, 2)).shape == (5, 6, 2)
    np.testing.assert_allclose(upsample_inplane(np.full((3, 3, 2), 0.25, np.float32), (5, 6, 2)), 0.25)
    ramp = upsample_inplane(np.repeat(np.array([0.0, 1.0], np.float32)[:, None, None], 2, 1), (4, 2, 1))[:, 0, 0]
    np.testing.assert_allclose(ramp, [0.0, 0.25, 0.75, 1.0])  # between block centres, held beyond them

    out = np.random.default_rng(0).random((8, 8, 10)).astype(np.float32)
    rec = Reconstruction(out, np.linspace(0.9, 0.1, 10), [2, 6], [0.74, 0.42], extra={"prior_weight": np.full(10, 0.5)})
    fine, coarse = uncertainty_signals(rec, None, 2.0), uncertainty_signals(rec, None, 2.0, stride=2)
    np.testing.assert_allclose(coarse["intensity"], pool_inplane(out, 2))
    assert coarse["edge_xy"].shape == (4, 4, 10) and fine["edge_xy"].shape == (8, 8, 10)
    np.testing.assert_array_equal(coarse["distance_mm"], fine["distance_mm"])
    cal = Calibration(-3.0, [0.5 if f in ("intensity", "distance_mm") else 0.0 for f in FEATURES], [-10.0, 5.0], [0.0, 1.0], stride=2)
    unc = uncertainty_map(rec, None, cal, 2.0)
    assert unc.shape == out.shape and not unc[:, :, [2, 6]].any() and unc.min(initial=1.0, where=unc > 0) > 0
    expected = upsample_inplane(cal.predict(coarse), out.shape)
    np.testing.assert_allclose(unc[:, :, 0], expected[:, :, 0], rtol=1e-6)


def test_the_local_spread_reaches_the_neighbours_of_a_disagreement():
    """One voxel where the atlases disagree: its neighbours (2 px in-plane, 1 slice axially) get some of it, voxels
    far away none, and the total is kept."""
    spike = np.zeros((21, 21, 9), np.float32)
    spike[10, 10, 4] = 1.0
    local = neighbourhood(spike)
    assert local[10, 10, 4] == local.max() < 1.0 and local[12, 10, 4] > 0.1 * local.max() and local[10, 10, 5] > 0.1 * local.max()
    assert local[0, 0, 4] < 1e-4 and abs(local.sum() - 1.0) < 1e-3


def test_the_edge_signal_is_the_in_plane_gradient_only():
    """0 on a flat volume (the old signal gave the intensity there), the same on every slice of a volume constant
    along the axial axis, largest at an in-plane step."""
    flat = np.full((16, 16, 4), 0.7, np.float32)
    assert edge_strength(flat).max() == 0
    step = np.zeros((16, 16, 4), np.float32)
    step[8:] = 1.0
    e = edge_strength(step)
    np.testing.assert_allclose(e[..., 0], e[..., 3])
    assert e[7:9].min() > 0.3 and e[:3].max() < 1e-3


def test_the_misfit_signal_carries_each_inputs_miss_along_its_runs(tiny_dataset):
    """``misfit_xy``: the smoothed |input - fitted prior| at each input's position, the same on every slice that
    input's prior serves (the nearer input; the lower one for a one-pass cell), larger where the input departs
    from what the atlases say; without a prior there is nothing to miss."""
    from monai_mrngan.inference.uncertainty import MISFIT_SIGMA_PX, uncertainty_signals
    from monai_mrngan.inference.volume import Reconstruction

    prior = _atlas_prior(tiny_dataset)
    vol, _ = load_volume(load_split(tiny_dataset, "test")[0]["image"])
    grid = np.asarray(prior.positions)
    out = vol.astype(np.float32).copy()
    out[4:10, 4:10, 8] = 1.0  # input 8 holds a bright patch no atlas has
    rec = Reconstruction(out, grid, [8, 16], [float(grid[8]), float(grid[16])])
    sig = uncertainty_signals(rec, prior, spacing_mm=2.0)
    m = sig["misfit_xy"]
    fitted = prior.slice_at(torch.as_tensor(grid[[8]]), torch.from_numpy(out[:, :, 8])[None, None], float(np.float32(grid[8])))[0, 0].numpy()
    np.testing.assert_allclose(m[:, :, 8], neighbourhood(np.abs(out[:, :, 8] - fitted), MISFIT_SIGMA_PX), atol=1e-5)
    np.testing.assert_array_equal(m[:, :, 3], m[:, :, 8])  # below input 8: its runs
    np.testing.assert_array_equal(m[:, :, 12], m[:, :, 8])  # the lower half of the gap: nearer input 8
    np.testing.assert_array_equal(m[:, :, 13], m[:, :, 16])  # the upper half: nearer input 16
    assert m[6, 6, 8] > 2 * m[6, 6, 16]  # the patch the atlases miss
    one_pass = uncertainty_signals(rec, prior, spacing_mm=2.0, one_pass=True)["misfit_xy"]
    np.testing.assert_array_equal(one_pass[:, :, 15], m[:, :, 8])  # one run from the lower input fills the whole gap
    assert not uncertainty_signals(rec, None, spacing_mm=2.0)["misfit_xy"].any()


def test_sharpness_is_the_inputs_detail_against_the_banks_at_their_positions(tiny_dataset):
    """1 on the bank's own scans; lower on a smoother acquisition, higher on a noisier one; a contrast curve leaves it
    near 1. An input without enough head to measure counts as 1."""
    from scipy import ndimage

    from monai_mrngan.atlas.bank import sharpness_profile
    from monai_mrngan.inference.uncertainty import relative_sharpness
    from monai_mrngan.transforms.scanners import SHIFTS, acquire, describe, describe_random, simulate_random

    prior = _atlas_prior(tiny_dataset)
    reference = {"p": prior.positions.tolist(), "value": np.nan_to_num(sharpness_profile(prior.bank), nan=0.0).tolist()}
    entry = load_split(tiny_dataset, "training")[0]  # one of the bank's own volumes
    vol, _ = load_volume(entry["image"])

    def sharpness(v):
        return relative_sharpness(Reconstruction(v.astype(np.float32), np.asarray(entry["positions"]), [6, 10, 14], []), reference)

    own, smooth, noisy = sharpness(vol), sharpness(ndimage.gaussian_filter(vol, 0.8)), sharpness(acquire(vol, "noise_3pct"))
    assert 0.7 < own < 1.3 and smooth < 0.75 * own and noisy > 1.1 * own, (own, smooth, noisy)
    assert abs(sharpness(acquire(vol, "gamma_1.4")) - own) < 0.3 * own
    assert sharpness(np.zeros_like(vol)) == 1.0
    # a drawn scanner is reproducible from its seed and never one of the evaluation's fixed settings
    a, b = simulate_random(vol, 7), simulate_random(vol, 7)
    np.testing.assert_array_equal(a[0], b[0])
    assert a[1] and a[1] == b[1] and all(a[1] != describe(steps) for steps in SHIFTS.values())
    assert describe_random(7) == a[1]  # the name the calibration records is the scanner it simulated


def test_the_sharpness_power_scales_a_scans_whole_map_and_needs_its_reference(tmp_path):
    """Fitted with the rest of the calibration fixed: a smoother scan whose error is lower gets a smaller map by the
    same factor everywhere; the power is never negative; a calibration with one loads only with its reference."""
    rng = np.random.default_rng(0)
    n = 6000
    sig = {name: rng.uniform(0.0, 0.3, n) for name in FEATURES}
    sig["slab_mm"] = np.zeros(n)  # thin slices: a thick-slice scan's map is never scaled (below)
    sig["sharpness"] = np.concatenate([np.ones(n // 2), np.repeat(rng.uniform(0.3, 1.0, 30), n // 60)])  # originals, then copies
    err = rng.exponential((0.02 + 0.2 * sig["spread"]) * sig["sharpness"] ** 0.5)
    cal = Calibration.fit({k: v[: n // 2] for k, v in sig.items()}, err[: n // 2])
    before = cal.predict(sig)
    power = cal.fit_sharpness_power(sig, err)
    assert 0.3 < power < 0.7 and cal.sharpness_power == power
    np.testing.assert_allclose(cal.predict(sig), before * sig["sharpness"].astype(np.float32) ** np.float32(power), rtol=1e-5)
    banded = Calibration.fit({k: v[: n // 2] for k, v in sig.items()}, err[: n // 2])
    banded.fit_sharpness_power(sig, err, band=(0.9, 1.1))  # the fit's own scans' range: maps inside it stay as fitted
    np.testing.assert_allclose(banded.sharpness_scale(np.array([0.95, 1.0, 1.1, 0.45])),
                               [1.0, 1.0, 1.0, (0.45 / 0.9) ** banded.sharpness_power], rtol=1e-6)
    assert 0.3 < banded.sharpness_power < 0.7 and banded.sharpness_band == [0.9, 1.1]
    np.testing.assert_allclose(banded.sharpness_scale(np.array([0.45, 0.45]), np.array([0.0, 6.0])),
                               [(0.45 / 0.9) ** banded.sharpness_power, 1.0], rtol=1e-6)  # slab means: their smoothness is the slab's
    inside = Calibration.fit({k: v[: n // 2] for k, v in sig.items()}, err[: n // 2])
    assert inside.fit_sharpness_power(sig, err, band=(0.2, 2.0)) == 0.0  # no scan outside the band: nothing to fit, no scale
    flipped = Calibration.fit({k: v[: n // 2] for k, v in sig.items()}, err[: n // 2])
    assert flipped.fit_sharpness_power(dict(sig, sharpness=1.0 / sig["sharpness"]), err) < 0.05  # never negative
    path = cal.save(tmp_path / "cal.json")
    with pytest.raises(InputError, match="sharpness_reference"):
        load_calibration(path)
    cal.sharpness_reference = {"p": [0.0, 1.0], "value": [0.5, 0.5]}
    back = load_calibration(cal.save(tmp_path / "cal.json"))
    np.testing.assert_allclose(back.predict(sig), cal.predict(sig), rtol=1e-6)


def test_calibration_is_monotone_and_round_trips(tmp_path):
    rng = np.random.default_rng(0)
    n = 20000
    sig = {"spread": rng.uniform(0, 0.3, n), "spread_local": rng.uniform(0, 0.2, n), "distance_mm": rng.uniform(0, 60, n), "gap_mm": rng.choice([0.0, 8.0, 16.0], n),
           "disagreement": rng.uniform(0, 0.5, n),
           "prior_weight": rng.uniform(0, 1, n), "run_spread": rng.uniform(0, 0.3, n) * rng.choice([0.0, 1.0], n),
           "intensity": rng.uniform(0, 1, n), "edge_xy": rng.uniform(0, 0.4, n), "misfit_xy": rng.uniform(0, 0.2, n),
           "candidate_spread": rng.uniform(0, 0.2, n)}
    truth = (0.02 + 0.5 * sig["spread"] + 0.002 * sig["distance_mm"] + 0.1 * sig["edge_xy"] + 0.2 * sig["run_spread"]
             + 0.3 * sig["misfit_xy"] + 0.2 * sig["candidate_spread"])  # the expected error
    err = rng.exponential(truth)
    sig["head_area"] = rng.uniform(0.02, 0.35, n)  # signals the error does not follow
    sig["slab_mm"] = rng.choice([0.0, 6.0], n)
    sig["slab_change"] = rng.uniform(0, 0.1, n) * (sig["slab_mm"] > 0)
    cal = Calibration.fit(sig, err)
    assert all(w >= 0 for w in cal.weights) and np.all(np.diff(cal.iso_y) >= 0) and np.all(np.diff(cal.iso_x) > 0)
    base = {k: np.full(50, float(np.median(v))) for k, v in sig.items()}
    for name in FEATURES:  # more of any one signal never predicts less error
        s = dict(base, **{name: np.linspace(float(sig[name].min()), float(sig[name].max()), 50)})
        assert np.all(np.diff(cal.predict(s)) >= -1e-7), name
    pred = cal.predict(sig)
    assert abs(pred.mean() - err.mean()) < 0.1 * err.mean()  # calibrated on average
    from scipy.stats import spearmanr

    assert spearmanr(pred, err)[0] > 0.95 * spearmanr(truth, err)[0]  # ranks nearly as well as the true expectation
    assert np.corrcoef(pred, truth)[0, 1] > 0.9
    cal.save(tmp_path / "c.json")
    again = load_calibration(tmp_path / "c.json")
    np.testing.assert_allclose(again.predict(sig), pred)
    assert load_calibration(tmp_path / "missing.json") is None
    # a calibration fitted before a signal existed still loads and uses the signals it knows
    older = Calibration.fit(sig, err, features=[f for f in FEATURES if f not in ("edge_xy", "run_spread", "misfit_xy", "candidate_spread")])
    older.save(tmp_path / "older.json")
    np.testing.assert_allclose(load_calibration(tmp_path / "older.json").predict(sig), older.predict(sig))
    assert not {"edge_xy", "run_spread", "misfit_xy", "candidate_spread"} & set(older.features)
    # one fitted on a retired signal (the old 'edge', which held the intensity too) is not used
    retired = json.loads((tmp_path / "c.json").read_text())
    retired["features"] = [f if f != "edge_xy" else "edge" for f in retired["features"]]
    (tmp_path / "retired.json").write_text(json.dumps(retired))
    assert load_calibration(tmp_path / "retired.json") is None
    strided = json.loads((tmp_path / "c.json").read_text())
    assert strided["stride"] == 1 and load_calibration(tmp_path / "c.json").stride == 1  # every voxel unless fitted on blocks
    (tmp_path / "stride0.json").write_text(json.dumps(dict(strided, stride=0)))
    with pytest.raises(InputError, match="stride0.json.*stride"):
        load_calibration(tmp_path / "stride0.json")
    (tmp_path / "bad.json").write_text(json.dumps({"kind": "something else"}))
    with pytest.raises(InputError, match="bad.json"):
        load_calibration(tmp_path / "bad.json")


def test_a_signal_constant_over_the_fit_is_left_out():
    """Fitted without thick-slice cases, the slab signals are 0 everywhere: left out, a thick scan's map stays finite."""
    rng = np.random.default_rng(1)
    n = 4000
    sig = {name: rng.uniform(0.0, 0.3, n) for name in FEATURES}
    sig["slab_change"], sig["slab_mm"] = np.zeros(n), np.zeros(n)
    err = rng.exponential(0.02 + 0.2 * sig["spread"])
    cal = Calibration.fit(sig, err, hidden=(4,), steps=50)
    assert {"slab_change", "slab_mm"}.isdisjoint(cal.features) and cal.info["constant_signals"] == ["slab_change", "slab_mm"]
    thick = dict(sig, slab_change=np.full(n, 0.2), slab_mm=np.full(n, 6.0))
    np.testing.assert_array_equal(cal.predict(thick), cal.predict(sig))


def test_the_correction_network_learns_how_signals_interact(tmp_path):
    """An error that a sum of monotone terms cannot express (the atlas spread counts inside a gap, the misfit
    beside one slice): the network over the log-linear model ranks it better, round-trips through JSON, and
    gives the same map whether per-slice signals come as (D,) or broadcast to the volume."""
    from scipy.stats import spearmanr

    rng = np.random.default_rng(1)
    n = 40000
    sig = {name: rng.uniform(0.0, 0.3, n) for name in FEATURES}
    sig["gap_mm"] = rng.choice([0.0, 8.0], n)
    truth = 0.01 + np.where(sig["gap_mm"] > 0, 0.6 * sig["spread"], 0.6 * sig["misfit_xy"])
    err = rng.exponential(truth)
    plain, corrected = Calibration.fit(sig, err), Calibration.fit(sig, err, hidden=(8, 8))
    assert plain.net is None and corrected.net is not None
    assert spearmanr(corrected.predict(sig), truth)[0] > spearmanr(plain.predict(sig), truth)[0] + 0.1
    assert abs(corrected.predict(sig).mean() - err.mean()) < 0.1 * err.mean()
    corrected.save(tmp_path / "net.json")
    again = load_calibration(tmp_path / "net.json")
    np.testing.assert_allclose(again.predict(sig), corrected.predict(sig), rtol=1e-5, atol=1e-7)
    broken = json.loads((tmp_path / "net.json").read_text())
    broken["net"]["layers"][0]["weight"] = [row[:3] for row in broken["net"]["layers"][0]["weight"]]  # 3 signals where all of FEATURES are read
    (tmp_path / "broken.json").write_text(json.dumps(broken))
    with pytest.raises(InputError, match="broken.json.*correction network"):
        load_calibration(tmp_path / "broken.json")
    vol = {name: rng.uniform(0.0, 0.3, (6, 5, 7)).astype(np.float32) for name in FEATURES}
    for name in ("distance_mm", "gap_mm", "prior_weight", "head_area"):
        vol[name] = np.array([0.0, 2.0, 4.0, 8.0, 4.0, 2.0, 0.0], np.float32)
    full = {k: np.broadcast_to(v, (6, 5, 7)) for k, v in vol.items()}
    np.testing.assert_allclose(corrected.predict(vol), corrected.predict(full), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(corrected.predict(full)[2, 3], corrected.predict({k: v[2, 3] for k, v in full.items()}), rtol=1e-5, atol=1e-7)


def test_calibrate_keeps_an_optional_signal_only_where_it_ranks_held_out_subjects_better():
    """``select_signals``: head_area that raises every subject's error is kept; one that raises half the subjects'
    error and lowers the other half's (so a fit on one fold misleads on the other) is dropped."""
    from monai_mrngan.evaluation.uncertainty import select_signals

    rng = np.random.default_rng(2)
    subjects, groups, slices, per_slice = 4, 2, 20, 60
    n = subjects * groups * slices * per_slice
    subject = np.repeat(np.arange(subjects), groups * slices * per_slice)
    group = np.repeat(np.arange(subjects * groups), slices * per_slice)
    slice_id = np.tile(np.repeat(np.arange(slices), per_slice), subjects * groups)
    case = group % 2  # single_slice / k4
    sig = {name: rng.uniform(0.0, 0.3, n) for name in FEATURES}
    sig["head_area"] = np.repeat(rng.uniform(0.02, 0.35, subjects * groups * slices), per_slice)
    base = 0.02 + 0.3 * sig["spread"]
    flipped = np.where(subject % 2 == 0, sig["head_area"], 0.37 - sig["head_area"])
    for truth, kept in ((base * (1 + 6 * sig["head_area"]), ["head_area"]), (base * (1 + 6 * flipped), [])):
        err = rng.exponential(truth)
        features, record = select_signals(sig, err, subject, group, slice_id, case, ["single_slice", "k4"], ["head_area"], hidden=())
        assert record["kept"] == kept, record["score"]
        assert ("head_area" in features) == bool(kept) and set(features) | {"head_area"} == set(FEATURES)
        assert set(record["per_fold"]["all"][0]) == {"single_slice_voxel", "single_slice_slice", "k4_voxel", "k4_slice", "score"}
        # every fold's fit finite (without head_area, the first data's fold-0 fit once overflowed into NaN weights)
        assert all(np.isfinite(row["score"]) for rows in record["per_fold"].values() for row in rows), record["per_fold"]
        # the fold fits side by side in forked processes: the same record
        assert select_signals(sig, err, subject, group, slice_id, case, ["single_slice", "k4"], ["head_area"], hidden=(), workers=2)[1] == record
    one = select_signals(sig, err, np.zeros(n, int), group, slice_id, case, ["single_slice", "k4"], ["head_area"], hidden=())
    assert one[0] == list(FEATURES) and "two subjects" in one[1]["reason"]  # nothing held out: nothing dropped


def _reconstruct(dataset, comp, out):
    vol, _ = load_volume(load_split(dataset, "test")[0]["image"])
    ref = reference_grid(dataset)
    png = save_png(vol[:, :, 12], out.parent / "in.png")
    return reconstruct_files([str(png)], str(out), comp, positions=[0.5], method="mrngan", expected_shape=ref["shape"],
                             spacing_mm=ref["spacing_mm"], reference_affine=ref["affine"], reference_positions=ref["positions"])


def test_reconstruct_writes_the_uncertainty_map(tiny_dataset, calibration, tmp_path):
    res = _reconstruct(tiny_dataset, _components(tiny_dataset, load_calibration(calibration)), tmp_path / "r.nii.gz")
    out, unc = nib.load(res["volume"]), nib.load(res["uncertainty"])
    assert res["uncertainty"].endswith("r_uncertainty.nii.gz")
    assert unc.shape == out.shape and np.allclose(unc.affine, out.affine)
    u = unc.get_fdata()
    assert (u >= 0).all() and u.max() > 0
    assert not u[:, :, res["input_indices"][0]].any()  # 0 on the real slice
    meta = json.loads((tmp_path / "r_positions.json").read_text())
    assert meta["uncertainty"] == res["uncertainty"]
    means = [s["uncertainty_mean"] for s in meta["slices"]]
    assert means[res["input_indices"][0]] == 0 and max(means) > 0
    from PIL import Image

    assert Image.open(tmp_path / "r_montage.png").mode == "RGB"  # slices with their uncertainty rows


def test_stored_map_is_within_half_a_step_of_the_float_map(tmp_path):
    """The map's NIfTI (scaled uint8, MAP_STORED) reads back within half a quantisation step; zero stays zero."""
    rng = np.random.default_rng(0)
    unc = (rng.random((16, 12, 6)) * 0.24).astype(np.float32)
    unc[:, :, 2] = 0.0  # the real slice
    rec = Reconstruction(rng.random((16, 12, 6)).astype(np.float32), np.linspace(0.2, 0.3, 6), [2], [0.25])
    res = save_reconstruction(rec, tmp_path / "r.nii.gz", uncertainty=unc)
    img = nib.load(res["uncertainty"])
    assert img.get_data_dtype() == np.uint8
    back = img.get_fdata()
    assert np.abs(back - unc).max() <= unc.max() / 255 / 2 + 1e-6
    assert not back[:, :, 2].any()


def test_reconstruct_without_calibration_writes_no_map(tiny_dataset, tmp_path, caplog):
    """Stages trained before the calibration existed: the reconstruction as before, no map, one warning."""
    with caplog.at_level(logging.WARNING):
        res = _reconstruct(tiny_dataset, _components(tiny_dataset), tmp_path / "r.nii.gz")
    assert "uncertainty" not in res and not (tmp_path / "r_uncertainty.nii.gz").exists()
    meta = json.loads((tmp_path / "r_positions.json").read_text())
    assert meta["uncertainty"] is None and "calibrate step" in meta["uncertainty_note"]
    assert any("no uncertainty map" in r.getMessage() for r in caplog.records)
    assert all("uncertainty_mean" not in s for s in meta["slices"])


def test_evaluate_scores_the_map(tiny_dataset, calibration, tmp_path):
    from monai_mrngan.evaluation.reconstruction import evaluate_reconstruction

    comp = _components(tiny_dataset, load_calibration(calibration))
    report = evaluate_reconstruction(tiny_dataset, tmp_path, comp, methods=("mrngan",), input_positions=(0.5,), few_slice_k=(4, 8),
                                     few_slice_methods=("mrngan",), localize_inputs=False, tensorboard=False)
    scores = report["uncertainty"]
    assert set(scores) == {"single_slice", "k4", "k8", "thick_k3"}  # thick_k3: 3-slice slabs, the volume made to agree with them
    for s in scores.values():
        assert {"spearman_voxel", "spearman_slice", "reliability"} <= set(s)
        assert -1 <= s["spearman_voxel"] <= 1
        rows = s["reliability"]
        assert len(rows) == 10 and all(set(r) == {"predicted", "true"} and r["predicted"] >= 0 and r["true"] >= 0 for r in rows)
        assert [r["predicted"] for r in rows] == sorted(r["predicted"] for r in rows)  # deciles in order
    assert json.loads((tmp_path / "report.json").read_text())["uncertainty"] == json.loads(json.dumps(scores))
    assert (tmp_path / "uncertainty_reliability.png").is_file()
    # two subjects at a time, each in its own process: the same report (each subject samples its voxels by its own seed)
    both = evaluate_reconstruction(tiny_dataset, tmp_path / "workers", comp, methods=("mrngan",), input_positions=(0.5,), few_slice_k=(4, 8),
                                   few_slice_methods=("mrngan",), localize_inputs=False, tensorboard=False, workers=2)
    _assert_close(json.loads(json.dumps(both)), json.loads(json.dumps(report)))


def _assert_close(a, b, path="report"):
    """Nested JSON values equal, numbers to 1e-4 (single-threaded workers may round differently from two threads)."""
    if isinstance(b, dict):
        assert set(a) == set(b), path
        for k in b:
            _assert_close(a[k], b[k], f"{path}.{k}")
    elif isinstance(b, list):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_close(x, y, f"{path}[{i}]")
    elif isinstance(b, float):
        assert a == pytest.approx(b, rel=1e-4, abs=1e-6, nan_ok=True), path
    else:
        assert a == b, path


def test_calibration_is_the_same_from_worker_processes(tiny_dataset, tmp_path):
    from monai_mrngan.evaluation.uncertainty import calibrate

    kw = dict(input_positions=(0.5,), few_slice_k=(4,), thick_slice_k=(), localize_inputs=False, voxels=2000, hidden=(), augment=1, optional=())
    alone = calibrate(tiny_dataset, _components(tiny_dataset), tmp_path / "one.json", **kw)
    both = calibrate(tiny_dataset, _components(tiny_dataset), tmp_path / "two.json", workers=2, **kw)
    assert both.info["samples"] == alone.info["samples"] and both.info["augmented_samples"] == alone.info["augmented_samples"]
    assert both.weights == pytest.approx(alone.weights, rel=1e-3, abs=1e-5)
    assert both.sharpness_power == pytest.approx(alone.sharpness_power, rel=1e-3, abs=1e-5)


def test_montage_with_uncertainty_has_a_colour_row_per_slice_row():
    vol = np.random.default_rng(0).random((16, 16, 12)).astype(np.float32)
    gray = montage(vol, num=8, cols=4, tile_px=32)
    rgb = montage(vol, num=8, cols=4, tile_px=32, uncertainty=vol * 0.1)
    assert rgb.ndim == 3 and rgb.shape[2] == 3 and rgb.shape[1] == gray.shape[1] and rgb.shape[0] == 2 * gray.shape[0] + 40
    assert gray.dtype == rgb.dtype == np.uint8 and gray.max() > 200  # 8-bit pixels, the volume's 0 .. 1 as 0 .. 255


def test_complete_writes_the_map_in_the_inputs_units_and_layout(tiny_dataset, calibration, tmp_path):
    """`complete`: the map beside the completed file (its shape, affine and intensity units), 0 on real slices."""
    from monai_mrngan.apps.complete import complete_dataset
    from monai_mrngan.data.io import save_json, save_nifti

    entry = load_split(tiny_dataset, "test")[0]
    img = nib.load(entry["image"])
    vol = np.asanyarray(img.dataobj).astype(np.float32)
    raw = np.rint(vol * 800).astype(np.int16)
    gone = [7, 8, 9, 10, 11]
    raw[:, :, gone] = 0
    gone = [i for i in range(raw.shape[2]) if not raw[:, :, i].any()]  # with the volume's own empty slices above the head
    src = tmp_path / "src"
    src.mkdir()
    save_nifti(raw, img.affine, src / "scan.nii.gz", dtype=None)
    save_json({"first_position": entry["positions"][0]}, src / "scan.json")
    comp = _components(tiny_dataset, load_calibration(calibration))
    report = complete_dataset(src, tmp_path / "dst", comp, reference_grid(tiny_dataset), method="mrngan", progress=False)
    assert report["volumes"][0]["uncertainty"] == "scan_uncertainty.nii.gz"
    unc = nib.load(str(tmp_path / "dst" / "scan_uncertainty.nii.gz"))
    u = unc.get_fdata()
    assert unc.shape == raw.shape and np.allclose(unc.affine, img.affine)
    real = [i for i in range(raw.shape[2]) if i not in gone]
    assert not u[:, :, real].any() and u[:, :, gone].max() > 1.0  # input units (x 800), not [0, 1]
    meta = json.loads((tmp_path / "dst" / "scan.json").read_text())["uncertainty"]
    assert len(meta["slice_means"]) == raw.shape[2] and all(meta["slice_means"][i] == 0 for i in real)


def test_a_thick_slice_scans_slabs_are_predicted_not_zeroed(tiny_dataset, calibration):
    """Thin real slices are the output itself (0 in the map); a slab only constrains the thin slice the output holds
    there, so the map predicts its error too, and the calibration is fitted and scored on those slices."""
    from monai_mrngan.evaluation.uncertainty import scored_slices
    from monai_mrngan.inference.reconstruct import reconstruct_volume
    from monai_mrngan.transforms.slabs import slabs_at

    assert scored_slices([2, 5, 8], slabs=False).tolist() == [3, 4, 6, 7]
    assert scored_slices([2, 5, 8], slabs=True).tolist() == [2, 3, 4, 5, 6, 7, 8]
    comp = _components(tiny_dataset, load_calibration(calibration))
    entry = load_split(tiny_dataset, "test")[0]
    vol = load_volume(entry["image"])[0]
    pos = np.asarray(entry["positions"])
    given = list(range(0, vol.shape[2], 3))
    kw = dict(method="mrngan", model=comp.model, next_fn=comp.next_fn, prior=comp.prior, step_p=float(pos[1] - pos[0]),
              num_slices=vol.shape[2], input_indices=given, calibration=comp.calibration)
    thin = reconstruct_volume(torch.from_numpy(np.moveaxis(vol[:, :, given], 2, 0)), pos[given].tolist(), **kw)
    slabs = slabs_at(torch.from_numpy(vol), given, 3)
    thick = reconstruct_volume(slabs, pos[given].tolist(), slab_mm=3 * abs(float(pos[1] - pos[0])) * 200.0, **kw)  # 3 slices thick
    assert not thin.extra["uncertainty"][:, :, given].any() and thin.extra["uncertainty"].max() > 0
    head = thick.volume[:, :, given] > 0.1
    assert (thick.extra["uncertainty"][:, :, given][head] > 0).all()
