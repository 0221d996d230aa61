"""Slice-localization metrics and the evaluation report.

- :func:`localization_metrics`: MSE of ``p``, mean absolute error in ``p``, mm and slices, and the
  paper's five-class setting (``p`` binned by :func:`monai_mrngan.data.positions.position_bins`;
  a prediction is correct when it falls in the true bin): accuracy and macro precision, recall, F1.
- :class:`LocalizationMetric`: one of those numbers as an Ignite ``EpochMetric`` (key metric of a
  ``SupervisedEvaluator``; gathers across DDP ranks).
- :class:`LocalizationReport`: evaluator handler writing ``metrics.json``, ``metrics.md`` (a table
  laid out like the paper's Table 1, model beside the training-mean baseline) and ``predictions.csv``.

The TensorBoard figure of true / predicted ``p`` is :class:`monai_mrngan.engines.handlers.PositionFigureHandler`.

MAE in mm is exact for any spacing: ``p`` is depth below the vertex / ``HEAD_HEIGHT_MM``.
"""

from __future__ import annotations

import csv
import logging
import os
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from ignite.engine import Engine, Events
from ignite.metrics import EpochMetric

from ..data.io import atomic_path, save_json
from ..data.positions import HEAD_HEIGHT_MM, NUM_POSITION_BINS, position_bins

logger = logging.getLogger(__name__)

METRIC_ROWS = (
    ("mse", "MSE"),
    ("accuracy", "Accuracy"),
    ("precision", "Precision"),
    ("recall", "Recall"),
    ("f1", "F1 Score"),
    ("mae_slices", "MAE (slices)"),
    ("mae_mm", "MAE (mm)"),
)
"""Row order of the report table: the paper's Table 1 rows, then the MAEs."""


def _flat(x: Any) -> np.ndarray:
    if isinstance(x, (list, tuple)):
        x = [torch.as_tensor(v).detach().reshape(-1) for v in x]
        x = torch.cat(x) if x else torch.zeros(0)
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().double().numpy()
    return np.asarray(x, dtype=np.float64).reshape(-1)


def classification_scores(pred_bins: np.ndarray, true_bins: np.ndarray, num_bins: int = NUM_POSITION_BINS) -> dict[str, float]:
    """Accuracy and macro precision / recall / F1 over the classes present in ``true_bins``.

    A class never predicted has precision 0 (and F1 0), as with scikit-learn's ``zero_division=0``.
    """
    pred_bins, true_bins = np.asarray(pred_bins), np.asarray(true_bins)
    conf = np.zeros((num_bins, num_bins), dtype=np.int64)
    np.add.at(conf, (true_bins, pred_bins), 1)
    tp = np.diag(conf).astype(np.float64)
    support, predicted = conf.sum(1), conf.sum(0)
    present = support > 0
    precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    recall = np.divide(tp, support, out=np.zeros_like(tp), where=support > 0)
    f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros_like(tp), where=(precision + recall) > 0)
    return {
        "accuracy": float(tp.sum() / max(conf.sum(), 1)),
        "precision": float(precision[present].mean()) if present.any() else float("nan"),
        "recall": float(recall[present].mean()) if present.any() else float("nan"),
        "f1": float(f1[present].mean()) if present.any() else float("nan"),
        "confusion": conf.tolist(),
    }


def localization_metrics(
    pred: Any, target: Any, slice_mm: float = 2.0, num_bins: int = NUM_POSITION_BINS
) -> dict[str, Any]:
    """All localization metrics for predicted vs true positions ``p`` (any shapes, flattened).

    Returns ``mse`` (of p), ``mae_p``, ``mae_mm``, ``mae_slices`` (``slice_mm`` apart),
    ``accuracy``, ``precision``, ``recall``, ``f1`` (five-class, macro), ``confusion`` and ``n``.
    """
    p, t = _flat(pred), _flat(target)
    if p.shape != t.shape:
        raise ValueError(f"{p.size} predictions but {t.size} targets")
    if p.size == 0:
        raise ValueError("no predictions to score")
    err = p - t
    mae_p = float(np.abs(err).mean())
    out: dict[str, Any] = {
        "n": int(p.size),
        "mse": float((err**2).mean()),
        "mae_p": mae_p,
        "mae_mm": mae_p * HEAD_HEIGHT_MM,
        "mae_slices": mae_p * HEAD_HEIGHT_MM / float(slice_mm),
    }
    out.update(classification_scores(position_bins(p, num_bins), position_bins(t, num_bins), num_bins))
    return out


def mean_position(entries: Sequence[Mapping[str, Any]], positions_key: str = "positions") -> float:
    """Mean ``p`` over every slice of the given datalist entries (the trivial baseline's guess)."""
    values = [np.asarray(e[positions_key], dtype=np.float64) for e in entries]
    if not values:
        raise ValueError("no datalist entries to average positions over")
    return float(np.concatenate(values).mean())


def axial_spacing_mm(entries: Sequence[Mapping[str, Any]], default: float = 2.0) -> float:
    """Median axial slice spacing (mm) of datalist entries (``spacing[2]``), ``default`` if unknown."""
    values = [float(e["spacing"][2]) for e in entries if e.get("spacing")]
    return float(np.median(values)) if values else float(default)


def _stack_pair(output: Any) -> tuple[torch.Tensor, torch.Tensor]:
    y_pred, y = output
    as_t = lambda v: torch.stack([torch.as_tensor(i).reshape(-1) for i in v]) if isinstance(v, (list, tuple)) else v
    return as_t(y_pred).reshape(-1).float(), as_t(y).reshape(-1).float()


class LocalizationMetric(EpochMetric):
    """One of :func:`localization_metrics`'s numbers over a whole epoch, as an Ignite metric.

    ``output_transform`` must give ``(pred, label)``: tensors or lists of per-sample tensors
    (``monai.handlers.from_engine(['pred', 'label'])`` on a decollating evaluator).
    """

    def __init__(
        self,
        name: str = "mae_mm",
        slice_mm: float = 2.0,
        output_transform: Callable = lambda x: x,
        device: str | torch.device = "cpu",
    ) -> None:
        keys = {k for k, _ in METRIC_ROWS} | {"mae_p"}
        if name not in keys:
            raise ValueError(f"unknown localization metric {name!r}; expected one of {sorted(keys)}")
        self.metric = name
        self.slice_mm = float(slice_mm)
        super().__init__(self._compute, output_transform=output_transform, check_compute_fn=False, device=device)

    def _compute(self, y_pred: torch.Tensor, y: torch.Tensor) -> float:
        return float(localization_metrics(y_pred, y, self.slice_mm)[self.metric])

    def update(self, output: Any) -> None:
        super().update(_stack_pair(output))


class LocalizationReport:
    """Evaluator handler: score the model and the training-mean baseline, write the results.

    Writes to ``output_dir``: ``metrics.json`` ({"model": {...}, "baseline": {...}, ...}),
    ``metrics.md`` (Table 1 layout) and ``predictions.csv`` (subject, slice_index, true_p, pred_p).

    Args:
        output_dir: folder for the files.
        baseline_position: the training set's mean ``p`` (see :func:`mean_position`).
        slice_mm: axial slice spacing for the MAE in slices.
        model_name: column title of the model.
        split: name of the evaluated split, recorded in the outputs.
    """

    def __init__(
        self,
        output_dir: str | os.PathLike,
        baseline_position: float,
        slice_mm: float = 2.0,
        model_name: str = "model",
        split: str = "test",
        output_transform: Callable = lambda x: x,
    ) -> None:
        self.output_dir = Path(output_dir)
        self.baseline_position = float(baseline_position)
        self.slice_mm = float(slice_mm)
        self.model_name = model_name
        self.split = split
        self.output_transform = output_transform
        self.results: dict[str, Any] = {}
        self._reset(None)

    def attach(self, engine: Engine) -> "LocalizationReport":
        engine.add_event_handler(Events.EPOCH_STARTED, self._reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._collect)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._write)
        return self

    def _reset(self, engine: Engine | None) -> None:
        self.pred: list[float] = []
        self.true: list[float] = []
        self.rows: list[tuple[str, int]] = []

    def _collect(self, engine: Engine) -> None:
        pred, true = _stack_pair(self.output_transform(engine.state.output))
        self.pred += pred.tolist()
        self.true += true.tolist()
        batch = engine.state.batch
        items = batch if isinstance(batch, list) else [batch]
        ids = []
        for item in items:
            subj, idx = item.get("subject", ""), item.get("slice_index", -1)
            if isinstance(subj, (list, tuple)):
                ids += list(zip(subj, torch.as_tensor(idx).reshape(-1).tolist()))
            else:
                ids.append((str(subj), int(torch.as_tensor(idx).reshape(-1)[0])))
        self.rows += ids if len(ids) == len(pred) else [("", -1)] * len(pred)

    def _write(self, engine: Engine) -> None:
        model = localization_metrics(self.pred, self.true, self.slice_mm)
        baseline = localization_metrics(np.full(len(self.true), self.baseline_position), self.true, self.slice_mm)
        self.results = {
            "split": self.split,
            "n_slices": len(self.true),
            "n_subjects": len({s for s, _ in self.rows if s}),
            "slice_mm": self.slice_mm,
            "baseline_position": self.baseline_position,
            "model_name": self.model_name,
            "model": model,
            "baseline": baseline,
        }
        save_json(self.results, self.output_dir / "metrics.json")
        title = f"Slice localization on the {self.split} split ({len(self.true)} slices)"
        table = format_table({self.model_name: model, "train-mean baseline": baseline})
        with atomic_path(self.output_dir / "metrics.md") as tmp:
            tmp.write_text(f"# {title}\n\n{table}\n")
        with atomic_path(self.output_dir / "predictions.csv") as tmp, open(tmp, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["subject", "slice_index", "true_p", "pred_p"])
            for (s, i), t, p in zip(self.rows, self.true, self.pred):
                w.writerow([s, i, f"{t:.6f}", f"{p:.6f}"])
        logger.info("%s\n%s\nwrote %s", title, table, self.output_dir / "metrics.json")


def format_table(columns: Mapping[str, Mapping[str, Any]], extra_rows: Mapping[str, Mapping[str, str]] | None = None) -> str:
    """Markdown table: one column per method, rows as in the paper's Table 1 plus MAEs (and extras)."""
    names = list(columns)
    lines = ["| | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for key, label in METRIC_ROWS:
        cells = []
        for n in names:
            v = columns[n].get(key)
            cells.append("" if v is None else (f"{v:.4f}" if key in ("mse", "accuracy", "precision", "recall", "f1") else f"{v:.2f}"))
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    for label, cells in (extra_rows or {}).items():
        lines.append(f"| {label} | " + " | ".join(cells.get(n, "") for n in names) + " |")
    return "\n".join(lines)
