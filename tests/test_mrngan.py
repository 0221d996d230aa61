"""The MRNGAN stage: recurrent cell, training pieces, one-/few-slice reconstruction, baselines,
evaluation report, and the bundle (train -> evaluate -> infer) through ConfigWorkflow.

The other stages (localization, pix2pix, prior) are replaced by small stand-ins defined here, so
these tests do not depend on them: a randomly initialised residual next-slice module and the
plain mean-brain prior of the training split.
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from ignite.engine import Events
from PIL import Image

from monai_mrngan.data.datalist import load_split
from monai_mrngan.data.io import InputError, load_volume, save_nifti, save_png
from monai_mrngan.engines.recurrent import RecurrentUnroll, RunBatch, WeightedL1L2Loss, trainable_parameters
from monai_mrngan.atlas.prior import BrainPrior, mean_prior
from monai_mrngan.evaluation.reconstruction import evaluate_reconstruction
from monai_mrngan.inference.components import Components, load_bundle_network, reference_grid
from monai_mrngan.inference.reconstruct import reconstruct_files, reconstruct_volume
from monai_mrngan.inference.volume import fill_volume, linear_fill, one_per_grid_slice, volume_grid
from monai_mrngan.networks.contracts import next_fn_for
from monai_mrngan.networks.recurrent import MRNGAN

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundles" / "mrngan"
SPACING = 200.0 / 24  # the tiny dataset's axial spacing (24 slices over p in [0, 0.96])


# ------------------------------------------------------------------ stand-ins for the other stages
class TinyNext(torch.nn.Module):
    """A next-slice stand-in: clamp(x + 0.1 tanh(conv([x, direction])), 0, 1)."""

    def __init__(self, device: str | torch.device = "cpu") -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(2, 1, 3, padding=1, device=device)

    def forward(self, x: torch.Tensor, direction: torch.Tensor) -> torch.Tensor:
        d = torch.as_tensor(direction, dtype=x.dtype, device=x.device).reshape(-1, 1, 1, 1).expand_as(x)
        return (x + 0.1 * torch.tanh(self.conv(torch.cat([x, d], 1)))).clamp(0, 1)


def stand_in_predict_next(generator, slices, direction):
    """The flow stage's ``predict_next`` contract, for :class:`TinyNext`."""
    return generator(slices, direction)


class ConstPrior:
    """A prior whose every slice is ``value`` (shape (B,1,H,W))."""

    def __init__(self, value: float, size: int = 32) -> None:
        self.value, self.size = value, size

    def slice_at(self, positions, reference=None, reference_position=None):
        return torch.full((len(positions), 1, self.size, self.size), self.value)


@pytest.fixture(scope="module")
def prior(tiny_dataset) -> BrainPrior:
    return mean_prior(tiny_dataset, "training")


@pytest.fixture(scope="module")
def test_volume(tiny_dataset):
    entry = load_split(tiny_dataset, "test")[0]
    vol, affine = load_volume(entry["image"])
    return vol, affine, np.asarray(entry["positions"]), entry


def _next_fn(seed: int = 0, trainable: bool = False):
    torch.manual_seed(seed)
    gen = TinyNext()
    return gen, next_fn_for(gen, trainable, stand_in_predict_next)


# ------------------------------------------------------------------ the cell
@pytest.mark.parametrize("cell", ["rnn", "gru"])
@pytest.mark.parametrize("output", ["blend", "residual", "direct"])
def test_unroll_shapes_range_and_gradients(cell, output):
    torch.manual_seed(0)
    model = MRNGAN(cell=cell, output=output, hidden_channels=4, features=4)
    _, nf = _next_fn()
    start = torch.rand(2, 1, 16, 16)
    pos = torch.tensor([[0.5, 0.49, 0.48, 0.47], [0.5, 0.51, 0.52, 0.53]])
    prior_fn = lambda p: torch.full((p.shape[0], p.shape[1], 1, 16, 16), 0.3)  # noqa: E731
    out = model.unroll(start, pos, torch.tensor([1.0, -1.0]), nf, prior_fn)
    assert out.shape == (2, 3, 16, 16)
    assert 0.0 <= float(out.detach().min()) and float(out.detach().max()) <= 1.0
    out.mean().backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and any(float(g.abs().sum()) > 0 for g in grads)


def test_blend_starts_as_the_configured_mixture():
    """Zero-initialised head: the first step is exactly 0.2 previous + 0.6 pix2pix + 0.2 prior."""
    model = MRNGAN(init_weights=(0.2, 0.6, 0.2), hidden_channels=4, features=4)
    start = torch.rand(1, 1, 8, 8)
    pix = torch.rand(1, 1, 8, 8)
    out = model.unroll(
        start, torch.tensor([[0.5, 0.49]]), torch.tensor([1.0]), lambda s, d: pix, lambda p: torch.full((1, 2, 1, 8, 8), 0.5)
    )
    expected = (0.2 * start + 0.6 * pix + 0.2 * 0.5).clamp(0, 1)
    torch.testing.assert_close(out[:, :1], expected, atol=1e-5, rtol=0)


def test_bad_cell_or_output_rejected():
    with pytest.raises(ValueError, match="cell"):
        MRNGAN(cell="lstm")
    with pytest.raises(ValueError, match="output"):
        MRNGAN(output="softmax")


# ------------------------------------------------------------------ training pieces
def _batch(vol: np.ndarray, positions: np.ndarray, starts=(4, 15), length: int = 5):
    runs, pos, dirs = [], [], []
    for s, d in zip(starts, (1, -1)):
        idx = np.arange(s, s + d * length, d)
        runs.append(torch.from_numpy(np.moveaxis(vol[:, :, idx], 2, 0)))
        pos.append(torch.from_numpy(positions[idx]).float())
        dirs.append(torch.tensor([float(d)]))
    return {"image": torch.stack(runs), "positions": torch.stack(pos), "direction": torch.stack(dirs)}


def test_training_lowers_the_loss_and_freezes_pix2pix(test_volume, prior):
    vol, _, positions, _ = test_volume
    batch = _batch(vol, positions)
    start, target, _, kw = RunBatch()(batch)
    assert start.shape == (2, 1, 32, 32) and target.shape == (2, 4, 32, 32)
    torch.testing.assert_close(start[1, 0], torch.from_numpy(vol[:, :, 15]))  # direction -1 starts at the top
    torch.manual_seed(0)
    model = MRNGAN(hidden_channels=8, features=8)
    gen, nf = _next_fn()
    gen_before = [p.detach().clone() for p in gen.parameters()]
    net = RecurrentUnroll(model, nf, prior, generator=gen, finetune=False)
    assert not any(n.startswith("flow") for n in net.state_dict())  # frozen pix2pix is not saved with the cell
    params = trainable_parameters(model, gen, finetune=False)
    assert len(params) == len(list(model.parameters()))
    opt = torch.optim.Adam(params, 1e-2)
    loss_fn = WeightedL1L2Loss(1.0, 0.5)
    losses = []
    for _ in range(25):
        opt.zero_grad()
        loss = loss_fn(net(start, **kw), target)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses
    assert all(torch.equal(a, b) for a, b in zip(gen_before, gen.parameters()))


def test_finetune_updates_pix2pix(test_volume, prior):
    vol, _, positions, _ = test_volume
    start, target, _, kw = RunBatch()(_batch(vol, positions))
    model = MRNGAN(hidden_channels=4, features=4)
    gen, nf = _next_fn(trainable=True)
    net = RecurrentUnroll(model, nf, prior, generator=gen, finetune=True)
    assert any(n.startswith("flow.") for n in net.state_dict())
    before = [p.detach().clone() for p in gen.parameters()]
    opt = torch.optim.Adam(trainable_parameters(model, gen, True), 1e-2)
    WeightedL1L2Loss()(net(start, **kw), target).backward()
    opt.step()
    assert not all(torch.equal(a, b) for a, b in zip(before, gen.parameters()))


def test_weighted_loss_weights():
    pred, target = torch.zeros(1, 2, 4, 4), torch.full((1, 2, 4, 4), 0.5)
    assert WeightedL1L2Loss(1.0, 0.0)(pred, target).item() == pytest.approx(0.5)
    assert WeightedL1L2Loss(2.0, 4.0)(pred, target).item() == pytest.approx(2.0)


def test_weighted_loss_ssim_term_is_one_minus_the_metrics_ssim():
    """``ssim_weight`` adds ``w * (1 - SSIM)`` over every step's slice, SSIM as the evaluation measures it."""
    from monai_mrngan.metrics.image import slice_metrics

    g = torch.Generator().manual_seed(0)
    target = torch.rand(2, 3, 24, 24, generator=g)
    pred = (target + 0.2 * torch.rand(2, 3, 24, 24, generator=g)).clamp(0, 1)
    plain = WeightedL1L2Loss(1.0, 0.5)(pred, target).item()
    ssim = slice_metrics(pred.reshape(-1, 1, 24, 24), target.reshape(-1, 1, 24, 24))["ssim"].mean().item()
    assert WeightedL1L2Loss(1.0, 0.5, ssim_weight=0.3, ssim_slices=0)(pred, target).item() == pytest.approx(plain + 0.3 * (1 - ssim), abs=1e-5)
    sub = [WeightedL1L2Loss(0.0, 0.0, ssim_weight=1.0, ssim_slices=2, seed=s)(pred, target).item() for s in range(40)]
    assert len(set(sub)) > 1 and np.mean(sub) == pytest.approx(1 - ssim, abs=0.02)  # two of six slices: unbiased
    assert WeightedL1L2Loss(0.0, 0.0, ssim_weight=1.0)(target, target).item() == pytest.approx(0.0, abs=1e-6)
    head = slice_metrics(pred.reshape(-1, 1, 24, 24), target.reshape(-1, 1, 24, 24))["ssim_head"].mean().item()
    assert WeightedL1L2Loss(0.0, 0.0, ssim_weight=1.0, ssim_region="head", ssim_slices=0)(pred, target).item() == pytest.approx(1 - head, abs=1e-5)
    with pytest.raises(ValueError, match="ssim_region"):
        WeightedL1L2Loss(ssim_region="brain")


# ------------------------------------------------------------------ placement, blending, baselines
def test_volume_grid_covers_the_extent_and_rejects_collisions():
    grid, idx = volume_grid([0.5], -0.01)
    assert len(grid) == 101 and idx == [50] and grid[0] == pytest.approx(1.0) and grid[-1] == pytest.approx(0.0)
    grid, idx = volume_grid([0.3, 0.5], -0.1)
    assert idx == [7, 5] and grid[idx[0]] == pytest.approx(0.3)
    with pytest.raises(ValueError, match=r"input slices 0 and 1 \(of 2\) at positions 0.3000 and 0.3020 fall on the same grid slice"):
        volume_grid([0.3, 0.302], -0.01)
    with pytest.raises(ValueError, match=r"slices 3 and 90 \(of 91\)") as err:  # the first pair named, not every position
        volume_grid([0.9 - 0.01 * k for k in range(90)] + [0.9 - 0.01 * 3], -0.01, reference=[1.0 - 0.01 * i for i in range(101)])
    assert len(str(err.value)) < 150


def test_a_stack_thinner_than_the_grid_keeps_the_input_nearest_each_grid_slice():
    # 1 mm slices on a 2 mm grid (step 0.01 in p): every grid slice takes one input, the nearest
    pos = [0.5 - 0.005 * k for k in range(7)]  # 0.5, 0.495, ..., 0.47
    keep = one_per_grid_slice(pos, -0.01)
    assert keep == [0, 2, 4, 6]
    grid, idx = volume_grid([pos[k] for k in keep], -0.01)  # no collision left
    assert len(set(idx)) == 4
    reference = [1.0 - 0.01 * i for i in range(101)]
    assert one_per_grid_slice([0.304, 0.301, 0.297, 0.294], -0.01, reference) == [1, 3]  # 0.301 nearest 0.30; 0.294 on 0.29
    assert one_per_grid_slice([0.3, 0.5], -0.01) == [0, 1]  # slices further apart than the grid: all kept
    # half-way between two grid slices (1 mm slices on a 2 mm grid): snapped as volume_grid will snap the float32 positions
    halves = [0.61, 0.505, 0.5, 0.495, 0.49]
    keep = one_per_grid_slice(halves, -0.01, reference)
    assert keep == [0, 2, 4]
    volume_grid(torch.as_tensor([halves[k] for k in keep], dtype=torch.float32).tolist(), -0.01, reference=reference)  # no collision
    assert volume_grid([0.64, 0.635], -0.01, reference=reference)[1] == [36, 37]  # a float64 tie snaps as its float32 does


def test_linear_fill_is_linear_interpolation(test_volume):
    vol, *_ = test_volume
    given = [2, 10, 18]
    out = linear_fill(torch.from_numpy(np.moveaxis(vol[:, :, given], 2, 0)), given, 24).numpy()
    for i in given:
        np.testing.assert_array_equal(out[i], vol[:, :, i])
    np.testing.assert_allclose(out[5], vol[:, :, 2] * 5 / 8 + vol[:, :, 10] * 3 / 8, atol=1e-6)
    np.testing.assert_allclose(out[0], vol[:, :, 2], atol=1e-6)  # nearest copy beyond the ends
    np.testing.assert_allclose(out[23], vol[:, :, 18], atol=1e-6)


def test_gap_blending_uses_both_sides():
    """Runs from below return 0, from above 1: a gap of 3 gets 1/4, 2/4, 3/4 towards the upper slice."""

    def run(starts, start_positions, directions, steps, step_p):
        return (directions < 0).float().view(-1, 1, 1, 1, 1).expand(-1, steps, 1, 4, 4).clone()

    vol = fill_volume(run, torch.full((2, 1, 4, 4), 0.5), [2, 6], 8, np.linspace(1, 0.3, 8), -0.1)
    np.testing.assert_allclose(vol[3:6, 0, 0].numpy(), [0.25, 0.5, 0.75], atol=1e-6)
    assert float(vol[0, 0, 0]) == 1.0 and float(vol[7, 0, 0]) == 0.0  # one-sided runs outwards


def test_reconstruct_single_slice_all_methods(test_volume, prior):
    vol, _, positions, _ = test_volume
    model = MRNGAN(hidden_channels=4, features=4)
    _, nf = _next_fn()
    i0 = 12
    for method in ("mrngan", "pix2pix_iterative", "prior", "copy"):
        rec = reconstruct_volume(vol[:, :, i0], [positions[i0]], method=method, model=model, next_fn=nf, prior=prior, spacing_mm=SPACING)
        assert rec.volume.shape == (32, 32, 25)  # p from 0 to 1 in steps of 1/24
        assert rec.positions[0] == pytest.approx(1.0, abs=1e-4) and rec.positions[-1] == pytest.approx(0.0, abs=1e-4)
        j = rec.input_indices[0]
        assert rec.positions[j] == pytest.approx(positions[i0], abs=1e-6)
        np.testing.assert_array_equal(rec.volume[:, :, j], vol[:, :, i0])
    copy = reconstruct_volume(vol[:, :, i0], [positions[i0]], method="copy", spacing_mm=SPACING).volume
    assert np.allclose(copy, vol[:, :, i0:i0 + 1])
    pri = reconstruct_volume(vol[:, :, i0], [positions[i0]], method="prior", prior=ConstPrior(0.25), spacing_mm=SPACING).volume
    assert np.allclose(np.delete(pri, j, axis=2), 0.25)
    with pytest.raises(ValueError, match="needs model"):
        reconstruct_volume(vol[:, :, i0], [0.5], method="mrngan", spacing_mm=SPACING)


def test_reconstruct_localizes_when_no_position_given(test_volume, monkeypatch):
    vol, *_ = test_volume
    calls = []

    def localize(network, slices):
        calls.append(tuple(slices.shape))
        return torch.full((slices.shape[0],), 0.25)

    monkeypatch.setattr("monai_mrngan.inference.reconstruct.localize", localize)
    rec = reconstruct_volume(vol[:, :, 10], None, method="copy", localizer=torch.nn.Identity(), spacing_mm=SPACING)
    assert calls == [(1, 1, 32, 32)] and rec.input_positions == [0.25]
    assert rec.positions[rec.input_indices[0]] == pytest.approx(0.25)


# ------------------------------------------------------------------ evaluation report
def test_evaluation_report_shape_and_baseline_sanity(tiny_dataset, prior, tmp_path):
    _, nf = _next_fn()
    comp = Components(model=MRNGAN(hidden_channels=4, features=4, far_end=True), next_fn=nf, prior=prior)
    report = evaluate_reconstruction(tiny_dataset, tmp_path, comp, tensorboard=False)
    methods = report["single_slice"]["methods"]
    assert set(methods) == {"mrngan", "pix2pix_iterative", "prior", "copy"}
    for entry in methods.values():
        assert set(entry) == {"ssim", "ssim_head", "psnr", "mse", "by_distance"}
        assert set(entry["by_distance"][0]) == {"d", "ssim", "ssim_head", "psnr", "mse"}
        assert entry["by_distance"][0]["d"] == 1 and all(np.isfinite(entry[k]) for k in ("ssim", "psnr", "mse"))
    copy = {r["d"]: r for r in methods["copy"]["by_distance"]}
    assert copy[1]["mse"] < copy[8]["mse"]  # copying degrades with distance
    few = report["few_slices"]
    assert set(few) == {"k2", "k4", "k8", "k16"}
    assert all(set(few[k]) == {"mrngan", "linear", "cubic", "registration"} for k in few)
    assert all(few[k]["registration"]["mse"] != few[k]["linear"]["mse"] for k in ("k2", "k4", "k8"))
    assert few["k2"]["linear"]["mse"] < few["k4"]["linear"]["mse"] < few["k8"]["linear"]["mse"]
    assert all(few[k]["cubic"]["mse"] != few[k]["linear"]["mse"] for k in ("k2", "k4", "k8"))
    assert few["k16"]["cubic"] == pytest.approx(few["k16"]["linear"], abs=1e-5)  # 25 slices: k = 16 gives two slices, PCHIP is the straight line
    assert json.loads((tmp_path / "report.json").read_text()) == json.loads(json.dumps(report))
    rows = (tmp_path / "per_distance.csv").read_text().splitlines()
    assert rows[0] == "setting,method,d,d_mm,n,ssim,ssim_head,psnr,mse" and len(rows) > 4 * 10
    few_rows = [r.split(",") for r in rows[1:] if not r.startswith("single,")]
    methods = ("mrngan", "linear", "cubic", "registration")
    thick = methods + ("linear_plain", "cubic_plain")  # the interpolations also as a user runs them: not made to agree with the slabs
    assert {(r[0], r[1]) for r in few_rows} == ({(f"k{k}", m) for k in (2, 4, 8, 16) for m in methods} | {("thick_k3", m) for m in thick})
    assert set(report["thick_slices"]) == {"k3"} and set(report["thick_slices"]["k3"]) == set(thick)
    assert sorted(int(r[2]) for r in few_rows if r[0] == "k8" and r[1] == "cubic") == [1, 2, 3, 4]  # d: to the nearest given slice
    for metric in ("ssim", "ssim_head", "psnr", "mse"):
        assert (tmp_path / f"distance_{metric}.png").stat().st_size > 1000
    # thick slices: the same given places as every 3rd slice, but slabs, so linear fills differently (here better: a
    # slab averages the slices around it, closer to the missing ones than its centre slice is)
    both = evaluate_reconstruction(tiny_dataset, tmp_path / "thick", comp, methods=(), few_slice_k=(3,), few_slice_methods=("linear",),
                                   thick_slice_k=(3,), tensorboard=False)
    assert 0 < both["thick_slices"]["k3"]["linear"]["mse"] != pytest.approx(both["few_slices"]["k3"]["linear"]["mse"], rel=0.05)
    assert both["thick_slices"]["k3"]["linear"]["mse"] < both["thick_slices"]["k3"]["linear_plain"]["mse"]  # agreeing with the slabs helps


# ------------------------------------------------------------------ stage bundle loading
def test_load_bundle_network_resolves_references_and_weights(tmp_path):
    cfg = tmp_path / "stage" / "configs" / "train.json"
    cfg.parent.mkdir(parents=True)
    cfg.write_text(json.dumps({"width": 3, "network_def": {"_target_": "torch.nn.Conv2d", "in_channels": 1, "out_channels": "@width", "kernel_size": 1}}))
    ref = torch.nn.Conv2d(1, 3, 1)
    torch.save(ref.state_dict(), tmp_path / "model.pt")
    net = load_bundle_network(cfg, tmp_path / "model.pt")
    torch.testing.assert_close(net.weight, ref.weight)
    with pytest.raises(ValueError, match="weights do not fit") as err:  # trained with other settings
        load_bundle_network(cfg, tmp_path / "model.pt", overrides={"width": 4})
    assert "\n" not in str(err.value)
    with pytest.raises(FileNotFoundError, match="no bundle config"):
        load_bundle_network(tmp_path / "missing.json")


# ------------------------------------------------------------------ the bundle end to end
def _overrides(tiny_dataset, tmp_path) -> dict:
    return {
        "bundle_root": str(BUNDLE),
        "dataset_dir": str(tiny_dataset),
        "ckpt_dir": str(tmp_path / "models"),
        "output_dir": str(tmp_path / "eval"),
        "generator": {"_target_": f"{__name__}.TinyNext", "device": "@device"},  # on the bundle's device, as load_bundle_network places the real one
        "predict_next": {"_target_": f"{__name__}.stand_in_predict_next", "_mode_": "callable"},
        "prior": "$monai_mrngan.atlas.prior.mean_prior(@dataset_dir, 'training')",
    }


def _train_overrides(tiny_dataset, tmp_path) -> dict:
    return {
        **_overrides(tiny_dataset, tmp_path),
        "epochs": 1,
        "run_length": 4,
        "runs_per_volume": 2,
        "volumes_per_batch": 2,
        "val_runs_per_volume": 2,
        "network_def#hidden_channels": 4,
        "network_def#features": 4,
        "localize_inputs": False,
    }


def test_the_ssim_term_picks_the_best_epoch_by_the_validation_loss(tiny_dataset, tmp_path):
    """With the SSIM term on, models/model.pt follows the lowest val_loss (the training loss on the validation
    runs), not val_psnr, which a loss trading PSNR for SSIM never beats after its first epochs."""
    from monai.bundle import ConfigWorkflow

    cfg = str(BUNDLE / "configs" / "train.json")
    plain = ConfigWorkflow(workflow_type="train", config_file=cfg, **_train_overrides(tiny_dataset, tmp_path / "plain"))
    plain.initialize()
    best = plain.parser.get_parsed_content("best_checkpoint")
    assert (best.metric_name, best.mode) == ("val_psnr", "max")
    by_mae = ConfigWorkflow(workflow_type="train", config_file=cfg, **{**_train_overrides(tiny_dataset, tmp_path / "mae"), "best_metric": "val_mae"})
    by_mae.initialize()
    assert by_mae.parser.get_parsed_content("best_checkpoint").mode == "min"  # every metric but PSNR: lower is better

    wf = ConfigWorkflow(workflow_type="train", config_file=cfg, **{**_train_overrides(tiny_dataset, tmp_path), "epochs": 3, "ssim_weight": 0.5})
    wf.initialize()
    best = wf.parser.get_parsed_content("best_checkpoint")
    assert (best.metric_name, best.mode) == ("val_loss", "min")
    seen = []
    evaluator = wf.parser.get_parsed_content("validate#evaluator")
    evaluator.add_event_handler(Events.EPOCH_COMPLETED, lambda e: seen.append(float(e.state.metrics["val_loss"])))
    wf.run()
    wf.finalize()
    assert len(seen) == 3 and all(np.isfinite(seen)) and best.best == pytest.approx(min(seen))
    loss = wf.parser.get_parsed_content("val_loss_fn")
    assert loss.ssim_weight == 0.5 and loss.ssim_slices == 0  # every slice: the same value for the same weights


def test_bundle_train_evaluate_infer(tiny_dataset, tmp_path):
    from monai.bundle import ConfigWorkflow

    cfg = BUNDLE / "configs"
    train = ConfigWorkflow(workflow_type="train", config_file=str(cfg / "train.json"), **_train_overrides(tiny_dataset, tmp_path))
    train.initialize()
    assert train.check_properties() == []
    train.run()
    train.finalize()
    assert (tmp_path / "models" / "model.pt").is_file() and (tmp_path / "models" / "last.pt").is_file()
    assert list((tmp_path / "eval").glob("events.out.tfevents*")) and list((tmp_path / "eval" / "train_img").glob("events*"))

    ov = _train_overrides(tiny_dataset, tmp_path)
    ov.update(epochs=2)
    resumed = ConfigWorkflow(workflow_type="train", config_file=str(cfg / "train.json"), **ov)
    resumed.initialize()
    ran = []
    trainer = resumed.parser.get_parsed_content("train#trainer")
    trainer.add_event_handler(Events.EPOCH_COMPLETED, lambda e: ran.append(e.state.epoch))
    resumed.run()
    assert ran == [2] and trainer.state.iteration == 2 * 3  # resumed after epoch 1 (6 volumes / 2 per batch)
    resumed.finalize()

    ev = ConfigWorkflow(workflow_type="train", config_file=[str(cfg / "train.json"), str(cfg / "evaluate.json")], **_train_overrides(tiny_dataset, tmp_path))
    ev.initialize()
    ev.run()
    ev.finalize()
    report = json.loads((tmp_path / "eval" / "reconstruction" / "report.json").read_text())
    assert set(report["single_slice"]["methods"]) == {"mrngan", "pix2pix_iterative", "prior", "copy"}
    assert set(report["few_slices"]["k8"]) == {"mrngan", "linear", "cubic", "registration"}
    assert (tmp_path / "eval" / "metrics.csv").is_file()

    # inference: one PNG slice, one 2D NIfTI slice, a set of slices of a 3D NIfTI
    entry = load_split(tiny_dataset, "test")[0]
    vol, affine = load_volume(entry["image"])
    save_png(vol[:, :, 12], tmp_path / "in.png")
    save_nifti(vol[:, :, 12], affine, tmp_path / "in2d.nii.gz")
    cases = [
        ([str(tmp_path / "in.png")], None, [entry["positions"][12]]),
        ([str(tmp_path / "in2d.nii.gz")], None, [entry["positions"][12]]),
        ([entry["image"]] * 1, 12, [entry["positions"][12]]),
    ]
    for n, (files, sidx, pos) in enumerate(cases):
        out = tmp_path / "rec" / f"rec{n}.nii.gz"
        infer = ConfigWorkflow(
            workflow_type="infer", config_file=str(cfg / "inference.json"), **_overrides(tiny_dataset, tmp_path),
            **{"input_files": files, "slice_index": sidx, "input_positions": pos, "output_file": str(out), "network_def#hidden_channels": 4, "network_def#features": 4},
        )
        infer.initialize()
        infer.run()
        infer.finalize()
        img = nib.load(str(out))
        assert img.shape == vol.shape
        # the model grid is the prepared data's; a NIfTI input's OUT sits in that input's own space beside it
        grid_file = out.with_name(f"rec{n}_model_grid.nii.gz")
        np.testing.assert_allclose(nib.load(str(grid_file)).affine if grid_file.exists() else img.affine, affine, atol=1e-4)
        assert (tmp_path / "rec" / f"rec{n}_montage.png").is_file()
        meta = json.loads((tmp_path / "rec" / f"rec{n}_positions.json").read_text())
        assert meta["input_indices"] == [12] and len(meta["positions"]) == vol.shape[2]


def test_reconstruct_files_few_slices_and_bad_inputs(tiny_dataset, tmp_path, prior):
    entry = load_split(tiny_dataset, "test")[0]
    vol, affine = load_volume(entry["image"])
    ref = reference_grid(tiny_dataset)
    comp = Components(prior=prior)
    kw = dict(expected_shape=ref["shape"], spacing_mm=ref["spacing_mm"], reference_affine=ref["affine"], reference_positions=ref["positions"])
    files = []
    for i in (4, 12, 20):
        save_nifti(vol[:, :, i], affine, tmp_path / f"s{i}.nii.gz")
        files.append(str(tmp_path / f"s{i}.nii.gz"))
    pos = [entry["positions"][i] for i in (4, 12, 20)]
    res = reconstruct_files(files, str(tmp_path / "few.nii.gz"), comp, positions=pos, method="linear", **kw)
    out = nib.load(res["volume"])
    assert out.shape == vol.shape and res["input_indices"] == [4, 12, 20]
    np.testing.assert_allclose(out.get_fdata()[:, :, 8], 0.5 * vol[:, :, 4] + 0.5 * vol[:, :, 12], atol=1e-5)

    coronal = np.zeros((vol.shape[0], 1, vol.shape[2]), np.float32)
    coronal[:, 0] = vol[:, 16, :]
    save_nifti(coronal, affine, tmp_path / "coronal.nii.gz")  # a coronal plane: its normal runs along y
    rgb = np.zeros((32, 32, 3), np.uint8)
    rgb[..., 0] = 200
    Image.fromarray(rgb, "RGB").save(tmp_path / "colour.png")
    nan = vol[:, :, 12].copy()
    nan[3, 3] = np.nan
    save_nifti(nan, affine, tmp_path / "nan.nii.gz")
    bad = [
        (tmp_path / "coronal.nii.gz", "slice stored along another axis"),
        (tmp_path / "colour.png", "colour image"),
        (Path(entry["image"]), "pass a slice index"),
        (tmp_path / "nan.nii.gz", "NaN"),
    ]
    for path, text in bad:
        with pytest.raises(InputError, match=text) as err:
            reconstruct_files([str(path)], str(tmp_path / "x.nii.gz"), comp, positions=[0.5], method="copy", **kw)
        assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_components_from_bundles_loads_what_exists(tmp_path):
    from monai_mrngan.inference.components import components_from_bundles

    model = MRNGAN(far_end=True, state_scale=4, far_next=True, interp=True)  # inference.json's network_def
    with torch.no_grad():
        model.head[-1].bias.fill_(0.123)
    (tmp_path / "mrngan" / "models").mkdir(parents=True)
    torch.save(model.state_dict(), tmp_path / "mrngan" / "models" / "model.pt")
    comp = components_from_bundles(REPO / "bundles", tmp_path)
    assert isinstance(comp.model, MRNGAN) and not comp.model.training
    torch.testing.assert_close(comp.model.head[-1].bias, model.head[-1].bias)
    assert comp.generator is None and comp.prior is None and comp.localizer is None


def test_finetune_default_predict_keeps_gradients():
    gen = TinyNext()
    nf = next_fn_for(gen, trainable=True)  # the flow stage's predict_next is no_grad: a differentiable copy is used
    out = nf(torch.rand(2, 1, 8, 8), torch.tensor([1.0, -1.0]))
    out.mean().backward()
    assert gen.conv.weight.grad is not None and float(gen.conv.weight.grad.abs().sum()) > 0
