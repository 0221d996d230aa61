"""The prepared dataset's datalist: MONAI's decathlon format with the project's extra keys.

``DST/datalist.json`` holds ``training``, ``validation`` and ``test`` lists; each entry has
``image`` (path relative to DST), ``subject``, ``session``, ``num_slices``, ``source`` (the raw
file it came from), ``spacing`` (mm) and ``positions`` (anatomical ``p`` of every axial index,
see :mod:`monai_mrngan.data.positions`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from monai.data import load_decathlon_datalist

SPLITS = ("training", "validation", "test")
DATALIST_NAME = "datalist.json"


def datalist_path(dataset_dir: str | os.PathLike) -> Path:
    """Where a prepared dataset keeps its datalist."""
    return Path(dataset_dir) / DATALIST_NAME


def load_split(dataset_dir: str | os.PathLike, split: str = "training", limit: int | None = None) -> list[dict]:
    """Entries of one split with absolute ``image`` paths; ``limit`` keeps the first N.

    Raises ``FileNotFoundError`` with a clear message when the folder holds no prepared dataset.
    """
    path = datalist_path(dataset_dir)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no prepared dataset here; run `python -m monai_mrngan prepare` first")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    with open(path) as f:
        raw = json.load(f)
    if not raw.get(split):
        return []
    entries = load_decathlon_datalist(str(path), is_segmentation=False, data_list_key=split, base_dir=str(dataset_dir))
    return entries[:limit] if limit else entries
