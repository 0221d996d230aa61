"""Slice samplers: shapes, positions, directions, determinism, and use through CacheDataset."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data import CacheDataset, DataLoader
from monai.transforms import Compose, EnsureTyped, LoadImaged

from monai_mrngan.data.datalist import load_split
from monai_mrngan.transforms import AdjacentSlicePaird, AxialSliced, SliceRund


def volume(depth: int = 12) -> dict:
    # slice k is filled with the value k, so every output can be traced back to its index
    img = torch.arange(depth, dtype=torch.float32).view(1, 1, 1, depth).expand(1, 8, 6, depth).clone()
    return {"image": img, "positions": list(np.linspace(1.0, 0.0, depth)), "subject": "s1", "session": None}


def test_axial_slice_carries_its_position():
    data = volume()
    t = AxialSliced(num_samples=20)
    t.set_random_state(0)
    out = t(data)
    assert len(out) == 20
    for d in out:
        k = d["slice_index"]
        assert d["image"].shape == (1, 8, 6) and torch.all(d["image"] == k)
        assert d["position"].shape == (1,) and d["position"].item() == pytest.approx(data["positions"][k])
        assert d["subject"] == "s1" and d["session"] == ""
    all_slices = AxialSliced(num_samples=None)(data)
    assert [d["slice_index"] for d in all_slices] == list(range(12))


def test_adjacent_pairs_both_directions():
    t = AdjacentSlicePaird(num_samples=200, step=2)
    t.set_random_state(1)
    out = t(volume())
    dirs = {d["direction"].item() for d in out}
    assert dirs == {1.0, -1.0}
    for d in out:
        src, dst = d["image"][0, 0, 0].item(), d["label"][0, 0, 0].item()
        assert dst - src == 2 * d["direction"].item()
        assert 0 <= min(src, dst) and max(src, dst) <= 11
        assert d["target_position"].item() == pytest.approx(volume()["positions"][int(dst)])
    forward_only = AdjacentSlicePaird(num_samples=None, directions=(1,))(volume())
    assert len(forward_only) == 11 and all(d["direction"].item() == 1 for d in forward_only)
    with pytest.raises(ValueError):
        AdjacentSlicePaird(directions=(2,))


def test_runs_are_in_generation_order():
    t = SliceRund(run_length=5, num_samples=50)
    t.set_random_state(2)
    for d in t(volume()):
        values = d["image"][:, 0, 0]
        assert d["image"].shape == (5, 8, 6)
        assert torch.all(torch.diff(values) == d["direction"].item())
        assert values[0].item() == d["slice_index"]
        assert d["positions"].shape == (5,)
    with pytest.raises(ValueError, match="fewer than run_length"):
        SliceRund(run_length=20)(volume())


def test_bad_volume_dictionaries():
    with pytest.raises(KeyError, match="prepare"):
        AxialSliced()({"image": torch.zeros(1, 4, 4, 3)})
    with pytest.raises(ValueError, match="entries"):
        AxialSliced()({"image": torch.zeros(1, 4, 4, 3), "positions": [0.1, 0.2]})


def test_cached_pipeline_over_prepared_dataset(tiny_dataset):
    data = load_split(tiny_dataset, "training")
    ds = CacheDataset(
        data,
        transform=Compose([
            LoadImaged(keys="image", ensure_channel_first=True, image_only=True),
            EnsureTyped(keys="image", dtype=torch.float32, track_meta=False),
            AdjacentSlicePaird(num_samples=4),
        ]),
        progress=False,
    )
    batch = next(iter(DataLoader(ds, batch_size=3, shuffle=True)))
    assert batch["image"].shape == (12, 1, 32, 32) and batch["label"].shape == (12, 1, 32, 32)
    assert batch["direction"].shape == (12, 1) and len(batch["subject"]) == 12
    assert 0.0 <= batch["image"].min() and batch["image"].max() <= 1.0
