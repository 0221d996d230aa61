"""Thick slabs: the slab operator, and volumes made to agree with the slabs a thick-slice scan recorded."""

import numpy as np
import pytest
import torch

from monai_mrngan.inference.reconstruct import reconstruct_volume
from monai_mrngan.transforms.slabs import slab_consistent, slab_mean, slab_operator


def _truth(depth: int = 30, size: int = 12, seed: int = 0) -> torch.Tensor:
    """(D, H, W) in [0.1, 0.9]: curved along the axial axis (where interpolating slab means misses), a little detail on top."""
    g = torch.Generator().manual_seed(seed)
    z = torch.linspace(0, 3.0, depth)[:, None, None]
    base = 0.5 + 0.25 * torch.sin(z + torch.rand(1, size, size, generator=g) * 6.0)
    return (base + 0.02 * (torch.rand(depth, size, size, generator=g) - 0.5)).clamp(0.1, 0.9)


@pytest.mark.parametrize("thickness", [1.0, 2.0, 2.5, 3.0, 3.2])
def test_slab_operator_rows_are_slab_mean_at_whole_centres(thickness):
    vol = _truth()
    a = torch.as_tensor(slab_operator(30, [0, 7, 29], thickness), dtype=torch.float32)
    assert torch.allclose(a.sum(1), torch.ones(3))
    got = torch.einsum("nd,dhw->nhw", a, vol)
    want = torch.stack([slab_mean(vol.permute(1, 2, 0), i, thickness) for i in (0, 7, 29)])
    assert torch.allclose(got, want, atol=1e-6)


def test_a_slab_between_grid_slices_weighs_them_by_the_share_it_covers():
    row = slab_operator(10, [4.5], 2.0)[0]  # covers slices 4 and 5 whole
    np.testing.assert_allclose(row[[4, 5]], [0.5, 0.5])
    np.testing.assert_allclose(row.sum(), 1.0)
    row = slab_operator(10, [4.25], 2.5)[0]  # 3.0 .. 5.5: half of slice 3 ([2.5, 3.5]), 4 and 5 whole
    np.testing.assert_allclose(row[[3, 4, 5]], np.array([0.5, 1.0, 1.0]) / 2.5)
    assert row.sum() == pytest.approx(1.0) and row[[2, 6]].sum() == 0


def test_the_consistent_volume_records_the_slabs_and_is_nearer_the_truth():
    truth = _truth()
    depth, k = truth.shape[0], 3
    centres = list(range(1, depth - 1, k))
    slabs = torch.stack([slab_mean(truth.permute(1, 2, 0), c, float(k)) for c in centres])
    guess = torch.zeros_like(truth)  # linear interpolation through the slabs, as if they were thin slices
    for z in range(depth):
        guess[z] = torch.from_numpy(np.stack([np.interp(z, centres, slabs[:, i, j].numpy()) for i in range(truth.shape[1])
                                              for j in range(truth.shape[2])]).reshape(truth.shape[1:]))
    before = guess.clone()
    fixed = slab_consistent(guess, slabs, centres, float(k))
    assert torch.equal(guess, before)  # the input is not modified
    assert fixed.min() >= 0 and fixed.max() <= 1
    a = torch.as_tensor(slab_operator(depth, centres, float(k)), dtype=torch.float32)
    assert torch.allclose(torch.einsum("nd,dhw->nhw", a, fixed), slabs, atol=1e-5)  # every slab is the mean of the volume over it
    assert ((fixed - truth) ** 2).mean() < 0.8 * ((guess - truth) ** 2).mean()  # and the volume is nearer the truth


def test_reconstruct_volume_makes_any_method_agree_with_thick_slabs():
    truth = _truth(depth=25)
    given = list(range(0, 25, 3))
    slabs = torch.stack([slab_mean(truth.permute(1, 2, 0), c, 3.0) for c in given])
    pos = [0.5 - 0.01 * g for g in given]  # p falls by spacing / 200 mm a slice
    kw = dict(method="linear", spacing_mm=2.0, num_slices=25, input_indices=given)
    plain = reconstruct_volume(slabs, pos, **kw)
    rec = reconstruct_volume(slabs, pos, slab_mm=6.0, **kw)
    assert "slab_mm" not in plain.extra and rec.extra["slab_mm"] == 6.0
    vol = torch.from_numpy(rec.volume).permute(2, 0, 1)
    a = torch.as_tensor(slab_operator(25, given, 3.0), dtype=torch.float32)
    assert torch.allclose(torch.einsum("nd,dhw->nhw", a, vol), slabs, atol=1e-4)
    assert not np.allclose(rec.volume, plain.volume)
    thin = reconstruct_volume(slabs, pos, slab_mm=2.0, **kw)  # no thicker than the grid: nothing to agree with
    np.testing.assert_array_equal(thin.volume, plain.volume)


def test_the_fill_is_kept_for_the_uncertainty_signals_with_how_much_the_step_changed():
    """The map's signals are the fill's (its prior fits keyed by the inputs as given), plus the step's change per voxel."""
    from monai_mrngan.inference.uncertainty import filled_volume, uncertainty_signals

    truth = _truth(depth=25)
    given = list(range(0, 25, 3))
    slabs = torch.stack([slab_mean(truth.permute(1, 2, 0), c, 3.0) for c in given])
    pos = [0.5 - 0.01 * g for g in given]
    kw = dict(method="linear", spacing_mm=2.0, num_slices=25, input_indices=given)
    plain = reconstruct_volume(slabs, pos, **kw)
    rec = reconstruct_volume(slabs, pos, slab_mm=6.0, **kw)
    np.testing.assert_array_equal(filled_volume(rec), plain.volume)
    assert filled_volume(plain) is plain.volume
    sig = uncertainty_signals(rec, None, 2.0, stride=1)
    np.testing.assert_allclose(sig["slab_change"], np.abs(rec.volume - plain.volume), atol=1e-7)
    assert sig["slab_change"].max() > 0 and np.all(sig["slab_mm"] == 6.0)
    assert np.array_equal(sig["intensity"], plain.volume)  # every other signal as on the fill
    thin = uncertainty_signals(plain, None, 2.0, stride=1)
    assert not thin["slab_change"].any() and not thin["slab_mm"].any()
