"""MONAI dictionary transforms of the project (slice sampling with anatomical positions)."""

from .shapes import as_slice_batch
from .slices import AdjacentSlicePaird, AxialSliced, GapRund, SliceRund

__all__ = ["AxialSliced", "AdjacentSlicePaird", "SliceRund", "GapRund", "as_slice_batch"]
