"""The contracts between the stages, as adapters the recurrent cell calls.

MRNGAN's unroll takes two callables (:data:`~monai_mrngan.networks.recurrent.NextFn`,
:data:`~monai_mrngan.networks.recurrent.PriorFn`); this module makes them from a trained pix2pix
generator and from a prior object, so training (:mod:`monai_mrngan.engines.recurrent`) and
inference (:mod:`monai_mrngan.inference`) share one definition:

- :func:`generator_step` / :func:`predict_next`: the flow stage's boundary, the one home of the
  [0, 1] <-> [-1, 1] scaling and of "does this generator take a direction input";
- :func:`next_fn_for`: ``next_fn(slices, direction)`` from a generator (frozen or fine-tuned);
- :func:`prior_fn_for`: ``prior_fn(positions)`` from any object with ``slice_at`` (e.g.
  :class:`~monai_mrngan.atlas.prior.BrainPrior`), fitted per sample to a reference slice.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable

import torch

from ..transforms.shapes import as_slice_batch
from .recurrent import NextFn, PriorFn

__all__ = ["generator_step", "predict_next", "next_fn_for", "prior_fn_for", "NextFn", "PriorFn"]


def _device(module: torch.nn.Module) -> torch.device:
    p = next(module.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _takes_direction(generator: torch.nn.Module) -> bool:
    try:
        return len(inspect.signature(generator.forward).parameters) >= 2
    except (TypeError, ValueError):
        return True


def _directions(direction: torch.Tensor | int, batch: int) -> torch.Tensor:
    d = torch.as_tensor(direction, dtype=torch.float32).reshape(-1)
    if d.numel() == 1:
        d = d.expand(batch).clone()
    if d.numel() != batch:
        raise ValueError(f"got {d.numel()} directions for {batch} slices")
    if not bool(torch.all((d == 1) | (d == -1))):
        raise ValueError(f"direction must be +1 or -1, got {sorted(set(d.tolist()))}")
    return d


def generator_step(generator: torch.nn.Module, slices: torch.Tensor, direction: torch.Tensor | int) -> torch.Tensor:
    """The generator's neighbour prediction on [0, 1] slices, with gradients (for fine-tuning).

    The one home of the stage's boundary: [0, 1] -> [-1, 1], a direction input when the
    generator takes one, back to [0, 1]. The result is on the input's device.
    """
    x = as_slice_batch(slices)
    d = _directions(direction, x.shape[0])
    dev = _device(generator)
    xin = x.to(dev) * 2.0 - 1.0
    out = generator(xin, d.to(dev)) if _takes_direction(generator) else generator(xin)
    return ((out.float() + 1.0) * 0.5).clamp(0.0, 1.0).to(torch.as_tensor(slices).device)


@torch.no_grad()
def predict_next(generator: torch.nn.Module, slices: torch.Tensor, direction: torch.Tensor | int) -> torch.Tensor:
    """Predicted neighbours (B, 1, H, W) in [0, 1] of ``slices`` (B, 1, H, W) in [0, 1].

    ``direction``: +1 (next array index, towards the vertex) or -1, one int or one per sample.
    The generator is put in eval mode; the result is on the input's device.
    """
    generator.eval()
    return generator_step(generator, slices, direction)


def next_fn_for(generator: Any, trainable: bool = False, predict: Callable | None = None) -> NextFn:
    """``next_fn(slices, direction)`` from a pix2pix generator and the flow stage's ``predict_next``.

    Frozen (default): the generator is put in eval mode with gradients off and called through
    ``predict`` (default: the flow stage's ``predict_next``) under ``no_grad``. ``trainable``:
    gradients flow into the generator (fine-tuning) through ``predict`` when one is given, else
    through :func:`generator_step`; the generator stays in eval mode (no batch-norm
    statistics drift while the cell trains).
    """
    if isinstance(generator, torch.nn.Module):
        generator.eval()
        generator.requires_grad_(trainable)
    if trainable:
        predict = predict or generator_step

        def next_fn(slices: torch.Tensor, direction: torch.Tensor) -> torch.Tensor:
            out = predict(generator, slices, direction)
            if torch.is_grad_enabled() and not out.requires_grad:
                raise RuntimeError("fine-tuning pix2pix needs a predict function that keeps gradients; it returned a detached tensor")
            return out

        return next_fn
    predict = predict or predict_next

    def frozen_next_fn(slices: torch.Tensor, direction: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return predict(generator, slices, direction)

    return frozen_next_fn


def prior_fn_for(prior: Any, reference: torch.Tensor | None = None, reference_positions: torch.Tensor | None = None) -> PriorFn:
    """``prior_fn(positions (B,T)) -> (B,T,1,H,W)`` from a prior object with ``slice_at``.

    With ``reference`` (B,1,H,W) and ``reference_positions`` (B,), sample b's slices are fitted to
    its own reference slice (priors with ``fit_many`` fit them all in one batch first).
    """

    def prior_fn(positions: torch.Tensor) -> torch.Tensor:
        out = []
        with torch.no_grad():
            if reference is not None and hasattr(prior, "fit_many"):  # every sample's fit in one batch (cached for slice_at)
                prior.fit_many(reference.detach(), torch.as_tensor(reference_positions).detach().reshape(-1).double().cpu(),
                               within=[p.detach().double().cpu() for p in positions])  # only the grid slices the runs read are warped
            for b in range(positions.shape[0]):
                kw = {}
                if reference is not None:
                    kw = {"reference": reference[b : b + 1].detach(), "reference_position": float(reference_positions[b])}
                out.append(torch.as_tensor(prior.slice_at(positions[b].detach().float().cpu(), **kw)).float())
        res = torch.stack(out, 0)
        if res.ndim == 4:  # (B,T,H,W) -> (B,T,1,H,W)
            res = res[:, :, None]
        return res.to(positions.device)

    return prior_fn
