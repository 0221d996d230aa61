"""Write small DICOM series from arrays for the tests (pydicom), in any acquisition orientation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

LPS = np.diag([-1.0, -1.0, 1.0])


def write_series(vol: np.ndarray, affine: np.ndarray, folder: Path, slice_axis: int = 2, series_uid: str | None = None,
                 scale: float = 1.0, thickness: float | None = None) -> list[Path]:
    """One file per slice of ``vol`` (RAS ``affine``) taken along ``slice_axis``, each ``thickness`` mm thick (default:
    the slice step); returns the files."""
    order = [a for a in range(3) if a != slice_axis] + [slice_axis]
    vol = np.transpose(np.asarray(vol), order)
    aff = np.asarray(affine, dtype=np.float64)[:3]
    cols, origin = aff[:, order], aff[:, 3]
    folder.mkdir(parents=True, exist_ok=True)
    series_uid = series_uid or generate_uid()
    study = generate_uid()
    a0, a1, a2 = (LPS @ cols[:, i] for i in range(3))
    out = []
    for k in range(vol.shape[2]):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = MRImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = MRImageStorage, meta.MediaStorageSOPInstanceUID
        ds.Modality, ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.InstanceNumber = "MR", study, series_uid, k + 1
        ds.ImageOrientationPatient = [float(v) for v in np.r_[a0 / np.linalg.norm(a0), a1 / np.linalg.norm(a1)]]
        ds.ImagePositionPatient = [float(v) for v in LPS @ (origin + k * cols[:, 2])]
        ds.PixelSpacing = [float(np.linalg.norm(a1)), float(np.linalg.norm(a0))]
        ds.SliceThickness = float(np.linalg.norm(a2)) if thickness is None else float(thickness)
        pix = np.clip(np.rint(vol[:, :, k].T * scale), 0, 65535).astype(np.uint16)
        ds.Rows, ds.Columns = pix.shape
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.PixelData = pix.tobytes()
        path = folder / f"IM{k + 1:04d}.dcm"
        ds.save_as(str(path), enforce_file_format=True)
        out.append(path)
    return out
