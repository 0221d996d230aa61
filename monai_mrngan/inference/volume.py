"""The output grid of a reconstruction and how runs fill it.

The volume lives on a grid of axial indices with the prepared data's slice step (``step_p``: the
change of ``p`` from one array index to the next, negative because RAS indices run towards the
vertex where ``p = 0``). Each input slice is placed at its index (:func:`volume_grid`); generation
runs outwards from it (:func:`fill_volume`):

- one slice: a run towards the vertex (direction +1) and one towards the neck (-1), batched
  together, until both ends of the axial extent (``0 <= p <= 1``, or a given grid);
- several slices, gap-aware runner (MRNGAN with ``far_end``): every gap is filled by a +1 run from
  its lower slice that is handed the upper slice and its position as its far end, and a -1 run from
  the upper slice handed the lower one, blended with linear weights by distance (``both_ways``; an
  ensemble of two runs that each see both ends); or, for a cell with ``both_ways`` false, by the
  +1 run alone; beyond the outermost inputs one-sided runs (no far end) reach the ends;
- several slices, any other runner: every gap is generated from both sides (a +1 run from the
  lower slice, a -1 run from the upper one) and the two are blended with linear weights by
  distance; beyond the outermost inputs one-sided runs reach the ends. With the ``copy`` runner
  this blending *is* linear interpolation (:func:`linear_fill`).

:func:`cubic_fill` is the monotone cubic (PCHIP) baseline through all given slices, :func:`registration_fill`
registration-based interpolation between neighbouring ones (neither is run-based).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

from ..atlas.registration import interpolate_between
from ..transforms.slices import axial_pchip
from .runners import Runner, copy_runner, is_gap_aware, one_pass_gaps

__all__ = ["Reconstruction", "volume_grid", "fill_volume", "linear_fill", "cubic_fill", "registration_fill", "volume_affine"]



@dataclass
class Reconstruction:
    """A reconstructed volume: ``volume`` (H, W, D) float32 [0,1], ``positions`` (D,) ``p`` per index."""

    volume: np.ndarray
    positions: np.ndarray
    input_indices: list[int]
    input_positions: list[float]
    method: str = "mrngan"
    extra: dict = field(default_factory=dict)


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
        indices = _snapped(pos, step_p, grid)
        _refuse_collisions(pos, indices, step)
        return grid, indices
    p_a = float(pos[0])
    below = max(0, int(math.floor((extent[1] - p_a) / step + 1e-3)))  # tolerance: positions are rounded
    above = max(0, int(math.floor((p_a - extent[0]) / step + 1e-3)))
    offs = _snapped(pos, step_p)
    below = max(below, -min(offs))  # inputs outside the extent still get a place
    above = max(above, max(offs))
    indices = [below + o for o in offs]
    _refuse_collisions(pos, indices, step)
    grid = p_a + (np.arange(below + above + 1) - below) * step_p
    return grid, indices


def _refuse_collisions(pos: np.ndarray, indices: Sequence[int], step: float) -> None:
    """One line naming the first two inputs that land on one grid slice (a list of every position ran to 2,000 characters)."""
    seen: dict[int, int] = {}
    for k, i in enumerate(indices):
        if i in seen:
            raise ValueError(f"input slices {seen[i]} and {k} (of {len(indices)}) at positions {pos[seen[i]]:.4f} and {pos[k]:.4f} "
                             f"fall on the same grid slice (step {step:.4f} in p)")
        seen[i] = k


def _snapped(pos: np.ndarray, step_p: float, reference: np.ndarray | None = None) -> list[int]:
    """Each position's grid slice: the nearest of ``reference``, else its offset in steps from the first position.
    Positions are taken at float32 (as :func:`~monai_mrngan.inference.reconstruct.reconstruct_volume` holds them), so a
    position half-way between two grid slices (a 1 mm slice on a 2 mm grid) snaps the same way from every caller."""
    pos = np.asarray(pos, dtype=np.float32).astype(np.float64)
    if reference is not None:
        return [int(np.argmin(np.abs(reference - p))) for p in pos]
    return [int(round((p - pos[0]) / step_p)) for p in pos]


def one_per_grid_slice(positions: Sequence[float], step_p: float, reference: Sequence[float] | None = None) -> list[int]:
    """Which inputs to keep so that no two land on one grid slice (as :func:`volume_grid` snaps them): per grid slice
    the input nearest to it. A stack of slices thinner than the grid (1 mm slices on a 2 mm grid) keeps about every
    other one."""
    pos = np.asarray(positions, dtype=np.float32).astype(np.float64).reshape(-1)  # as _snapped takes them
    grid = None if reference is None else np.asarray(reference, dtype=np.float64)
    snapped = _snapped(pos, step_p, grid)
    centres = grid[snapped] if grid is not None else pos[0] + np.asarray(snapped) * step_p
    best: dict[int, int] = {}
    for k, i in enumerate(snapped):
        if i not in best or abs(pos[k] - centres[k]) < abs(pos[best[i]] - centres[best[i]]):
            best[i] = k
    return sorted(best.values())


def fill_volume(run: Runner, slices: torch.Tensor, indices: Sequence[int], num_slices: int, grid_positions: torch.Tensor | np.ndarray, step_p: float,
                signals: dict | None = None) -> torch.Tensor:
    """(D,H,W) volume: inputs at ``indices``, everything else generated by ``run``.

    A gap-aware ``run`` (:func:`~monai_mrngan.inference.runners.is_gap_aware`) fills each gap with
    runs that know both ends: one from each end, blended by distance, or, when
    :func:`~monai_mrngan.inference.runners.one_pass_gaps`, one from the lower end. Any other runner
    fills it from both sides with one-sided runs, blended by distance.
    ``signals``: a dict that receives, per output slice ((D,), or (D,H,W) for a per-pixel one), each
    per-step signal the runner left in ``run.last_signals`` (e.g. MRNGAN's weight on the prior, its
    candidates' spread), blended like the slices, and
    ``run_spread`` (D,H,W): where two runs meet (inside a gap filled from both ends) the absolute
    difference of their outputs, 0 where one run fills a slice. A runner with ``wants_cubic`` is also handed
    ``cubic``: the PCHIP through all given slices at each of its gap runs' slices (zeros for the others).
    """
    slices = torch.as_tensor(slices, dtype=torch.float32)
    if slices.ndim == 3:
        slices = slices[:, None]
    order = np.argsort(np.asarray(indices))
    idx = [int(indices[i]) for i in order]
    slices = slices[torch.as_tensor(order)]
    if idx[0] < 0 or idx[-1] >= num_slices:
        raise ValueError(f"input indices {idx} outside the grid of {num_slices} slices")
    grid = torch.as_tensor(np.asarray(grid_positions), dtype=torch.float32)
    gap_aware, one_pass = is_gap_aware(run), one_pass_gaps(run)
    # runs: (source slice number, direction, steps); a gap-aware gap run's far end is slice k +- 1
    runs = [(0, -1, idx[0]), (len(idx) - 1, 1, num_slices - 1 - idx[-1])]
    for k in range(len(idx) - 1):
        gap = idx[k + 1] - idx[k] - 1
        runs += [(k, 1, gap)] if one_pass else [(k, 1, gap), (k + 1, -1, gap)]
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
    kw = {}
    if gap_aware:
        # a run inside the inputs fills a gap: its far end is the next input in its direction
        bounded = [0 <= r[0] + r[1] < len(idx) for r in runs]
        far_src = torch.as_tensor([r[0] + r[1] if b else r[0] for r, b in zip(runs, bounded)])
        far_pos = torch.where(torch.as_tensor(bounded), grid[torch.as_tensor([idx[i] for i in far_src.tolist()])], torch.tensor(float("nan")))
        kw["far"] = (slices[far_src] * torch.as_tensor(bounded, dtype=torch.float32).view(-1, 1, 1, 1), far_pos)
        if getattr(run, "wants_cubic", False):
            kw["cubic"] = _run_cubic(slices[:, 0], idx, num_slices, runs, bounded, steps)
    gen = run(starts, start_pos, dirs, steps, step_p, **kw)[:, :, 0].float().cpu()  # (N, steps, H, W)
    if gen.shape[:2] != (len(runs), steps):
        raise RuntimeError(f"runner returned {tuple(gen.shape)}, expected ({len(runs)}, {steps}, H, W)")
    acc = torch.zeros_like(vol)
    wsum = torch.zeros(num_slices)
    signed, count = torch.zeros_like(vol), torch.zeros(num_slices)  # +1 runs minus -1 runs: |a - b| where two meet
    side = {name: (torch.zeros(num_slices, *v.shape[2:]), v.float()) for name, v in (getattr(run, "last_signals", None) or {}).items()}
    for n, (k, d, nsteps) in enumerate(runs):
        i0 = idx[k]
        t = torch.arange(1, nsteps + 1)
        target = i0 + d * t
        if one_pass:
            weight = torch.ones(nsteps)
        elif d > 0 and k + 1 < len(idx):  # gap above slice k: weight falls linearly to the upper input
            weight = (idx[k + 1] - target).float() / (idx[k + 1] - i0)
        elif d < 0 and k > 0:
            weight = (target - idx[k - 1]).float() / (i0 - idx[k - 1])
        else:
            weight = torch.ones(nsteps)
        acc[target] += weight.view(-1, 1, 1) * gen[n, :nsteps]
        wsum[target] += weight
        if signals is not None:
            signed[target] += float(d) * gen[n, :nsteps]
            count[target] += 1
        for total, per_step in side.values():
            total[target] += weight.view(-1, *[1] * (per_step.ndim - 2)) * per_step[n, :nsteps]
    filled = wsum > 0
    vol[filled] = acc[filled] / wsum[filled].view(-1, 1, 1)
    if signals is not None:  # the runner's per-step signals, blended like the slices; NaN on given slices
        for name, (total, _) in side.items():
            per = [1] * (total.ndim - 1)
            signals[name] = torch.where(filled.view(-1, *per), total / wsum.clamp_min(1e-12).view(-1, *per), torch.tensor(float("nan")))
        signals["run_spread"] = torch.where((count == 2).view(-1, 1, 1), signed.abs(), torch.zeros(()))
    return vol.clamp(0.0, 1.0)


def _run_cubic(slices: torch.Tensor, idx: list[int], num_slices: int, runs: list[tuple[int, int, int]], bounded: list[bool],
               steps: int) -> torch.Tensor:
    """(N, steps+1, 1, H, W): for each gap run (``bounded``), the :func:`cubic_fill` volume through all given ``slices``
    (K,H,W) at ``idx``, read at the run's start and the slices it fills; zeros elsewhere (open runs, steps past the gap).
    The curve is built once for the stack, not once per run."""
    whole = cubic_fill(slices, idx, num_slices)
    out = torch.zeros(len(runs), steps + 1, 1, *slices.shape[-2:])
    for n, ((k, d, nsteps), b) in enumerate(zip(runs, bounded)):
        if b:
            out[n, : nsteps + 1, 0] = whole[idx[k] + d * torch.arange(nsteps + 1)]
    return out


def linear_fill(slices: torch.Tensor | np.ndarray, indices: Sequence[int], num_slices: int) -> torch.Tensor:
    """(D,H,W) volume by linear interpolation between given slices (nearest copy beyond the ends)."""
    grid = -np.arange(num_slices, dtype=np.float64)  # positions are irrelevant to copying
    return fill_volume(copy_runner(), torch.as_tensor(slices, dtype=torch.float32), indices, num_slices, grid, -1.0)


def cubic_fill(slices: torch.Tensor | np.ndarray, indices: Sequence[int], num_slices: int) -> torch.Tensor:
    """(D,H,W) volume by monotone cubic (PCHIP) interpolation through the given slices along the axial axis, per pixel.

    :func:`~monai_mrngan.transforms.slices.axial_pchip` (scipy's ``PchipInterpolator``): C1, local, and it never
    overshoots the two neighbouring slices (no ringing at tissue edges); exact on linear data, with two slices the
    straight line. Chosen over a not-a-knot ``CubicSpline`` (exact on cubic polynomials) because it is the stronger
    baseline on brain MRI: on the 15 held-out IXI subjects (2 mm, 128 px) it scored 0.4-0.6 dB
    PSNR and 0.004-0.013 head-only SSIM above the spline at every k = 2..16. Nearest copy beyond
    the outermost slices, as :func:`linear_fill`.
    """
    x = torch.as_tensor(slices, dtype=torch.float32)
    if x.ndim == 4:
        x = x[:, 0]
    order = np.argsort(np.asarray(indices))
    idx = np.asarray(indices)[order]
    x = x[torch.as_tensor(order)]
    vol = linear_fill(x, idx.tolist(), num_slices)  # inputs in place, nearest copy beyond the ends
    if len(idx) < 3:  # PCHIP through two slices is the straight line
        return vol
    inside = np.arange(idx[0], idx[-1] + 1)
    vol[torch.as_tensor(inside)] = axial_pchip(x, idx, inside)
    vol[torch.as_tensor(idx)] = x  # exact at the given slices
    return vol.clamp(0.0, 1.0)


def registration_fill(slices: torch.Tensor | np.ndarray, indices: Sequence[int], num_slices: int, fit: dict | None = None) -> torch.Tensor:
    """(D,H,W) volume by registration-based interpolation between neighbouring given slices
    (:func:`~monai_mrngan.atlas.registration.interpolate_between` on every pair with a gap, ``fit`` updating its
    settings). Exact at the given slices, nearest copy beyond the outermost ones (as :func:`linear_fill`); nothing is
    learned, so no scanner's look is. MONAI's registration networks learn a deformation from training pairs; this
    registers each pair on its own, with the atlas fit's 2D engine.
    """
    x = torch.as_tensor(slices, dtype=torch.float32)
    if x.ndim == 4:
        x = x[:, 0]
    order = np.argsort(np.asarray(indices))
    idx = [int(i) for i in np.asarray(indices)[order]]
    x = x[torch.as_tensor(order)]
    vol = linear_fill(x, idx, num_slices)
    pairs = [j for j in range(len(idx) - 1) if idx[j + 1] - idx[j] > 1]
    if not pairs:
        return vol
    longest = max(idx[j + 1] - idx[j] for j in pairs) - 1  # slices to fill in the widest gap; shorter gaps pad with 0
    fractions = torch.zeros(len(pairs), longest)
    for n, j in enumerate(pairs):
        g = idx[j + 1] - idx[j]
        fractions[n, : g - 1] = torch.arange(1, g, dtype=torch.float32) / g
    mid = interpolate_between(x[pairs][:, None], x[[j + 1 for j in pairs]][:, None], fractions, fit)
    for n, j in enumerate(pairs):
        vol[idx[j] + 1 : idx[j + 1]] = mid[n, : idx[j + 1] - idx[j] - 1, 0]
    return vol


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
