"""The one normaliser of 2D slice batches: every stage talks in (B, 1, H, W) float32 tensors."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

__all__ = ["as_slice_batch"]


def as_slice_batch(slices: Any) -> torch.Tensor:
    """(H, W), (B, H, W), (B, 1, H, W) or a list of (H, W) arrays -> a (B, 1, H, W) float32 tensor.

    Raises ``ValueError`` for any other shape.
    """
    if isinstance(slices, (list, tuple)):
        slices = torch.stack([torch.as_tensor(np.asarray(s), dtype=torch.float32).reshape(np.asarray(s).shape[-2:]) for s in slices])
    t = torch.as_tensor(slices, dtype=torch.float32)
    if t.ndim == 2:
        t = t[None, None]
    elif t.ndim == 3:
        t = t[:, None]
    if t.ndim != 4 or t.shape[1] != 1:
        raise ValueError(f"expected slices shaped (H, W), (B, H, W) or (B, 1, H, W), got {tuple(t.shape)}")
    return t
