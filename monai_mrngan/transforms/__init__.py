"""MONAI dictionary transforms of the project (slice sampling with anatomical positions)."""

from .slices import AdjacentSlicePaird, AxialSliced, SliceRund

__all__ = ["AxialSliced", "AdjacentSlicePaird", "SliceRund"]
