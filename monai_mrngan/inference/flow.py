"""Next-slice prediction with a trained pix2pix generator, on [0, 1] slices.

- :func:`predict_next`: one step for a batch, each sample in its own direction (defined with the
  stages' other contracts in :mod:`monai_mrngan.networks.contracts`);
- :func:`rollout` / :func:`rollout_batch`: ``steps`` steps, feeding the model its own output
  (many starts and both directions advance together, one batched call per step);
- :func:`predict_file`: the inference entry point: a slice (PNG, 2D NIfTI, or a slice index of a
  3D NIfTI) -> K predicted slices in either direction (or both), written as NIfTI and PNG;
- :func:`load_generator`: the generator of a flow_generation bundle, through
  :func:`~monai_mrngan.inference.components.load_bundle_network`.

The [-1, 1] scaling and whether the model takes a direction input or is a pair of models stay
inside: callers see (B, 1, H, W) [0, 1] slices and +1 (next array index, towards the vertex) / -1.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import torch

from ..data.io import InputError, is_nifti, load_slice, save_json, save_nifti, save_png, strip_image_suffix
from ..networks.contracts import generator_step, predict_next
from ..transforms.shapes import as_slice_batch
from .components import load_bundle_network

__all__ = ["generator_step", "predict_next", "rollout", "rollout_batch", "rollout_both", "predict_file", "load_generator"]

logger = logging.getLogger(__name__)


@torch.no_grad()
def rollout_batch(generator: torch.nn.Module, slices: torch.Tensor, direction: torch.Tensor | int, steps: int) -> torch.Tensor:
    """Roll ``B`` starts out together: (B, 1, H, W) [0, 1] -> (B, steps, 1, H, W), step k at [:, k-1]."""
    if int(steps) < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    x = as_slice_batch(slices)
    outs = []
    for _ in range(int(steps)):
        x = predict_next(generator, x, direction)
        outs.append(x)
    return torch.stack(outs, dim=1)


@torch.no_grad()
def rollout(generator: torch.nn.Module, slice: torch.Tensor, direction: torch.Tensor | int, steps: int) -> torch.Tensor:
    """``steps`` slices (steps, 1, H, W) in [0, 1] generated from one slice (H, W) / (1, H, W) / (1, 1, H, W),
    each step fed the previous prediction; ``direction`` +1 or -1."""
    x = as_slice_batch(slice)
    if x.shape[0] != 1:
        raise ValueError(f"rollout takes one slice, got a batch of {x.shape[0]}; use rollout_batch")
    return rollout_batch(generator, x, direction, steps)[0]


@torch.no_grad()
def rollout_both(generator: torch.nn.Module, slice: torch.Tensor, steps_up: int, steps_down: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Both directions from one slice in one batch: (steps_up, 1, H, W) towards +1, (steps_down, 1, H, W) towards -1."""
    x = as_slice_batch(slice)
    n = max(int(steps_up), int(steps_down))
    if n < 1:
        return x[:0], x[:0]
    both = rollout_batch(generator, x.expand(2, -1, -1, -1), torch.tensor([1.0, -1.0]), n)
    return both[0, : int(steps_up)], both[1, : int(steps_down)]


def load_generator(
    bundle_root: str | os.PathLike, ckpt: str | os.PathLike | None = None, device: str = "cpu", **overrides
) -> torch.nn.Module:
    """The flow_generation bundle's ``network_def`` (from ``configs/inference.json``) with weights loaded.

    ``overrides`` set config ids first (e.g. ``unet_channels=[16, 32, 64, 128]``) to match a model
    trained with overridden network settings; ``ckpt`` defaults to ``<bundle_root>/models/model.pt``.
    """
    bundle_root = Path(bundle_root)
    weights = ckpt if ckpt is not None else bundle_root / "models" / "model.pt"
    return load_bundle_network(bundle_root / "configs" / "inference.json", weights, overrides=overrides, device=device)


def _input_affine(path: Path, slice_index: int | None) -> np.ndarray:
    """Affine of the input slice's plane (identity for PNG; voxel i of a 3D NIfTI moved to slice_index)."""
    if not is_nifti(path):
        return np.eye(4)
    import nibabel as nib

    img = nib.load(str(path))
    affine = np.asarray(img.affine, dtype=np.float64).copy()
    if slice_index is not None and len(img.shape) >= 3 and img.shape[2] > 1:
        idx = slice_index % img.shape[2]
        affine[:3, 3] = affine[:3, :3] @ np.array([0.0, 0.0, float(idx)]) + affine[:3, 3]
    return affine


def predict_file(
    generator: torch.nn.Module,
    image: str | os.PathLike,
    output_dir: str | os.PathLike,
    steps: int = 10,
    direction: int | str = 1,
    slice_index: int | None = None,
) -> dict:
    """Write ``steps`` predicted slices from one input slice, in ``direction`` +1, -1 or ``"both"``.

    Input: a PNG, a 2D NIfTI, or axial slice ``slice_index`` of a 3D NIfTI, with [0, 1] intensities
    at the size the model was trained on. Output in ``output_dir``: per direction ``<name>_up`` (+1)
    / ``<name>_down`` (-1): a NIfTI (H, W, steps) in generation order, placed in the input's space
    when the input is a NIfTI (slice k at index ``slice_index + direction * k``), and one PNG per
    step; plus ``flow_prediction.json`` describing them. Returns that description.
    """
    path = Path(image)
    if str(direction) not in ("1", "-1", "+1", "both"):
        raise ValueError(f"direction must be 1, -1 or 'both', got {direction!r}")
    if int(steps) < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    arr = load_slice(path, None if slice_index is None else int(slice_index))
    if float(arr.min()) < -1e-3 or float(arr.max()) > 1.0 + 1e-3:
        raise InputError(path, f"intensities span [{arr.min():.3g}, {arr.max():.3g}]; expected a prepared slice in [0, 1]")
    x = torch.from_numpy(np.clip(arr, 0.0, 1.0))[None, None]
    dirs = [1, -1] if str(direction) == "both" else [int(direction)]
    try:
        preds = rollout_batch(generator, x.expand(len(dirs), -1, -1, -1), torch.tensor(dirs, dtype=torch.float32), int(steps))
    except ValueError as err:  # wrong size for the network
        raise InputError(path, str(err).splitlines()[0]) from err
    base = _input_affine(path, None if slice_index is None else int(slice_index))
    out_dir = Path(output_dir)
    name = strip_image_suffix(path.name) + (f"_s{int(slice_index)}" if slice_index is not None else "")
    summary = {"input": str(path), "slice_index": slice_index, "steps": int(steps), "outputs": {}}
    for b, d in enumerate(dirs):
        tag = "up" if d > 0 else "down"
        vol = preds[b, :, 0].permute(1, 2, 0).cpu().numpy()  # (H, W, steps)
        affine = base.copy()
        affine[:3, 3] = base[:3, :3] @ np.array([0.0, 0.0, float(d)]) + base[:3, 3]  # first prediction at +-1
        affine[:3, 2] = base[:3, 2] * d
        nii = save_nifti(vol, affine, out_dir / f"{name}_{tag}.nii.gz")
        pngs = [str(save_png(vol[..., k], out_dir / f"{name}_{tag}_{k + 1:03d}.png")) for k in range(vol.shape[-1])]
        summary["outputs"][tag] = {"direction": d, "nifti": str(nii), "png": pngs}
        logger.info("wrote %d predicted slices (direction %+d) to %s", vol.shape[-1], d, nii)
    save_json(summary, out_dir / "flow_prediction.json")
    return summary
