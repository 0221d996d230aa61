"""What dataset completion reads and writes, apart from generating: the missing-slice rules, the
optional sidecars, the scaling of real voxels to the models' [0, 1] and back, provenance of the
models used, and the completed image itself (see :mod:`monai_mrngan.apps.complete`)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import nibabel as nib
import numpy as np

from ..data.dicom import is_dicom
from ..data.io import InputError, check_destination, is_nifti, read_image, save_nifti, strip_image_suffix
from ..data.grid import unit_range_and_scale
from ..inference.uncertainty import MAP_STORED, slice_means

REPORT_NAME = "complete_report.json"
METHOD_STAGES = {
    "mrngan": ("mrngan", "flow_generation", "brain_generalization"),
    "pix2pix_iterative": ("flow_generation",),
    "prior": ("brain_generalization",),
    "copy": (),
    "linear": (),
    "cubic": (),
    "registration": (),
}
"""The trained stages each method reads (the localizer comes on top where it placed the slices)."""
MISSING_RULES = ("empty", "zero", "nan")
"""Named rules for a missing axial slice (a number is a rule too: every voxel equals it)."""
SPACING_TOLERANCE = 0.02
"""Relative tolerance between a volume's voxel size and the prepared spacing."""

@dataclass
class Completed:
    """One completed file: the array to write (input voxel type), its affine/header and the sidecar."""

    data: np.ndarray
    affine: np.ndarray
    meta: dict
    header: Any = None
    image_class: type = nib.Nifti1Image
    uncertainty: np.ndarray | None = None  # expected absolute error (input units, float32, 0 on real slices), like ``data``
    reconstructed: Any = None  # a scan off the grid: the reconstruction that writes itself as ``reconstruct`` writes (``.save(out)``)



def parse_missing(rule: str | float | int) -> tuple[str, float | None]:
    """``"empty" | "zero" | "nan"`` or a number -> ``(name, value)`` (value only for a number)."""
    if isinstance(rule, str) and rule.strip().lower() in MISSING_RULES:
        return rule.strip().lower(), None
    try:
        value = float(rule)
    except (TypeError, ValueError):
        raise ValueError(f"--missing must be one of {', '.join(MISSING_RULES)} or a number, got {rule!r}") from None
    if not np.isfinite(value):
        raise ValueError(f"--missing {rule!r}: use 'nan' for NaN-filled slices")
    return "value", value


def describe_missing(rule: tuple[str, float | None]) -> str:
    name, value = rule
    names = {"empty": "all 0 or NaN", "zero": "all 0", "nan": "all NaN"}
    return names[name] if name in names else f"all {value:g}"


def missing_slices(data: np.ndarray, rule: tuple[str, float | None]) -> np.ndarray:
    """(D,) bool: axial slices (last axis) whose every voxel matches the missing ``rule``."""
    flat = np.asarray(data).reshape(-1, data.shape[-1])
    name, value = rule
    nan = np.isnan(flat) if np.issubdtype(flat.dtype, np.floating) else np.zeros(flat.shape, bool)
    if name == "empty":
        hit = (flat == 0) | nan
    elif name == "zero":
        hit = flat == 0
    elif name == "nan":
        hit = nan
    else:
        hit = flat == value
    return hit.all(axis=0)


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def model_files(workdir: str | Path) -> dict[str, dict]:
    """The weight files a pipeline work folder holds, by stage (``file``, ``sha256``), for provenance.

    The same files :func:`~monai_mrngan.inference.components.components_from_bundles` loads (the fine-tuned flow
    generator ``mrngan/models/flow_finetuned.pt`` replaces the flow stage's when present).
    """
    w = Path(workdir)
    finetuned = w / "mrngan" / "models" / "flow_finetuned.pt"
    files = {
        "slice_localization": w / "slice_localization" / "models" / "model.pt",
        "flow_generation": finetuned if finetuned.is_file() else w / "flow_generation" / "models" / "model.pt",
        "brain_generalization": w / "brain_generalization" / "models" / "atlas_bank.pt",
        "mrngan": w / "mrngan" / "models" / "model.pt",
    }
    return {stage: {"file": str(p.resolve()), "sha256": sha256_of(p)} for stage, p in files.items() if p.is_file()}


def models_used(method: str, localized: bool, models: Mapping[str, dict] | None) -> dict:
    """The weight files (:func:`model_files`) a completion with ``method`` read, by stage."""
    stages = list(METHOD_STAGES.get(method, ())) + (["slice_localization"] if localized else [])
    return {s: dict((models or {}).get(s, {})) for s in stages}


def read_sidecar(path: Path) -> tuple[dict | None, Path]:
    side = path.with_name(strip_image_suffix(path.name) + ".json")
    if not side.is_file():
        return None, side
    try:
        obj = json.loads(side.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise InputError(side, f"unreadable sidecar JSON ({type(err).__name__}: {err})".splitlines()[0]) from err
    if not isinstance(obj, dict):
        raise InputError(side, "sidecar JSON must be an object such as {\"positions\": [...]}")
    kind = obj.get("kind")
    if kind is not None and kind not in ("volume", "stack"):
        raise InputError(side, f"\"kind\" must be \"volume\" or \"stack\", got {kind!r}")
    return obj, side


def slab_mm(sidecar: Mapping[str, Any] | None, side: Path) -> float | None:
    """A sidecar's ``"slab_mm"``: how thick a scan's slices are (0: thin slices with gaps between them); None when it
    does not say (their spacing is taken when wider than the grid's)."""
    value = (sidecar or {}).get("slab_mm")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value) or value < 0:
        raise InputError(side, f"\"slab_mm\" must be a number of mm >= 0 (0: thin slices), got {json.dumps(value)[:60]}")
    return float(value)


def float_list(value: Any, side: Path, key: str) -> np.ndarray:
    try:
        arr = np.asarray(value, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError):
        raise InputError(side, f"\"{key}\" must be a list of numbers, got {json.dumps(value)[:60]}") from None
    if value is None or arr.size == 0 or not np.isfinite(arr).all():
        raise InputError(side, f"\"{key}\" must be a non-empty list of finite numbers, got {json.dumps(value)[:60]}")
    return arr


def load_image(path: Path) -> tuple[np.ndarray, Any]:
    """The voxel values as nibabel loads them (a private copy) and the image (header, affine)."""
    data, _ = read_image(path, "one 3D volume or a stack of slices")
    data = np.array(data)  # never a memory map of the source
    if data.ndim < 2:
        raise InputError(path, f"{data.ndim}D image of shape {tuple(data.shape)}; expected a 3D volume or a stack of slices")
    if data.size == 0:
        raise InputError(path, "empty image (no voxels)")
    if data.dtype == bool or not np.issubdtype(data.dtype, np.number) or np.iscomplexobj(data):
        raise InputError(path, f"unsupported voxel type {data.dtype}")
    return data, nib.load(str(path))


def to_model_range(real: np.ndarray, path: Path) -> tuple[np.ndarray, float, bool]:
    """Real voxels -> [0, 1] float32 as ``prepare`` scales volumes; returns (scaled, scale, unit_range)."""
    values = real.astype(np.float32)
    scaled, scale = unit_range_and_scale(values)
    if scale <= 0:
        raise InputError(path, "no positive intensities in the real slices; nothing to scale for the models")
    return scaled, float(scale), scaled is values  # the same array back: already in [0, 1]


def from_model_range(generated: np.ndarray, scale: float, dtype: np.dtype) -> np.ndarray:
    """[0, 1] generated slices -> the input's intensity scale and voxel type."""
    values = generated.astype(np.float64) * scale
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        values = np.clip(np.rint(values), info.min, info.max)
    return values.astype(dtype)


def axial_axis(affine: np.ndarray) -> int:
    """The array axis running head-foot according to the affine (2 when it cannot tell)."""
    ornt = nib.orientations.io_orientation(np.asarray(affine, dtype=np.float64))
    return 2 if np.isnan(ornt).any() else int(np.nonzero(ornt[:, 0] == 2)[0][0])


def on_grid(shape: Sequence[int], zooms: Sequence[float], reference: Mapping[str, Any]) -> bool:
    """Whether a RAS volume of ``shape`` and voxel sizes ``zooms`` (mm) lies on the prepared grid (its in-plane size and spacing)."""
    spacing = float(reference["spacing_mm"])
    return tuple(int(n) for n in shape[:2]) == tuple(int(n) for n in reference["shape"]) and all(
        abs(z - spacing) <= SPACING_TOLERANCE * spacing for z in zooms)


def thicker_than_grid(affine: np.ndarray, reference: Mapping[str, Any]) -> bool:
    """Whether the axial slices of a volume with this affine lie further apart than the prepared grid's (a thick-slice scan)."""
    a = np.asarray(affine, dtype=np.float64)
    return float(np.linalg.norm(a[:3, axial_axis(a)])) > (1 + SPACING_TOLERANCE) * float(reference["spacing_mm"])


def check_real(real: np.ndarray, path: Path, what: str) -> None:
    finite = np.isfinite(real) if np.issubdtype(real.dtype, np.floating) else None
    if finite is not None and not finite.all():
        raise InputError(path, f"{int((~finite).sum())} NaN or infinite voxels in {what}; only whole missing slices may be NaN")


def check_inplane(shape: Sequence[int], expected: Sequence[int], path: Path) -> None:
    if tuple(int(s) for s in shape[:2]) != tuple(int(s) for s in expected):
        raise InputError(path, f"in-plane size {shape[0]}x{shape[1]} px; the models expect {expected[0]}x{expected[1]} (prepared size)")


def find_inputs(src: Path) -> tuple[list[Path], list[Path]]:
    """The inputs under SRC (NIfTI files, and DICOM series folders: a folder holding DICOM files is one input) and the
    other files, which are ignored (a NIfTI's sidecar is neither)."""
    images, others = [], []
    for p in sorted(src.rglob("*")):
        if not p.is_file() or any(part.startswith(".") for part in p.relative_to(src).parts):
            continue
        (images if is_nifti(p) else others).append(p)
    series = sorted({p.parent for p in others if is_dicom(p)})
    sidecars = {p.with_name(strip_image_suffix(p.name) + ".json") for p in images}
    return sorted(images + series), [p for p in others if p not in sidecars and p.parent not in series]


def check_folders(src: Path, dst: Path, overwrite: bool) -> None:
    if not src.is_dir():
        raise FileNotFoundError(f"{src}: no such folder")
    src_r, dst_r = src.resolve(), dst.resolve()
    if dst_r in src_r.parents:
        raise ValueError(f"{dst}: destination contains the source folder {src}; pick a folder beside it")
    if dst.exists() and not dst.is_dir():
        raise FileExistsError(f"{dst}: exists and is not a folder")
    if check_destination(src, dst, overwrite, "a completed dataset"):
        old = dst / REPORT_NAME
        if old.is_file():  # remove what the previous run wrote (and nothing else)
            try:
                listed = json.loads(old.read_text()).get("volumes", [])
            except (OSError, json.JSONDecodeError):
                listed = []
            for rec in listed:
                for name in [rec.get(key) for key in ("output", "sidecar", "uncertainty")] + list(rec.get("files", [])):
                    target = (dst / str(name or "")).resolve()
                    if name and dst_r in target.parents and target.is_file():
                        target.unlink()
            old.unlink()


def write_image(done: Completed, path: Path) -> Path:
    """Write the completed array in its own voxel type (no scale factor), atomically."""
    return save_nifti(done.data, done.affine, path, dtype=None, header=done.header, image_class=done.image_class)


def write_uncertainty(done: Completed, path: Path) -> dict:
    """Write ``<name>_uncertainty.nii.gz`` beside the completed ``path`` (same affine; stored as ``MAP_STORED``) when there is a map;
    returns the sidecar's ``uncertainty`` entry (file, units, per-slice mean over head voxels along the axial axis)."""
    if done.uncertainty is None:
        return {"uncertainty": None}
    unc_path = path.with_name(strip_image_suffix(path.name) + "_uncertainty.nii.gz")
    save_nifti(done.uncertainty, done.affine, unc_path, stored=MAP_STORED)
    axis = done.meta.get("axial_axis")
    scale = float(done.meta["intensity"]["scale"])
    unc = done.uncertainty if done.uncertainty.ndim == 3 else done.uncertainty[:, :, None]
    data = np.asarray(done.data, dtype=np.float32).reshape(unc.shape)
    axis = 2 if axis is None else int(axis)
    means = slice_means(np.moveaxis(unc, axis, -1) / scale, np.moveaxis(data, axis, -1) / scale) * scale
    return {"uncertainty": {"file": unc_path.name, "units": "expected absolute error, the input's intensity units; 0 on real slices",
                            "slice_means": [round(float(m), 6) for m in means]}}


def write_completed(done: Completed, out: Path) -> dict:
    """Write one completed file (a scan off the grid as ``reconstruct`` writes its output); return the sidecar's entries for it."""
    if done.reconstructed is None:
        write_image(done, out)
        return write_uncertainty(done, out)
    paths = {key: Path(p).name for key, p in done.reconstructed.save(str(out)).items()}
    unc = {"file": paths["uncertainty"], "units": "expected absolute error, the models' [0, 1] like the volume; 0 on real thin slices, predicted on slabs; "
           f"per-slice means in {paths['positions']}"} if "uncertainty" in paths else None
    return {"files": paths, "uncertainty": unc}
