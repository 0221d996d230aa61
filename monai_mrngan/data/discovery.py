"""Find structural MRIs in a BIDS tree or in any folder of NIfTI files."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from .io import is_nifti, strip_image_suffix

_MODALITY_SUFFIX = re.compile(r"[_-](T1w|T1|t1w|t1|T1W|mprage|MPRAGE)$")
_SUB = re.compile(r"sub-([A-Za-z0-9]+)")
_SES = re.compile(r"ses-([A-Za-z0-9]+)")
_IXI = re.compile(r"^(IXI\d+)")


@dataclass(frozen=True)
class Scan:
    """One input scan: where it is, whose it is, and which session it belongs to."""

    path: Path
    subject: str
    session: str | None = None

    @property
    def name(self) -> str:
        """Output file stem: the input's own stem, so runs and sessions stay distinct."""
        return strip_image_suffix(self.path.name)


def is_bids(src: str | os.PathLike) -> bool:
    """A BIDS tree has ``sub-*`` folders at its top level."""
    return any(p.is_dir() and p.name.startswith("sub-") for p in Path(src).iterdir())


def subject_of(path: Path) -> tuple[str, str | None]:
    """Subject and session identifiers from a path (BIDS entities, IXI ids, else the file stem)."""
    text = str(path)
    ses = _SES.findall(text)
    session = f"ses-{ses[-1]}" if ses else None
    sub = _SUB.findall(text)
    if sub:
        return f"sub-{sub[-1]}", session
    stem = strip_image_suffix(path.name)
    ixi = _IXI.match(stem)
    if ixi:
        return ixi.group(1), session
    return _MODALITY_SUFFIX.sub("", stem), session


def find_scans(src: str | os.PathLike) -> tuple[list[Scan], list[Path]]:
    """Structural scans under ``src`` and the files that were passed over.

    BIDS: ``sub-*/[ses-*/]anat/*_T1w.nii[.gz]``. Otherwise every ``.nii`` / ``.nii.gz`` below
    ``src`` (hidden files and folders skipped). Returns ``(scans, ignored_files)``; the ignored
    list holds non-NIfTI files of a plain folder, for the report.
    """
    src = Path(src)
    if not src.is_dir():
        raise FileNotFoundError(f"{src}: source folder does not exist")
    ignored: list[Path] = []
    if is_bids(src):
        paths = sorted(
            p for pattern in ("sub-*/anat/*_T1w.nii*", "sub-*/ses-*/anat/*_T1w.nii*") for p in src.glob(pattern)
            if is_nifti(p)
        )
    else:
        paths = []
        for root, dirs, files in os.walk(src):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            for f in sorted(files):
                if f.startswith("."):
                    continue
                (paths if is_nifti(f) else ignored).append(Path(root) / f)
    scans = [Scan(p, *subject_of(p.relative_to(src))) for p in paths]
    return scans, ignored
