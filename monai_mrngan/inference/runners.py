"""Every reconstruction method as a *runner*, so placement, blending, saving and evaluation are shared.

``run(starts (N,1,H,W), start_positions (N,), directions (N,), steps, step_p, far=None) -> (N,steps,1,H,W)``:
from each start slice, ``steps`` slices in its direction (+1 towards the vertex, -1 towards the
neck), position ``p_t = p_0 + t * direction * step_p``. ``far``: optional (slices (N,1,H,W),
positions (N,)), the given slice at the far end of each run's gap (position NaN: none). Only a
*gap-aware* runner (attribute ``gap_aware`` true: MRNGAN with ``far_end``) reads it, and
:func:`~monai_mrngan.inference.volume.fill_volume` then fills each gap with runs that know both
ends: one from each end, blended by distance (attribute ``both_ways``, MRNGAN's default), or one
from the lower end (:func:`one_pass_gaps`). Every other runner ignores it and gaps are filled from
both sides with one-sided runs, blended by distance.

- ``mrngan``: the trained cell unrolled with pix2pix and the prior (:func:`mrngan_runner`);
- ``copy``: the input slice repeated (:func:`copy_runner`);
- ``prior``: the general brain at each position, fitted to the input slice (:func:`prior_runner`);
- ``pix2pix_iterative``: pix2pix rolled out on its own outputs, both ways (:func:`pix2pix_runner`);
- ``linear``: for few-slice input, copy runs from both sides of a gap blended with linear weights
  by distance (:func:`~monai_mrngan.inference.volume.fill_volume`), which is exactly linear
  interpolation between the two given slices (and nearest copy beyond the outermost ones);
- ``cubic``: monotone cubic (PCHIP) interpolation through all given slices per pixel
  (:func:`~monai_mrngan.inference.volume.cubic_fill`, not run-based; its runner is ``copy``, used
  beyond the outermost given slices);
- ``registration``: registration-based interpolation between neighbouring given slices
  (:func:`~monai_mrngan.inference.volume.registration_fill`, not run-based; its runner is ``copy``, as cubic's).
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Tuple

import torch

from ..atlas.registration import interpolate_between
from ..networks.contracts import prior_fn_for
from ..networks.recurrent import MRNGAN, NextFn

__all__ = ["Runner", "FarEnd", "METHODS", "is_gap_aware", "one_pass_gaps", "run_positions", "mrngan_runner", "copy_runner", "prior_runner", "pix2pix_runner", "make_runner",
           "check_method"]

FarEnd = Optional[Tuple[torch.Tensor, torch.Tensor]]
"""``(far slices (N,1,H,W), far positions (N,))``; a NaN position means the run has no far end."""
Runner = Callable[..., torch.Tensor]
"""``run(starts, start_positions, directions, steps, step_p, far=None) -> (N,steps,1,H,W)``."""
METHODS = ("mrngan", "pix2pix_iterative", "prior", "copy", "linear", "cubic", "registration")


def run_positions(start_positions: torch.Tensor, directions: torch.Tensor, steps: int, step_p: float) -> torch.Tensor:
    """(N, steps+1) positions of runs: ``p_t = p_0 + t * direction * step_p``."""
    t = torch.arange(steps + 1, dtype=torch.float32, device=start_positions.device)
    return start_positions.float().view(-1, 1) + t.view(1, -1) * directions.float().view(-1, 1) * float(step_p)


def is_gap_aware(run: Runner) -> bool:
    """Whether ``run`` fills a gap in one pass from its far end (reads ``far``)."""
    return bool(getattr(run, "gap_aware", False))


def one_pass_gaps(run: Runner | MRNGAN | None) -> bool:
    """Whether each gap is filled by ONE gap-aware run from its lower slice (a runner, or the MRNGAN it unrolls).

    Then every generated slice of a gap used the lower slice's fitted prior; otherwise the nearer input's.
    """
    if isinstance(run, MRNGAN):
        return run.far_end and not run.both_ways
    return is_gap_aware(run) and not getattr(run, "both_ways", False)


def mrngan_runner(model: MRNGAN, next_fn: NextFn, prior: Any, fit_prior: bool = True) -> Runner:
    """Runner that unrolls the trained MRNGAN cell (eval mode, no grad); gap-aware when the cell has ``far_end``; a cell with
    ``interp`` gets each run's registration-based interpolation between its ends, as in training; a cell with ``cubic`` reads
    the PCHIP through the given slices at its runs' positions (``cubic`` (N,steps+1,1,H,W), from
    :func:`~monai_mrngan.inference.volume.fill_volume`; ``run.wants_cubic``)."""

    if next(model.parameters()).device.type == "cpu":
        model.use_channels_last()

    @torch.no_grad()
    def run(starts: torch.Tensor, start_positions: torch.Tensor, directions: torch.Tensor, steps: int, step_p: float, far: FarEnd = None,
            cubic: torch.Tensor | None = None) -> torch.Tensor:
        model.eval()
        pos = run_positions(start_positions, directions, steps, step_p)
        prior_fn = prior_fn_for(prior, starts if fit_prior else None, start_positions)
        far_slices, far_pos = far if far is not None else (None, None)
        recording, model.record_spread = model.record_spread, True  # a few elementwise operations per step beside the convolutions
        try:
            out = model.unroll(starts, pos, directions, next_fn, prior_fn, far_slices, far_pos, interpolate_between if model.interp else None, cubic)
        finally:  # only this rollout records: the model object may be trained afterwards
            model.record_spread = recording
        # prior weight (N, steps) and candidate spread (N, steps, H, W): fill_volume maps them to slices
        run.last_signals = {"prior_weight": model.last_prior_weight.float().cpu()}
        if getattr(model, "last_candidate_spread", None) is not None:
            run.last_signals["candidate_spread"] = model.last_candidate_spread.float().cpu()
        return out[:, :, None]

    run.gap_aware = bool(getattr(model, "far_end", False))
    run.both_ways = bool(getattr(model, "both_ways", False))
    run.wants_cubic = bool(getattr(model, "cubic", False))
    return run


def copy_runner() -> Runner:
    """Every generated slice is the start slice."""

    def run(starts: torch.Tensor, start_positions: torch.Tensor, directions: torch.Tensor, steps: int, step_p: float, far: FarEnd = None) -> torch.Tensor:
        return starts[:, None].expand(-1, steps, -1, -1, -1).clone()

    return run


def prior_runner(prior: Any, fit: bool = True) -> Runner:
    """The prior slice at each position of the run (fitted to the start slice when ``fit``)."""

    def run(starts: torch.Tensor, start_positions: torch.Tensor, directions: torch.Tensor, steps: int, step_p: float, far: FarEnd = None) -> torch.Tensor:
        pos = run_positions(start_positions, directions, steps, step_p)[:, 1:]
        fn = prior_fn_for(prior, starts if fit else None, start_positions)
        return fn(pos).to(starts).clamp(0, 1)

    return run


def pix2pix_runner(next_fn: NextFn) -> Runner:
    """pix2pix fed its own outputs (``next_fn`` as from :func:`~monai_mrngan.networks.contracts.next_fn_for`)."""

    @torch.no_grad()
    def run(starts: torch.Tensor, start_positions: torch.Tensor, directions: torch.Tensor, steps: int, step_p: float, far: FarEnd = None) -> torch.Tensor:
        prev, outs = starts, []
        for _ in range(steps):
            prev = next_fn(prev, directions).clamp(0, 1)
            outs.append(prev)
        return torch.stack(outs, 1)

    return run


def check_method(method: str) -> None:
    """Raise a one-line ValueError for a method that is not one of :data:`METHODS`."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {METHODS}")


def make_runner(
    method: str,
    model: MRNGAN | None = None,
    next_fn: NextFn | None = None,
    prior: Any = None,
    fit_prior: bool = True,
) -> Runner:
    """The runner of one method of :data:`METHODS` (raises when a component it needs is missing)."""
    need = {"mrngan": ("model", "next_fn", "prior"), "pix2pix_iterative": ("next_fn",), "prior": ("prior",)}.get(method, ())
    given = {"model": model, "next_fn": next_fn, "prior": prior}
    missing = [n for n in need if given[n] is None]
    check_method(method)
    if missing:
        raise ValueError(f"method {method!r} needs {', '.join(missing)}")
    if method == "mrngan":
        return mrngan_runner(model, next_fn, prior, fit_prior)
    if method == "pix2pix_iterative":
        return pix2pix_runner(next_fn)
    if method == "prior":
        return prior_runner(prior, fit_prior)
    return copy_runner()  # copy; linear = copy runs blended across gaps; cubic, registration: copy beyond the ends
