"""Skull-stripped scans: told apart from whole heads, skipped by prepare, refused by reconstruct unless forced."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from monai_mrngan.data.grid import scale_intensity
from monai_mrngan.data.head_layers import FLAT, STRIPPED_SCORE, outer_layer_score, stripped_score
from monai_mrngan.data.io import InputError, save_nifti
from monai_mrngan.data.prepare import SkipScan, prepare_volume
from monai_mrngan.inference.components import Components
from monai_mrngan.inference.reconstruct import reconstruct_files

SPACING = 2.0
LAYERS = ((5.0, 0.8), (11.0, 0.05), (13.0, 0.2), (16.0, 0.5))  # scalp fat, skull, CSF, cortex (mm from the edge, value); then white matter


def _layered_head(stripped: bool = False, shape=(96, 96, 60), seed: int = 0) -> np.ndarray:
    """The top of a T1 head as nested layers: an ellipsoid whose axial sections are wrapped, from the outside in,
    in scalp fat, skull, CSF and cortex around white matter, with noise; ``stripped``: only the brain and its
    CSF (what a brain extraction leaves)."""
    x, y, z = np.meshgrid(*(np.arange(n) * SPACING for n in shape), indexing="ij")
    cx, cy = shape[0] * SPACING / 2, shape[1] * SPACING / 2
    top = shape[2] * SPACING - 10.0  # the vertex, 10 mm under the top of the field of view
    r = np.sqrt(np.clip(1.0 - ((z - (top - 90.0)) / 90.0) ** 2, 0.0, None))  # sections shrink to nothing at the vertex
    a, b = 70.0 * r + 1e-6, 88.0 * r + 1e-6
    depth = (1.0 - np.sqrt(((x - cx) / a) ** 2 + ((y - cy) / b) ** 2)) * np.minimum(a, b)  # mm inside the edge
    vol = np.where(depth > 0, 0.7, 0.0)
    for edge, value in reversed(LAYERS):
        vol = np.where((depth > 0) & (depth <= edge), value, vol)
    if stripped:
        vol = np.where(depth > LAYERS[1][0], vol, 0.0)
    return (vol + 0.02 * np.random.default_rng(seed).standard_normal(shape) * (vol > 0)).astype(np.float32)


def _strip(vol: np.ndarray) -> np.ndarray:
    """A crude brain extraction of a real T1 scan, slice by slice: bright tissue cut loose from the scalp by
    erosion, the largest piece kept and grown back."""
    top = float(np.percentile(vol, 99.5))
    out = np.zeros_like(vol)
    for k in range(vol.shape[2]):
        s = vol[:, :, k]
        core = ndimage.binary_erosion(s > 0.35 * top, iterations=3)
        labels, n = ndimage.label(core)
        if n == 0:
            continue
        brain = labels == 1 + int(np.argmax(ndimage.sum(core, labels, range(1, n + 1))))
        out[:, :, k] = s * ndimage.binary_fill_holes(ndimage.binary_dilation(brain, iterations=3) & (s > 0.15 * top))
    return out


@pytest.fixture(scope="module")
def heads(tmp_path_factory):
    """The layered head, whole and stripped, written as NIfTI files (RAS, 2 mm)."""
    folder = tmp_path_factory.mktemp("heads")
    affine = np.diag([SPACING, SPACING, SPACING, 1.0])
    paths = {}
    for name in ("whole", "stripped"):
        paths[name] = folder / f"{name}.nii.gz"
        save_nifti(_layered_head(name == "stripped"), affine, paths[name])
    return paths


def _slices(vol: np.ndarray) -> np.ndarray:
    return np.moveaxis(scale_intensity(vol)[0], 2, 0)


def test_a_whole_head_shows_its_layers_and_a_stripped_one_does_not():
    whole, stripped = _slices(_layered_head()), _slices(_layered_head(stripped=True))
    assert stripped_score(whole, SPACING) == 0.0
    assert stripped_score(stripped, SPACING) == 1.0
    assert outer_layer_score(whole[30], SPACING) < 0.2  # the skull under the scalp: a dark band inside the bright edge
    assert outer_layer_score(stripped[30], SPACING) >= FLAT
    assert stripped_score(whole, 8.0) is None  # too coarse a grid to show the layers: nothing judged
    assert np.isnan(outer_layer_score(np.zeros((32, 32), np.float32), SPACING))


def test_real_scans_stripped_are_told_apart(ixi_dir):
    """On real IXI scans (skipped without them): whole heads well under the threshold, the same scans stripped over it."""
    from monai_mrngan.data.inputs import read_inputs

    for path in sorted(ixi_dir.glob("*.nii*"))[:3]:
        got = read_inputs([path], 128, 2.0, stack=True)
        assert stripped_score(got.slices, 2.0) < STRIPPED_SCORE / 2, path
        ras = nib.as_closest_canonical(nib.load(str(path)))
        stripped = _strip(ras.get_fdata(dtype=np.float32))
        assert stripped_score(np.moveaxis(scale_intensity(stripped)[0], 2, 0), 2.0) >= STRIPPED_SCORE, path


def test_prepare_skips_a_stripped_scan(heads):
    paths = heads
    assert prepare_volume(paths["whole"], spacing=2.0, size=96).steps["stripped_score"] < STRIPPED_SCORE
    with pytest.raises(SkipScan, match="skull-stripped"):
        prepare_volume(paths["stripped"], spacing=2.0, size=96)


def test_reconstruct_refuses_a_stripped_volume_unless_forced(heads, tmp_path):
    paths = heads
    kw = dict(method="linear", expected_shape=(96, 96), spacing_mm=SPACING, stack=True, positions=[0.3])
    with pytest.raises(InputError, match="skull-stripped.*--force"):
        reconstruct_files([str(paths["stripped"])], str(tmp_path / "s.nii.gz"), Components(), **kw)
    with pytest.raises(InputError, match="skull-stripped"):  # one slice of it: judged by the whole volume
        reconstruct_files([str(paths["stripped"])], str(tmp_path / "s1.nii.gz"), Components(), method="copy",
                          expected_shape=(96, 96), spacing_mm=SPACING, slice_index=30, positions=[0.2])
    res = reconstruct_files([str(paths["stripped"])], str(tmp_path / "s.nii.gz"), Components(), force=True, **kw)
    assert res["input_check"][0]["stripped_score"] >= STRIPPED_SCORE  # forced: the score is on record
    res = reconstruct_files([str(paths["whole"])], str(tmp_path / "w.nii.gz"), Components(), **kw)
    meta = json.loads((tmp_path / "w_positions.json").read_text())
    assert meta["input_check"][0]["stripped_score"] < STRIPPED_SCORE


def test_complete_skips_a_stripped_volume(heads, tmp_path):
    """complete would draw scalp into a stripped volume's missing slices: refused, naming the file."""
    from monai_mrngan.apps.complete import complete_file

    ref = {"shape": (96, 96), "spacing_mm": SPACING, "positions": list(np.linspace(0.5, 0.0, 60)), "affine": np.diag([SPACING] * 3 + [1.0])}
    for name in ("whole", "stripped"):
        vol = _layered_head(name == "stripped")
        vol[:, :, 20:23] = 0.0  # three missing slices
        save_nifti(vol, np.diag([SPACING] * 3 + [1.0]), tmp_path / f"{name}.nii.gz")
    assert complete_file(tmp_path / "whole.nii.gz", Components(), ref, method="linear").meta["generated_slices"] == [20, 21, 22]
    with pytest.raises(InputError, match="stripped.nii.gz: looks skull-stripped"):
        complete_file(tmp_path / "stripped.nii.gz", Components(), ref, method="linear")
