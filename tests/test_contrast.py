"""A prior that takes the input's contrast: the monotone intensity mapping of the atlas fit (``intensity="monotone"``)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from monai_mrngan.atlas.fit import apply_lut, monotone_lut
from monai_mrngan.atlas.prior import BrainPrior, FitConfig
from monai_mrngan.data.datalist import load_split
from monai_mrngan.data.io import load_volume
from monai_mrngan.metrics.image import slice_metrics

FAST_FIT = {"work_size": 32, "affine_iters": 20, "deform_iters": 20, "grid_points": 6, "top_k": 2}


def _head_slice(seed: int = 0, size: int = 48) -> torch.Tensor:
    """A slice with air around a head of graded tissue intensities in (0.15, 0.95)."""
    g = torch.Generator().manual_seed(seed)
    y, x = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    r = (x**2 + (y / 0.8) ** 2).sqrt()
    head = 0.15 + 0.8 * (1 - r).clamp(0, 1) + 0.05 * torch.rand(size, size, generator=g)
    return torch.where(r < 0.9, head.clamp(0, 0.95), torch.zeros(()))


def test_lut_is_monotone_keeps_air_and_recovers_a_gamma_curve():
    prior = _head_slice()
    truth = prior**1.6  # the same anatomy from a scanner with another contrast curve
    lut = monotone_lut(prior, truth)
    assert lut.shape[0] == 2 and bool((lut[0, 1:] > lut[0, :-1]).all()) and bool((lut[1, 1:] >= lut[1, :-1]).all())
    assert float(lut[0, 0]) == 0 and float(lut[1, 0]) == 0 and float(lut[0, -1]) == 1
    ramp = torch.linspace(0, 1, 501)
    out = apply_lut(ramp, lut)
    assert bool((out[1:] >= out[:-1]).all()) and float(out.min()) >= 0 and float(out.max()) <= 1
    assert float(apply_lut(torch.zeros(4, 4), lut).abs().max()) == 0  # air stays air
    mapped = apply_lut(prior, lut)
    head = prior > 0.1
    assert float((mapped - truth)[head].abs().mean()) < 0.01
    assert float((prior - truth)[head].abs().mean()) > 0.1  # the curve was far from identity
    # an identity pair gives (about) the identity; no head at all gives exactly the identity
    assert float((apply_lut(prior, monotone_lut(prior, prior)) - prior).abs().max()) < 0.01
    empty = torch.zeros(8, 8)
    assert torch.equal(apply_lut(ramp, monotone_lut(empty, empty)), ramp)


def test_fit_config_refuses_unknown_intensity():
    with pytest.raises(ValueError, match="intensity"):
        FitConfig(intensity="histogram")


def _setup(dataset, gamma: float):
    """Grid, bank (every training volume) and the last one as a scanner with contrast curve ``v ** gamma`` gives it:
    its anatomy is in the bank, so the fit's geometry is (nearly) exact and its intensity mapping is what differs."""
    entries = load_split(dataset, "training")
    vols = [load_volume(e["image"])[0] for e in entries]
    grid = np.asarray(entries[0]["positions"])
    bank = np.stack([np.moveaxis(v, -1, 0) for v in vols])
    return grid, bank, np.clip(vols[-1], 0, 1) ** gamma


def test_monotone_fit_follows_a_gamma_shifted_input(tiny_dataset):
    """Fitted to a gamma-shifted slice, the monotone prior is closer to the gamma-shifted truth than the linear one,
    on the other slices too; air stays 0; the lookup table is kept on the fit."""
    grid, bank, patient = _setup(tiny_dataset, 2.0)
    i = 10
    fit = {**FAST_FIT, "top_k": 1}
    ref = torch.from_numpy(patient[..., i])[None, None].float()
    others = [j for j in range(len(grid)) if j != i and patient[..., j].max() > 0.1]
    truth = torch.from_numpy(np.moveaxis(patient[..., others], -1, 0))[:, None].float()
    pos = torch.from_numpy(grid[others])
    scores = {}
    for intensity in ("linear", "monotone"):
        prior = BrainPrior(bank, grid, FitConfig(mode="affine", intensity=intensity, **fit))
        pred = prior.slice_at(pos, ref, float(grid[i]))
        assert float(pred.min()) >= 0 and float(pred.max()) <= 1
        scores[intensity] = float(slice_metrics(pred, truth)["psnr"].mean())
        assert int(prior.last_fit.atlas_index[0]) == len(bank) - 1  # the patient's own anatomy
        assert (prior.last_fit.lut is not None) == (intensity == "monotone")
        if intensity == "monotone":
            assert float(pred[..., :2, :].abs().max()) == 0  # the rows outside every head stay air
    assert scores["monotone"] > scores["linear"] + 3.0 and scores["monotone"] > 30.0, scores


def test_monotone_lut_applies_to_slices_warped_later(tiny_dataset):
    """A fit warped in two calls (a few grid slices first, the rest later) equals one warped at once."""
    grid, bank, patient = _setup(tiny_dataset, 0.6)
    i = 12
    ref = torch.from_numpy(patient[..., i])[None, None].float()
    cfg = FitConfig(mode="affine", intensity="monotone", **FAST_FIT)
    later = BrainPrior(bank, grid, cfg)
    later.slice_at(torch.from_numpy(grid[i - 2 : i + 3]), ref, float(grid[i]))
    pos = torch.from_numpy(grid)
    at_once = BrainPrior(bank, grid, cfg).slice_at(pos, ref, float(grid[i]))
    assert torch.allclose(later.slice_at(pos, ref, float(grid[i])), at_once, atol=1e-5)
