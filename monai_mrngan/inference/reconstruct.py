"""Reconstruct a whole volume from one 2D axial slice, or from a few.

:func:`reconstruct_volume` places the inputs on the output grid and fills it with one method's
runner (:mod:`~monai_mrngan.inference.runners`, :mod:`~monai_mrngan.inference.volume`); localized
positions are refined against the prior's atlases (:func:`refine_positions`).
:func:`reconstruct_files` is the file-level entry point of the command line (files in, NIfTI +
positions + montage out, see :mod:`~monai_mrngan.inference.output`); the trained stages come from
:mod:`~monai_mrngan.inference.components`.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Sequence
from weakref import WeakKeyDictionary

import numpy as np
import torch

from ..atlas.bank import slice_scale_profile
from ..atlas.input_check import checker_for, fitted_contrast, flip_reason
from ..atlas.prior import BrainPrior, template_localizer_for
from ..data.head_layers import FLAT, looks_stripped, outer_layer_score, stripped_reason, stripped_score
from ..data.inputs import InputSlices, read_inputs, read_slice_and_volume
from ..data.io import InputError, is_nifti
from ..data.positions import HEAD_HEIGHT_MM
from ..networks.recurrent import MRNGAN, NextFn
from ..transforms.shapes import as_slice_batch
from ..transforms.slabs import slab_consistent
from .components import Components
from .localize import localize, place_slices
from .output import Reconstructed
from .runners import check_method, is_gap_aware, make_runner, one_pass_gaps
from .stacks import check_slab_mm, slab_thickness_mm, stack_inside, stack_positions
from .uncertainty import track_spread, uncertainty_map
from .volume import Reconstruction, cubic_fill, fill_volume, registration_fill, volume_affine, volume_grid

logger = logging.getLogger(__name__)

__all__ = ["Reconstruction", "reconstruct_volume", "refine_positions", "check_inputs", "check_contrast", "check_orientation", "calibration_for",
           "to_volume_scale", "Reconstructed", "reconstruct_slices", "reconstruct_files"]


def reconstruct_volume(
    slices: torch.Tensor | np.ndarray | Sequence[np.ndarray],
    positions: Sequence[float] | torch.Tensor | None = None,
    *,
    method: str = "mrngan",
    model: MRNGAN | None = None,
    next_fn: NextFn | None = None,
    prior: Any = None,
    localizer: torch.nn.Module | None = None,
    spacing_mm: float = 2.0,
    step_p: float | None = None,
    num_slices: int | None = None,
    input_indices: Sequence[int] | None = None,
    fit_prior: bool = True,
    extent: tuple[float, float] = (0.0, 1.0),
    reference_positions: Sequence[float] | None = None,
    refine_window: float = 0.12,
    device: str | torch.device = "cpu",
    calibration: Any = None,
    slab_mm: float = 0.0,
) -> Reconstruction:
    """One (or a few) [0,1] axial slices -> a whole volume.

    Args:
        slices: (H,W), (K,H,W) or (K,1,H,W) slices at the prepared in-plane size.
        positions: ``p`` of each slice; localized with ``localizer`` when None.
        method: one of :data:`METHODS`; the components it needs must be given.
        spacing_mm: axial spacing of the prepared data (sets ``step_p = -spacing / 200 mm``).
        num_slices, input_indices: place the inputs on a known grid (evaluation on a true volume);
            default: a grid from ``p = 0`` to ``p = 1`` anchored on the first input.
        fit_prior: fit the prior to the input slice (the nearest input, for each run).
        extent: the range of ``p`` to fill when no grid is given.
        reference_positions: a prepared volume's ``p`` per index: the output takes that grid.
        refine_window: localized positions (not given ones) are refined by matching the input
            against the prior's atlases within this window in ``p`` (:func:`refine_positions`; 0: off).
        calibration: an uncertainty :class:`~monai_mrngan.inference.calibration.Calibration` (MRNGAN only):
            ``extra["uncertainty"]`` is then the expected absolute error map (H, W, D), 0 on the inputs.
        slab_mm: the inputs are slabs this thick (a thick-slice scan; thicker than the grid's step to matter): the
            filled volume is made to agree with them (:func:`~monai_mrngan.transforms.slabs.slab_consistent`), every
            method alike; ``extra["slab_mm"]`` records it and ``extra["slab_fill"]`` keeps the fill before that step (the
            uncertainty map's signals are computed on it, with how much the step changed each voxel).
    """
    device = torch.device(device)
    x = as_slice_batch(slices)
    if not torch.isfinite(x).all():
        raise ValueError("input slices contain NaN or infinite values")
    if positions is None:
        positions = localized_positions(x, localizer, prior, refine_window, device)
    pos = torch.as_tensor(positions, dtype=torch.float32).reshape(-1).cpu()
    if pos.numel() != x.shape[0]:
        raise ValueError(f"{x.shape[0]} slices but {pos.numel()} positions")
    step_p = float(step_p) if step_p is not None else -float(spacing_mm) / HEAD_HEIGHT_MM
    if input_indices is not None:
        idx = [int(i) for i in input_indices]
        if num_slices is None:
            raise ValueError("input_indices needs num_slices")
        grid = pos[0].item() + (np.arange(num_slices) - idx[0]) * step_p
    else:
        grid, idx = volume_grid(pos.tolist(), step_p, extent, reference_positions)
        num_slices = len(grid)
    run = make_runner(method, model=model, next_fn=next_fn, prior=prior, fit_prior=fit_prior)

    def run_on_device(s, p, d, n, sp, far=None, **kw):
        far = tuple(t.to(device) for t in far) if far is not None else None
        out = run(s.to(device), p.to(device), d.to(device), n, sp, far=far, **{k: v.to(device) for k, v in kw.items()})
        run_on_device.last_signals = getattr(run, "last_signals", None)
        return out

    run_on_device.gap_aware = is_gap_aware(run)
    run_on_device.both_ways = getattr(run, "both_ways", False)
    run_on_device.wants_cubic = getattr(run, "wants_cubic", False)
    signals: dict = {}
    if calibration is not None and method != "mrngan":
        raise ValueError(f"the uncertainty calibration is fitted for mrngan, not {method}")
    if method == "cubic":
        vol = cubic_fill(x, idx, num_slices)
    elif method == "registration":
        vol = registration_fill(x, idx, num_slices)
    else:
        with track_spread(prior, calibration is not None):  # the fits keep the atlas spread the map needs
            vol = fill_volume(run_on_device, x, idx, num_slices, grid, step_p, signals=signals)
    rec = Reconstruction(
        volume=vol.permute(1, 2, 0).numpy().astype(np.float32),
        positions=np.asarray(grid, dtype=np.float64),
        input_indices=list(idx),
        input_positions=[float(p) for p in pos],
        method=method,
        extra={name: (v.permute(1, 2, 0) if v.ndim == 3 else v).numpy() for name, v in signals.items()},  # voxel signals as (H, W, D)
    )
    thickness = float(slab_mm) / (abs(step_p) * HEAD_HEIGHT_MM)  # in grid slices
    if thickness > 1.0:  # each slab centred where it was taken, between grid slices if so
        fixed = slab_consistent(vol, x[:, 0], (pos.double().numpy() - float(grid[0])) / step_p, thickness)
        rec.extra["slab_fill"], rec.extra["slab_mm"] = rec.volume, float(slab_mm)  # the fill: the uncertainty signals' volume
        rec.volume = fixed.permute(1, 2, 0).numpy().astype(np.float32)
    if calibration is not None:
        rec.extra["uncertainty"] = uncertainty_map(rec, prior, calibration, abs(step_p) * HEAD_HEIGHT_MM, fit_prior, one_pass_gaps(run))
    return rec


def localized_positions(x: torch.Tensor, localizer: torch.nn.Module | None, prior: Any, refine_window: float,
                        device: str | torch.device = "cpu") -> torch.Tensor:
    """Positions of input slices (N, 1, H, W) found by ``localizer``, refined against the prior (:func:`refine_positions`)."""
    if localizer is None:
        raise ValueError("no positions given and no localizer to find them")
    return refine_positions(prior, x, localize(localizer, x.to(device)).cpu(), refine_window)


def refine_positions(prior: Any, slices: torch.Tensor, positions: torch.Tensor | Sequence[float], window: float = 0.12) -> torch.Tensor:
    """Localized positions refined by the prior's atlas matching (``prior.locate``), one per slice.

    The search covers ``+- window`` around the localizer's estimate and around the mean-brain
    template's (:func:`~monai_mrngan.atlas.prior.template_localizer_for`, one matrix product), in one
    scan (overlapping windows share their candidates), and the atlases' best match wins: a localizer
    far off cannot hold the search away from the right region, nor can the template (which puts a
    few mid-brain slices near the skull base). Error after refinement (``python -m
    scripts.bench.localization``) is in the slice_localization docs.
    Unchanged when ``window`` is 0 or the prior cannot locate (a one-volume general brain has no
    atlases to vote).
    """
    pos = torch.as_tensor(positions, dtype=torch.float32).reshape(-1).clone()
    if window <= 0 or not hasattr(prior, "locate") or len(prior.bank) < 2:
        return pos
    x = as_slice_batch(slices).cpu()
    also = template_localizer_for(prior)(x.float()).tolist() if isinstance(prior, BrainPrior) else None
    for i in range(len(pos)):
        pos[i] = prior.locate(x[i : i + 1], [float(pos[i])] + ([also[i]] if also else []), window=window)
    return pos


def _volume_position(components: Components, whole: InputSlices, path: str, slice_index: int, spacing_mm: float
                     ) -> tuple[list[float] | None, dict | None]:
    """The position of one slice of a 3D input from its ``whole`` volume (:func:`~monai_mrngan.inference.localize.place_slices`):
    counted from the vertex when the volume shows it, else one offset localized over all its slices."""
    if len(whole.slices) < 8:
        return None, None  # too few slices to place by: the slice is localized on its own
    try:
        localizer, template = components.placer()
        positions, info = place_slices(localizer, whole.slices, whole.offsets_mm, spacing_mm, template=template)
    except ValueError:
        return None, None
    p = float(positions[whole.indices.index(slice_index)])  # slice_index: the RAS axial index (a series with gaps skips some)
    logger.info("%s: placed from the whole volume (%s): p = %.3f", path, info["method"], p)
    return [p], info


def _input_space_affine(inputs: InputSlices, first_index: int, spacing_mm: float) -> np.ndarray:
    """Affine placing the output grid in the input's world: the model grid's in-plane transform undone,
    axial steps of ``spacing_mm`` along the input's axial axis, the first input slice where it was acquired."""
    aff = np.asarray(inputs.affine, dtype=np.float64).copy()
    axial = aff[:3, 2] / max(float(np.linalg.norm(aff[:3, 2])), 1e-12) * spacing_mm
    aff[:3, 2] = axial
    aff[:3, 3] = aff[:3, 3] - first_index * axial
    return aff


def check_inputs(prior: Any, got: InputSlices, stack: bool = False, force: bool = False, spacing_mm: float = 2.0,
                 whole: InputSlices | None = None) -> list[dict]:
    """Score every input slice as an axial head slice (:class:`~monai_mrngan.atlas.input_check.InputChecker`) of a
    whole head (:mod:`~monai_mrngan.data.head_layers`).

    A failing slice raises :class:`InputError` naming its file and score unless ``force``; a stack
    is refused when its median slice fails (its end slices may lie beyond the head). A stack, or the
    ``whole`` volume a slice was taken from, is refused when it looks skull-stripped (most of its head
    sections without a darker band inside their outer layer: :func:`~monai_mrngan.data.head_layers.stripped_score`);
    a lone slice without one gets a warning (one slice alone is too noisy to refuse by). Returns the scores
    (``outer_layer`` per slice; ``stripped_score`` on every slice of a judged volume); the atlas scores
    only with an atlas prior.
    """
    volume = got if stack else whole
    judged_volume = stripped_score(volume.slices, spacing_mm) if volume is not None else None
    if looks_stripped(judged_volume) and not force:
        source = (volume.sources[0] if volume.sources else "input").split("#")[0]
        raise InputError(source, f"{stripped_reason(judged_volume)}; pass --force to reconstruct it anyway")
    extra = {} if judged_volume is None else {"stripped_score": round(judged_volume, 4)}
    layers = [outer_layer_score(sl, spacing_mm) for sl in got.slices]
    results = [{"source": src, "outer_layer": round(o, 4) if np.isfinite(o) else None, **extra} for src, o in zip(got.sources, layers)]
    if volume is None:
        for res, o in zip(results, layers):
            if o >= FLAT:
                logger.warning("%s: shows no scalp or skull around the brain (outer-layer score %.2f): if it is skull-stripped, its position "
                               "and reconstruction are unreliable (the models learned whole heads)", res["source"], o)
    if prior is None or not hasattr(prior, "bank"):
        return results
    checker = checker_for(prior)
    for res, sl in zip(results, got.slices):
        res.update(checker.check(torch.from_numpy(sl)).as_dict())
    judged = [results[len(results) // 2]] if stack else results
    for res in judged:
        if not res["passed"] and not force:
            source = res["source"].split("#")[0] if stack else res["source"]
            raise InputError(source, f"{res['reason']}; pass --force to reconstruct it anyway")
    return results


def _on_grid(positions: Sequence[float] | None, spacing_mm: float, reference_positions: Sequence[float] | None) -> list[float] | None:
    """Each input's position on the output grid (:func:`~monai_mrngan.inference.volume.volume_grid`, as
    :func:`reconstruct_volume` places it): where the reconstruction fits its prior, so a check there shares that fit."""
    if positions is None:
        return None
    grid, idx = volume_grid(list(positions), -float(spacing_mm) / HEAD_HEIGHT_MM, (0.0, 1.0), reference_positions)
    return [float(grid[i]) for i in idx]


def _refuse_or_record(entry: dict, source: str, reason: str, force: bool) -> None:
    """A check that placed inputs fail (``reason`` not empty): a one-line :class:`InputError` naming ``source`` unless
    ``force``; forced, the input's ``checks`` entry records the failure beside any earlier reason."""
    if not reason:
        return
    if not force:
        raise InputError(source, f"{reason}; pass --force to reconstruct it anyway")
    entry.update(passed=False, reason="; ".join(r for r in (entry.get("reason"), reason) if r))


def check_contrast(prior: Any, got: InputSlices, positions: Sequence[float] | None, checks: list[dict], stack: bool = False,
                   force: bool = False, spacing_mm: float = 2.0) -> None:
    """Are the inputs T1-weighted, as every trained stage is? Each input (a stack: its median slice, as :func:`check_inputs`
    judges it) is scored against the prior fitted to it at its position (:class:`~monai_mrngan.atlas.input_check.ContrastCheck`),
    recorded in its ``checks`` entry (``t1_contrast``, ``white_over_grey``). A failing slice raises :class:`InputError` naming
    its file and score unless ``force`` (then its entry says it failed). Needs the positions and an atlas prior that is
    fitted (:func:`~monai_mrngan.atlas.input_check.fitted_contrast`). Checked before anything is reconstructed, so a refusal
    comes fast; given the positions on the output grid (:func:`_on_grid`), the reconstruction reuses this fit.
    """
    if not isinstance(prior, BrainPrior) or positions is None:
        return
    by_source = {c["source"]: c for c in checks}
    for i in [len(got.slices) // 2] if stack else range(len(got.slices)):
        scores = fitted_contrast(prior, got.slices[i], positions[i], spacing_mm)
        entry = by_source.get(got.sources[i], {})
        entry.update(scores.as_dict())
        _refuse_or_record(entry, got.sources[i].split("#")[0] if stack else got.sources[i], scores.reason, force)


def check_orientation(components: Components, got: InputSlices, checks: list[dict], force: bool = False, refine_window: float = 0.12,
                      spacing_mm: float = 2.0) -> None:
    """Is each input (localized slices without a geometry: PNGs) the right way up? Its top-to-bottom mirror image is placed
    and fitted on its own and scored like the slice (``t1_contrast_flipped`` beside ``t1_contrast`` in its ``checks`` entry);
    a slice whose mirror image matches the fitted atlases better (:func:`~monai_mrngan.atlas.input_check.flip_reason`) raises
    :class:`InputError` naming its file unless ``force``. An upside-down slice passes every other score: its outline is
    nearly symmetric, and it was placed up to 110 mm off. Costs one more placement and fit per input (about 1 s at 128 px)."""
    by_source = {c["source"]: c for c in checks}
    for i, source in enumerate(got.sources):
        entry = by_source.get(source, {})
        if entry.get("t1_contrast") is None:
            continue  # not judged (a prior never fitted, no head core)
        flipped = np.ascontiguousarray(got.slices[i][:, ::-1])  # RAS axis 1 runs posterior -> anterior
        p = localized_positions(torch.from_numpy(flipped)[None, None], components.localizer, components.prior, refine_window,
                                components.device)
        entry["t1_contrast_flipped"] = fitted_contrast(components.prior, flipped, float(p[0]), spacing_mm).as_dict()["t1_contrast"]
        _refuse_or_record(entry, source, flip_reason(entry["t1_contrast"], entry["t1_contrast_flipped"]), force)


_SCALE_PROFILES: WeakKeyDictionary = WeakKeyDictionary()  # prior -> its bank's slice_scale_profile (about a second to compute)


def to_volume_scale(prior: Any, got: InputSlices, positions: Sequence[float]) -> tuple[InputSlices, dict | None]:
    """Slices each scaled by its own head (``got.scaled_alone``: lone slices with raw intensities) brought to the
    scale their whole volume would give them, as ``prepare`` scales: each multiplied by the prior's
    :func:`~monai_mrngan.atlas.bank.slice_scale_profile` at its position in ``positions`` and clipped to [0, 1]
    (on IXI a slice at p = 0.3-0.4 scaled alone is 1.2x too dark). Unchanged, with None, for other inputs or
    without an atlas prior."""
    if not got.scaled_alone or not isinstance(prior, BrainPrior):
        return got, None
    if prior not in _SCALE_PROFILES:
        _SCALE_PROFILES[prior] = slice_scale_profile(prior.bank)
    profile, grid = _SCALE_PROFILES[prior], prior.positions.numpy()
    ok = np.isfinite(profile)
    if not ok.any():
        return got, None
    factors = np.interp(np.asarray(positions, dtype=np.float64).reshape(-1), grid[ok], profile[ok])
    slices = np.clip(got.slices * factors[:, None, None], 0.0, 1.0).astype(np.float32)
    scale = got.scale / float(factors[0]) if len(factors) == 1 else got.scale  # one input: its intensities are that scale
    return dataclasses.replace(got, slices=slices, scale=scale), {"scaled_alone": True, "position_scale_factor": [round(float(f), 4) for f in factors]}


def calibration_for(components: Components, method: str) -> tuple[Any, str | None]:
    """The uncertainty calibration to use for ``method`` and, when there is none, the one-line reason (logged)."""
    cal = getattr(components, "calibration", None)
    note = None
    if method != "mrngan":
        note = f"no uncertainty map: it is calibrated for mrngan, not {method}"
    elif cal is None:
        note = ("no uncertainty map: no uncertainty calibration with the mrngan weights "
                "(stages trained before it existed; run the mrngan bundle's calibrate step)")
    if note:
        logger.warning(note)
        return None, note
    return cal, None


def reconstruct_slices(
    got: InputSlices,
    components: Components,
    whole: InputSlices | None = None,
    positions: Sequence[float] | None = None,
    method: str = "mrngan",
    spacing_mm: float = 2.0,
    reference_affine: np.ndarray | None = None,
    reference_positions: Sequence[float] | None = None,
    refine_window: float = 0.12,
    stack: bool = False,
    force: bool = False,
    slab_mm: float | None = None,
) -> Reconstructed:
    """Input slices already on the model grid (:mod:`~monai_mrngan.data.inputs`) -> a reconstruction, as
    :func:`reconstruct_files` makes it (checked, placed, reconstructed; see there for the arguments); nothing written.
    ``whole``: the 3D volume one input slice was taken from (places it and judges the head). ``slab_mm``: a stack's slab
    thickness (:func:`~monai_mrngan.inference.stacks.slab_thickness_mm`; None: its slice step when thicker than the grid)."""
    checks = check_inputs(components.prior, got, stack, force, spacing_mm, whole)
    placement = None
    if stack:
        positions, placement = stack_positions(components, got, positions, spacing_mm)
        grid = np.asarray(reference_positions if reference_positions is not None else (0.0, 1.0), dtype=np.float64)
        half = abs(spacing_mm) / HEAD_HEIGHT_MM / 2
        got, positions = stack_inside(got, positions, float(grid.min()) - half, float(grid.max()) + half, -2 * half, reference_positions)
    elif whole is not None and positions is None:  # one slice of a 3D input: placed by its whole volume
        positions, placement = _volume_position(components, whole, got.sources[0].split("#")[0], got.indices[0], spacing_mm)
    elif positions is not None and len(positions) != len(got.slices):
        raise ValueError(f"{len(got.slices)} input slices but {len(positions)} positions")
    intensity = None
    localized = positions is None and isinstance(components.prior, BrainPrior) and components.localizer is not None
    if localized:
        # localized as reconstruct_volume would: the lone-slice scale and the contrast check need the positions first
        positions = localized_positions(torch.from_numpy(got.slices)[:, None], components.localizer, components.prior, refine_window,
                                        components.device).tolist()
    if got.scaled_alone and isinstance(components.prior, BrainPrior) and positions is not None:
        got, intensity = to_volume_scale(components.prior, got, positions)
    check_contrast(components.prior, got, _on_grid(positions, spacing_mm, reference_positions), checks, stack, force, spacing_mm)
    if localized and not got.has_geometry:  # a PNG carries no orientation
        check_orientation(components, got, checks, force, refine_window, spacing_mm)
    cal, note = calibration_for(components, method)
    slab = slab_thickness_mm(got, spacing_mm, slab_mm) if stack else 0.0
    if slab > 0:
        logger.info("stack read as %.3g mm slabs: the output is made to agree with them (--slab_mm 0: thin slices)", slab)
    rec = reconstruct_volume(
        got.slices,
        positions,
        method=method,
        model=components.model,
        next_fn=components.next_fn,
        prior=components.prior,
        localizer=components.localizer,
        spacing_mm=spacing_mm,
        reference_positions=reference_positions,
        refine_window=refine_window,
        device=components.device,
        calibration=cal,
        slab_mm=slab,
    )
    unc = rec.extra.pop("uncertainty", None)
    rec.extra["input_check"] = checks
    if intensity is not None:
        rec.extra["intensity"] = intensity
    if placement is not None:
        rec.extra["placement"] = placement
    grid_affine = None
    if reference_affine is not None and reference_positions is not None:
        grid_affine = volume_affine(reference_affine, reference_positions, rec.positions)
    input_affine = _input_space_affine(got, rec.input_indices[0], spacing_mm) if got.has_geometry else None
    return Reconstructed(rec, got, checks, spacing_mm, grid_affine, input_affine, unc, note)


def reconstruct_files(
    inputs: Sequence[str],
    out: str,
    components: Components,
    slice_index: int | None = None,
    positions: Sequence[float] | None = None,
    method: str = "mrngan",
    expected_shape: Sequence[int] | None = None,
    spacing_mm: float = 2.0,
    reference_affine: np.ndarray | None = None,
    reference_positions: Sequence[float] | None = None,
    refine_window: float = 0.12,
    stack: bool = False,
    pixel_mm: float | Sequence[float] | None = None,
    force: bool = False,
    slab_mm: float | None = None,
) -> dict[str, Any]:
    """Files in (DICOM series or file, NIfTI, PNG; see :func:`~monai_mrngan.data.inputs.read_inputs`), volume files out.

    ``expected_shape``: the prepared in-plane size the models were trained on (default: the
    prior's); inputs of other sizes and spacings are resampled and cropped to it as ``prepare``
    does (a PNG needs ``pixel_mm``). ``stack``: every axial slice of one volume is an input, at
    positions relative to each other from its geometry, with one offset localized; a stack further apart than the grid
    is read as slabs that thick (``slab_mm`` another thickness, 0 thin slices) and the volume made to agree with them. With
    ``reference_affine`` / ``reference_positions`` (one prepared volume's affine and ``p`` per
    index) the model-grid output covers that volume's extent in ``p`` with the prepared data's
    orientation and spacing; otherwise ``0 <= p <= 1`` and a RAS diagonal affine with ``spacing_mm``.
    When the input has a geometry (DICOM, NIfTI) ``out`` is placed in the input's world so that it
    overlays the input in a viewer, and the model-grid volume is written beside it
    (``<out>_model_grid.nii.gz``). Every input is first checked to be an axial head slice
    (:func:`check_inputs`), then, once placed, to be T1-weighted (:func:`check_contrast`); ``force`` reconstructs a
    failing one anyway, with its scores recorded.
    With an uncertainty calibration (``components.calibration``, method ``mrngan``) the expected
    absolute error map is written beside ``out`` (``<out>_uncertainty.nii.gz``, same grid and affine;
    :mod:`~monai_mrngan.inference.uncertainty`); without one, no map and a one-line warning.
    Returns the written paths and the positions of the inputs.
    """
    if not inputs:
        raise ValueError("no input slices given")
    if not is_nifti(out):  # these three refused before any work, not after it
        raise InputError(out, "the output must be a NIfTI file name ending in .nii.gz or .nii (e.g. recon.nii.gz)")
    check_method(method)
    check_slab_mm(slab_mm, stack)  # refused before the inputs are read and placed
    outside = [float(p) for p in (positions or []) if not 0.0 <= float(p) <= 1.0]
    if outside:
        raise ValueError(f"position {outside[0]:g} is outside 0..1 (p is 0 at the vertex and 1 at 200 mm below it)")
    size = expected_shape[0] if expected_shape is not None else (components.prior.shape[0] if components.prior is not None else None)
    if size is None:
        raise ValueError("the model grid's size is unknown: pass expected_shape")
    if slice_index is not None and len(inputs) == 1 and not stack:  # the slice, and the whole volume that places it
        got, whole = read_slice_and_volume(inputs[0], int(size), spacing_mm, slice_index)
    else:
        got = read_inputs(inputs, int(size), spacing_mm, slice_index=slice_index, stack=stack, pixel_mm=pixel_mm)
        whole = got if slice_index is not None and len(inputs) == 1 else None  # with --stack: every slice already
    done = reconstruct_slices(got, components, whole=whole, positions=positions, method=method, spacing_mm=spacing_mm,
                              reference_affine=reference_affine, reference_positions=reference_positions, refine_window=refine_window,
                              stack=stack, force=force, slab_mm=slab_mm)
    paths = done.save(out)
    rec, got, checks = done.rec, done.inputs, done.checks
    logger.info("wrote %s (%s slices); input positions %s", paths["volume"], rec.volume.shape[2], rec.input_positions)
    return {**paths, "input_positions": rec.input_positions, "input_indices": rec.input_indices, "sources": got.sources, "input_check": checks}
