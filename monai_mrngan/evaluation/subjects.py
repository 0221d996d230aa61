"""Held-out subjects evaluated side by side, one worker process each.

A subject's reconstructions (atlas fits, registration, the cell's unrolling) are many small tensor operations: on two
CPU cores one evaluation process kept only about 1.25 of them busy, and two single-threaded processes, each on its own
subject, finished two IXI subjects in 83 s against 126 s one after the other. Torch's thread pool cannot share that
work out (the operations are too small) and a ``DataLoader`` only loads, so the evaluation, the calibration and
``complete`` (a dataset's files) map their per-subject work over a process pool here; the calibration's signal
selection maps its fold fits (small single-threaded networks) the same way.

The workers are forked, so they start with the caller's trained components (networks, atlas bank, calibration) without
pickling or loading them again; each gets one thread (several forked OpenMP pools could oversubscribe or hang). Only
the subject's index goes out and its (small) results come back, in the subjects' order, so what the caller accumulates
does not depend on how many workers ran: per-subject randomness is seeded by the subject (:func:`subject_rng`).
"""

from __future__ import annotations

import logging
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from typing import Any, Callable, Iterator, Sequence, TypeVar

import numpy as np
import torch

logger = logging.getLogger(__name__)

__all__ = ["map_subjects", "subject_rng", "worker_count"]

T = TypeVar("T")
R = TypeVar("R")

_TASK: dict[str, Any] = {}
"""The function and items of the running :func:`map_subjects`, inherited by its forked workers."""


def worker_count(workers: int, items: int, device: str | torch.device = "cpu") -> int:
    """How many processes :func:`map_subjects` uses: ``workers`` capped by the items and the CPU cores; 1 off the CPU
    (a forked process cannot use its parent's CUDA context) or where the platform cannot fork."""
    if str(device) != "cpu" or "fork" not in multiprocessing.get_all_start_methods():
        return 1
    return max(1, min(int(workers), int(items), os.cpu_count() or 1))


def _run(index: int) -> Any:
    return _TASK["fn"](index, _TASK["items"][index])


def map_subjects(fn: Callable[[int, T], R], items: Sequence[T], workers: int = 1, device: str | torch.device = "cpu") -> Iterator[R]:
    """``fn(index, item)`` for every item, yielded in the items' order.

    With more than one worker (:func:`worker_count`) the calls run in forked processes of one thread each, which see
    everything this process holds when the call starts (``fn`` may be a closure over trained networks); results travel
    back pickled, so keep them small (metrics, sampled voxels, not volumes).
    """
    n = worker_count(workers, len(items), device)
    if n == 1:
        for i, item in enumerate(items):
            yield fn(i, item)
        return
    if _TASK:
        raise RuntimeError("map_subjects: another parallel map is running in this process")
    _TASK.update(fn=fn, items=items)
    try:
        with ProcessPoolExecutor(n, mp_context=multiprocessing.get_context("fork"), initializer=torch.set_num_threads, initargs=(1,)) as pool:
            logger.info("%d subjects in %d worker processes", len(items), n)
            yield from pool.map(_run, range(len(items)))
    finally:
        _TASK.clear()


def subject_rng(seed: int, index: int) -> np.random.Generator:
    """The random generator of one subject's sampling: the same whichever process draws it and in whatever order."""
    return np.random.default_rng([int(seed), int(index)])
