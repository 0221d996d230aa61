"""Reconstruct a whole volume from one 2D axial slice, or from a few.

:func:`reconstruct_volume` places the inputs on the output grid and fills it with one method's
runner (:mod:`~monai_mrngan.inference.runners`, :mod:`~monai_mrngan.inference.volume`); localized
positions are refined against the prior's atlases (:func:`refine_positions`).
:func:`reconstruct_files` is the file-level entry point of the command line (files in, NIfTI +
positions + montage out, see :mod:`~monai_mrngan.inference.output`); the trained stages come from
:mod:`~monai_mrngan.inference.components`.
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

import numpy as np
import torch

from ..data.io import InputError, load_slice
from ..data.positions import HEAD_HEIGHT_MM
from ..data.prepare import to_unit_range
from ..networks.recurrent import MRNGAN, NextFn
from ..transforms.shapes import as_slice_batch
from .components import Components
from .localize import localize
from .output import save_reconstruction
from .runners import is_gap_aware, make_runner
from .volume import Reconstruction, cubic_fill, fill_volume, volume_affine, volume_grid

logger = logging.getLogger(__name__)

__all__ = ["Reconstruction", "reconstruct_volume", "refine_positions", "reconstruct_files"]


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
    x = as_slice_batch(slices)
    if not torch.isfinite(x).all():
        raise ValueError("input slices contain NaN or infinite values")
    if positions is None:
        if localizer is None:
            raise ValueError("no positions given and no localizer to find them")
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

    def run_on_device(s, p, d, n, sp, far=None):
        far = tuple(t.to(device) for t in far) if far is not None else None
        return run(s.to(device), p.to(device), d.to(device), n, sp, far=far)

    run_on_device.gap_aware = is_gap_aware(run)
    if method == "cubic":
        vol = cubic_fill(x, idx, num_slices)
    else:
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
    x = as_slice_batch(slices)
    for i in range(len(pos)):
        pos[i] = prior.locate(x[i : i + 1].cpu(), float(pos[i]), window=window)
    return pos


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
