"""Training pieces for the MRNGAN stage, used with MONAI's SupervisedTrainer / SupervisedEvaluator.

A run of ``T`` true slices (from :class:`~monai_mrngan.transforms.SliceRund`, both directions)
becomes one training sample: the first slice is the input, the other ``T - 1`` are the targets of
the free-running unroll (the cell feeds on its own outputs, as at inference), and the loss is taken
at every step. Runs from :class:`~monai_mrngan.transforms.GapRund` also carry the far end of the gap
they fill (``far_image``, ``far_position``; NaN position for an open run), passed through to the
cell's unroll. Runs that start at an input slice of the fitted-prior cache
(:mod:`monai_mrngan.atlas.cache`) carry their prior slices (``prior``) and the recorded localizer
error of that fit (``position_offset``); other runs read the plain prior. Nothing here is a new
engine: :class:`RunBatch` is the ``prepare_batch``, :class:`RecurrentUnroll` the ``network`` (it
closes over pix2pix and the prior) and :class:`WeightedL1L2Loss` the loss, so MONAI's trainer,
evaluator and handlers work unchanged.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn

from ..atlas.registration import interpolate_between
from ..metrics.image import ssim_and_head
from ..networks.contracts import prior_fn_for
from ..networks.recurrent import MRNGAN, NextFn

__all__ = ["RunBatch", "RecurrentUnroll", "WeightedL1L2Loss", "ReseedSampler", "trainable_parameters", "run_strips", "pred_strips"]


class RunBatch:
    """``prepare_batch`` for runs: -> (start (B,1,H,W), targets (B,T-1,H,W), (), {positions, direction[, far, far_position][, prior][, cubic]}).

    ``position_noise``: std of one random offset added to all positions of a run (training only),
    so the cell learns to live with the localizer's error; the far end's position moves with them.
    Runs from the fitted-prior cache bring their own offset (``position_offset``, the error the
    cached fit was given) and their prior slices (``prior`` (B,T,H,W) -> (B,T,1,H,W)); the random
    offset is then not drawn. Gap runs sampled with ``cubic`` bring the PCHIP through their given slices at each
    slice (``cubic_image`` (B,T,H,W) -> ``cubic`` (B,T,1,H,W)).
    """

    def __init__(self, position_noise: float = 0.0) -> None:
        self.position_noise = float(position_noise)

    def __call__(self, batchdata: Mapping[str, Any], device: torch.device | str | None = None, non_blocking: bool = False, **kwargs: Any):
        runs = torch.as_tensor(batchdata["image"]).float()
        if runs.ndim == 5:  # (B,1,T,H,W) or (B,T,1,H,W) from other samplers
            runs = runs.squeeze(1) if runs.shape[1] == 1 else runs.squeeze(2)
        positions = torch.as_tensor(batchdata["positions"]).float().reshape(runs.shape[0], -1)
        extra = {}
        direction = torch.as_tensor(batchdata["direction"]).float().reshape(-1)
        if "position_offset" in batchdata:  # the cached fit's recorded localizer error
            offset = torch.as_tensor(batchdata["position_offset"]).float().reshape(-1, 1)
        elif self.position_noise > 0:
            offset = self.position_noise * torch.randn(positions.shape[0], 1)
        else:
            offset = torch.zeros(positions.shape[0], 1)
        positions = positions + offset
        if "prior" in batchdata:
            extra["prior"] = torch.as_tensor(batchdata["prior"]).float().reshape(*positions.shape, 1, *runs.shape[-2:]).to(device, non_blocking=non_blocking)
        if "cubic_image" in batchdata:
            extra["cubic"] = torch.as_tensor(batchdata["cubic_image"]).float().reshape(*positions.shape, 1, *runs.shape[-2:]).to(device, non_blocking=non_blocking)
        if "far_position" in batchdata:
            far = torch.as_tensor(batchdata["far_image"]).float().reshape(runs.shape[0], 1, *runs.shape[-2:])
            far_position = torch.as_tensor(batchdata["far_position"]).float().reshape(-1) + offset[:, 0]
            extra.update(far=far.to(device, non_blocking=non_blocking), far_position=far_position.to(device))
        runs = runs.to(device, non_blocking=non_blocking)
        start, targets = runs[:, :1], runs[:, 1:]
        return start, targets, (), {"positions": positions.to(device), "direction": direction.to(device), **extra}


class RecurrentUnroll(nn.Module):
    """``forward(start, positions, direction) -> (B,T-1,H,W)``: the MRNGAN cell unrolled with pix2pix and the prior.

    Only ``model`` (and ``generator`` when fine-tuned) are submodules, so ``train()`` / ``eval()``
    never touch a frozen generator and this module's ``state_dict`` holds no frozen weights.

    Args:
        model: the :class:`~monai_mrngan.networks.recurrent.MRNGAN` cell (``network_def``).
        next_fn: ``next_fn(slices, direction)`` (see :func:`~monai_mrngan.networks.contracts.next_fn_for`).
        prior: object with ``slice_at(positions)``: the plain (unfitted) prior of runs that bring
            no prior slices of their own (runs from the fitted-prior cache do).
        generator: the pix2pix module, registered only when ``finetune`` so it is trained/saved.

    A cell with ``interp`` is handed :func:`~monai_mrngan.atlas.registration.interpolate_between` (each gap run's
    two ends registered, as at inference).
    """

    def __init__(self, model: MRNGAN, next_fn: NextFn, prior: Any, generator: nn.Module | None = None, finetune: bool = False) -> None:
        super().__init__()
        self.model = model
        self.flow = generator if (finetune and generator is not None) else None
        self.next_fn, self.prior = next_fn, prior

    def train(self, mode: bool = True) -> "RecurrentUnroll":
        super().train(mode)
        if self.flow is not None:
            self.flow.eval()  # fine-tune weights, keep normalisation statistics
        return self

    def forward(self, start: torch.Tensor, positions: torch.Tensor, direction: torch.Tensor, far: torch.Tensor | None = None,
                far_position: torch.Tensor | None = None, prior: torch.Tensor | None = None, cubic: torch.Tensor | None = None) -> torch.Tensor:
        """``far`` / ``far_position``: each run's far end (NaN position: open run); the paper cell ignores them.
        ``prior`` (B,T,1,H,W): the run's prior slices (from the fitted-prior cache); else the plain prior at ``positions``.
        ``cubic`` (B,T,1,H,W): the PCHIP through each gap run's given slices, for a cell with ``cubic``."""
        if prior is not None:
            if tuple(prior.shape[:2]) != tuple(positions.shape):
                raise ValueError(f"prior slices {tuple(prior.shape)} do not match the runs' positions {tuple(positions.shape)}")
            prior_fn = lambda _positions: prior  # noqa: E731
        else:
            prior_fn = prior_fn_for(self.prior)
        interp_fn = interpolate_between if getattr(self.model, "interp", False) else None
        return self.model.unroll(start, positions, direction, self.next_fn, prior_fn, far, far_position, interp_fn, cubic)


class WeightedL1L2Loss(nn.Module):
    """``l1_weight * L1 + l2_weight * MSE`` averaged over every step and pixel (more weight on L1), plus
    ``ssim_weight * (1 - SSIM)`` averaged over every step's slice when ``ssim_weight`` > 0: SSIM exactly as the
    evaluation measures it (:func:`~monai_mrngan.metrics.image.ssim_and_head`), over the whole slice
    (``ssim_region="slice"``) or over the true slice's head pixels (``"head"``, slices without head left out).

    ``ssim_slices``: the SSIM term is taken on at most this many of the batch's slices, drawn at random (its
    own generator, ``seed``): an unbiased estimate at a fraction of the cost (0: every slice). SSIM's five
    windowed means and their gradients took 1.1 s per batch of 88 slices of 128 px on 2 cores, more than the
    cell's own step (0.85 s)."""

    def __init__(self, l1_weight: float = 1.0, l2_weight: float = 0.5, ssim_weight: float = 0.0, ssim_region: str = "slice",
                 ssim_slices: int = 16, seed: int = 0) -> None:
        super().__init__()
        if ssim_region not in ("slice", "head"):
            raise ValueError(f"ssim_region must be 'slice' or 'head', got {ssim_region!r}")
        self.l1_weight, self.l2_weight, self.ssim_weight, self.ssim_region = float(l1_weight), float(l2_weight), float(ssim_weight), ssim_region
        self.ssim_slices = int(ssim_slices)
        self._gen = torch.Generator().manual_seed(int(seed))

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        diff = pred - target
        loss = self.l1_weight * diff.abs().mean() + self.l2_weight * (diff**2).mean()
        if self.ssim_weight > 0:  # (B, T, H, W) runs -> (B * T, 1, H, W) slices
            h, w = pred.shape[-2:]
            pred, target = pred.reshape(-1, 1, h, w), target.reshape(-1, 1, h, w)
            if 0 < self.ssim_slices < pred.shape[0]:
                pick = torch.randperm(pred.shape[0], generator=self._gen)[: self.ssim_slices].to(pred.device)
                pred, target = pred[pick], target[pick]
            whole, head, head_px = ssim_and_head(pred, target)
            if self.ssim_region == "slice":
                loss = loss + self.ssim_weight * (1.0 - whole).mean()
            elif bool((head_px > 0).any()):
                loss = loss + self.ssim_weight * (1.0 - head[head_px > 0]).mean()
        return loss


def trainable_parameters(model: nn.Module, generator: nn.Module | None = None, finetune: bool = False) -> list[nn.Parameter]:
    """The cell's parameters, plus pix2pix's when fine-tuning."""
    params = list(model.parameters())
    if finetune and generator is not None:
        params += list(generator.parameters())
    return params


def _strip(x: torch.Tensor) -> torch.Tensor:
    """(T,H,W) -> (1,H,T*W): the slices of a run side by side."""
    x = torch.as_tensor(x).detach().float().cpu()
    if x.ndim == 4:
        x = x[:, 0]
    return torch.cat(list(x), dim=-1)[None]


def run_strips(batch: Any) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """TensorBoardImageHandler ``batch_transform``: (input slice repeated, true slices) per sample.

    Accepts a collated batch (trainer) or a decollated list of samples (evaluator).
    """
    if isinstance(batch, Mapping):
        runs = list(torch.as_tensor(batch["image"]))
    else:
        runs = [torch.as_tensor(b["image"]) for b in batch]
    starts = [_strip(r[:1].expand(r.shape[0] - 1, -1, -1)) for r in runs]
    return starts, [_strip(r[1:]) for r in runs]


def pred_strips(output: Any) -> list[torch.Tensor]:
    """TensorBoardImageHandler ``output_transform``: generated slices side by side, per sample."""
    if isinstance(output, Mapping):
        return [_strip(p) for p in output["pred"]]
    return [_strip(o["pred"]) for o in output]



class ReseedSampler:
    """Evaluator handler: reseed a random sampler at every run, so validation sees the same runs each epoch.

    (``CacheDataset`` re-applies random transforms on every pass; MONAI has no handler for this.)
    """

    def __init__(self, sampler: Any, seed: int = 0) -> None:
        self.sampler, self.seed = sampler, int(seed)

    def attach(self, engine: Any) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.STARTED, lambda _: self.sampler.set_random_state(self.seed))
