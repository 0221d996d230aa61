"""Shared fixtures: tiny prepared datasets and the optional real IXI folder."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
IXI_ENV = "MRNGAN_IXI_DIR"


def ixi_folder() -> Path | None:
    """The real IXI T1 folder: $MRNGAN_IXI_DIR, else ../shared/data/ixi_t1_2mm beside the repo."""
    env = os.environ.get(IXI_ENV)
    path = Path(env) if env else REPO.parent / "shared" / "data" / "ixi_t1_2mm"
    return path if path.is_dir() and any(path.glob("*.nii*")) else None


@pytest.fixture(scope="session")
def ixi_dir() -> Path:
    path = ixi_folder()
    if path is None:
        pytest.skip(f"IXI data not found: set {IXI_ENV} or place it at ../shared/data/ixi_t1_2mm")
    return path


def _ellipsoid_volume(rng: np.random.Generator, size: int, depth: int) -> np.ndarray:
    """A crude head: ellipsoid shell with a bright core and a dark ventricle, varying per subject."""
    x, y, z = np.meshgrid(
        np.linspace(-1, 1, size), np.linspace(-1, 1, size), np.linspace(-1, 1, depth), indexing="ij"
    )
    a, b = rng.uniform(0.7, 0.9, 2)
    c = rng.uniform(0.9, 1.1)
    r = np.sqrt((x / a) ** 2 + (y / b) ** 2 + ((z + 0.2) / c) ** 2)
    vol = np.where(r < 1.0, 0.4, 0.0) + np.where(r < 0.85, 0.4, 0.0)
    vol -= np.where(np.sqrt((x / 0.2) ** 2 + (y / 0.35) ** 2 + (z / 0.3) ** 2) < 1.0, 0.6, 0.0)
    vol += 0.1 * np.sin(6 * x + rng.uniform(0, 6)) * (r < 0.85)
    return np.clip(vol, 0, 1).astype(np.float32)


def write_tiny_dataset(dst: Path, subjects: int = 8, size: int = 32, depth: int = 24, seed: int = 0) -> Path:
    """A small prepared dataset (volumes + datalist.json) in the project's format, made directly."""
    from monai_mrngan.data.io import save_json, save_nifti
    from monai_mrngan.data.positions import slice_positions

    rng = np.random.default_rng(seed)
    spacing = 200.0 / depth
    entries = []
    for i in range(subjects):
        name = f"sub-{i + 1:03d}"
        vol = _ellipsoid_volume(rng, size, depth)
        affine = np.diag([spacing, spacing, spacing, 1.0])
        save_nifti(vol, affine, dst / "volumes" / f"{name}.nii.gz")
        entries.append(
            {
                "image": f"volumes/{name}.nii.gz",
                "subject": name,
                "session": None,
                "num_slices": depth,
                "source": f"synthetic/{name}",
                "spacing": [spacing] * 3,
                "positions": [round(float(p), 6) for p in slice_positions(depth, depth - 1, spacing)],
            }
        )
    n_val = max(1, subjects // 8)
    datalist = {
        "training": entries[: subjects - 2 * n_val],
        "validation": entries[subjects - 2 * n_val : subjects - n_val],
        "test": entries[subjects - n_val :],
    }
    save_json(datalist, dst / "datalist.json")
    return dst


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory) -> Path:
    """A prepared dataset of 8 subjects, 32 x 32 px, 24 axial slices (6 train / 1 val / 1 test)."""
    return write_tiny_dataset(tmp_path_factory.mktemp("tiny_dataset"))


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: one torch thread is far faster than two on a shared, busy 2-core CPU."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
