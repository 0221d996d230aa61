"""Ignite handlers that write what a stage produces: positions CSVs, general brains, figures.

- :class:`PositionCSVWriter`: the localizer's ``p`` per slice -> CSV (slice localization ``inference.json``);
- :class:`GeneralBrainWriter`: a generator's slice per position -> a general brain NIfTI over ``p``
  (brain generalization ``inference.json``);
- :class:`PositionFigureHandler`: slices titled "true p / predicted p" -> TensorBoard.

Checkpoint handlers live in :mod:`monai_mrngan.engines.checkpoint`.
"""

from __future__ import annotations

import csv
import logging
import os
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from ignite.engine import Engine, Events

from ..atlas.bank import save_prior_volume
from ..data.io import atomic_path, atomic_torch_save, pyplot
from ..data.positions import HEAD_HEIGHT_MM, position_bins
from ..networks.gan import export_generator

logger = logging.getLogger(__name__)

CSV_COLUMNS = ("source", "slice_index", "p", "depth_mm", "bin", "reference_p")

__all__ = ["CSV_COLUMNS", "position_rows", "write_positions_csv", "PositionCSVWriter", "GeneralBrainWriter", "PositionFigureHandler"]


def position_rows(sources: Sequence[str], indices: Sequence[int], p: Sequence[float], ref: Sequence[float]) -> list[list]:
    bins = position_bins(np.asarray(p, dtype=np.float64))
    return [
        [s, int(i), f"{v:.6f}", f"{v * HEAD_HEIGHT_MM:.1f}", int(b), "" if not np.isfinite(r) else f"{r:.6f}"]
        for s, i, v, b, r in zip(sources, indices, p, bins, ref)
    ]


def write_positions_csv(rows: Sequence[Sequence[Any]], path: str | os.PathLike) -> Path:
    """Write the positions CSV (:data:`CSV_COLUMNS`) atomically."""
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(CSV_COLUMNS)
        w.writerows(rows)
    return Path(path)


class PositionCSVWriter:
    """Evaluator handler: collect each slice's predicted ``p`` and write them to ``output_file`` at the end.

    ``p`` is clamped to [0, 1]; ``depth_mm`` = ``p`` x 200 mm below the vertex; ``bin`` = five-class bin.
    """

    def __init__(self, output_file: str | os.PathLike, output_transform: Callable | None = None) -> None:
        self.output_file = Path(output_file)
        self.output_transform = output_transform
        self.rows: list[list] = []

    def attach(self, engine: Engine) -> "PositionCSVWriter":
        engine.add_event_handler(Events.EPOCH_STARTED, lambda e: self.rows.clear())
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._collect)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._write)
        return self

    def _collect(self, engine: Engine) -> None:
        output, batch = engine.state.output, engine.state.batch
        if self.output_transform is not None:
            preds = self.output_transform(output)
        else:
            preds = [o["pred"] for o in output] if isinstance(output, list) else list(output["pred"])
        p = [float(torch.as_tensor(v).reshape(-1)[0].clamp(0, 1)) for v in preds]
        if isinstance(batch, list):
            src = [b["source"] for b in batch]
            idx = [int(torch.as_tensor(b["slice_index"]).reshape(-1)[0]) for b in batch]
            ref = [float(torch.as_tensor(b.get("reference_p", float("nan"))).reshape(-1)[0]) for b in batch]
        else:
            src, idx = list(batch["source"]), torch.as_tensor(batch["slice_index"]).reshape(-1).tolist()
            ref = torch.as_tensor(batch.get("reference_p", [float("nan")] * len(p))).reshape(-1).tolist()
        self.rows += position_rows(src, idx, p, ref)

    def _write(self, engine: Engine) -> None:
        write_positions_csv(self.rows, self.output_file)
        logger.info("wrote %d slice positions to %s", len(self.rows), self.output_file)



class GeneralBrainWriter:
    """Evaluator handler: collect the general brain slice per position and write it when the run completes.

    Writes ``output_file`` (NIfTI over ``p`` + ``.positions.json``, readable by :func:`load_prior`) and,
    with ``generator`` and ``generator_file``, the self-describing generator checkpoint.
    """

    def __init__(self, output_file: str, generator: torch.nn.Module | None = None, generator_file: str | None = None, spacing_mm: float = 2.0):
        self.output_file, self.generator, self.generator_file, self.spacing_mm = output_file, generator, generator_file, spacing_mm
        self._slices: list[torch.Tensor] = []
        self._pos: list[torch.Tensor] = []

    def attach(self, engine: Engine) -> "GeneralBrainWriter":
        engine.add_event_handler(Events.STARTED, lambda e: (self._slices.clear(), self._pos.clear()))
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._collect)
        engine.add_event_handler(Events.COMPLETED, self._write)
        return self

    def _collect(self, engine: Engine) -> None:
        out = engine.state.output
        items = out if isinstance(out, list) else [out]
        for o in items:
            pred, pos = torch.as_tensor(o["pred"]).detach().cpu(), torch.as_tensor(o["image"]).detach().cpu()
            self._slices.append(pred.reshape(-1, *pred.shape[-2:]))
            self._pos.append(pos.reshape(-1))

    def _write(self, engine: Engine) -> None:
        pos = torch.cat(self._pos).double()
        order = torch.argsort(pos, descending=True)
        vol = torch.cat(self._slices)[order].float().numpy()
        save_prior_volume(vol, pos[order].numpy(), self.output_file, self.spacing_mm)
        logger.info("general brain over %d positions written to %s", len(pos), self.output_file)
        if self.generator is not None and self.generator_file:
            atomic_torch_save(export_generator(self.generator), self.generator_file)


class PositionFigureHandler:
    """Log a grid of slices titled "true p / predicted p" to TensorBoard at each epoch end
    (MONAI's ``TensorBoardImageHandler`` cannot show the two numbers).

    Takes the first ``max_images`` slices of the last batch, spread along the batch when
    ``spread`` (validation batches are whole volumes in slice order, so this spans the head).

    Args:
        summary_writer: a ``SummaryWriter``; or ``log_dir`` to create one.
        tag: TensorBoard figure tag.
        max_images: slices in the grid.
        output_transform: engine output -> (images, preds, labels) as tensors or per-sample lists.
    """

    def __init__(
        self,
        log_dir: str | os.PathLike | None = None,
        tag: str = "positions",
        max_images: int = 8,
        output_transform: Callable | None = None,
        summary_writer: Any = None,
    ) -> None:
        if summary_writer is None:
            from torch.utils.tensorboard import SummaryWriter

            summary_writer = SummaryWriter(log_dir=None if log_dir is None else str(log_dir))
        self.writer = summary_writer
        self.tag = tag
        self.max_images = int(max_images)
        self.output_transform = output_transform or _image_pred_label

    def attach(self, engine: Engine) -> "PositionFigureHandler":
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)
        return self

    def __call__(self, engine: Engine) -> None:
        plt = pyplot()
        images, preds, labels = self.output_transform(engine.state.output)
        n = len(preds)
        if n == 0:
            return
        pick = np.unique(np.linspace(0, n - 1, min(n, self.max_images)).round().astype(int))
        fig, axes = plt.subplots(1, len(pick), figsize=(2.2 * len(pick), 2.6), squeeze=False)
        for ax, i in zip(axes[0], pick):
            img = torch.as_tensor(images[i]).detach().cpu().float().reshape(-1, *images[i].shape[-2:])[0]
            ax.imshow(np.flipud(img.numpy().T), cmap="gray", vmin=0, vmax=1)
            ax.set_title(f"true {float(labels[i]):.3f}\npred {float(preds[i]):.3f}", fontsize=8)
            ax.axis("off")
        fig.tight_layout()
        # a MONAI evaluator run by ValidationHandler carries the trainer's epoch
        self.writer.add_figure(self.tag, fig, global_step=engine.state.epoch)
        self.writer.flush()
        plt.close(fig)


def _image_pred_label(output: Any) -> tuple[list, list, list]:
    if isinstance(output, list):
        return [o["image"] for o in output], [o["pred"] for o in output], [o["label"] for o in output]
    return list(output["image"]), list(output["pred"]), list(output["label"])
