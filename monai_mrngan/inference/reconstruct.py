"""Reconstruct a whole volume from one 2D axial slice, or from a few.

The volume lives on a grid of axial indices with the prepared data's slice step (``step_p``: the
change of ``p`` from one array index to the next, negative because RAS indices run towards the
vertex where ``p = 0``). Each input slice is placed at its index; generation runs outwards from it:

- one slice: a run towards the vertex (direction +1) and one towards the neck (-1), batched
  together, until both ends of the axial extent (``0 <= p <= 1``, or a given grid);
- several slices: every gap between two inputs is generated from both sides (a +1 run from the
  lower slice, a -1 run from the upper one) and the two are blended with linear weights by
  distance; beyond the outermost inputs one-sided runs reach the ends. With the ``copy`` runner
  this blending *is* linear interpolation (see :mod:`monai_mrngan.inference.baselines`).

Every method (MRNGAN and the baselines) is a *runner*:
``run(starts (N,1,H,W), start_positions (N,), directions (N,), steps, step_p) -> (N,steps,1,H,W)``,
so placement, blending, saving and evaluation are shared.

Python entry points for the command line: :func:`load_components` (trained stages from their
bundles) and :func:`reconstruct_files` (files in, NIfTI + positions + montage out).
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

from ..data.io import InputError, load_slice, save_json, save_nifti, save_png, slice_to_display
from ..data.positions import HEAD_HEIGHT_MM
from ..data.prepare import to_unit_range
from ..networks.recurrent import MRNGAN, NextFn, PriorFn

logger = logging.getLogger(__name__)

__all__ = [
    "Runner",
    "Components",
    "Reconstruction",
    "flow_predict_next",
    "next_fn_for",
    "prior_fn_for",
    "run_positions",
    "mrngan_runner",
    "make_runner",
    "volume_grid",
    "fill_volume",
    "reconstruct_volume",
    "load_bundle_network",
    "load_components",
    "components_from_bundles",
    "load_stage_prior",
    "reference_grid",
    "reconstruct_files",
    "volume_affine",
    "save_reconstruction",
    "montage",
    "METHODS",
    "refine_positions",
]

Runner = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int, float], torch.Tensor]
METHODS = ("mrngan", "pix2pix_iterative", "prior", "copy", "linear")


# ---------------------------------------------------------------- adapters to the stage contracts
def flow_predict_next(generator: torch.nn.Module, slices: torch.Tensor, direction: torch.Tensor | int) -> torch.Tensor:
    """``monai_mrngan.inference.flow.predict_next`` (imported on first use)."""
    from .flow import predict_next

    return predict_next(generator, slices, direction)


def _differentiable_predict(generator: torch.nn.Module, slices: torch.Tensor, direction: torch.Tensor | int) -> torch.Tensor:
    """pix2pix's next slice with gradients, for fine-tuning (the flow stage's ``generator_step``)."""
    from .flow import generator_step

    return generator_step(generator, slices, direction)


def next_fn_for(generator: Any, trainable: bool = False, predict: Callable | None = None) -> NextFn:
    """``next_fn(slices, direction)`` from a pix2pix generator and the flow stage's ``predict_next``.

    Frozen (default): the generator is put in eval mode with gradients off and called through
    ``predict`` (default: the flow stage's ``predict_next``) under ``no_grad``. ``trainable``:
    gradients flow into the generator (fine-tuning) through ``predict`` when one is given, else
    through :func:`_differentiable_predict`; the generator stays in eval mode (no batch-norm
    statistics drift while the cell trains).
    """
    if isinstance(generator, torch.nn.Module):
        generator.eval()
        generator.requires_grad_(trainable)
    if trainable:
        predict = predict or _differentiable_predict

        def next_fn(slices: torch.Tensor, direction: torch.Tensor) -> torch.Tensor:
            out = predict(generator, slices, direction)
            if torch.is_grad_enabled() and not out.requires_grad:
                raise RuntimeError("fine-tuning pix2pix needs a predict function that keeps gradients; it returned a detached tensor")
            return out

        return next_fn
    predict = predict or flow_predict_next

    def frozen_next_fn(slices: torch.Tensor, direction: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return predict(generator, slices, direction)

    return frozen_next_fn


def prior_fn_for(prior: Any, reference: torch.Tensor | None = None, reference_positions: torch.Tensor | None = None,
                 exclude: Sequence[str] | None = None) -> PriorFn:
    """``prior_fn(positions (B,T)) -> (B,T,1,H,W)`` from a prior object with ``slice_at``.

    With ``reference`` (B,1,H,W) and ``reference_positions`` (B,), sample b's slices are fitted to
    its own reference slice (the prior's contract takes one reference at a time); ``exclude`` (B,)
    names each sample's subject, left out of the prior's atlases (training on bank subjects).
    """

    def prior_fn(positions: torch.Tensor) -> torch.Tensor:
        out = []
        with torch.no_grad():
            for b in range(positions.shape[0]):
                kw = {}
                if reference is not None:
                    kw = {"reference": reference[b : b + 1].detach(), "reference_position": float(reference_positions[b])}
                    if exclude is not None and getattr(prior, "subjects", None) is not None:  # banks that know their subjects
                        kw["exclude"] = str(exclude[b])
                out.append(torch.as_tensor(prior.slice_at(positions[b].detach().float().cpu(), **kw)).float())
        res = torch.stack(out, 0)
        if res.ndim == 4:  # (B,T,H,W) -> (B,T,1,H,W)
            res = res[:, :, None]
        return res.to(positions.device)

    return prior_fn


def run_positions(start_positions: torch.Tensor, directions: torch.Tensor, steps: int, step_p: float) -> torch.Tensor:
    """(N, steps+1) positions of runs: ``p_t = p_0 + t * direction * step_p``."""
    t = torch.arange(steps + 1, dtype=torch.float32, device=start_positions.device)
    return start_positions.float().view(-1, 1) + t.view(1, -1) * directions.float().view(-1, 1) * float(step_p)


def mrngan_runner(model: MRNGAN, next_fn: NextFn, prior: Any, fit_prior: bool = True) -> Runner:
    """Runner that unrolls the trained MRNGAN cell (eval mode, no grad)."""

    @torch.no_grad()
    def run(starts: torch.Tensor, start_positions: torch.Tensor, directions: torch.Tensor, steps: int, step_p: float) -> torch.Tensor:
        model.eval()
        pos = run_positions(start_positions, directions, steps, step_p)
        prior_fn = prior_fn_for(prior, starts if fit_prior else None, start_positions)
        out = model.unroll(starts, pos, directions, next_fn, prior_fn)
        return out[:, :, None]

    return run


def make_runner(
    method: str,
    model: MRNGAN | None = None,
    next_fn: NextFn | None = None,
    prior: Any = None,
    fit_prior: bool = True,
) -> Runner:
    """The runner of one method of :data:`METHODS` (raises when a component it needs is missing)."""
    from . import baselines

    need = {"mrngan": ("model", "next_fn", "prior"), "pix2pix_iterative": ("next_fn",), "prior": ("prior",)}.get(method, ())
    given = {"model": model, "next_fn": next_fn, "prior": prior}
    missing = [n for n in need if given[n] is None]
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {METHODS}")
    if missing:
        raise ValueError(f"method {method!r} needs {', '.join(missing)}")
    if method == "mrngan":
        return mrngan_runner(model, next_fn, prior, fit_prior)
    if method == "pix2pix_iterative":
        return baselines.pix2pix_runner(next_fn)
    if method == "prior":
        return baselines.prior_runner(prior, fit_prior)
    return baselines.copy_runner()  # copy; linear = copy runs blended across gaps


# ---------------------------------------------------------------- placement and blending
def volume_grid(
    positions: Sequence[float],
    step_p: float,
    extent: tuple[float, float] = (0.0, 1.0),
    reference: Sequence[float] | None = None,
) -> tuple[np.ndarray, list[int]]:
    """Grid positions (D,) covering ``extent`` in ``p`` and the index of each input slice.

    With ``reference`` (a prepared volume's ``p`` per index) the grid is that volume's, so the
    output has the prepared data's shape and affine, and each input snaps to its nearest index.
    Otherwise the grid is anchored on the first input and the others snap to the nearest index.
    Raises when two inputs land on the same index.
    """
    if step_p >= 0:
        raise ValueError(f"step_p must be negative (p decreases with the RAS index), got {step_p}")
    pos = np.asarray(positions, dtype=np.float64).reshape(-1)
    if pos.size == 0:
        raise ValueError("no input positions")
    step = -float(step_p)
    if reference is not None:
        grid = np.asarray(reference, dtype=np.float64)
        indices = [int(np.argmin(np.abs(grid - p))) for p in pos]
        if len(set(indices)) != len(indices):
            raise ValueError(f"input slices at positions {pos.round(4).tolist()} fall on the same grid slice (step {step:.4f} in p)")
        return grid, indices
    p_a = float(pos[0])
    below = max(0, int(math.floor((extent[1] - p_a) / step + 1e-3)))  # tolerance: positions are rounded
    above = max(0, int(math.floor((p_a - extent[0]) / step + 1e-3)))
    offs = [int(round((p - p_a) / step_p)) for p in pos]
    below = max(below, -min(offs))  # inputs outside the extent still get a place
    above = max(above, max(offs))
    indices = [below + o for o in offs]
    if len(set(indices)) != len(indices):
        raise ValueError(f"input slices at positions {pos.round(4).tolist()} fall on the same grid slice (step {step:.4f} in p)")
    grid = p_a + (np.arange(below + above + 1) - below) * step_p
    return grid, indices


def fill_volume(run: Runner, slices: torch.Tensor, indices: Sequence[int], num_slices: int, grid_positions: torch.Tensor | np.ndarray, step_p: float) -> torch.Tensor:
    """(D,H,W) volume: inputs at ``indices``, everything else generated by ``run`` (both ways, blended)."""
    slices = torch.as_tensor(slices, dtype=torch.float32)
    if slices.ndim == 3:
        slices = slices[:, None]
    order = np.argsort(np.asarray(indices))
    idx = [int(indices[i]) for i in order]
    slices = slices[torch.as_tensor(order)]
    if idx[0] < 0 or idx[-1] >= num_slices:
        raise ValueError(f"input indices {idx} outside the grid of {num_slices} slices")
    grid = torch.as_tensor(np.asarray(grid_positions), dtype=torch.float32)
    # runs: (source slice number, direction, steps)
    runs = [(0, -1, idx[0]), (len(idx) - 1, 1, num_slices - 1 - idx[-1])]
    for k in range(len(idx) - 1):
        gap = idx[k + 1] - idx[k] - 1
        runs += [(k, 1, gap), (k + 1, -1, gap)]
    runs = [r for r in runs if r[2] > 0]
    h, w = slices.shape[-2:]
    vol = torch.zeros(num_slices, h, w)
    vol[torch.as_tensor(idx)] = slices[:, 0]
    if not runs:
        return vol
    steps = max(r[2] for r in runs)
    src = torch.as_tensor([r[0] for r in runs])
    dirs = torch.as_tensor([float(r[1]) for r in runs])
    starts = slices[src]
    start_pos = grid[torch.as_tensor([idx[r[0]] for r in runs])]
    gen = run(starts, start_pos, dirs, steps, step_p)[:, :, 0].float().cpu()  # (N, steps, H, W)
    if gen.shape[:2] != (len(runs), steps):
        raise RuntimeError(f"runner returned {tuple(gen.shape)}, expected ({len(runs)}, {steps}, H, W)")
    acc = torch.zeros_like(vol)
    wsum = torch.zeros(num_slices)
    for n, (k, d, nsteps) in enumerate(runs):
        i0 = idx[k]
        t = torch.arange(1, nsteps + 1)
        target = i0 + d * t
        if d > 0 and k + 1 < len(idx):  # gap above slice k: weight falls linearly to the upper input
            weight = (idx[k + 1] - target).float() / (idx[k + 1] - i0)
        elif d < 0 and k > 0:
            weight = (target - idx[k - 1]).float() / (i0 - idx[k - 1])
        else:
            weight = torch.ones(nsteps)
        acc[target] += weight.view(-1, 1, 1) * gen[n, :nsteps]
        wsum[target] += weight
    filled = wsum > 0
    vol[filled] = acc[filled] / wsum[filled].view(-1, 1, 1)
    return vol.clamp(0.0, 1.0)


@dataclass
class Reconstruction:
    """A reconstructed volume: ``volume`` (H, W, D) float32 [0,1], ``positions`` (D,) ``p`` per index."""

    volume: np.ndarray
    positions: np.ndarray
    input_indices: list[int]
    input_positions: list[float]
    method: str = "mrngan"
    extra: dict = field(default_factory=dict)


def _as_slices(slices: Any) -> torch.Tensor:
    if isinstance(slices, (list, tuple)):
        slices = torch.stack([torch.as_tensor(np.asarray(s), dtype=torch.float32).reshape(np.asarray(s).shape[-2:]) for s in slices])
    t = torch.as_tensor(slices, dtype=torch.float32)
    if t.ndim == 2:
        t = t[None, None]
    elif t.ndim == 3:
        t = t[:, None]
    if t.ndim != 4 or t.shape[1] != 1:
        raise ValueError(f"slices must be (H,W), (K,H,W) or (K,1,H,W), got {tuple(t.shape)}")
    return t


def reconstruct_volume(
    slices: torch.Tensor | np.ndarray | Sequence[np.ndarray],
    positions: Sequence[float] | torch.Tensor | None = None,
    *,
    method: str = "mrngan",
    model: MRNGAN | None = None,
    next_fn: NextFn | None = None,
    prior: Any = None,
    localizer: torch.nn.Module | None = None,
    spacing_mm: float = 2.0,
    step_p: float | None = None,
    num_slices: int | None = None,
    input_indices: Sequence[int] | None = None,
    fit_prior: bool = True,
    extent: tuple[float, float] = (0.0, 1.0),
    reference_positions: Sequence[float] | None = None,
    refine_window: float = 0.12,
    device: str | torch.device = "cpu",
) -> Reconstruction:
    """One (or a few) [0,1] axial slices -> a whole volume.

    Args:
        slices: (H,W), (K,H,W) or (K,1,H,W) slices at the prepared in-plane size.
        positions: ``p`` of each slice; localized with ``localizer`` when None.
        method: one of :data:`METHODS`; the components it needs must be given.
        spacing_mm: axial spacing of the prepared data (sets ``step_p = -spacing / 200 mm``).
        num_slices, input_indices: place the inputs on a known grid (evaluation on a true volume);
            default: a grid from ``p = 0`` to ``p = 1`` anchored on the first input.
        fit_prior: fit the prior to the input slice (the nearest input, for each run).
        extent: the range of ``p`` to fill when no grid is given.
        reference_positions: a prepared volume's ``p`` per index: the output takes that grid.
        refine_window: localized positions (not given ones) are refined by matching the input
            against the prior's atlases within this window in ``p`` (:func:`refine_positions`; 0: off).
    """
    device = torch.device(device)
    x = _as_slices(slices)
    if not torch.isfinite(x).all():
        raise ValueError("input slices contain NaN or infinite values")
    if positions is None:
        if localizer is None:
            raise ValueError("no positions given and no localizer to find them")
        from .localize import localize

        positions = refine_positions(prior, x, localize(localizer, x.to(device)).cpu(), refine_window)
    pos = torch.as_tensor(positions, dtype=torch.float32).reshape(-1).cpu()
    if pos.numel() != x.shape[0]:
        raise ValueError(f"{x.shape[0]} slices but {pos.numel()} positions")
    step_p = float(step_p) if step_p is not None else -float(spacing_mm) / HEAD_HEIGHT_MM
    if input_indices is not None:
        idx = [int(i) for i in input_indices]
        if num_slices is None:
            raise ValueError("input_indices needs num_slices")
        grid = pos[0].item() + (np.arange(num_slices) - idx[0]) * step_p
    else:
        grid, idx = volume_grid(pos.tolist(), step_p, extent, reference_positions)
        num_slices = len(grid)
    run = make_runner(method, model=model, next_fn=next_fn, prior=prior, fit_prior=fit_prior)

    def run_on_device(s, p, d, n, sp):
        return run(s.to(device), p.to(device), d.to(device), n, sp)

    vol = fill_volume(run_on_device, x, idx, num_slices, grid, step_p)
    return Reconstruction(
        volume=vol.permute(1, 2, 0).numpy().astype(np.float32),
        positions=np.asarray(grid, dtype=np.float64),
        input_indices=list(idx),
        input_positions=[float(p) for p in pos],
        method=method,
    )


def refine_positions(prior: Any, slices: torch.Tensor, positions: torch.Tensor | Sequence[float], window: float = 0.12) -> torch.Tensor:
    """Localized positions refined by the prior's atlas matching (``prior.locate``), one per slice.

    Unchanged when ``window`` is 0 or the prior cannot locate (a one-volume general brain has no
    atlases to vote). The localizer's estimate bounds the search to ``+- window``.
    """
    pos = torch.as_tensor(positions, dtype=torch.float32).reshape(-1).clone()
    if window <= 0 or not hasattr(prior, "locate") or len(prior.bank) < 2:
        return pos
    x = _as_slices(slices)
    for i in range(len(pos)):
        pos[i] = prior.locate(x[i : i + 1].cpu(), float(pos[i]), window=window)
    return pos


# ---------------------------------------------------------------- trained stages
def load_bundle_network(
    config_file: str | os.PathLike,
    weights: str | os.PathLike | None = None,
    net_id: str = "network_def",
    overrides: Mapping[str, Any] | None = None,
    device: str | torch.device = "cpu",
) -> torch.nn.Module:
    """Instantiate ``net_id`` of a stage bundle's config (through ``monai.bundle``) and load weights.

    ``bundle_root`` defaults to the bundle folder (the parent of the config's folder).
    """
    from monai.bundle import ConfigParser

    from ..engines.checkpoint import load_weights

    config_file = Path(config_file)
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file}: no bundle config here")
    parser = ConfigParser()
    parser.read_config(str(config_file))
    parser["bundle_root"] = str(config_file.resolve().parent.parent)
    for k, v in (overrides or {}).items():
        parser[k] = v
    net = parser.get_parsed_content(net_id, instantiate=True)
    if weights is not None:
        try:
            load_weights(net, weights)
        except RuntimeError as err:  # shape / key mismatch: the stage was trained with other settings
            first = str(err).strip().splitlines()
            detail = next((ln.strip() for ln in first[1:] if ln.strip()), first[0] if first else "")
            raise ValueError(
                f"{weights}: weights do not fit {config_file}::{net_id} ({detail}); "
                "pass the overrides the stage was trained with (e.g. flow_overrides / localizer_overrides)"
            ) from err
    return net.to(device).eval()


@dataclass
class Components:
    """The trained stages MRNGAN composes; any may be None (methods needing it are then skipped)."""

    model: MRNGAN | None = None
    generator: torch.nn.Module | None = None
    prior: Any = None
    localizer: torch.nn.Module | None = None
    next_fn: NextFn | None = None
    device: str = "cpu"

    def __post_init__(self) -> None:
        if self.next_fn is None and self.generator is not None:
            self.next_fn = next_fn_for(self.generator)


def load_components(
    mrngan_config: str | None = None,
    mrngan_weights: str | None = None,
    flow_config: str | None = None,
    flow_weights: str | None = None,
    prior_path: str | None = None,
    prior_fit: Mapping[str, Any] | None = None,
    localizer_config: str | None = None,
    localizer_weights: str | None = None,
    device: str = "cpu",
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
) -> Components:
    """Load whichever trained stages are given (config + weights of each stage bundle, the prior's file).

    ``overrides`` maps ``"mrngan" | "flow" | "localizer"`` to config overrides (e.g. image size).
    """
    overrides = overrides or {}
    comp = Components(device=device)
    if localizer_config and localizer_weights:
        comp.localizer = load_bundle_network(localizer_config, localizer_weights, overrides=overrides.get("localizer"), device=device)
    if flow_config and flow_weights:
        comp.generator = load_bundle_network(flow_config, flow_weights, overrides=overrides.get("flow"), device=device)
        comp.next_fn = next_fn_for(comp.generator)
    if prior_path:
        comp.prior = load_stage_prior(prior_path, prior_fit)
    if mrngan_config and mrngan_weights:
        comp.model = load_bundle_network(mrngan_config, mrngan_weights, overrides=overrides.get("mrngan"), device=device)
    return comp


def components_from_bundles(
    bundles_root: str | os.PathLike,
    weights_root: str | os.PathLike | None = None,
    prior_file: str = "atlas_bank.pt",
    prior_fit: Mapping[str, Any] | None = None,
    device: str = "cpu",
    use_finetuned_flow: bool = True,
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
) -> Components:
    """All trained stages from the standard layout: configs from ``BUNDLES/<stage>/configs/inference.json``,
    weights from ``WEIGHTS/<stage>/models/`` (``weights_root`` defaults to ``bundles_root``; a pipeline
    work folder with one sub-folder per stage fits). Missing weights leave that component None.

    ``WEIGHTS/mrngan/models/flow_finetuned.pt`` replaces the flow weights when it exists.
    ``prior_fit`` defaults to the mrngan bundle's ``prior_fit`` (its ``configs/inference.json``).
    ``overrides``: per stage (``"mrngan" | "flow" | "localizer"``) the config overrides it was trained with.
    """
    b = Path(bundles_root)
    w = Path(weights_root) if weights_root is not None else b

    def cfg(stage: str) -> str:
        return str(b / stage / "configs" / "inference.json")

    def weights(stage: str, name: str = "model.pt") -> str | None:
        path = w / stage / "models" / name
        if not path.is_file():
            logger.warning("%s: not found; %s is left out", path, stage)
            return None
        return str(path)

    flow_w = weights("flow_generation")
    finetuned = w / "mrngan" / "models" / "flow_finetuned.pt"
    if use_finetuned_flow and finetuned.is_file():
        flow_w = str(finetuned)
    if prior_fit is None:
        from monai.bundle import ConfigParser

        prior_fit = ConfigParser.load_config_file(cfg("mrngan")).get("prior_fit")
    prior_path = w / "brain_generalization" / "models" / prior_file
    return load_components(
        mrngan_config=cfg("mrngan"),
        mrngan_weights=weights("mrngan"),
        flow_config=cfg("flow_generation"),
        flow_weights=flow_w,
        prior_path=str(prior_path) if prior_path.is_file() else None,
        prior_fit=prior_fit,
        localizer_config=cfg("slice_localization"),
        localizer_weights=weights("slice_localization"),
        device=device,
        overrides=overrides,
    )


# ---------------------------------------------------------------- output
def volume_affine(reference_affine: np.ndarray, reference_positions: Sequence[float], grid_positions: Sequence[float]) -> np.ndarray:
    """The reference volume's affine, shifted along its axial axis so grid index i sits at ``p_i``."""
    ref = np.asarray(reference_positions, dtype=np.float64)
    aff = np.array(reference_affine, dtype=np.float64)
    if ref.size < 2:
        return aff
    ref_step = (ref[-1] - ref[0]) / (ref.size - 1)
    j0 = (float(grid_positions[0]) - ref[0]) / ref_step  # fractional reference index of grid index 0
    if abs(j0 - round(j0)) < 1e-3:  # positions are stored rounded: snap to the reference grid
        j0 = float(round(j0))
    aff[:3, 3] = aff[:3, 3] + aff[:3, 2] * j0
    return aff


def montage(volume: np.ndarray, num: int = 16, cols: int = 4) -> np.ndarray:
    """A grid of ``num`` evenly spaced axial slices (display orientation), top of the head first."""
    depth = volume.shape[2]
    picks = np.unique(np.linspace(depth - 1, 0, min(num, depth)).round().astype(int))[::-1]
    tiles = [slice_to_display(volume[:, :, i]) for i in picks]
    rows = int(math.ceil(len(tiles) / cols))
    h, w = tiles[0].shape
    out = np.zeros((rows * h, cols * w), dtype=np.float32)
    for n, tile in enumerate(tiles):
        r, c = divmod(n, cols)
        out[r * h : (r + 1) * h, c * w : (c + 1) * w] = tile
    return out


def save_reconstruction(rec: Reconstruction, out: str | os.PathLike, affine: np.ndarray | None = None, spacing_mm: float = 2.0) -> dict[str, str]:
    """Write ``OUT.nii.gz``, ``OUT_montage.png`` and ``OUT_positions.json`` (atomically); return the paths."""
    out = Path(out)
    stem = out.name[: -len(".nii.gz")] if out.name.endswith(".nii.gz") else out.stem
    if affine is None:
        affine = np.diag([spacing_mm, spacing_mm, spacing_mm, 1.0])
    save_nifti(rec.volume, affine, out)
    mont = out.with_name(f"{stem}_montage.png")
    save_png(montage(rec.volume), mont, display=False)
    meta = out.with_name(f"{stem}_positions.json")
    save_json(
        {
            "method": rec.method,
            "input_indices": rec.input_indices,
            "input_positions": rec.input_positions,
            "positions": [round(float(p), 6) for p in rec.positions],
            "shape": list(rec.volume.shape),
        },
        meta,
    )
    return {"volume": str(out), "montage": str(mont), "positions": str(meta)}


def reconstruct_files(
    inputs: Sequence[str],
    out: str,
    components: Components,
    slice_index: int | None = None,
    positions: Sequence[float] | None = None,
    method: str = "mrngan",
    expected_shape: Sequence[int] | None = None,
    spacing_mm: float = 2.0,
    reference_affine: np.ndarray | None = None,
    reference_positions: Sequence[float] | None = None,
    refine_window: float = 0.12,
) -> dict[str, Any]:
    """Files in (PNG, 2D NIfTI, or a slice of a 3D NIfTI with ``slice_index``), volume files out.

    ``expected_shape``: the prepared in-plane size the models were trained on (a wrong-size input
    raises :class:`InputError`). With ``reference_affine`` / ``reference_positions`` (one prepared
    volume's affine and ``p`` per index) the output covers that volume's extent in ``p`` and its
    affine matches the prepared data's orientation, spacing and anatomy; otherwise ``0 <= p <= 1`` and a RAS diagonal affine with ``spacing_mm``. Returns the written
    paths and the positions used for each input.
    """
    if not inputs:
        raise ValueError("no input slices given")
    arrs = []
    for path in inputs:
        arr = load_slice(path, slice_index)
        if expected_shape is not None and tuple(arr.shape) != tuple(expected_shape):
            raise InputError(path, f"slice is {arr.shape[0]}x{arr.shape[1]} px; the models expect {expected_shape[0]}x{expected_shape[1]} (prepared size)")
        arrs.append(to_unit_range(arr))
    if positions is not None and len(positions) != len(inputs):
        raise ValueError(f"{len(inputs)} input slices but {len(positions)} positions")
    rec = reconstruct_volume(
        np.stack(arrs),
        positions,
        method=method,
        model=components.model,
        next_fn=components.next_fn,
        prior=components.prior,
        localizer=components.localizer,
        spacing_mm=spacing_mm,
        reference_positions=reference_positions,
        refine_window=refine_window,
        device=components.device,
    )
    affine = None
    if reference_affine is not None and reference_positions is not None:
        affine = volume_affine(reference_affine, reference_positions, rec.positions)
    paths = save_reconstruction(rec, out, affine, spacing_mm)
    logger.info("wrote %s (%s slices); input positions %s", paths["volume"], rec.volume.shape[2], rec.input_positions)
    return {**paths, "input_positions": rec.input_positions, "input_indices": rec.input_indices}


def load_stage_prior(path: str | os.PathLike, fit: Mapping[str, Any] | None = None) -> Any:
    """The brain generalization stage's prior (``monai_mrngan.inference.prior.load_prior``, imported on use).

    ``fit``: how the prior is fitted to an input slice (that stage's ``FitConfig`` fields).
    """
    from .prior import load_prior

    return load_prior(str(path), fit=dict(fit) if fit is not None else None)


def reference_grid(dataset_dir: str | os.PathLike, split: str = "training") -> dict[str, Any]:
    """Affine, ``p`` per index, in-plane shape and axial spacing of the prepared split's volume
    with the most slices (the fullest extent from the vertex down).

    :func:`reconstruct_files` uses it so its output matches the prepared data.
    """
    import nibabel as nib

    from ..data.datalist import load_split

    entries = load_split(dataset_dir, split) or load_split(dataset_dir, "test")
    if not entries:
        raise ValueError(f"{dataset_dir}: no prepared volumes to take the grid from")
    entry = max(entries, key=lambda e: len(e["positions"]))
    img = nib.load(entry["image"])
    positions = [float(p) for p in entry["positions"]]
    spacing = float(np.asarray(img.header.get_zooms()[:3])[2])
    return {
        "affine": np.asarray(img.affine, dtype=np.float64),
        "positions": positions,
        "shape": tuple(int(s) for s in img.shape[:2]),
        "spacing_mm": spacing,
    }
