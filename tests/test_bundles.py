"""Bundle conventions every stage must keep (model-zoo style checks)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BUNDLES = Path(__file__).resolve().parents[1] / "bundles"
NAMES = ["slice_localization", "brain_generalization", "flow_generation", "mrngan"]
FILES = ["LICENSE", "configs/metadata.json", "configs/train.json", "configs/evaluate.json", "configs/inference.json",
         "configs/multi_gpu_train.json", "configs/logging.conf", "docs/README.md"]


@pytest.mark.parametrize("name", NAMES)
def test_bundle_files_and_metadata(name):
    root = BUNDLES / name
    for f in FILES:
        assert (root / f).is_file(), f"{name}: missing {f}"
    meta = json.loads((root / "configs" / "metadata.json").read_text())
    for key in ("version", "changelog", "monai_version", "pytorch_version", "numpy_version", "name", "task",
                "description", "authors", "network_data_format"):
        assert key in meta, f"{name}: metadata lacks {key}"
    assert meta["version"] in meta["changelog"]
    fmt = meta["network_data_format"]
    assert fmt["inputs"] and fmt["outputs"]
    train = json.loads((root / "configs" / "train.json").read_text())
    for key in ("bundle_root", "device", "dataset_dir", "ckpt_dir", "output_dir", "network_def"):
        assert key in train, f"{name}: train.json lacks {key}"


FORMAT_KEYS = ("type", "format", "num_channels", "spatial_shape", "dtype", "value_range", "is_patch_data", "channel_def")


@pytest.mark.parametrize("name", NAMES)
def test_network_data_format_is_complete(name):
    """Every input and output of every data-format block says what it is (model-zoo metadata fields)."""
    meta = json.loads((BUNDLES / name / "configs" / "metadata.json").read_text())
    blocks = [k for k in meta if k.endswith("data_format")]
    assert "network_data_format" in blocks
    for block in blocks:
        fmt = meta[block]
        assert "image" in fmt["inputs"] and "pred" in fmt["outputs"], f"{name}::{block}: verify_net_in_out reads inputs.image / outputs.pred"
        for side in ("inputs", "outputs"):
            for key, item in fmt[side].items():
                missing = [k for k in FORMAT_KEYS if k not in item]
                assert not missing, f"{name}::{block}.{side}.{key} lacks {missing}"
                assert isinstance(item["spatial_shape"], list) and isinstance(item["value_range"], list)
                assert item["channel_def"], f"{name}::{block}.{side}.{key}: empty channel_def"


# MONAI's verify_net_in_out feeds torch.rand(1, C, *spatial_shape) of inputs.image to network_def and checks
# the output's channels and dtype against outputs.pred. brain_generalization's network_def (the generator)
# takes one (B, latent + 1) tensor whose last channel is p; mrngan's (the cell) one (B, 5, H, W) step input.
@pytest.mark.parametrize("name", NAMES)
def test_verify_net_in_out(name):
    root = BUNDLES / name
    proc = subprocess.run(
        [sys.executable, "-m", "monai.bundle", "verify_net_in_out", "--net_id", "network_def",
         "--meta_file", str(root / "configs" / "metadata.json"), "--config_file", str(root / "configs" / "inference.json"),
         "--bundle_root", str(root)],
        capture_output=True, text=True,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "verified with no error" in proc.stdout + proc.stderr


def test_train_and_inference_network_def_agree():
    """The weights a bundle trains (train.json network_def) load into its inference.json network_def."""
    from monai.bundle import ConfigParser

    for name, small in [("brain_generalization", {"image_size": 32, "g_channels": 16}),
                        ("mrngan", {"network_def#hidden_channels": 4, "network_def#features": 4})]:
        nets = []
        for cfg in ("train.json", "inference.json"):
            parser = ConfigParser()
            parser.read_config(str(BUNDLES / name / "configs" / cfg))
            for k, v in small.items():
                parser[k] = v
            nets.append(parser.get_parsed_content("network_def"))
        nets[1].load_state_dict(nets[0].state_dict())


@pytest.mark.parametrize("cell,state_scale", [("rnn", 1), ("gru", 1), ("rnn", 2)])
@pytest.mark.parametrize("output", ["blend", "residual", "direct"])
def test_mrngan_forward_is_one_step(cell, output, state_scale):
    """MRNGAN(x) == one step of the step path from a zero state; with a state, the unroll's own step
    (at full size, and with the state at half size)."""
    import torch

    from monai_mrngan.networks.recurrent import MRNGAN

    torch.manual_seed(0)
    model = MRNGAN(cell=cell, hidden_channels=6, features=4, output=output, state_scale=state_scale).eval()
    with torch.no_grad():  # non-trivial head (its last conv starts at zero)
        for prm in model.head[-1].parameters():
            prm.normal_(0, 0.3)
    x = torch.rand(2, 5, 16, 16)
    state_hw = (16 // state_scale, 16 // state_scale)
    zeros = torch.zeros(2, 6, *state_hw)
    maps = lambda p, dist: torch.stack([p, (5 * dist).clamp(max=1.0)], 1).view(2, 2, 1, 1).expand(2, 2, 16, 16)  # noqa: E731
    with torch.no_grad():
        out = model(x)
        assert out.shape == (2, 1, 16, 16) and out.dtype == torch.float32
        assert torch.equal(out, model.step(x, zeros)[0])
        s = torch.randn(2, 6, *state_hw).tanh()
        assert torch.equal(model(x, s), model.step(x, s)[0])

        # the first generated slice of unroll is forward(x_1, s_0) with x_1 stacked as unroll stacks it
        start = torch.rand(2, 1, 16, 16)
        pos = torch.tensor([[0.5, 0.51, 0.52], [0.4, 0.39, 0.38]])
        direction = torch.tensor([1.0, -1.0])
        pix = lambda prev, d: (prev * 0.9).clamp(0, 1)  # noqa: E731
        priors = torch.rand(2, 3, 1, 16, 16)
        gen = model.unroll(start, pos, direction, pix, lambda p: priors)
        p0 = pos[:, 0]
        x0 = torch.cat([start, start, priors[:, 0], maps(p0, torch.zeros_like(p0))], 1)
        x1 = torch.cat([start, pix(start, direction), priors[:, 1], maps(pos[:, 1], (pos[:, 1] - p0).abs())], 1)
        assert torch.allclose(gen[:, 0:1], model(x1, model.init_state(x0)), atol=1e-6)


def test_generator_single_tensor_input():
    """The brain_generalization generators take (B, latent + 1) / (B, latent + 1, 1, 1) with p last, same as (z, p)."""
    import torch

    from monai_mrngan.networks.gan import make_generator

    torch.manual_seed(0)
    z, p = torch.randn(3, 8), torch.tensor([0.1, 0.5, 0.9])
    for route in ("cgan", "dcgan_set"):
        g = make_generator(route, 16, 8, 8, num_bins=3).eval()
        with torch.no_grad():
            ref = g(z, p)
            x = torch.cat([z, p[:, None]], 1)
            assert torch.allclose(g(x), ref, atol=1e-6)
            assert torch.allclose(g(x[:, :, None, None]), ref, atol=1e-6)
            assert torch.allclose(g.generate(z, p), ref, atol=1e-6)
        with pytest.raises(ValueError):
            g(z)  # latent without p
