"""Stop a time-limited training at the end of the last epoch that fits its budget.

Ignite's ``TimeLimit`` (every stage's ``time_limit_s``) stops training at the first iteration past the limit. Every
stage validates, and keeps ``model.pt``, once per epoch, so the epoch that limit cuts short is trained and thrown
away: on 2 CPU cores the ``ixi2mm`` localizer's epochs take 7.5 minutes with their validation, and its 12-minute limit
spent the last 4.5 of them on a second epoch that never reached a validation (2026-12-07). Nothing in Ignite or MONAI
stops at an epoch boundary by a time estimate, so :class:`EpochTimeBudget` does: attached after the validation, it
ends the run when the time left is shorter than the epoch just finished took. ``TimeLimit`` stays as the hard cap (a
first epoch longer than the whole budget).

In a multi-process (DDP) run every rank must stop after the same epoch, or the others wait for it in their next
collective: the ranks agree (the stop of any rank stops all, as the overlays' ``TimeLimit`` replacement agrees on
iterations), so the handler must be attached on every rank.
"""

from __future__ import annotations

import logging
import time
from typing import Callable

import ignite.distributed as idist
from ignite.engine import Engine, Events

logger = logging.getLogger(__name__)

__all__ = ["EpochTimeBudget"]


class EpochTimeBudget:
    """End training after an epoch (and its validation) when another as long would not finish within ``limit_s``
    seconds of the run's start. Attach it to the trainer after the validation handler (handlers of one event run in
    the order they were attached); ``clock``: seconds, for tests."""

    def __init__(self, limit_s: float, clock: Callable[[], float] = time.perf_counter):
        if not limit_s or limit_s <= 0:
            raise ValueError(f"time budget must be > 0 s, got {limit_s}")
        self.limit_s, self.clock = float(limit_s), clock
        self.start = self.last = None

    def attach(self, engine: Engine) -> "EpochTimeBudget":
        engine.add_event_handler(Events.STARTED, self._started)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._epoch_completed)
        return self

    def _started(self, engine: Engine) -> None:
        self.start = self.last = self.clock()

    def _epoch_completed(self, engine: Engine) -> None:
        now = self.clock()
        took, self.last = now - self.last, now
        left = self.limit_s - (now - self.start)
        stop = left < took
        if idist.get_world_size() > 1:  # one verdict for all ranks (their epochs and validations differ in length)
            stop = idist.all_reduce(float(stop), op="MAX") > 0
        if stop:
            logger.info("epoch %d took %.0f s and %.0f s of the %.0f s budget are left: training stops here, not inside an "
                        "epoch that no validation would see", engine.state.epoch, took, max(left, 0.0), self.limit_s)
            engine.terminate()
