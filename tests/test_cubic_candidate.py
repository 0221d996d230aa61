"""The cell's cubic candidate (``network_def`` ``cubic``): the monotone cubic (PCHIP) through the given slices around a
gap, built the same way by the training sampler (from the regular ``k`` grid around each gap run) and by
reconstruction (from the whole stack), read by the cell as one more channel and blend candidate."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from monai_mrngan.engines.recurrent import RunBatch
from monai_mrngan.inference.volume import cubic_fill, fill_volume
from monai_mrngan.networks.recurrent import MRNGAN
from monai_mrngan.transforms import GapRund
from monai_mrngan.transforms.slabs import slab_mean
from monai_mrngan.transforms.slices import axial_pchip

NAN = float("nan")


def _curved_volume(depth: int = 40, size: int = 6) -> dict:
    """Each pixel's intensity follows its own smooth, non-linear curve along the axial axis (where PCHIP and the
    straight line differ)."""
    z = torch.arange(depth, dtype=torch.float32)
    phase = torch.linspace(0.0, 3.0, size * size).view(size, size, 1)
    img = 0.5 + 0.4 * torch.sin(0.15 * z.view(1, 1, -1) + phase)
    return {"image": img[None], "positions": list(np.linspace(1.0, 0.0, depth)), "subject": "s1"}


def test_axial_pchip_is_the_stack_baseline_and_local():
    vol = _curved_volume()["image"][0].permute(2, 0, 1)  # (D, H, W)
    given = [2, 9, 16, 23, 30, 37]
    whole = cubic_fill(vol[given], given, 40)
    inside = np.arange(2, 38)
    torch.testing.assert_close(axial_pchip(vol[given], given, inside), whole[2:38], atol=1e-6, rtol=0)
    # local: between 16 and 23 the curve needs only 9, 16, 23 and 30 (the four nodes a gap run holds)
    torch.testing.assert_close(axial_pchip(vol[[30, 9, 23, 16]], [30, 9, 23, 16], np.arange(16, 24)), whole[16:24], atol=1e-6, rtol=0)
    torch.testing.assert_close(axial_pchip(vol[[2, 9]], [2, 9], [2, 5.5, 9]), torch.stack([vol[2], (vol[2] + vol[9]) / 2, vol[9]]))
    with pytest.raises(ValueError, match="at least two"):
        axial_pchip(vol[:1], [0], [0])


def test_gap_runs_carry_the_cubic_the_whole_stack_gives():
    data = _curved_volume()
    vol = data["image"][0].permute(2, 0, 1)
    runs = GapRund(run_length=6, num_samples=None, directions=(-1,), max_gap=4, cubic=True)(data)
    gap_runs = [d for d in runs if d["gap"]]
    assert gap_runs and all(float(d["cubic_image"].abs().sum()) == 0 for d in runs if not d["gap"])
    for d in gap_runs:  # direction -1, k = 4: the run passes its far end after 4 steps
        s = d["slice_index"]
        given = list(range(s % 4, 40, 4))  # the stack every 4th slice through this run's start
        want = cubic_fill(vol[given], given, 40)[[s - t for t in range(5)]]
        torch.testing.assert_close(d["cubic_image"][:5], want, atol=1e-5, rtol=0)
        assert float(d["cubic_image"][5:].abs().sum()) == 0  # past the far end
    t = GapRund(run_length=6, num_samples=20, gap_fraction=1.0, min_gap=3, max_gap=3, slab_prob=1.0, slab_slices=(3.0, 3.0), cubic=True)
    t.set_random_state(0)
    for d in t(data):  # thick given slices: the nodes are slabs like the ends
        s, k, dr = d["slice_index"], d["gap"], int(d["direction"])
        nodes = [i for i in (s - dr * k, s, s + dr * k, s + 2 * dr * k) if 0 <= i < 40]
        slabs = torch.stack([slab_mean(data["image"][0], i, 3.0) for i in nodes])
        torch.testing.assert_close(d["cubic_image"][: k + 1], axial_pchip(slabs, nodes, s + dr * np.arange(k + 1)), atol=1e-6, rtol=0)
        torch.testing.assert_close(d["cubic_image"][0], d["image"][0])
    batch = {k: torch.stack([torch.as_tensor(d[k]) for d in gap_runs[:2]]) for k in ("image", "positions", "direction", "far_image", "far_position", "cubic_image")}
    _, _, _, kw = RunBatch()(batch)
    assert tuple(kw["cubic"].shape) == (2, 6, 1, 6, 6)


def _prior(p):
    return torch.full((p.shape[0], p.shape[1], 1, 8, 8), 0.3)


def _same(prev, direction):
    return prev


def test_cubic_cell_blends_the_candidate_on_gap_runs_only():
    torch.manual_seed(0)
    model = MRNGAN(hidden_channels=4, features=4, far_end=True, far_next=True, interp=True, cubic=True, state_scale=2)
    assert model.in_channels == 12 and model.step_channels[-1] == "cubic"
    with pytest.raises(ValueError, match="cubic needs far_end"):
        MRNGAN(cubic=True)
    start, far = torch.rand(2, 1, 8, 8), torch.rand(2, 1, 8, 8)
    pos = torch.tensor([[0.5, 0.49, 0.48, 0.47]] * 2)
    far_p = torch.tensor([0.47, NAN])  # a gap run and an open run
    args = (start, pos, torch.ones(2), _same, _prior, far, far_p, None)
    with torch.no_grad():
        lin = torch.lerp(start[:, None], far[:, None], torch.tensor([0.0, 1 / 3, 2 / 3, 1.0]).view(1, 4, 1, 1, 1))
        plain = model.unroll(*args)
        torch.testing.assert_close(plain, model.unroll(*args, lin))  # no cubic given: the linear blend of the ends
        bright = model.unroll(*args, torch.ones(2, 4, 1, 8, 8))
    assert float((bright[0] - plain[0]).min()) > 0  # the untrained cell gives the candidate weight on the gap run
    torch.testing.assert_close(bright[1], plain[1])  # and none on the open run
    with pytest.raises(ValueError, match="cubic must be"):
        model.unroll(*args, torch.ones(2, 3, 1, 8, 8))
    with pytest.raises(ValueError, match="11-channel step input, this cell reads 12.*cubic"):
        model.load_state_dict(MRNGAN(hidden_channels=4, features=4, far_end=True, far_next=True, interp=True).state_dict())


class _CubicEcho:
    """A gap-aware runner that wants the cubic and fills every slice of a gap run with it (its start elsewhere)."""

    gap_aware, both_ways, wants_cubic = True, True, True

    def __call__(self, starts, start_positions, directions, steps, step_p, far=None, cubic=None):
        assert cubic is not None and tuple(cubic.shape) == (starts.shape[0], steps + 1, *starts.shape[1:])
        torch.testing.assert_close(cubic[torch.isfinite(far[1]), 0], starts[torch.isfinite(far[1])])
        return torch.where(torch.isfinite(far[1]).view(-1, 1, 1, 1, 1), cubic[:, 1:], starts[:, None].expand(-1, steps, -1, -1, -1))


def test_reconstruction_hands_the_cell_the_stacks_cubic_in_every_gap():
    vol = _curved_volume(30, 8)["image"][0].permute(2, 0, 1)
    given = [4, 9, 13, 20, 26]  # irregular gaps: the cubic through the whole stack
    out = fill_volume(_CubicEcho(), vol[given], given, 30, torch.linspace(1.0, 0.0, 30), -1 / 29)
    torch.testing.assert_close(out[4:27], cubic_fill(vol[given], given, 30)[4:27].clamp(0, 1), atol=1e-6, rtol=0)


def test_contiguous_slab_runs_are_drawn_like_a_thick_slice_acquisition():
    data = _curved_volume()
    vol = data["image"][0]
    t = GapRund(run_length=6, num_samples=200, gap_fraction=0.5, min_gap=2, max_gap=16, slab_prob=0.4, slab_contiguous=True, slab_gaps=(2, 4))
    t.set_random_state(0)
    runs = t(data)
    slabs = [d for d in runs if not torch.equal(d["image"][0], vol[..., d["slice_index"]])]
    assert 50 < len(slabs) < 110  # about 40 % of 200
    for d in slabs:  # contiguous: the slab is as thick as the gap, the gap in slab_gaps, the far end a slab too
        k, s, dr = d["gap"], d["slice_index"], int(d["direction"])
        assert 2 <= k <= 4
        torch.testing.assert_close(d["image"][0], slab_mean(vol, s, float(k)))
        torch.testing.assert_close(d["far_image"][0], slab_mean(vol, s + dr * k, float(k)))
    assert any(d["gap"] > 4 for d in runs) and any(d["gap"] == 0 for d in runs)  # the other runs as without slabs
    plain, again = GapRund(run_length=6, num_samples=50, slab_prob=0.3), GapRund(run_length=6, num_samples=50, slab_prob=0.3, slab_gaps=(2, 6))
    plain.set_random_state(3)
    again.set_random_state(3)  # slab_gaps alone changes nothing: draws as before
    assert [(d["slice_index"], d["gap"]) for d in plain(data)] == [(d["slice_index"], d["gap"]) for d in again(data)]
    with pytest.raises(ValueError, match="slab_gaps"):
        GapRund(slab_gaps=(1, 3))
