"""The gap-aware MRNGAN (issue 13): a cell that sees the far end of its gap, one run per gap in
few-slice reconstruction, the open-run / bounded-gap sampler, and the monotone cubic (PCHIP) and
registration-based interpolation baselines (these two in ``test_interpolation.py``)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from monai_mrngan.engines.recurrent import RecurrentUnroll, RunBatch, WeightedL1L2Loss
from monai_mrngan.inference.reconstruct import reconstruct_volume
from monai_mrngan.inference.runners import copy_runner, is_gap_aware, make_runner, one_pass_gaps
from monai_mrngan.inference.volume import fill_volume, linear_fill
from monai_mrngan.networks.recurrent import MRNGAN
from monai_mrngan.transforms import GapRund
from monai_mrngan.transforms.slabs import slab_mean
from test_interpolation import _moving_disc  # noqa: E402  (tests/ module: a disc that shifts with depth)

NAN = float("nan")


def _const_prior(value: float = 0.3, size: int = 8):
    return lambda p: torch.full((p.shape[0], p.shape[1], 1, size, size), value)


def _identity_next(prev, direction):
    return prev


# ------------------------------------------------------------------ the far-end cell
def test_far_end_cell_shapes_channels_and_gradients():
    torch.manual_seed(0)
    model = MRNGAN(hidden_channels=4, features=4, far_end=True)
    assert model.in_channels == 9 and MRNGAN().in_channels == 5
    start, far = torch.rand(3, 1, 8, 8), torch.rand(3, 1, 8, 8)
    pos = torch.tensor([[0.5, 0.49, 0.48, 0.47, 0.46]] * 3)
    far_p = torch.tensor([0.47, NAN, 0.40])  # reached inside the run, none, beyond the run
    out = model.unroll(start, pos, torch.ones(3), _identity_next, _const_prior(), far, far_p)
    assert out.shape == (3, 4, 8, 8) and 0 <= float(out.detach().min()) and float(out.detach().max()) <= 1
    out.mean().backward()
    assert any(float(p.grad.abs().sum()) > 0 for p in model.parameters() if p.grad is not None)
    assert model(torch.rand(2, 9, 8, 8)).shape == (2, 1, 8, 8)
    with pytest.raises(ValueError, match="9 channels"):
        model(torch.rand(2, 5, 8, 8))
    with pytest.raises(ValueError, match="far must be"):
        model.unroll(start, pos, torch.ones(3), _identity_next, _const_prior(), None, far_p)


def test_interp_cell_adds_the_interpolation_between_the_ends_as_a_channel_and_a_candidate():
    """``interp``: one more channel (after far_next) and blend candidate; the interpolation is asked once per run at the
    fractions of the way to the far end (0 at the start, 1 at the far end, clamped past it); no far end: weight 0."""
    torch.manual_seed(0)
    with pytest.raises(ValueError, match="interp needs far_end"):
        MRNGAN(interp=True)
    assert MRNGAN(far_end=True, interp=True).in_channels == 10 and MRNGAN(far_end=True, far_next=True, interp=True).in_channels == 11
    model = MRNGAN(hidden_channels=4, features=4, far_end=True, far_next=True, interp=True)
    assert model.step_channels[-2:] == ("far_next", "interp")
    start, far = torch.rand(3, 1, 8, 8), torch.rand(3, 1, 8, 8)
    pos = torch.tensor([[0.5, 0.49, 0.48, 0.47, 0.46]] * 3)
    far_p = torch.tensor([0.48, NAN, 0.40])
    asked = []

    def interp_fn(a, b, fractions):
        asked.append(fractions.clone())
        return torch.lerp(a[:, None], b[:, None], fractions[..., None, None, None]) * 0 + 0.7  # a constant slice: easy to spot

    out = model.unroll(start, pos, torch.ones(3), _identity_next, _const_prior(), far, far_p, interp_fn)
    assert out.shape == (3, 4, 8, 8) and len(asked) == 1
    assert asked[0].shape == (2, 5)  # only the runs with a far end are interpolated (the open run's candidate is masked)
    torch.testing.assert_close(asked[0][0], torch.tensor([0.0, 0.5, 1.0, 1.0, 1.0]))  # clamped past the far end
    torch.testing.assert_close(asked[0][1], torch.tensor([0.0, 0.1, 0.2, 0.3, 0.4]))
    assert float(model.last_weights[1, 4].abs().max()) == 0.0  # the open run: no weight on the interpolation
    assert float(model.last_weights[2, 4].min()) > 0.0
    out.mean().backward()
    assert float(model.head[-1].weight.grad.abs().sum()) > 0
    assert model(torch.rand(2, 11, 8, 8)).shape == (2, 1, 8, 8)
    with torch.no_grad():  # without an interp_fn the channel holds the linear blend of the ends
        plain = model.unroll(start, pos, torch.ones(3), _identity_next, _const_prior(), far, far_p)
        linear = model.unroll(start, pos, torch.ones(3), _identity_next, _const_prior(), far, far_p,
                              lambda a, b, f: torch.lerp(a[:, None], b[:, None], f[..., None, None, None]))
    torch.testing.assert_close(plain, linear)
    older = MRNGAN(hidden_channels=4, features=4, far_end=True, far_next=True)  # weights trained without interp
    with pytest.raises(ValueError, match="10-channel step input, this cell reads 11.*interp"):
        model.load_state_dict(older.state_dict())


def test_miss_cell_sees_how_far_the_prior_misses_the_start_at_every_step():
    """``miss``: one more channel, last, holding ``|start - prior(p_0)|`` (pooled to the state's size) at every step."""
    torch.manual_seed(0)
    model = MRNGAN(hidden_channels=4, features=4, far_end=True, far_next=True, interp=True, miss=True, state_scale=2)
    assert model.in_channels == 12 and model.step_channels[-1] == "miss" and MRNGAN(miss=True).in_channels == 6
    seen = []
    model.encoder.register_forward_hook(lambda mod, args, out: seen.append(args[0][:, -1].clone()))
    start, far = torch.rand(2, 1, 8, 8), torch.rand(2, 1, 8, 8)
    pos = torch.tensor([[0.5, 0.49, 0.48]] * 2)
    prior = lambda p: torch.linspace(0, 1, 64).view(1, 1, 1, 8, 8).expand(p.shape[0], p.shape[1], 1, 8, 8)  # noqa: E731
    model.unroll(start, pos, torch.ones(2), _identity_next, prior, far, torch.tensor([0.48, NAN]))
    want = torch.nn.functional.avg_pool2d((start - prior(pos)[:, 0]).abs(), 2)[:, 0]
    assert len(seen) == 3 and all(torch.allclose(x, want) for x in seen)  # the first state and both steps
    torch.nn.init.normal_(model.head[-1].weight, std=0.1)  # zero at the start: no gradient reaches the encoder
    model.unroll(start, pos, torch.ones(2), _identity_next, prior, far, torch.tensor([0.48, NAN])).mean().backward()
    assert float(model.encoder[0].weight.grad[:, -1].abs().sum()) > 0
    with pytest.raises(ValueError, match="11-channel step input, this cell reads 12.*miss"):
        model.load_state_dict(MRNGAN(hidden_channels=4, features=4, far_end=True, far_next=True, interp=True).state_dict())


def test_interpolate_between_is_exact_at_the_ends_and_used_when_training_an_interp_cell(monkeypatch):
    from monai_mrngan.atlas import registration
    from monai_mrngan.engines import recurrent

    truth = _moving_disc([10 + 1.5 * z for z in range(5)])
    mid = registration.interpolate_between(truth[[0]][:, None], truth[[4]][:, None], torch.tensor([[0.0, 0.5, 1.0]]))
    torch.testing.assert_close(mid[0, 0, 0], truth[0], atol=1e-6, rtol=0)
    torch.testing.assert_close(mid[0, 2, 0], truth[4], atol=1e-6, rtol=0)
    assert float(((mid[0, 1, 0] - truth[2]) ** 2).mean()) < 0.3 * float(((0.5 * (truth[0] + truth[4]) - truth[2]) ** 2).mean())
    calls = []
    monkeypatch.setattr(recurrent, "interpolate_between", lambda a, b, f: calls.append(f) or torch.lerp(a[:, None], b[:, None], f[..., None, None, None]))
    net = RecurrentUnroll(MRNGAN(hidden_channels=4, features=4, far_end=True, interp=True), _identity_next,
                          type("P", (), {"slice_at": staticmethod(lambda p, **k: torch.zeros(len(p), 1, 8, 8))})())
    net(torch.rand(2, 1, 8, 8), torch.tensor([[0.5, 0.49, 0.48]] * 2), torch.ones(2), torch.rand(2, 1, 8, 8), torch.tensor([0.48, NAN]))
    assert len(calls) == 1


def test_far_end_enters_the_blend_at_its_linear_weight_and_stops_after_it_is_passed():
    """Zero head: the far slice's weight is |p_t - p_{t-1}| / |p_far - p_{t-1}| while the run is before it, 0 after."""
    model = MRNGAN(hidden_channels=4, features=4, far_end=True, init_weights=(0.2, 0.6, 0.2))
    start, far = torch.full((1, 1, 8, 8), 0.6), torch.full((1, 1, 8, 8), 0.9)
    pos = torch.tensor([[0.5, 0.49, 0.48, 0.47]])
    with torch.no_grad():
        out = model.unroll(start, pos, torch.ones(1), _identity_next, _const_prior(0.3), far, torch.tensor([0.48]))
        open_run = model.unroll(start, pos, torch.ones(1), _identity_next, _const_prior(0.3))
    mix = 0.2 * 0.6 + 0.6 * 0.6 + 0.2 * 0.3
    first = 0.5 * mix + 0.5 * 0.9  # 0.01 / 0.02 of the way to the far end
    assert float(out[0, 0, 0, 0]) == pytest.approx(first, abs=1e-5)
    assert float(out[0, 1, 0, 0]) == pytest.approx(0.9, abs=1e-4)  # at the far end itself
    third = 0.2 * float(out[0, 1, 0, 0]) + 0.6 * float(out[0, 1, 0, 0]) + 0.2 * 0.3  # past it: the paper cell's mixture
    assert float(out[0, 2, 0, 0]) == pytest.approx(third, abs=1e-5)
    assert float(open_run[0, 0, 0, 0]) == pytest.approx(mix, abs=1e-5)


@pytest.mark.parametrize("state_scale", [1, 2])
def test_untrained_gap_cell_starts_at_linear_interpolation(state_scale):
    """All blend weight on the previous output: one run per gap reproduces linear interpolation."""
    model = MRNGAN(hidden_channels=4, features=4, far_end=True, init_weights=(1.0, 1e-6, 1e-6), state_scale=state_scale)
    prior = type("P", (), {"slice_at": staticmethod(lambda positions, **kw: torch.full((len(positions), 1, 8, 8), 0.5))})()
    run = make_runner("mrngan", model=model, next_fn=_identity_next, prior=prior, fit_prior=False)
    given, idx = torch.rand(4, 1, 8, 8), [1, 5, 13, 14]
    out = fill_volume(run, given, idx, 17, np.linspace(1.0, 0.36, 17), -0.04)
    torch.testing.assert_close(out, linear_fill(given, idx, 17), atol=5e-3, rtol=0)


def test_far_end_off_is_the_paper_cell():
    """far_end=False: the old parameter layout (old weights load strictly), and far-end inputs are ignored."""
    torch.manual_seed(0)
    paper = MRNGAN(hidden_channels=4, features=4, far_end=False)
    shapes = {k: tuple(v.shape) for k, v in paper.state_dict().items()}
    assert shapes["encoder.0.weight"] == (4, 5, 3, 3) and shapes["head.0.weight"] == (4, 9, 3, 3) and shapes["head.2.weight"] == (4, 4, 1, 1)
    old_config = MRNGAN(hidden_channels=4, features=4)  # a config without far_end
    old_config.load_state_dict(paper.state_dict(), strict=True)
    with torch.no_grad():
        for prm in paper.head[-1].parameters():
            prm.normal_(0, 0.3)
    start, pos = torch.rand(2, 1, 8, 8), torch.tensor([[0.5, 0.49, 0.48], [0.3, 0.31, 0.32]])
    args = (start, pos, torch.tensor([1.0, -1.0]), _identity_next, _const_prior())
    with torch.no_grad():
        plain = paper.unroll(*args)
        torch.testing.assert_close(paper.unroll(*args, torch.rand(2, 1, 8, 8), torch.tensor([0.47, 0.33])), plain, atol=0, rtol=0)
    with pytest.raises(ValueError, match="9-channel step input, this cell reads 5"):  # the far-end cell's weights do not fit the paper cell
        paper.load_state_dict(MRNGAN(hidden_channels=4, features=4, far_end=True).state_dict())


@pytest.mark.parametrize("state_scale", [1, 2])
def test_step_inputs_are_stacked_as_documented(state_scale):
    """x_t built by hand (maps min(1, 5 |p_t - p_0|), min(1, 5 |p_far - p_t|), flag, linear weight) gives unroll's first slice
    (at half size too: unroll makes its reduced input directly, forward averages the full-size one)."""
    torch.manual_seed(0)
    for far_end in (False, True):
        model = MRNGAN(hidden_channels=4, features=4, far_end=far_end, state_scale=state_scale)
        with torch.no_grad():
            for prm in model.head[-1].parameters():
                prm.normal_(0, 0.3)
            start, far, priors = torch.rand(1, 1, 8, 8), torch.rand(1, 1, 8, 8), torch.rand(1, 3, 1, 8, 8)
            pos = torch.tensor([[0.5, 0.44, 0.38]])  # 0.06 per step: the travelled distance saturates at step 4
            gen = model.unroll(start, pos, torch.ones(1), _identity_next, lambda p: priors, far, torch.tensor([0.30]))

            def const(v):
                return torch.full((1, 1, 8, 8), float(v))

            far0 = [far, const(1.0), const(1.0), const(0.0)] if far_end else []  # 5 * 0.2 = 1 at p_0
            far1 = [far, const(min(1.0, 5 * 0.14)), const(1.0), const(0.06 / 0.20)] if far_end else []
            x0 = torch.cat([start, start, priors[:, 0], const(0.5), const(0.0), *far0], 1)
            x1 = torch.cat([start, start, priors[:, 1], const(0.44), const(5 * 0.06), *far1], 1)
            torch.testing.assert_close(gen[:, 0:1], model(x1, model.init_state(x0)), atol=1e-6, rtol=0)
            if far_end:  # no far end: unroll leaves the far candidate out; the full step (flag 0, zeros) gives the same
                alone = model.unroll(start, pos, torch.ones(1), _identity_next, lambda p: priors)
                none0 = [const(0.0), const(1.0), const(0.0), const(0.0)]
                x0 = torch.cat([start, start, priors[:, 0], const(0.5), const(0.0), *none0], 1)
                x1 = torch.cat([start, start, priors[:, 1], const(0.44), const(5 * 0.06), *none0], 1)
                torch.testing.assert_close(alone[:, 0:1], model(x1, model.init_state(x0)), atol=1e-6, rtol=0)


# ------------------------------------------------------------------ one run per gap
class _Recorder:
    """A gap-aware runner that records its calls and fills every run with its far slice (or its start)."""

    gap_aware = True

    def __init__(self) -> None:
        self.calls = []

    def __call__(self, starts, start_positions, directions, steps, step_p, far=None):
        self.calls.append((starts.clone(), start_positions.clone(), directions.clone(), steps, far))
        far_slices, far_pos = far
        fill = torch.where(torch.isfinite(far_pos).view(-1, 1, 1, 1), far_slices, starts)
        return fill[:, None].expand(-1, steps, -1, -1, -1).clone()


def test_gap_aware_fill_makes_one_run_per_gap():
    slices = torch.stack([torch.full((1, 4, 4), v) for v in (0.1, 0.5, 0.9)])
    idx, grid = [3, 7, 12], torch.linspace(1.0, 0.0, 16)
    run = _Recorder()
    vol = fill_volume(run, slices, idx, 16, grid, -1 / 15)
    (starts, start_pos, dirs, steps, (far, far_pos)), = run.calls  # one batched call
    assert dirs.tolist() == [-1.0, 1.0, 1.0, 1.0] and steps == 4  # 2 outward runs + 1 run per gap, all +1 inside
    assert starts[:, 0, 0, 0].tolist() == pytest.approx([0.1, 0.9, 0.1, 0.5])
    assert math.isnan(far_pos[0]) and math.isnan(far_pos[1])  # outward runs have no far end
    assert far_pos[2:].tolist() == pytest.approx([float(grid[7]), float(grid[12])])
    assert far[2:, 0, 0, 0].tolist() == pytest.approx([0.5, 0.9]) and float(far[:2].abs().sum()) == 0
    np.testing.assert_allclose(vol[4:7, 0, 0].numpy(), 0.5, atol=1e-6)  # one run, weight 1, no blending
    np.testing.assert_allclose(vol[8:12, 0, 0].numpy(), 0.9, atol=1e-6)
    np.testing.assert_allclose(vol[:3, 0, 0].numpy(), 0.1, atol=1e-6)
    np.testing.assert_allclose(vol[13:, 0, 0].numpy(), 0.9, atol=1e-6)
    lin = fill_volume(copy_runner(), slices, idx, 16, grid, -1 / 15)  # not gap-aware: exact linear interpolation
    np.testing.assert_allclose(lin[5, 0, 0].item(), 0.1 + (0.5 - 0.1) * 2 / 4, atol=1e-6)


class _BothWays(_Recorder):
    both_ways = True


def test_both_ways_fill_runs_from_each_end_with_the_other_as_far_end_and_blends_by_distance():
    slices = torch.stack([torch.full((1, 4, 4), v) for v in (0.1, 0.5, 0.9)])
    idx, grid = [3, 7, 12], torch.linspace(1.0, 0.0, 16)
    run = _BothWays()
    assert one_pass_gaps(_Recorder()) and not one_pass_gaps(run)
    signals = {}
    vol = fill_volume(run, slices, idx, 16, grid, -1 / 15, signals=signals)
    (starts, start_pos, dirs, steps, (far, far_pos)), = run.calls
    assert dirs.tolist() == [-1.0, 1.0, 1.0, -1.0, 1.0, -1.0] and steps == 4  # 2 outward runs + 2 runs per gap
    assert starts[:, 0, 0, 0].tolist() == pytest.approx([0.1, 0.9, 0.1, 0.5, 0.5, 0.9])
    assert math.isnan(far_pos[0]) and math.isnan(far_pos[1])
    assert far_pos[2:].tolist() == pytest.approx([float(grid[i]) for i in (7, 3, 12, 7)])  # each run's far end is the other end
    assert far[2:, 0, 0, 0].tolist() == pytest.approx([0.5, 0.1, 0.9, 0.5]) and float(far[:2].abs().sum()) == 0
    # the recorder fills a run with its far slice; the +1 run weighs (7 - i) / 4 at slice i, the -1 run the rest
    np.testing.assert_allclose(vol[4:7, 0, 0].numpy(), [0.75 * 0.5 + 0.25 * 0.1, 0.3, 0.25 * 0.5 + 0.75 * 0.1], atol=1e-6)
    np.testing.assert_allclose(vol[:3, 0, 0].numpy(), 0.1, atol=1e-6)
    spread = signals["run_spread"][:, 0, 0].numpy()  # |a - b| where the two runs of a gap meet, 0 where one run fills
    np.testing.assert_allclose(spread[[4, 5, 6, 8, 11]], [0.4, 0.4, 0.4, 0.4, 0.4], atol=1e-6)
    assert spread[[0, 1, 2, 3, 7, 12, 13, 14, 15]].tolist() == [0.0] * 9 and signals["run_spread"].shape == (16, 4, 4)
    one = {}
    fill_volume(_Recorder(), slices, idx, 16, grid, -1 / 15, signals=one)
    assert float(one["run_spread"].abs().sum()) == 0.0


def test_mrngan_fills_gaps_both_ways_unless_told_not_to():
    assert not one_pass_gaps(MRNGAN(hidden_channels=4, features=4, far_end=True))
    assert one_pass_gaps(MRNGAN(hidden_channels=4, features=4, far_end=True, both_ways=False))
    assert not one_pass_gaps(MRNGAN(hidden_channels=4, features=4))  # the paper cell: one-sided runs, no far end
    prior = type("P", (), {"slice_at": staticmethod(lambda positions, **kw: torch.full((len(positions), 1, 8, 8), 0.3))})()
    run = make_runner("mrngan", model=MRNGAN(hidden_channels=4, features=4, far_end=True), next_fn=_identity_next, prior=prior, fit_prior=False)
    assert is_gap_aware(run) and not one_pass_gaps(run)


def test_few_slice_reconstruction_with_the_far_end_cell():
    torch.manual_seed(0)
    model = MRNGAN(hidden_channels=4, features=4, far_end=True)
    prior = type("P", (), {"slice_at": staticmethod(lambda positions, **kw: torch.full((len(positions), 1, 8, 8), 0.3))})()
    run = make_runner("mrngan", model=model, next_fn=_identity_next, prior=prior, fit_prior=False)
    assert is_gap_aware(run) and not is_gap_aware(make_runner("mrngan", model=MRNGAN(hidden_channels=4, features=4), next_fn=_identity_next, prior=prior))
    given = torch.rand(3, 1, 8, 8)
    rec = reconstruct_volume(given, [0.6, 0.5, 0.4], method="mrngan", model=model, next_fn=_identity_next, prior=prior,
                             input_indices=[2, 7, 12], num_slices=15, step_p=-0.02, fit_prior=False)
    out = torch.from_numpy(np.moveaxis(rec.volume, 2, 0))
    torch.testing.assert_close(out[[2, 7, 12]], given[:, 0])
    assert out.shape == (15, 8, 8) and float(out.std()) > 0


# ------------------------------------------------------------------ the sampler and the training path
def _volume(depth: int = 40) -> dict:
    img = torch.arange(depth, dtype=torch.float32).view(1, 1, 1, depth).expand(1, 6, 5, depth).clone()
    return {"image": img, "positions": list(np.linspace(1.0, 0.0, depth)), "subject": "s1"}


def test_gap_sampler_yields_valid_open_runs_and_gaps():
    data = _volume()
    t = GapRund(run_length=6, num_samples=400, gap_fraction=0.5, min_gap=2, max_gap=16)
    t.set_random_state(0)
    out = t(data)
    gaps = [d["gap"] for d in out]
    assert 0.4 < np.mean([g > 0 for g in gaps]) < 0.6 and {min(g for g in gaps if g), max(gaps)} == {2, 16}
    assert {d["direction"].item() for d in out if d["gap"]} == {1.0, -1.0}
    for d in out:
        values = d["image"][:, 0, 0]
        step = d["direction"].item()
        assert d["image"].shape == (6, 6, 5) and torch.all(torch.diff(values) == step) and values[0].item() == d["slice_index"]
        if d["gap"]:
            far = d["slice_index"] + step * d["gap"]
            assert 0 <= far < 40 and torch.all(d["far_image"] == far) and d["far_image"].shape == (1, 6, 5)
            assert d["far_position"].item() == pytest.approx(data["positions"][int(far)])
        else:
            assert math.isnan(d["far_position"].item()) and float(d["far_image"].abs().sum()) == 0
    assert all(d["gap"] == 0 for d in GapRund(run_length=6, num_samples=20, gap_fraction=0.0)(data))
    det = GapRund(run_length=6, num_samples=None, directions=(-1,), max_gap=16)(data)
    assert len(det) == 35 + 24 and {d["gap"] for d in det} == {0, 16}
    short = GapRund(run_length=6, num_samples=30, gap_fraction=1.0, max_gap=16)(_volume(10))  # no room for k = 16
    assert all(d["gap"] <= 9 for d in short)
    for bad in (dict(gap_fraction=1.5), dict(min_gap=1), dict(min_gap=5, max_gap=4)):
        with pytest.raises(ValueError):
            GapRund(**bad)


def test_slab_mean_is_a_box_profile_over_the_slices_a_slab_covers():
    vol = torch.arange(10, dtype=torch.float32).pow(2).reshape(1, 1, 10).expand(2, 3, 10)
    assert torch.equal(slab_mean(vol, 4, 1.0), vol[..., 4])
    assert torch.allclose(slab_mean(vol, 4, 3.0), vol[..., 3:6].mean(-1))
    assert torch.allclose(slab_mean(vol, 4, 2.0), 0.25 * vol[..., 3] + 0.5 * vol[..., 4] + 0.25 * vol[..., 5])
    assert torch.allclose(slab_mean(vol, 0, 3.0), (2 * vol[..., 0] + vol[..., 1]) / 3)  # the end slice repeats
    with pytest.raises(ValueError):
        slab_mean(vol, 4, 0.5)


def test_slab_runs_thicken_the_given_slices_and_keep_the_targets_sharp():
    data = _volume()
    data["image"] = data["image"] ** 2  # not linear in depth, so a slab differs from its centre slice
    plain = GapRund(run_length=6, num_samples=50, gap_fraction=0.5)
    plain.set_random_state(3)
    off = GapRund(run_length=6, num_samples=50, gap_fraction=0.5, slab_prob=0.0)
    off.set_random_state(3)
    assert all(torch.equal(a["image"], b["image"]) and a["gap"] == b["gap"] for a, b in zip(plain(data), off(data)))
    t = GapRund(run_length=6, num_samples=200, gap_fraction=0.5, slab_prob=1.0, slab_slices=(2.0, 3.0))
    t.set_random_state(0)
    vol = data["image"][0]
    for d in t(data):
        start, step = d["slice_index"], int(d["direction"].item())
        idx = start + step * torch.arange(6)
        assert torch.equal(d["image"][1:], vol[..., idx[1:]].permute(2, 0, 1))  # targets sharp
        assert not torch.equal(d["image"][0], vol[..., start]) or start in (0, 39)
        centre = float(d["image"][0, 0, 0])
        assert vol[0, 0, max(start - 1, 0)] <= centre <= vol[0, 0, min(start + 1, 39)] + 1
        if d["gap"]:
            far = start + step * d["gap"]
            assert not torch.equal(d["far_image"][0], vol[..., far]) or far in (0, 39)
    with pytest.raises(ValueError):
        GapRund(slab_prob=2.0)
    with pytest.raises(ValueError):
        GapRund(slab_slices=(0.5, 2.0))
    det = GapRund(run_length=6, num_samples=None, slab_prob=1.0)(data)  # deterministic mode never makes slabs
    assert all(torch.equal(d["image"][0], vol[..., d["slice_index"]]) for d in det)


def test_run_batch_passes_the_far_end_and_training_uses_it():
    t = GapRund(run_length=5, num_samples=8, gap_fraction=0.5, max_gap=8)
    t.set_random_state(1)
    samples = t(_volume(24))
    batch = {k: torch.stack([torch.as_tensor(s[k]) for s in samples]) for k in ("image", "positions", "direction", "far_image", "far_position")}
    torch.manual_seed(0)
    start, target, _, kw = RunBatch(position_noise=0.05)(batch)
    assert kw["far"].shape == (8, 1, 6, 5) and kw["far_position"].shape == (8,)
    shift = kw["positions"][:, 0] - batch["positions"][:, 0]
    has = torch.isfinite(batch["far_position"][:, 0])
    torch.testing.assert_close(kw["far_position"][has] - batch["far_position"][has, 0], shift[has])  # same offset
    assert torch.isnan(kw["far_position"][~has]).all()
    model = MRNGAN(hidden_channels=4, features=4, far_end=True)
    net = RecurrentUnroll(model, _identity_next, type("P", (), {"slice_at": staticmethod(lambda p, **k: torch.zeros(len(p), 1, 6, 5))})())
    loss = WeightedL1L2Loss()(net(start / 24, **kw), target / 24)
    loss.backward()
    assert torch.isfinite(loss) and model.head[-1].weight.grad.abs().sum() > 0


def test_positions_json_reports_the_cells_weight_on_the_prior(tiny_dataset, tmp_path):
    """For MRNGAN every generated slice says how much the cell leaned on the prior (issue 14)."""
    import json

    from monai_mrngan.atlas.prior import mean_prior
    from monai_mrngan.data.datalist import load_split
    from monai_mrngan.data.io import load_volume, save_png
    from monai_mrngan.inference.components import Components, reference_grid
    from monai_mrngan.inference.reconstruct import reconstruct_files
    from monai_mrngan.networks.pix2pix import Pix2PixGenerator
    from monai_mrngan.networks.recurrent import MRNGAN

    vol, _ = load_volume(load_split(tiny_dataset, "test")[0]["image"])
    ref = reference_grid(tiny_dataset)
    torch.manual_seed(0)
    comp = Components(model=MRNGAN(far_end=True, hidden_channels=4, features=4), generator=Pix2PixGenerator(channels=(4, 8), strides=(2,)),
                      prior=mean_prior(tiny_dataset, "training"))
    png = save_png(vol[:, :, 12], tmp_path / "in.png")
    reconstruct_files([str(png)], str(tmp_path / "r.nii.gz"), comp, positions=[0.5], method="mrngan", expected_shape=ref["shape"],
                      spacing_mm=ref["spacing_mm"], reference_affine=ref["affine"], reference_positions=ref["positions"])
    slices = json.loads((tmp_path / "r_positions.json").read_text())["slices"]
    generated = [s for s in slices if not s["real"]]
    assert generated and all(0.0 <= s["prior_weight"] <= 1.0 for s in generated)
    assert all("prior_weight" not in s for s in slices if s["real"])


def test_a_half_size_state_keeps_the_weights_and_runs_weights_at_their_own_scale(caplog):
    """state_scale 2: the same parameters, a state of ceil(H/2) x ceil(W/2) at any slice size, full-size output;
    weights remember their scale (older weights count as 1) and a cell built at another scale takes theirs."""
    full, half = MRNGAN(hidden_channels=4, features=4, far_end=True), MRNGAN(hidden_channels=4, features=4, far_end=True, state_scale=2)
    assert {k: v.shape for k, v in full.state_dict().items()} == {k: v.shape for k, v in half.state_dict().items()}
    start, pos = torch.rand(2, 1, 15, 17), torch.tensor([[0.5, 0.49, 0.48], [0.3, 0.31, 0.32]])
    args = (start, pos, torch.tensor([1.0, -1.0]), _identity_next, lambda p: torch.full((*p.shape, 1, 15, 17), 0.4))
    with torch.no_grad():
        out = half.unroll(*args)
        assert out.shape == (2, 2, 15, 17) and half.zero_state(torch.zeros(2, 9, 15, 17)).shape == (2, 4, 8, 9)
    older = {k: v for k, v in full.state_dict().items() if k != "trained_state_scale"}  # saved before the option
    with caplog.at_level("WARNING"):
        half.load_state_dict(older)
    assert half.state_scale == 1 and int(half.trained_state_scale) == 1 and "running at 1, as trained" in caplog.text
    with torch.no_grad():
        torch.testing.assert_close(half.unroll(*args), full.unroll(*args), atol=1e-6, rtol=0)
    again = MRNGAN(hidden_channels=4, features=4, far_end=True)
    again.load_state_dict(MRNGAN(hidden_channels=4, features=4, far_end=True, state_scale=2).state_dict())
    assert again.state_scale == 2


def test_far_next_mixes_pix2pix_one_step_back_from_the_far_end_into_the_far_candidate():
    """far_next: one pix2pix call per run (far, -direction); untrained, the far candidate is half far slice,
    half that prediction; past the far end (or with none) it counts for nothing; far_next needs far_end."""
    calls = []

    def next_fn(prev, direction):
        calls.append(direction.clone())
        return (prev * 0.5).clamp(0, 1)

    with pytest.raises(ValueError, match="far_next needs far_end"):
        MRNGAN(far_next=True)
    model = MRNGAN(hidden_channels=4, features=4, far_end=True, far_next=True, init_weights=(1.0, 1e-6, 1e-6))
    assert model.in_channels == 10
    start, far = torch.full((1, 1, 8, 8), 0.6), torch.full((1, 1, 8, 8), 1.0)
    pos = torch.tensor([[0.5, 0.49, 0.48, 0.47]])
    with torch.no_grad():  # (pix2pix and the prior keep the blend's floor weight of 1e-3 each: tolerance 2e-3)
        out = model.unroll(start, pos, torch.ones(1), next_fn, _const_prior(0.3), far, torch.tensor([0.48]))
    assert len(calls) == 4 and float(calls[0][0]) == -1.0  # the step back from the far end, then one per step
    far_candidate = 0.5 * 1.0 + 0.5 * 0.5
    assert float(out[0, 0, 0, 0]) == pytest.approx(0.5 * 0.6 + 0.5 * far_candidate, abs=2e-3)
    assert float(out[0, 1, 0, 0]) == pytest.approx(far_candidate, abs=2e-3)  # at the far end
    assert float(out[0, 2, 0, 0]) == pytest.approx(far_candidate, abs=2e-3)  # past it: the previous output
    calls.clear()
    with torch.no_grad():  # no far end in the batch (one-slice runs): no extra call
        model.unroll(start, pos, torch.ones(1), next_fn, _const_prior(0.3), far, torch.tensor([float("nan")]))
    assert len(calls) == 3


def test_fusion_headroom_pairs_the_two_runs_of_each_gap():
    """scripts/bench/fusion_headroom reads back, per gap, the run from the lower end and the one from the upper end,
    each slice aligned with the slice it fills (a fake runner writes target index / 1000, + 0.5 on runs going down)."""
    from scripts.bench.fusion_headroom import _Recorder, gap_runs

    grid = 0.3 - 0.01 * np.arange(20)  # p falls with the index, as on prepared volumes

    def fake(starts, start_positions, directions, steps, step_p, far=None):
        i0 = torch.round((start_positions.double() - grid[0]) / step_p).long()
        t = torch.arange(1, steps + 1)
        target = i0.view(-1, 1) + directions.long().view(-1, 1) * t
        val = target.float() / 1000 + 0.5 * (directions.view(-1, 1) < 0)
        return val.view(len(i0), steps, 1, 1, 1).expand(-1, -1, 1, 2, 2)

    fake.gap_aware, fake.both_ways = True, True
    rec = _Recorder(fake, "cpu")
    given = [2, 6, 9, 17]
    fill_volume(rec, torch.rand(len(given), 1, 2, 2), given, 20, grid, -0.01)
    pairs = gap_runs(rec, grid, given)
    assert [lo for lo, _, _ in pairs] == [2, 6, 9]
    for lo, a, b in pairs:
        want = torch.arange(lo + 1, lo + 1 + a.shape[0]).float() / 1000
        torch.testing.assert_close(a[:, 0, 0], want)
        torch.testing.assert_close(b[:, 0, 0], want + 0.5)


def test_gap_unet_screen_starts_at_linear_interpolation():
    """scripts/bench/gap_unet: the untrained two-ended network is linear interpolation between the gap's ends, so
    its screen measures what training adds over linear."""
    from scripts.bench.gap_unet import GapUNet

    lower, upper = torch.rand(3, 1, 16, 16), torch.rand(3, 1, 16, 16)
    t = torch.tensor([0.25, 0.5, 0.75])
    out = GapUNet()(lower, upper, t, torch.full((3,), 4.0))
    torch.testing.assert_close(out, (1 - t.view(-1, 1, 1, 1)) * lower + t.view(-1, 1, 1, 1) * upper)
