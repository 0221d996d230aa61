"""Loading the trained stages MRNGAN composes: each stage bundle's network through ``monai.bundle``
(its ``configs/inference.json``) with its weights, the prior's file, and the prepared data's grid.

- :func:`load_bundle_network`: the one loader of a bundle network (config + ``weights_only`` weights);
- :class:`Components`: the trained stages (any may be None; methods needing it are then skipped);
- :func:`load_components` / :func:`components_from_bundles`: from explicit files / the standard layout;
- :func:`reference_grid`: affine, ``p`` per index and size of a prepared volume, for the output grid.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import nibabel as nib
import numpy as np
import torch

from ..atlas.prior import BrainPrior, TemplateLocalizer, load_prior, template_localizer_for
from ..data.datalist import load_split
from ..data.io import load_weights
from ..networks.contracts import next_fn_for
from ..networks.recurrent import MRNGAN, NextFn
from .calibration import CALIBRATION_NAME, Calibration, load_calibration

logger = logging.getLogger(__name__)

__all__ = ["load_bundle_network", "Components", "load_components", "components_from_bundles", "load_stage_prior", "reference_grid"]


def load_bundle_network(
    config_file: str | os.PathLike,
    weights: str | os.PathLike | None = None,
    net_id: str = "network_def",
    overrides: Mapping[str, Any] | None = None,
    device: str | torch.device = "cpu",
) -> torch.nn.Module:
    """Instantiate ``net_id`` of a stage bundle's config (through ``monai.bundle``) and load weights.

    ``bundle_root`` defaults to the bundle folder (the parent of the config's folder).
    """
    from monai.bundle import ConfigParser

    config_file = Path(config_file)
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file}: no bundle config here")
    parser = ConfigParser()
    parser.read_config(str(config_file))
    parser["bundle_root"] = str(config_file.resolve().parent.parent)
    for k, v in (overrides or {}).items():
        parser[k] = v
    net = parser.get_parsed_content(net_id, instantiate=True)
    if weights is not None:
        try:
            load_weights(net, weights)
        except RuntimeError as err:  # shape / key mismatch: the stage was trained with other settings
            first = str(err).strip().splitlines()
            detail = next((ln.strip() for ln in first[1:] if ln.strip()), first[0] if first else "")
            raise ValueError(
                f"{weights}: weights do not fit {config_file}::{net_id} ({detail}); "
                "pass the overrides the stage was trained with (e.g. flow_overrides / localizer_overrides)"
            ) from err
    return net.to(device).eval()


@dataclass
class Components:
    """The trained stages MRNGAN composes; any may be None (methods needing it are then skipped)."""

    model: MRNGAN | None = None
    generator: torch.nn.Module | None = None
    prior: Any = None
    localizer: torch.nn.Module | None = None
    next_fn: NextFn | None = None
    device: str = "cpu"
    calibration: Calibration | None = None  # MRNGAN's uncertainty calibration (None: no uncertainty map)

    def __post_init__(self) -> None:
        if self.next_fn is None and self.generator is not None:
            self.next_fn = next_fn_for(self.generator)

    def template(self) -> TemplateLocalizer | None:
        """The prior's mean-brain template matcher, which places a whole stack by one offset (None without an atlas prior)."""
        return template_localizer_for(self.prior) if isinstance(self.prior, BrainPrior) else None

    def placer(self) -> tuple[torch.nn.Module | None, TemplateLocalizer | None]:
        """What places a stack of slices: the localizer (on the components' device) and the template matcher."""
        loc = self.localizer.to(self.device) if self.localizer is not None else None
        return loc, self.template()


def load_components(
    mrngan_config: str | None = None,
    mrngan_weights: str | None = None,
    flow_config: str | None = None,
    flow_weights: str | None = None,
    prior_path: str | None = None,
    prior_fit: Mapping[str, Any] | None = None,
    localizer_config: str | None = None,
    localizer_weights: str | None = None,
    device: str = "cpu",
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
    calibration_path: str | None = None,
) -> Components:
    """Load whichever trained stages are given (config + weights of each stage bundle, the prior's file,
    MRNGAN's uncertainty calibration).

    ``overrides`` maps ``"mrngan" | "flow" | "localizer"`` to config overrides (e.g. image size).
    """
    overrides = overrides or {}
    comp = Components(device=device)
    if localizer_config and localizer_weights:
        comp.localizer = load_bundle_network(localizer_config, localizer_weights, overrides=overrides.get("localizer"), device=device)
    if flow_config and flow_weights:
        comp.generator = load_bundle_network(flow_config, flow_weights, overrides=overrides.get("flow"), device=device)
        comp.next_fn = next_fn_for(comp.generator)
    if prior_path:
        comp.prior = load_stage_prior(prior_path, prior_fit, device=device)
    if mrngan_config and mrngan_weights:
        comp.model = load_bundle_network(mrngan_config, mrngan_weights, overrides=overrides.get("mrngan"), device=device)
    comp.calibration = load_calibration(calibration_path)
    return comp


def components_from_bundles(
    bundles_root: str | os.PathLike,
    weights_root: str | os.PathLike | None = None,
    prior_file: str = "atlas_bank.pt",
    prior_fit: Mapping[str, Any] | None = None,
    device: str = "cpu",
    use_finetuned_flow: bool = True,
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
) -> Components:
    """All trained stages from the standard layout: configs from ``BUNDLES/<stage>/configs/inference.json``,
    weights from ``WEIGHTS/<stage>/models/`` (``weights_root`` defaults to ``bundles_root``; a pipeline
    work folder with one sub-folder per stage fits). Missing weights leave that component None.

    ``WEIGHTS/mrngan/models/flow_finetuned.pt`` replaces the flow weights when it exists;
    ``WEIGHTS/mrngan/models/uncertainty_calibration.json`` is the uncertainty calibration (none: no map).
    ``prior_fit`` defaults to the mrngan bundle's ``prior_fit`` (its ``configs/inference.json``).
    ``overrides``: per stage (``"mrngan" | "flow" | "localizer"``) the config overrides it was trained with.
    """
    b = Path(bundles_root)
    w = Path(weights_root) if weights_root is not None else b

    def cfg(stage: str) -> str:
        return str(b / stage / "configs" / "inference.json")

    def weights(stage: str, name: str = "model.pt") -> str | None:
        path = w / stage / "models" / name
        if not path.is_file():
            logger.warning("%s: not found; %s is left out", path, stage)
            return None
        return str(path)

    flow_w = weights("flow_generation")
    finetuned = w / "mrngan" / "models" / "flow_finetuned.pt"
    if use_finetuned_flow and finetuned.is_file():
        flow_w = str(finetuned)
    if prior_fit is None:
        from monai.bundle import ConfigParser

        prior_fit = ConfigParser.load_config_file(cfg("mrngan")).get("prior_fit")
    prior_path = w / "brain_generalization" / "models" / prior_file
    return load_components(
        mrngan_config=cfg("mrngan"),
        mrngan_weights=weights("mrngan"),
        flow_config=cfg("flow_generation"),
        flow_weights=flow_w,
        prior_path=str(prior_path) if prior_path.is_file() else None,
        prior_fit=prior_fit,
        localizer_config=cfg("slice_localization"),
        localizer_weights=weights("slice_localization"),
        device=device,
        overrides=overrides,
        calibration_path=str(w / "mrngan" / "models" / CALIBRATION_NAME),
    )


def load_stage_prior(path: str | os.PathLike, fit: Mapping[str, Any] | None = None, device: str | torch.device = "cpu") -> Any:
    """The brain generalization stage's prior (:func:`monai_mrngan.atlas.prior.load_prior`).

    ``fit``: how the prior is fitted to an input slice (that stage's ``FitConfig`` fields);
    ``device``: where its bank lives and its fits run (the networks' device).
    """
    return load_prior(str(path), fit=dict(fit) if fit is not None else None, device=device)


def reference_grid(dataset_dir: str | os.PathLike, split: str = "training") -> dict[str, Any]:
    """Affine, ``p`` per index, in-plane shape and axial spacing of the prepared split's volume
    with the most slices (the fullest extent from the vertex down).

    :func:`reconstruct_files` uses it so its output matches the prepared data.
    """
    entries = load_split(dataset_dir, split) or load_split(dataset_dir, "test")
    if not entries:
        raise ValueError(f"{dataset_dir}: no prepared volumes to take the grid from")
    entry = max(entries, key=lambda e: len(e["positions"]))
    img = nib.load(entry["image"])
    positions = [float(p) for p in entry["positions"]]
    spacing = float(np.asarray(img.header.get_zooms()[:3])[2])
    return {
        "affine": np.asarray(img.affine, dtype=np.float64),
        "positions": positions,
        "shape": tuple(int(s) for s in img.shape[:2]),
        "spacing_mm": spacing,
    }
