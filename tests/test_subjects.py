"""Held-out subjects evaluated in worker processes (monai_mrngan.evaluation.subjects): same results, same order."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from monai_mrngan.evaluation.subjects import map_subjects, subject_rng, worker_count


def test_map_subjects_gives_each_items_result_in_order_from_forked_workers():
    weights = torch.arange(6.0)  # a closure over what the caller holds: the forked workers see it without pickling

    def fn(index: int, item: int) -> tuple[int, float, int, int]:
        return index, float(weights[item] * 2), os.getpid(), torch.get_num_threads()

    items = [5, 3, 0, 4, 1]
    alone = list(map_subjects(fn, items, workers=1))
    both = list(map_subjects(fn, items, workers=2))
    assert [r[:2] for r in alone] == [r[:2] for r in both] == [(i, 2.0 * v) for i, v in enumerate(items)]
    if worker_count(2, len(items)) == 2:
        assert all(r[2] != os.getpid() and r[3] == 1 for r in both)  # other processes, one thread each
    assert all(r[2] == os.getpid() for r in alone)


def test_worker_count_caps_and_stays_in_process_off_the_cpu():
    assert worker_count(8, 3) == min(3, os.cpu_count() or 1)
    assert worker_count(0, 5) == worker_count(1, 5) == 1
    assert worker_count(4, 5, device="cuda:0") == 1  # a forked child cannot use the parent's CUDA context
    with pytest.raises(ZeroDivisionError):  # a worker's error reaches the caller
        list(map_subjects(lambda i, x: 1 / x, [1, 0], workers=2))


def test_subject_rng_depends_on_the_subject_only():
    a = subject_rng(0, 3).random(4)
    assert np.array_equal(a, subject_rng(0, 3).random(4)) and not np.array_equal(a, subject_rng(0, 4).random(4))
    assert not np.array_equal(a, subject_rng(1, 3).random(4))
