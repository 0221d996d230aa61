"""monai-mrngan: reconstruct a whole 3D brain MRI from one (or a few) 2D axial slices."""

__version__ = "0.1.0"
