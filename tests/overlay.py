"""Test helpers: does an output overlay its input in a viewer (world coordinates, not array indices)?"""

from __future__ import annotations

import nibabel as nib
import numpy as np
from scipy import ndimage


def world_samples(volume_path, world_points: np.ndarray) -> np.ndarray:
    """A NIfTI's values at world points (N, 3) (RAS mm), trilinear."""
    img = nib.load(str(volume_path))
    ijk = (np.linalg.inv(img.affine) @ np.c_[world_points, np.ones(len(world_points))].T)[:3]
    return ndimage.map_coordinates(img.get_fdata(), ijk, order=1, mode="nearest")


def overlay_correlation(volume_path, source_path, ras_index: int, head: float = 0.1) -> float:
    """Correlation over the head (above ``head`` x its maximum) between axial slice ``ras_index`` of ``source_path``
    (counted in RAS orientation) and ``volume_path`` sampled at that slice's world coordinates."""
    ras = nib.as_closest_canonical(nib.load(str(source_path)))
    data = np.asanyarray(ras.dataobj).astype(np.float32)
    plane = data[:, :, ras_index]
    ii, jj = np.meshgrid(np.arange(plane.shape[0]), np.arange(plane.shape[1]), indexing="ij")
    world = (ras.affine @ np.c_[ii.ravel(), jj.ravel(), np.full(ii.size, ras_index), np.ones(ii.size)].T)[:3].T
    sampled = world_samples(volume_path, world).reshape(plane.shape)
    mask = plane > head * data.max()
    return float(np.corrcoef(sampled[mask], plane[mask])[0, 1])
