"""Is this an axial head slice? An honest check of an input before anything is reconstructed from it.

Two scores against the prior's atlases (moment-aligned normalised cross-correlation, as the fit's
first step, :func:`~monai_mrngan.atlas.registration.register_slices`):

- ``axial_match``: the best match with any atlas's axial slice. Real axial head slices score high
  (120 held-out IXI slices, 15 subjects, p = 0.15 to 0.85: 0.919 and above); noise, a grey
  gradient or an empty image score 0 to 0.38.
- ``plane_margin``: ``axial_match`` minus the best match with the same atlases' coronal and sagittal
  planes (in every in-plane orientation). A coronal or sagittal slice of a head also looks like a head,
  but more like the atlases' own coronal / sagittal planes than like any axial one: on the same
  120 held-out IXI slices real axial ones had a margin of +0.009 and above (1st percentile +0.015),
  18 coronal and sagittal planes of three held-out subjects -0.030 and below.

An input is accepted when ``axial_match >= min_match`` and ``plane_margin >= min_margin``; the
defaults come from those measurements (``scripts/calibrate_input_check.py`` measures them again on
any prepared dataset and prints the table).

Two more scores need the prior fitted to the input at its position, so they are taken once the input is placed
(:class:`ContrastCheck`): is the slice T1-weighted, as the atlases and every trained stage are? A T2, PD or FLAIR
slice has a head's outline and passes the two scores above (simulated ones: ``axial_match`` >= 0.92), but
its tissues rank otherwise (fluid bright, white matter dark).

Orientation. A slice turned by 90 degrees fails ``plane_margin``; the error then says when turning it back would pass.
A slice upside down (anterior at the bottom) passes both scores (its outline is nearly symmetric), so an input that
carries no orientation (a PNG) is also compared with its top-to-bottom mirror image, each placed and fitted on its own
(:func:`flip_reason`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from weakref import WeakKeyDictionary

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage, stats

from ..data.positions import HEAD_THRESHOLD
from .fit import moment_match, to_unit
from .prior import BrainPrior
from .registration import gauss_blur, head_sums

__all__ = ["InputCheck", "InputChecker", "checker_for", "MIN_MATCH", "MIN_MARGIN", "MIN_CONTRAST", "MIN_WHITE_OVER_GREY", "TISSUE_SPACING_MM",
           "CONTRAST_CORE_MM", "ContrastCheck", "contrast_check", "fitted_contrast", "MAX_FLIP_GAIN", "flip_reason"]

MIN_MATCH = 0.75
"""Lowest ``axial_match`` accepted (real slices: >= 0.919; a gradient: 0.38)."""
MIN_MARGIN = -0.01
"""Lowest ``plane_margin`` accepted (real axial slices: >= +0.009; coronal / sagittal: <= -0.030): the
midpoint, leaving room for slices from other scanners on the accepted side."""
MIN_CONTRAST = 0.35
"""Lowest ``t1_contrast`` accepted (:class:`ContrastCheck`). Real T1 slices (IXI test subjects at p = 0.15-0.85, the
same under every simulated scanner shift, three T1 scans stored as other sites store them) scored 0.48 and above,
lowest near the crown; T1 slices given T2-, PD- and FLAIR-like tissue rankings
(:func:`~monai_mrngan.transforms.scanners.reweight`) scored 0.28 / 0.24 / 0.43 at the median (README, "From your
scanner")."""
MIN_WHITE_OVER_GREY = 0.10
"""Lowest ``white_over_grey`` accepted (:class:`ContrastCheck`). The same real T1 slices scored 0.25 and above (at the
crown); FLAIR-like slices keep T1's dark fluid, so most pass ``t1_contrast`` (25 % refused), but their white matter is
darker than their grey: with this floor 42 % are refused (T2-like 72 %, PD-like 75 %)."""
MAX_FLIP_GAIN = 0.01
"""Most that a slice's top-to-bottom mirror image may exceed its ``t1_contrast`` by (each placed and fitted on its own).
On 112 real T1 slices at p = 0.2-0.8 (8 IXI test subjects, 5 under the gamma 0.7 scanner, three T1 scans stored as
other sites store them) the mirror image scored 0.023 and more below the slice (0.03-0.04 near the crown, 0.06-0.2 lower
down); at p = 0.15 and 0.85 (all 15 IXI test subjects) 0.013 and more below. The same slices given upside down scored
those amounts below their mirror image, so all are refused, the nearest the crown with little room. The demo's phantoms,
nearly symmetric front to back, up to 0.001 above."""
TISSUE_SPACING_MM = 4.0
"""Coarsest grid ``white_over_grey`` is judged on: the cortex is 2-4 mm thick, so on coarser voxels white and grey matter
mix (the tests' 8 mm phantoms, whose "tissue" is a texture of their own, score -0.3 against atlases of other phantoms)."""
CONTRAST_CORE_MM = 8.0
"""How far inside the head's outline the contrast scores look: the brain, not the scalp and skull, whose layers
rank alike in every contrast."""


@dataclass
class ContrastCheck:
    """Is a slice T1-weighted, as the atlases and every trained stage are? Two scores over the core of its head (the filled
    head mask eroded by :data:`CONTRAST_CORE_MM`) against the prior fitted to it at its position (T1 atlases warped onto
    this head); None where not judged.

    - ``t1_contrast``: the Spearman rank correlation between the slice and the fitted prior. A rank correlation, so any
      monotone contrast curve of a T1 scan scores as the scan; a T2 or PD slice ranks fluid and white matter the other
      way round.
    - ``white_over_grey``: the slice's mean where the fitted prior is brightest (its top third: white matter) minus its
      mean where the prior is in its middle third (grey matter), over the slice's standard deviation there. Positive
      in T1; FLAIR, T2 and PD put white matter below grey.
    """

    t1_contrast: float | None
    white_over_grey: float | None

    @property
    def reason(self) -> str:
        """The one-line reason to refuse the slice; "" when it passes or is not judged."""
        what = "real T1 slices score >= {:.2f}); a T2, PD or FLAIR slice cannot be reconstructed by these T1-trained models"
        if self.t1_contrast is not None and self.t1_contrast < MIN_CONTRAST:
            return (f"does not look T1-weighted (T1 contrast {self.t1_contrast:.2f}: its tissues rank unlike the T1 atlases fitted "
                    f"to it; " + what.format(MIN_CONTRAST))
        if self.white_over_grey is not None and self.white_over_grey < MIN_WHITE_OVER_GREY:
            return (f"does not look T1-weighted (white over grey {self.white_over_grey:.2f}: its white matter is no brighter than its "
                    f"grey matter; " + what.format(MIN_WHITE_OVER_GREY))
        return ""

    def as_dict(self) -> dict:
        return {k: (None if v is None else round(v, 4)) for k, v in asdict(self).items()}


def contrast_check(image: np.ndarray, fitted: np.ndarray, spacing_mm: float = 2.0) -> ContrastCheck:
    """:class:`ContrastCheck` of a slice against the prior ``fitted`` to it; not judged when its head core is under
    50 pixels (a slice at the very crown or neck) or flat; ``white_over_grey`` not on grids coarser than
    :data:`TISSUE_SPACING_MM`."""
    image, fitted = np.asarray(image, dtype=np.float64), np.asarray(fitted, dtype=np.float64)
    head = ndimage.binary_fill_holes(image > HEAD_THRESHOLD)
    core = ndimage.binary_erosion(head, iterations=max(1, int(round(CONTRAST_CORE_MM / float(spacing_mm)))))
    x, t = image[core], fitted[core]
    if x.size < 50 or np.ptp(x) == 0 or np.ptp(t) == 0:
        return ContrastCheck(None, None)
    ranked = x[np.argsort(t, kind="stable")]  # thirds by the prior's rank (ties split too, as in a flat tissue class)
    third = len(ranked) // 3
    white, grey = ranked[2 * third :], ranked[third : 2 * third]
    over = float((white.mean() - grey.mean()) / x.std()) if float(spacing_mm) <= TISSUE_SPACING_MM else None
    return ContrastCheck(float(stats.spearmanr(x, t)[0]), over)


def fitted_contrast(prior: BrainPrior, image: np.ndarray, position: float, spacing_mm: float = 2.0) -> ContrastCheck:
    """:func:`contrast_check` of a model-grid slice against ``prior`` fitted to it at ``position`` (the prior's own fit,
    cached like any other). Not judged with a prior that is never fitted (a plain mean brain is too blurred to rank tissues
    against: a phantom's T1 slice scored 0.33 against it)."""
    if prior.config.mode == "none":
        return ContrastCheck(None, None)
    p = float(position)
    ref = torch.as_tensor(np.asarray(image, dtype=np.float32))[None, None]
    fitted = prior.slice_at(torch.tensor([p], dtype=torch.float64), ref, p)[0, 0].cpu().numpy()
    return contrast_check(image, fitted, spacing_mm)


def flip_reason(t1_contrast: float | None, t1_contrast_flipped: float | None) -> str:
    """The one-line reason to refuse a slice whose top-to-bottom mirror image ranks its tissues as the fitted atlases do by
    more than :data:`MAX_FLIP_GAIN` better (both ``t1_contrast``, each at its own position); "" otherwise or unjudged."""
    if t1_contrast is None or t1_contrast_flipped is None or t1_contrast_flipped - t1_contrast <= MAX_FLIP_GAIN:
        return ""
    return (f"looks upside down (anterior at the bottom): flipped top to bottom it matches the atlases better (T1 contrast "
            f"{t1_contrast_flipped:.2f} against {t1_contrast:.2f}); a PNG must show the front of the head at the top")


@dataclass
class InputCheck:
    """The scores of one input slice and the verdict."""

    axial_match: float
    plane_margin: float
    passed: bool
    reason: str = ""

    def as_dict(self) -> dict:
        return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in asdict(self).items()}


def _canvas(planes: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(N, r, c) planes centred on a zero (N, 1, *size) canvas (cropped where larger)."""
    n, r, c = planes.shape
    out = planes.new_zeros(n, *size)
    r0, c0 = max(0, (size[0] - r) // 2), max(0, (size[1] - c) // 2)
    rs, cs = max(0, (r - size[0]) // 2), max(0, (c - size[1]) // 2)
    h, w = min(r, size[0]), min(c, size[1])
    out[:, r0 : r0 + h, c0 : c0 + w] = planes[:, rs : rs + h, cs : cs + w]
    return out[:, None]


class InputChecker:
    """Scores input slices against ``atlases`` of the prior's bank (evenly picked), as templates at ``work_size``.

    Args:
        prior: a :class:`BrainPrior` (a one-volume mean brain works too, with one template set).
        atlases: how many of the bank's volumes serve as templates.
        min_match, min_margin: the acceptance thresholds (see the module docstring).
        position_step: spacing in ``p`` of the axial templates; plane_step: spacing in voxels of the
            coronal / sagittal ones.
    """

    def __init__(self, prior: BrainPrior, atlases: int = 20, min_match: float = MIN_MATCH, min_margin: float = MIN_MARGIN,
                 work_size: int = 64, position_step: float = 0.05, plane_step: int = 10) -> None:
        k = prior.bank.shape[0]
        pick = sorted({int(round(i)) for i in torch.linspace(0, k - 1, min(atlases, k)).tolist()})
        vols = to_unit(prior.bank[pick]).cpu()  # (A, P, H, W) in [0, 1], p ascending (a uint8 bank is stored as 0..255)
        h, w = prior.shape
        self.min_match, self.min_margin = float(min_match), float(min_margin)
        self.size, self.sigma = int(work_size), 1.0
        s = (self.size, self.size)
        p = torch.arange(0.05, 0.951, position_step, dtype=torch.float64)
        axial = torch.cat([prior._interp(v, p).float().cpu() for v in prior.bank[pick]])
        others = []
        for j in range(h // 5, h - h // 5, max(1, plane_step * h // 128)):
            for plane in (vols[:, :, :, min(j, w - 1)], vols[:, :, min(j, h - 1), :]):  # coronal (P, x), sagittal (P, y)
                for view in (plane.transpose(1, 2), plane.transpose(1, 2).flip(2), plane, plane.flip(1)):
                    others.append(_canvas(view, (h, w)))
        # templates at the work size, blurred and with their head moments, once (a check only aligns and correlates)
        self.templates = {}
        for name, t in (("axial", axial), ("others", torch.cat(others))):
            small = F.interpolate(t, size=s, mode="area")
            self.templates[name] = (gauss_blur(small, self.sigma), head_sums(small))

    @torch.no_grad()
    def _best(self, name: str, ref: torch.Tensor) -> float:
        blur, sums = self.templates[name]
        return float(moment_match(blur, sums, ref, gauss_blur(ref, self.sigma))[0].max())

    @torch.no_grad()
    def check(self, image: torch.Tensor) -> InputCheck:
        """Scores and verdict for one (H, W) slice in [0, 1] on the model grid."""
        ref = F.interpolate(torch.as_tensor(image, dtype=torch.float32).reshape(1, 1, *image.shape[-2:]), size=(self.size, self.size), mode="area")
        if float(ref.max() - ref.min()) == 0.0:
            return InputCheck(0.0, 0.0, False, "an empty (constant) image")
        match = self._best("axial", ref)
        margin = match - self._best("others", ref)
        if match < self.min_match:
            return InputCheck(match, margin, False, f"does not look like a head slice (atlas match {match:.2f}; real axial slices score "
                                                    f">= {self.min_match:.2f})")
        if margin < self.min_margin:
            turned = self._turned(ref)
            if turned:
                return InputCheck(match, margin, False, f"looks like an axial slice turned on its side (axial margin {margin:+.3f}; "
                                                        f"{turned}): the front of the head must be at the top")
            return InputCheck(match, margin, False, f"looks more like a coronal or sagittal slice than an axial one (axial margin "
                                                    f"{margin:+.3f}; real axial slices score >= {self.min_margin:+.3f})")
        return InputCheck(match, margin, True)

    def _turned(self, ref: torch.Tensor) -> str:
        """How a slice refused as coronal or sagittal would pass turned by 90 degrees either way ("" when neither passes)."""
        for k in (1, 3):
            turned = torch.rot90(ref, k, (2, 3))
            match = self._best("axial", turned)
            margin = match - self._best("others", turned)
            if match >= self.min_match and margin >= self.min_margin:
                return f"turned by 90 degrees it scores {margin:+.3f}"
        return ""


_CHECKERS: "WeakKeyDictionary[BrainPrior, InputChecker]" = WeakKeyDictionary()


def checker_for(prior: BrainPrior) -> InputChecker:
    """The default :class:`InputChecker` of ``prior``, built once per prior (its templates take a second or two)."""
    if prior not in _CHECKERS:
        _CHECKERS[prior] = InputChecker(prior)
    return _CHECKERS[prior]
