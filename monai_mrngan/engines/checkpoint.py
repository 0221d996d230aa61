"""Checkpoints every stage shares: resume after an interruption, and keep the best model.

MONAI's ``CheckpointSaver`` writes with ``atomic=False`` and names files by epoch; an interrupted
write could leave a corrupt file that resuming would then trip on. These two handlers write with
``torch.save`` to a temporary file and ``os.replace`` it:

- :class:`ResumeCheckpoint` (attach to the trainer): saves networks, optimizers and the trainer's
  own state to one fixed file (``last.pt``) every epoch (and every ``iteration_interval``
  iterations). The bundle configs restore that file with MONAI's ``CheckpointLoader``
  (``weights_only``; ``resume_loader``, disabled while no ``last.pt`` exists), so ``trainer.run()``
  continues where the interrupted run stopped; ``resume=True`` restores it here instead, for use
  without a config.
- :class:`BestCheckpoint` (attach to the evaluator): saves one network's bare ``state_dict`` to
  ``model.pt`` whenever the key metric improves (``ckpt_export`` / ``load_state_dict`` ready);
  put it in the resume ``save_dict`` too, so the best value survives a restart.

The file helpers (``atomic_torch_save``, ``load_state``, ``load_weights``) live in
:mod:`monai_mrngan.data.io` and are re-exported here.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Mapping

import torch
from ignite.engine import Engine, Events
from ignite.handlers import Checkpoint

from ..data.io import atomic_torch_save, load_state, load_weights

logger = logging.getLogger(__name__)

__all__ = ["ResumeCheckpoint", "BestCheckpoint", "atomic_torch_save", "load_state", "load_weights"]

_WRAPPERS = (torch.nn.DataParallel, torch.nn.parallel.DistributedDataParallel)


class ResumeCheckpoint:
    """Save everything needed to resume to ``path``; restore it when a run starts.

    Args:
        path: the checkpoint file (e.g. ``models/last.pt``).
        save_dict: objects with ``state_dict`` / ``load_state_dict``; include the trainer under
            ``"trainer"`` so epoch and iteration counters resume too.
        iteration_interval: also save every N iterations (0: only at epoch ends).
        resume: restore from ``path`` when it exists.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        save_dict: Mapping[str, Any],
        iteration_interval: int = 0,
        resume: bool = True,
    ) -> None:
        self.path = Path(path)
        self.save_dict = dict(save_dict)
        self.iteration_interval = int(iteration_interval)
        self.resume = resume

    def attach(self, engine: Engine) -> "ResumeCheckpoint":
        if self.resume:
            engine.add_event_handler(Events.STARTED, self.load)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.save)
        if self.iteration_interval > 0:
            engine.add_event_handler(Events.ITERATION_COMPLETED(every=self.iteration_interval), self.save)
        return self

    def load(self, engine: Engine) -> None:
        if not self.path.is_file():
            return
        state = load_state(self.path)
        max_epochs = engine.state.max_epochs
        Checkpoint.load_objects(to_load=self.save_dict, checkpoint=state)
        if max_epochs is not None and engine.state.epoch > max_epochs:
            raise ValueError(
                f"{self.path}: checkpoint is at epoch {engine.state.epoch}, beyond max_epochs {max_epochs}; "
                "raise max_epochs to train on"
            )
        engine.state.max_epochs = max_epochs
        logger.info("resumed from %s at epoch %d, iteration %d", self.path, engine.state.epoch, engine.state.iteration)

    def save(self, engine: Engine) -> None:
        # DDP / DataParallel wrappers are unwrapped (no "module." prefix): ignite's load_objects loads
        # into ``.module``, and the file stays interchangeable between single- and multi-GPU runs
        state = {k: (v.module if isinstance(v, _WRAPPERS) else v).state_dict() for k, v in self.save_dict.items()}
        atomic_torch_save(state, self.path)


class BestCheckpoint:
    """Save ``network``'s ``state_dict`` to ``path`` whenever the evaluator's metric improves.

    Args:
        path: where the best weights go (e.g. ``models/model.pt``).
        network: the module to save (a DDP wrapper is unwrapped).
        metric_name: a key of ``engine.state.metrics``; default the evaluator's key metric.
        mode: ``"max"`` or ``"min"``.
    """

    def __init__(self, path: str | os.PathLike, network: torch.nn.Module, metric_name: str | None = None, mode: str = "max"):
        if mode not in ("max", "min"):
            raise ValueError(f"mode must be 'max' or 'min', got {mode!r}")
        self.path = Path(path)
        self.network = network
        self.metric_name = metric_name
        self.mode = mode
        self.best: float | None = None

    def state_dict(self) -> dict[str, float | None]:
        """The best value so far, so a :class:`ResumeCheckpoint` can carry it across a restart."""
        return {"best": self.best}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.best = None if state.get("best") is None else float(state["best"])

    def attach(self, engine: Engine) -> "BestCheckpoint":
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)
        return self

    def __call__(self, engine: Engine) -> None:
        name = self.metric_name or getattr(engine.state, "key_metric_name", None)
        if name is None or name not in engine.state.metrics:
            raise KeyError(f"metric {name!r} not computed by the evaluator; have {sorted(engine.state.metrics)}")
        value = float(engine.state.metrics[name])
        better = self.best is None or (value > self.best if self.mode == "max" else value < self.best)
        if better:
            self.best = value
            net = getattr(self.network, "module", self.network)
            atomic_torch_save(net.state_dict(), self.path)
            logger.info("new best %s = %.6g, saved %s", name, value, self.path)
