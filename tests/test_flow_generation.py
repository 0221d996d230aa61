"""Flow generation (pix2pix next slice): generator, trainer, predict_next / rollout, bundle workflows."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from ignite.engine import Events
from monai.bundle import ConfigParser, ConfigWorkflow
from monai.networks.nets import PatchDiscriminator

from monai_mrngan.data.io import InputError, save_nifti, save_png
from monai_mrngan.engines.pix2pix import Pix2PixTrainer
from monai_mrngan.inference.flow import load_generator, predict_file, predict_next, rollout, rollout_batch, rollout_both
from monai_mrngan.evaluation.flow import evaluate_flow
from monai_mrngan.networks.pix2pix import Pix2PixGenerator

BUNDLE = Path(__file__).resolve().parents[1] / "bundles" / "flow_generation"
CONFIGS = BUNDLE / "configs"
TINY = {
    "unet_channels": [8, 16, 32],
    "d_channels": 8,
    "epochs": 1,
    "volumes_per_batch": 2,
    "samples_per_volume": 4,
    "val_limit": 1,
    "val_image_index": 0,
}


@pytest.fixture(autouse=True)
def _threads():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


class ShiftModel(torch.nn.Module):
    """Stand-in generator in [-1, 1]: adds 0.2 * direction (0.1 in [0, 1] units)."""

    def __init__(self):
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(()))

    def forward(self, x, direction):
        return torch.clamp(x + 0.2 * direction.view(-1, 1, 1, 1), -1, 1)


# --- generator -------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["input", "pair"])
@pytest.mark.parametrize("size", [64, 128, 256])
def test_generator_sizes_and_zero_init_copy(mode, size):
    g = Pix2PixGenerator(channels=(4, 8, 16, 16), direction_mode=mode).eval()
    x = torch.rand(2, 1, size, size) * 2 - 1
    with torch.no_grad():
        y = g(x, torch.tensor([1.0, -1.0]))
    assert y.shape == x.shape
    # the residual parameterization with a zero-initialised head starts as the copy baseline
    assert torch.allclose(y, x)


def test_generator_direct_output_and_direction_matters():
    torch.manual_seed(0)
    g = Pix2PixGenerator(channels=(4, 8, 16), residual=False, dropout=0.5).eval()
    x = torch.rand(2, 1, 32, 32) * 2 - 1
    with torch.no_grad():
        up, down = g(x, 1), g(x, -1)
    assert up.abs().max() <= 1.0 and not torch.allclose(up, x)
    assert not torch.allclose(up, down)  # the direction channel changes the prediction


def test_pair_mode_routes_each_sample_to_its_model():
    torch.manual_seed(0)
    g = Pix2PixGenerator(channels=(4, 8, 16), direction_mode="pair", zero_init=False).eval()
    x = torch.rand(3, 1, 32, 32) * 2 - 1
    d = torch.tensor([1.0, -1.0, 1.0])
    with torch.no_grad():
        mixed = g(x, d)
        assert torch.allclose(mixed[[0, 2]], g(x[[0, 2]], 1), atol=1e-6)
        assert torch.allclose(mixed[1:2], g(x[1:2], -1), atol=1e-6)
        assert not torch.allclose(g(x[:1], 1), g(x[:1], -1))


def test_generator_rejects_bad_input():
    g = Pix2PixGenerator(channels=(4, 8, 16))
    with pytest.raises(ValueError, match="divisible by 4"):
        g(torch.zeros(1, 1, 30, 32))
    with pytest.raises(ValueError, match=r"\+1 or -1"):
        g(torch.zeros(2, 1, 32, 32), torch.tensor([1.0, 0.0]))
    with pytest.raises(ValueError, match="direction_mode"):
        Pix2PixGenerator(direction_mode="both")


# --- trainer -----------------------------------------------------------------------------------


@pytest.mark.parametrize("criterion", ["bce", "least_squares"])
def test_trainer_updates_both_networks_and_lowers_l1(criterion):
    from monai.losses import PatchAdversarialLoss

    torch.manual_seed(0)
    g = Pix2PixGenerator(channels=(8, 16, 32))
    d = PatchDiscriminator(spatial_dims=2, channels=8, in_channels=3, num_layers_d=2)
    x = torch.rand(4, 1, 32, 32) * 2 - 1
    y = torch.clamp(x + 0.3, -1, 1)  # a learnable "next slice"
    batch = {"image": x, "label": y, "direction": torch.ones(4, 1)}
    d0 = [p.detach().clone() for p in d.parameters()]
    tr = Pix2PixTrainer(
        "cpu", 1, [batch] * 12, g, torch.optim.Adam(g.parameters(), 2e-3, betas=(0.5, 0.999)), d,
        torch.optim.Adam(d.parameters(), 2e-4, betas=(0.5, 0.999)), adversarial_loss=PatchAdversarialLoss(criterion=criterion),
    )
    losses = []
    tr.add_event_handler(Events.ITERATION_COMPLETED, lambda e: losses.append(e.state.output["g_rec"]))
    tr.run()
    out = tr.state.output
    assert set(out) >= {"image", "label", "pred", "g_loss", "d_loss", "g_adv", "g_rec"} and out["d_loss"] > 0
    assert losses[-1] < 0.7 * losses[0]
    assert any(not torch.equal(a, b) for a, b in zip(d0, d.parameters()))


def test_trainer_reconstruction_only_leaves_discriminator_alone():
    g = Pix2PixGenerator(channels=(4, 8))
    d = PatchDiscriminator(spatial_dims=2, channels=4, in_channels=2, num_layers_d=2)
    d0 = [p.detach().clone() for p in d.parameters()]
    batch = {"image": torch.zeros(2, 1, 16, 16), "label": torch.ones(2, 1, 16, 16) * 0.5, "direction": torch.tensor([[1.0], [-1.0]])}
    tr = Pix2PixTrainer("cpu", 1, [batch] * 2, g, torch.optim.Adam(g.parameters()), d, torch.optim.Adam(d.parameters()),
                        adv_weight=0.0, d_direction=False)
    tr.run()
    assert tr.state.output["d_loss"] == 0.0 and tr.state.output["g_adv"] == 0.0
    assert all(torch.equal(a, b) for a, b in zip(d0, d.parameters()))
    with pytest.raises(KeyError, match="direction"):
        Pix2PixTrainer("cpu", 1, [{"image": batch["image"], "label": batch["label"]}], g, torch.optim.Adam(g.parameters()), d,
                       torch.optim.Adam(d.parameters()), adv_weight=0.0).run()


# --- predict_next / rollout ------------------------------------------------------------------


def test_predict_next_scales_and_routes_directions():
    m = ShiftModel()
    x = torch.full((2, 1, 8, 8), 0.5)
    out = predict_next(m, x, torch.tensor([1, -1]))
    assert out.shape == x.shape
    assert torch.allclose(out[0], torch.full_like(out[0], 0.6)) and torch.allclose(out[1], torch.full_like(out[1], 0.4))
    assert torch.allclose(predict_next(m, x, -1), torch.full_like(x, 0.4))
    with pytest.raises(ValueError):
        predict_next(m, x, 0)
    with pytest.raises(ValueError):
        predict_next(m, x, torch.tensor([1, 1, 1]))


def test_rollout_feeds_its_own_output():
    m = ShiftModel()
    r = rollout(m, torch.full((1, 1, 8, 8), 0.5), 1, 3)
    assert r.shape == (3, 1, 8, 8)
    assert torch.allclose(r[:, 0, 0, 0], torch.tensor([0.6, 0.7, 0.8]))
    assert torch.allclose(rollout(m, torch.full((8, 8), 0.95), 1, 2), torch.ones(2, 1, 8, 8))  # stays in [0, 1]
    up, down = rollout_both(m, torch.full((1, 1, 8, 8), 0.5), 2, 3)
    assert up.shape == (2, 1, 8, 8) and down.shape == (3, 1, 8, 8)
    assert torch.allclose(down[:, 0, 0, 0], torch.tensor([0.4, 0.3, 0.2]))
    b = rollout_batch(m, torch.full((2, 1, 8, 8), 0.5), torch.tensor([1, -1]), 2)
    assert b.shape == (2, 2, 1, 8, 8) and torch.allclose(b[1, 1], torch.full((1, 8, 8), 0.3))
    with pytest.raises(ValueError):
        rollout(m, torch.zeros(2, 1, 8, 8), 1, 2)


def test_predict_file_inputs_and_bad_inputs(tmp_path):
    m = ShiftModel()
    vol = (0.04 * np.arange(16)[None, None, :] + 0.02 * np.arange(16)[:, None, None] / 15 + np.zeros((16, 16, 16))).astype(np.float32)
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    nii = save_nifti(vol, affine, tmp_path / "vol.nii.gz")
    res = predict_file(m, nii, tmp_path / "out", steps=3, direction="both", slice_index=5)
    up = nib.load(res["outputs"]["up"]["nifti"])
    assert up.shape == (16, 16, 3)
    assert np.allclose(up.get_fdata()[0, 0], vol[0, 0, 5] + np.array([0.1, 0.2, 0.3]), atol=1e-5)
    assert np.allclose(up.affine[2, 3], 2.0 * 6)  # first predicted slice sits at index 5 + 1
    down = nib.load(res["outputs"]["down"]["nifti"])
    assert np.allclose(down.affine[2, 3], 2.0 * 4) and down.affine[2, 2] == -2.0
    assert len(res["outputs"]["down"]["png"]) == 3 and all(Path(p).is_file() for p in res["outputs"]["down"]["png"])
    assert (tmp_path / "out" / "flow_prediction.json").is_file()
    png = save_png(vol[..., 8], tmp_path / "s.png")
    res = predict_file(m, png, tmp_path / "out_png", steps=2, direction=-1)
    assert list(res["outputs"]) == ["down"]

    with pytest.raises(InputError, match="no such file"):
        predict_file(m, tmp_path / "missing.png", tmp_path / "o")
    with pytest.raises(InputError, match="slice index"):
        predict_file(m, nii, tmp_path / "o")
    save_nifti(vol * 300, affine, tmp_path / "raw.nii.gz")
    with pytest.raises(InputError, match=r"raw.nii.gz: intensities"):
        predict_file(m, tmp_path / "raw.nii.gz", tmp_path / "o", slice_index=3)
    g = Pix2PixGenerator(channels=(2, 2, 2, 2, 2, 2))  # needs multiples of 32 px
    with pytest.raises(InputError, match="not divisible"):
        predict_file(g, png, tmp_path / "o")
    with pytest.raises(ValueError, match="direction"):
        predict_file(m, png, tmp_path / "o", direction=2)


# --- evaluation ----------------------------------------------------------------------------------


def test_evaluate_flow_untrained_equals_copy(tiny_dataset, tmp_path):
    g = Pix2PixGenerator(channels=(4, 8))  # zero-initialised residual = copy baseline
    s = evaluate_flow(g, tiny_dataset, tmp_path, split="test", steps=6, batch_size=16)
    p, c = s["one_step"]["pix2pix"], s["one_step"]["copy"]
    assert p["psnr"]["avg"] == pytest.approx(c["psnr"]["avg"], abs=1e-4)
    assert p["psnr"]["worst"] <= p["psnr"]["avg"] <= p["psnr"]["best"]
    assert p["mse"]["worst"] >= p["mse"]["best"]
    assert p["psnr_paper"]["avg"] == pytest.approx(p["psnr"]["avg"] + 48.1308, abs=1e-3)
    rows = list(csv.DictReader(open(tmp_path / "rollout.csv")))
    assert [int(r["k"]) for r in rows] == list(range(1, 7))
    assert float(rows[0]["copy_psnr"]) > float(rows[-1]["copy_psnr"])  # copying gets worse with distance
    assert (tmp_path / "rollout.png").stat().st_size > 1000
    assert "| pix2pix | avg |" in (tmp_path / "table2.md").read_text()
    assert s["inference_slices_per_second"] > 0


# --- bundle ---------------------------------------------------------------------------------------


def test_metadata_and_network_defs_agree():
    meta = json.loads((CONFIGS / "metadata.json").read_text())
    for key in ("version", "changelog", "monai_version", "pytorch_version", "numpy_version", "network_data_format"):
        assert key in meta
    assert meta["version"] in meta["changelog"]
    nets = []
    for name in ("train.json", "inference.json"):
        p = ConfigParser()
        p.read_config(str(CONFIGS / name))
        nets.append(p.get_parsed_content("network_def"))
    a, b = (n.state_dict() for n in nets)
    assert list(a) == list(b) and all(a[k].shape == b[k].shape for k in a)


def test_bundle_train_resume_evaluate_infer(tiny_dataset, tmp_path):
    common = {"bundle_root": str(BUNDLE), "dataset_dir": str(tiny_dataset), "ckpt_dir": str(tmp_path / "models"),
              "output_dir": str(tmp_path / "eval"), **TINY}
    kw = {"logging_file": str(CONFIGS / "logging.conf"), "meta_file": str(CONFIGS / "metadata.json")}
    train = ConfigWorkflow(workflow_type="train", config_file=str(CONFIGS / "train.json"), **kw, **common)
    train.initialize()
    assert not train.check_properties()
    train.run()
    train.finalize()
    assert (tmp_path / "models" / "model.pt").is_file() and (tmp_path / "models" / "last.pt").is_file()
    assert list((tmp_path / "eval").glob("events.out.tfevents*")) and list((tmp_path / "eval" / "train_img").glob("events*"))

    # resume: a second run with more epochs continues at epoch 2
    again = ConfigWorkflow(workflow_type="train", config_file=str(CONFIGS / "train.json"), **kw, **{**common, "epochs": 2})
    again.initialize()
    again.run()
    trainer = again.parser.get_parsed_content("train#trainer")
    assert trainer.state.epoch == 2 and trainer.state.iteration == 2 * 3
    again.finalize()

    ev = ConfigWorkflow(workflow_type="train", config_file=[str(CONFIGS / "train.json"), str(CONFIGS / "evaluate.json")],
                        **kw, **{**common, "eval_steps": 5})
    ev.initialize()
    ev.run()
    ev.finalize()
    summary = json.loads((tmp_path / "eval" / "flow_eval.json").read_text())
    assert summary["one_step"]["pix2pix"]["psnr"]["n"] == 2 * 23
    assert len(summary["rollout"]["curve"]) == 5 and (tmp_path / "eval" / "rollout.png").is_file()

    infer = ConfigWorkflow(workflow_type="infer", config_file=str(CONFIGS / "inference.json"), **kw,
                           bundle_root=str(BUNDLE), ckpt_dir=str(tmp_path / "models"), output_dir=str(tmp_path / "infer"),
                           unet_channels=TINY["unet_channels"], input_path=str(tiny_dataset / "volumes" / "sub-008.nii.gz"),
                           slice_index=12, steps=4, direction="both")
    infer.initialize()
    infer.run()
    infer.finalize()
    for tag in ("up", "down"):
        img = nib.load(str(tmp_path / "infer" / f"sub-008_s12_{tag}.nii.gz"))
        assert img.shape == (32, 32, 4) and 0.0 <= img.get_fdata().min() and img.get_fdata().max() <= 1.0
        assert len(list((tmp_path / "infer").glob(f"sub-008_s12_{tag}_*.png"))) == 4

    gen = load_generator(BUNDLE, tmp_path / "models" / "model.pt", unet_channels=TINY["unet_channels"])
    x = torch.rand(2, 1, 32, 32)
    assert not gen.training and predict_next(gen, x, torch.tensor([1, -1])).shape == x.shape
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        load_generator(BUNDLE, tmp_path / "nothing.pt", unet_channels=TINY["unet_channels"])
