"""Slice localization: networks, metrics, inference inputs and the bundle through ConfigWorkflow."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from monai_mrngan.data.grid import HEAD_LEVEL
from monai_mrngan.data.io import InputError, save_nifti, save_png
from monai_mrngan.inference.localize import localize, localize_files, prepare_slice, slice_items
from monai_mrngan.metrics.localization import LocalizationMetric, format_table, localization_metrics, mean_position
from monai_mrngan.networks.localizers import LOCALIZERS, LocalizerCNN

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundles" / "slice_localization"
CONFIGS = BUNDLE / "configs"
SIZE = 32

torch.set_num_threads(1)


@pytest.mark.parametrize("name", list(LOCALIZERS))
def test_networks_shape_range_and_size_check(name):
    net = LOCALIZERS[name](spatial_size=[SIZE, SIZE])
    out = net(torch.rand(3, 1, SIZE, SIZE))
    assert out.shape == (3, 1)
    assert ((out >= 0) & (out <= 1)).all()
    with pytest.raises(ValueError, match="expects slices shaped"):
        net(torch.rand(2, 1, SIZE * 2, SIZE))


def test_paper_cnn_layout():
    net = LocalizerCNN(spatial_size=[SIZE, SIZE])
    convs = [m for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs] == [128, 64, 32, 1]
    assert all(c.kernel_size == (3, 3) and c.padding == (1, 1) for c in convs)
    linears = [m for m in net.modules() if isinstance(m, torch.nn.Linear)]
    assert [(l.in_features, l.out_features) for l in linears] == [(SIZE * SIZE, 256), (256, 1)]
    # downsample keeps the input contract but halves the working size
    small = LocalizerCNN(spatial_size=[SIZE, SIZE], downsample=2)
    assert [m for m in small.modules() if isinstance(m, torch.nn.Linear)][0].in_features == SIZE * SIZE // 4
    assert small(torch.rand(2, 1, SIZE, SIZE)).shape == (2, 1)


def test_metrics_values():
    true = np.array([0.05, 0.15, 0.25, 0.45, 0.65, 0.85])
    perfect = localization_metrics(true, true, slice_mm=2.0)
    assert perfect["mse"] == 0 and perfect["accuracy"] == 1 and perfect["f1"] == 1
    pred = true + 0.01
    m = localization_metrics(pred, true, slice_mm=2.0)
    assert m["mae_mm"] == pytest.approx(2.0) and m["mae_slices"] == pytest.approx(1.0)
    assert m["mse"] == pytest.approx(1e-4)
    # +0.01 keeps every value in its 20 % bin
    assert m["accuracy"] == 1.0
    wrong = localization_metrics(np.full(6, 0.5), true)  # everything predicted in bin 2
    assert wrong["accuracy"] == pytest.approx(1 / 6)
    assert wrong["recall"] == pytest.approx(1 / 5)  # classes 0,1,2,3,4 present; only bin 2 recalled
    assert wrong["precision"] == pytest.approx((1 / 6) / 5)
    assert mean_position([{"positions": [0.0, 1.0]}, {"positions": [0.5]}]) == pytest.approx(0.5)
    table = format_table({"CNN": m, "baseline": wrong})
    assert "| Accuracy | 1.0000 | 0.1667 |" in table


def test_ignite_metric_accepts_decollated_lists():
    metric = LocalizationMetric("mae_mm")
    metric.reset()
    metric.update(([torch.tensor([0.1]), torch.tensor([0.2])], [torch.tensor([0.1]), torch.tensor([0.3])]))
    assert metric.compute() == pytest.approx(0.05 * 200)
    with pytest.raises(ValueError, match="unknown localization metric"):
        LocalizationMetric("iou")


def test_localize_contract():
    net = LocalizerCNN(spatial_size=[SIZE, SIZE]).train()
    p = localize(net, torch.rand(5, 1, SIZE, SIZE), batch_size=2)
    assert p.shape == (5,) and p.dtype == torch.float32
    assert net.training  # mode restored
    with pytest.raises(ValueError, match=r"\(B, 1, H, W\)"):
        localize(net, torch.rand(5, SIZE, SIZE))


def test_inputs_resize_refuse_and_errors(tmp_path):
    img = np.zeros((64, 64), dtype=np.float32)
    img[16:48, 20:44] = 0.8
    # a 2D NIfTI of the wrong size with 1 mm pixels is resampled to 2 mm and centred
    nii = save_nifti(img[:, :, None], np.diag([1.0, 1.0, 1.0, 1.0]), tmp_path / "one.nii.gz")
    (item,) = slice_items(nii, spatial_size=SIZE)
    assert item["image"].shape == (1, SIZE, SIZE)
    assert item["image"].max() == pytest.approx(HEAD_LEVEL, abs=1e-4)  # scaled by its head as prepare scales, though in [0, 1]
    assert (item["image"][0] > 0.4).sum() == pytest.approx(16 * 12, rel=0.15)  # 32x24 mm head at 2 mm
    # a PNG of the wrong size: pixel size unknown -> clear refusal, accepted with pixel_mm
    png = save_png(img, tmp_path / "slice.png")
    with pytest.raises(InputError, match=r"slice\.png: slice is 64x64 px .* pass pixel_mm"):
        slice_items(png, spatial_size=SIZE)
    assert slice_items(png, spatial_size=SIZE, pixel_mm=1.0)[0]["image"].shape == (1, SIZE, SIZE)
    # a right-size PNG is used as is
    ok = save_png(np.random.default_rng(0).random((SIZE, SIZE)), tmp_path / "ok.png")
    assert slice_items(ok, spatial_size=SIZE)[0]["image"].shape == (1, SIZE, SIZE)
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(InputError, match="bad.png"):
        slice_items(bad, spatial_size=SIZE)
    with pytest.raises(InputError, match="no such file"):
        slice_items(tmp_path / "missing.nii.gz", spatial_size=SIZE)
    txt = tmp_path / "notes.txt"
    txt.write_text("x")
    with pytest.raises(InputError, match="unsupported file type"):
        slice_items(txt, spatial_size=SIZE)
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(InputError, match="no .png"):
        slice_items(tmp_path / "empty_dir", spatial_size=SIZE)
    # prepare_slice scales raw intensities like prepare (the head's 75th percentile -> HEAD_LEVEL)
    raw = prepare_slice(img[16:48, 16:48] * 1000, SIZE)
    assert np.percentile(raw[raw > 0.1], 75) == pytest.approx(HEAD_LEVEL, abs=0.02) and raw.max() <= 1.0


def test_localize_files_on_prepared_volume(tiny_dataset, tmp_path):
    net = LocalizerCNN(spatial_size=[SIZE, SIZE])
    vol = sorted((tiny_dataset / "volumes").glob("*.nii.gz"))[0]
    out = localize_files(net, [vol], tmp_path / "pos.csv", spatial_size=SIZE)
    rows = list(csv.DictReader(open(out)))
    assert len(rows) == nib.load(str(vol)).shape[2]
    assert {"source", "slice_index", "p", "depth_mm", "bin"} <= set(rows[0])
    assert all(0 <= float(r["p"]) <= 1 for r in rows)


def _workflow(kind, files, **override):
    from monai.bundle import ConfigWorkflow

    wf = ConfigWorkflow(workflow_type=kind, config_file=[str(f) for f in files], **override)
    wf.initialize()
    assert wf.check_properties() in ([], None)
    wf.run()
    wf.finalize()
    return wf


@pytest.mark.parametrize(
    "network",
    [
        {"_target_": "monai_mrngan.networks.localizers.LocalizerCNN", "spatial_size": "@spatial_size", "filters": [8, 8, 4, 1], "hidden": 16},
        {"_target_": "monai_mrngan.networks.localizers.LocalizerDCNNRes", "spatial_size": "@spatial_size", "channels": [4, 8], "strides": [2, 2]},
    ],
    ids=["CNN", "DCNN-Res"],
)
def test_bundle_train_resume_evaluate_infer(tiny_dataset, tmp_path, network):
    common = {
        "bundle_root": str(BUNDLE),
        "dataset_dir": str(tiny_dataset),
        "ckpt_dir": str(tmp_path / "models"),
        "spatial_size": [SIZE, SIZE],
        "network_def": network,
        "slices_per_volume": 4,
        "volumes_per_batch": 3,
    }
    _workflow("train", [CONFIGS / "train.json"], output_dir=str(tmp_path / "eval"), epochs=1, **common)
    assert (tmp_path / "models" / "model.pt").is_file() and (tmp_path / "models" / "last.pt").is_file()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags: dict[str, list] = {"images": [], "scalars": []}
    for ev in (tmp_path / "eval").glob("events.out.tfevents.*"):
        acc = EventAccumulator(str(ev), size_guidance={"images": 0}).Reload()
        for k in tags:
            tags[k] += acc.Tags()[k]
    assert {"train_positions", "val_positions"} <= set(tags["images"])
    assert {"train_loss", "val_mae_mm", "val_accuracy"} <= set(tags["scalars"])
    state = torch.load(tmp_path / "models" / "last.pt", weights_only=True)
    assert state["trainer"]["iteration"] == state["trainer"]["epoch_length"] == 2  # 6 volumes / 3 per batch
    # resume: a second run with epochs=2 continues from epoch 1
    _workflow("train", [CONFIGS / "train.json"], output_dir=str(tmp_path / "eval"), epochs=2, **common)
    assert torch.load(tmp_path / "models" / "last.pt", weights_only=True)["trainer"]["iteration"] == 4

    _workflow("train", [CONFIGS / "train.json", CONFIGS / "evaluate.json"], output_dir=str(tmp_path / "test"), **common)
    metrics = json.loads((tmp_path / "test" / "metrics.json").read_text())
    assert metrics["split"] == "test" and metrics["n_slices"] == 24
    for side in ("model", "baseline"):
        assert {"mse", "mae_mm", "mae_slices", "accuracy", "precision", "recall", "f1"} <= set(metrics[side])
    assert metrics["baseline"]["mae_mm"] > 0
    assert "train-mean baseline" in (tmp_path / "test" / "metrics.md").read_text()

    infer = {k: v for k, v in common.items() if k not in ("slices_per_volume", "volumes_per_batch")}
    infer["dataset_dir"] = str(tiny_dataset / "volumes")
    _workflow("infer", [CONFIGS / "inference.json"], output_dir=str(tmp_path / "infer"), **infer)
    rows = list(csv.DictReader(open(tmp_path / "infer" / "positions.csv")))
    assert len(rows) == 8 * 24


def test_bundle_metadata_and_configs_parse():
    meta = json.loads((CONFIGS / "metadata.json").read_text())
    assert meta["version"] in meta["changelog"]
    assert meta["network_data_format"]["inputs"]["image"]["spatial_shape"] == [128, 128]
    for name in ("train", "evaluate", "inference", "multi_gpu_train"):
        cfg = json.loads((CONFIGS / f"{name}.json").read_text())
        assert "run" in cfg
    assert (BUNDLE / "docs" / "README.md").is_file() and (BUNDLE / "LICENSE").is_file()


@pytest.mark.ixi
def test_raw_ixi_volume_is_prepared_like_training(ixi_dir):
    raw = sorted(ixi_dir.glob("*.nii*"))[0]
    items = slice_items(raw, spatial_size=128, spacing_mm=2.0)
    assert len(items) > 50
    assert all(it["image"].shape == (1, 128, 128) for it in items)
    ref = np.array([it["reference_p"] for it in items])
    assert np.isfinite(ref).all() and ref.min() >= 0 and ref.max() <= 1


class _Constant(torch.nn.Module):
    """A localizer that answers the same ``p`` for every slice (a badly trained one)."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.full((x.shape[0], 1), self.p)


def test_a_whole_stack_is_placed_by_one_offset_matched_to_the_mean_brain(tmp_path):
    """A localizer that places every slice at one height puts the median offset far off; the whole
    stack's match to the mean brain brings a phantom volume back within 8 mm."""
    from monai_mrngan.atlas.bank import build_bank
    from monai_mrngan.atlas.prior import BrainPrior, template_localizer_for
    from monai_mrngan.data.datalist import load_split
    from monai_mrngan.data.io import load_volume
    from monai_mrngan.data.phantoms import write_phantom_cohort
    from monai_mrngan.data.prepare import prepare_dataset
    from monai_mrngan.inference.localize import localize_with_offset, place_slices

    write_phantom_cohort(tmp_path / "bids", subjects=10, size=64, seed=3, progress=False)
    prepare_dataset(tmp_path / "bids", tmp_path / "prep", spacing=4.0, size=64, split="0.8,0,0.2", progress=False)
    prior = BrainPrior(*build_bank(load_split(tmp_path / "prep", "training"), 101))
    template = template_localizer_for(prior)
    assert template_localizer_for(prior) is template  # built once per prior
    tests = load_split(tmp_path / "prep", "test")
    assert tests
    for entry in tests:
        vol, _ = load_volume(entry["image"])
        slices, truth = np.moveaxis(vol, -1, 0), np.asarray(entry["positions"])
        rel = truth - truth[0]
        plain, _ = localize_with_offset(_Constant(0.35), slices, rel)
        refined, info = localize_with_offset(_Constant(0.35), slices, rel, template, window=0.3)
        err_plain, err = (float(np.mean(np.abs(p - truth))) * 200 for p in (plain, refined))
        assert err <= 8.0 < err_plain, (err, err_plain)
        assert info["offset_p_localizer"] == pytest.approx(float(plain[0] - rel[0]), abs=1e-5) and "offset_refined" in info
        # the template alone places a volume cut at the top when there is no trained localizer
        offsets_mm = (truth[0] - truth) * 200
        cut = slices[:-3], offsets_mm[:-3]
        placed, how = place_slices(None, cut[0], cut[1], 4.0, template=template)
        assert how["method"] == "localized slices, one offset"
        assert float(np.mean(np.abs(placed - truth[:-3]))) * 200 <= 8.0


class _Linear(torch.nn.Module):
    """A localizer that reads ``p`` off the slice's mean (the test's slices carry it), counting the slices it sees."""

    def __init__(self) -> None:
        super().__init__()
        self.seen = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen += x.shape[0]
        return x.mean((1, 2, 3)).view(-1, 1)


def test_a_long_stack_is_placed_from_at_most_max_localized_slices(monkeypatch):
    """A thin-slice volume's one offset comes from at most MAX_LOCALIZED slices spread over all of it (a 1 mm volume's
    240 took 12 s), and the offset is still the median over them: one slice far off moves nothing."""
    import monai_mrngan.inference.localize as localize_module

    monkeypatch.setattr(localize_module, "MAX_LOCALIZED", 16)
    rel = -np.arange(100) * 0.005  # 100 slices, 1 mm apart, downwards from p0
    p0 = 0.8
    slices = np.ones((100, 8, 8), np.float32) * (p0 + rel)[:, None, None].astype(np.float32)
    slices[50] = 0.9  # one slice the localizer gets wrong
    net = _Linear()
    pos, info = localize_module.localize_with_offset(net, slices, rel)
    assert net.seen == info["localized_slices"] == 16
    assert pos == pytest.approx(p0 + rel, abs=1e-6)
    few = _Linear()
    localize_module.localize_with_offset(few, slices[:10], rel[:10])
    assert few.seen == 10  # a short stack: every slice


def test_localization_bound_recovers_a_head_stretched_along_its_axis(tiny_dataset):
    from scripts.bench.localization_bound import P, best_map, bounds

    mean = np.stack([np.exp(-((P - 0.4) / 0.2) ** 2), np.clip(P * 1.5, 0, 1), np.sin(3 * P) ** 2])
    stretched = np.stack([np.interp((P - 0.02) / 1.1, P, m) for m in mean])  # anatomy 10 % deeper, 4 mm lower
    a, b = best_map(stretched, mean)
    assert abs(a - 1.1) <= 0.01 and abs(b - 0.02) <= 0.004
    assert best_map(mean, mean) == pytest.approx((1.0, 0.0), abs=1e-9)
    rows = bounds(str(tiny_dataset))
    assert rows["training"] and all(r["ideal_mae_mm"] >= 0 and "profile" not in r for s in rows.values() for r in s)
