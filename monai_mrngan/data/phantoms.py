"""Synthetic T1-weighted head phantoms and a BIDS cohort writer (for tests, demos and smoke runs).

:func:`make_phantom` draws one subject: a whole head (scalp fat, skull, CSF, folded cortex, white
matter, deep grey nuclei, butterfly lateral ventricles, cerebellum, brainstem, eyes, sinuses and a
neck down to the bottom of the field of view) with per-subject size, shape, pose, contrast, bias
field, folding pattern and Rician noise. Intensities are in an arbitrary scanner range (a few
hundred to ~1000), not normalised.

Orientation: the array is stored **PSR** (like IXI T1): axis 0 runs anterior -> posterior,
axis 1 inferior -> superior, axis 2 left -> right. The affine is the matching RAS+ voxel-to-world
map, so ``nib.as_closest_canonical`` (or MONAI ``Orientation("RAS")``) gives an RAS array whose
third axis goes from the neck (index 0) to the vertex.

:func:`write_phantom_cohort` writes ``sub-XXX/anat/sub-XXX_T1w.nii.gz`` files in a BIDS tree.

The anatomy is modelled in an "AC frame" (mm, RAS, origin at the anterior commissure) with
approximate signed distances of ellipsoids and elliptic cylinders, painted on an axis-aligned
template grid and resampled once into the subject's pose.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
from scipy import ndimage

from .io import atomic_path, save_json, save_nifti

__all__ = ["make_phantom", "phantom_affine", "write_phantom_cohort"]

# Nominal T1w intensities (before per-subject contrast/scale jitter).
_TISSUE = {
    "fat": 0.85, "muscle": 0.38, "skull": 0.08, "diploe": 0.4, "csf": 0.15, "gm": 0.5,
    "wm": 0.8, "deep_gm": 0.6, "stem": 0.72, "marrow": 0.6, "disc": 0.3, "eye": 0.12, "air": 0.0,
}
_AC_WORLD_Z = 18.0  # world z (mm, FOV centre = 0) of the anterior commissure at the neutral pose
_HEAD_CENTRE = np.array([0.0, -10.0, 10.0])  # AC frame; centre of scaling / rotation


# --------------------------------------------------------------------------- geometry helpers
def _ray(r, rho, a) -> np.ndarray:
    """Centre-to-surface distance along the ray through each point (``r / rho``, safe at 0)."""
    shortest = np.minimum.reduce(np.broadcast_arrays(*a))
    return np.where(rho > 1e-6, r / np.maximum(rho, 1e-6), shortest)


def _sd_ellipsoid(x, y, z, c, a) -> np.ndarray:
    """Approximate signed distance (mm, < 0 inside) to an axis-aligned ellipsoid."""
    qx, qy, qz = x - c[0], y - c[1], z - c[2]
    rho = np.sqrt((qx / a[0]) ** 2 + (qy / a[1]) ** 2 + (qz / a[2]) ** 2)
    r = np.sqrt(qx**2 + qy**2 + qz**2)
    return r - _ray(r, rho, a)


def _sd_cylinder(x, y, c, a) -> np.ndarray:
    """Approximate signed distance to an infinite elliptic cylinder along z (centre may vary)."""
    qx, qy = x - c[0], y - c[1]
    rho = np.sqrt((qx / a[0]) ** 2 + (qy / a[1]) ** 2)
    r = np.sqrt(qx**2 + qy**2)
    return r - _ray(r, rho, a)


def _smin(a, b, k: float) -> np.ndarray:
    """Smooth minimum (union of two signed distances) with blending radius ``k`` mm."""
    h = np.clip(0.5 + 0.5 * (b - a) / k, 0.0, 1.0)
    return b + (a - b) * h - k * h * (1.0 - h)


def _rbf_noise(rng: np.random.Generator, coords, lo, hi, spacing: float) -> np.ndarray:
    """Smooth unit-variance random field at the grid ``coords`` (three 1D mm axes).

    A tensor product of Gaussian bumps on a fixed mm lattice, so the pattern drawn from ``rng``
    does not depend on the sampling resolution.
    """
    weights, var = [], []
    for ax, l, h in zip(coords, lo, hi):
        centres = np.arange(l, h + spacing, spacing, dtype=np.float32)
        w = np.exp(-0.5 * ((np.ravel(ax)[:, None] - centres[None, :]) / spacing) ** 2)
        weights.append(w.astype(np.float32))
        var.append((w**2).sum(1).astype(np.float32))
    coef = rng.standard_normal(tuple(w.shape[1] for w in weights), dtype=np.float32)
    field = np.tensordot(weights[0], coef, axes=(1, 0))  # (nx, Ky, Kz)
    field = np.tensordot(field, weights[1], axes=(1, 1))  # (nx, Kz, ny)
    field = np.tensordot(field, weights[2], axes=(1, 1))  # (nx, ny, nz)
    norm = np.sqrt(var[0][:, None, None] * var[1][None, :, None] * var[2][None, None, :])
    return field / np.maximum(norm, 1e-12)


def _rotation(angles_deg) -> np.ndarray:
    ax, ay, az = np.deg2rad(angles_deg)
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


class _Canvas:
    """Axis-aligned template volume in the AC frame; shapes are painted inside sub-boxes."""

    def __init__(self, size: int, spacing: float):
        ax = ((np.arange(size) - (size - 1) / 2) * spacing).astype(np.float32)
        self.axes = (ax, ax, ax - np.float32(_AC_WORLD_Z))
        self.vol = np.zeros((size, size, size), np.float32)

    def box(self, lo, hi):
        """Slices and broadcastable x, y, z (mm) of the grid points inside [lo, hi]."""
        sl, co = [], []
        for a, l, h in zip(self.axes, lo, hi):
            i0, i1 = np.searchsorted(a, l), np.searchsorted(a, h, side="right")
            sl.append(slice(i0, i1))
            co.append(a[i0:i1])
        return tuple(sl), co[0][:, None, None], co[1][None, :, None], co[2][None, None, :]

    def paint(self, sl, mask, value: float) -> None:
        view = self.vol[sl]
        view[np.broadcast_to(mask, view.shape)] = value


# --------------------------------------------------------------------------- anatomy
def _subject_params(rng: np.random.Generator) -> dict:
    """Per-subject anatomical, contrast and acquisition parameters."""
    u = rng.uniform
    contrast = u(0.85, 1.15)
    tissue = {k: 0.5 + (v * (1 + 0.04 * rng.standard_normal()) - 0.5) * contrast
              for k, v in _TISSUE.items()}
    tissue["air"] = 0.0
    return {
        "tissue": {k: float(max(v, 0.0)) for k, v in tissue.items()},
        "scale": u(0.9, 1.1, 3),
        "angles": u(-8.0, 8.0, 3),
        "shift": np.array([u(-5, 5), u(-5, 5), u(-3, 3)]),
        "ventricles": u(0.75, 1.5),
        "csf_gap": u(1.5, 4.0),
        "gm_thick": u(2.5, 3.3),
        "sulcal_depth": u(9.0, 13.0),
        "skull": u(5.0, 7.5),
        "scalp": u(4.5, 7.0),
        "bias": u(0.08, 0.2),
        "noise": u(0.008, 0.025),
        "gain": u(300.0, 1000.0),
    }


def _cord_y(z) -> np.ndarray:
    """Antero-posterior position of the brainstem/spinal cord axis at height z."""
    lordosis = 0.0008 * np.clip(-62.0 - z, 0, None) ** 2
    return -26.0 - 4.0 * np.clip((-30.0 - z) / 32.0, 0, 1) - lordosis


_CEREBRUM = ((0.0, -10.0, 10.0), (64.0, 82.0, 66.0))
_TEMPORAL = ((43.0, -5.0, -20.0), (22.0, 38.0, 19.0))  # right lobe; the left one is mirrored
_CEREBELLUM = ((0.0, -55.0, -30.0), (50.0, 29.0, 19.0))


def _sd_cerebrum_parts(x, y, z, surface=0.0) -> tuple[np.ndarray, np.ndarray]:
    """(upper cerebrum cut by the anterior fossa / tentorium floor, both temporal lobes)."""
    floor = np.interp(y.ravel(), [-30, -10, 10, 30, 75], [-9, -13, -13, -17, -6]).reshape(y.shape)
    floor = floor + 0.004 * x**2 * (y > 10)  # orbital roofs domed up beside the midline
    upper = np.maximum(_sd_ellipsoid(x, y, z, *_CEREBRUM) + surface, floor.astype(np.float32) - z)
    (cx, cy, cz), a = _TEMPORAL
    temporal = _sd_ellipsoid(np.abs(x), y, z, (cx, cy, cz), a) + surface
    return upper, temporal


def _sd_cerebrum(x, y, z, surface=0.0) -> np.ndarray:
    """Cerebrum with temporal lobes, split by the interhemispheric fissure above the callosum."""
    upper, temporal = _sd_cerebrum_parts(x, y, z, surface)
    cc = np.abs(y + 5.0) < 33.0  # corpus callosum spans y in [-38, 28]
    z_cc = 21.0 + 5.0 * (1.0 - ((y + 5.0) / 33.0) ** 2)
    slab = np.maximum(np.abs(x) - 1.0, np.where(cc, z_cc - z, -1e3))  # fissure: < 0 inside
    return np.maximum(_smin(upper, temporal, 6.0), -slab)


def _sd_cerebellum(x, y, z) -> np.ndarray:
    (cx, cy, cz), _ = _CEREBELLUM
    hemi = _sd_ellipsoid(np.abs(x), y, z, (22, cy, cz), (28, 28, 19))
    return _smin(hemi, _sd_ellipsoid(x, y, z, (0, cy + 2, cz + 2), (12, 25, 18)), 4.0)


def _sd_brainstem(x, y, z) -> np.ndarray:
    mid = _sd_ellipsoid(x, y, z, (0, -18, -4), (12, 11, 11))
    pons = _sd_ellipsoid(x, y, z, (0, -19, -25), (15, 12, 11))
    radius = 6.0 + 2.0 * np.clip((z + 75.0) / 15.0, 0, 1)
    cord = np.maximum(_sd_cylinder(x, y, (0.0, _cord_y(z)), (radius, radius)), z + 28.0)
    return _smin(_smin(mid, pons, 5.0), cord, 5.0)


def _sd_icv(x, y, z, gap: float) -> np.ndarray:
    """Intracranial space and spinal canal: the brain hulls grown by the CSF gap."""
    upper, temporal = _sd_cerebrum_parts(x, y, z)
    brain = _smin(_smin(upper, temporal, 8.0), _sd_ellipsoid(x, y, z, *_CEREBELLUM), 12.0)
    canal = np.maximum(_sd_cylinder(x, y, (0.0, _cord_y(z)), (11.0, 11.0)), z + 20.0)
    sphenoid = _sd_ellipsoid(x, y, z, (0, 8, -42), (20, 26, 20))  # skull base body, kept out
    return np.maximum(_smin(brain - gap, canal, 8.0), -sphenoid)


def _sd_head(x, y, z, icv, outer: float) -> np.ndarray:
    face = _smin(_sd_ellipsoid(x, y, z, (0, 28, -55), (54, 60, 52)),
                 _sd_ellipsoid(x, y, z, (0, 80, -48), (9, 14, 17)), 5.0)  # + nose
    neck = np.maximum(_sd_cylinder(x, y, (0, -18), (48, 52)), z + 30.0)
    return _smin(_smin(icv - outer, face, 12.0), neck, 15.0)


def _paint_head(cv: _Canvas, p: dict, rng: np.random.Generator) -> None:
    """Scalp/face/neck soft tissue with fat planes, skull, vertebrae and the CSF spaces."""
    t, skull = p["tissue"], p["skull"]
    lo, hi = (-110, -125, -1e3), (110, 115, 110)
    sl, x, y, z = cv.box(lo, hi)
    icv = _sd_icv(x, y, z, p["csf_gap"])
    head = _sd_head(x, y, z, icv, skull + p["scalp"])
    fat_planes = np.abs(_rbf_noise(rng, (x, y, z), lo[:2] + (-150,), hi, 8.0)) < 0.1
    cv.paint(sl, head < 0, t["muscle"])
    cv.paint(sl, (head < 0) & ((head > 1.0 - p["scalp"]) | fat_planes), t["fat"])
    _paint_face(cv, p, rng)
    shell = (icv > 0) & (icv < skull)
    cv.paint(sl, shell, t["skull"])
    cv.paint(sl, shell & (np.abs(icv - skull / 2) < skull / 5), t["diploe"])
    vert = np.maximum(_sd_cylinder(x, y, (0.0, _cord_y(z) + 20.0), (12, 8)), z + 60.0)
    disc = np.cos(2 * np.pi * (z + rng.uniform(0, 17)) / 17.0) > 0.8
    cv.paint(sl, (vert < 0) & (icv > 0), t["marrow"])
    cv.paint(sl, (vert < 0) & (icv > 0) & disc, t["disc"])
    cv.paint(sl, icv < 0, t["csf"])


def _paint_face(cv: _Canvas, p: dict, rng: np.random.Generator) -> None:
    """Orbits with eyes, nasal cavity with turbinates, maxillary sinuses, pharynx and airway."""
    t = p["tissue"]
    for sx in (-1, 1):
        sl, x, y, z = cv.box((sx * 31 - 17, 38, -52), (sx * 31 + 17, 74, -20))
        cv.paint(sl, _sd_ellipsoid(x, y, z, (sx * 31, 56, -36), (16, 16, 14)) < 0, t["fat"])
        cv.paint(sl, _sd_ellipsoid(x, y, z, (sx * 31, 60, -36), (11, 11, 11)) < 0, t["eye"])
        sl, x, y, z = cv.box((sx * 25 - 13, 29, -75), (sx * 25 + 13, 61, -45))
        cv.paint(sl, _sd_ellipsoid(x, y, z, (sx * 25, 45, -60), (11, 14, 13)) < 0, t["air"])
    sl, x, y, z = cv.box((-13, -3, -57), (13, 27, -33))
    cv.paint(sl, _sd_ellipsoid(x, y, z, (0, 12, -45), (12, 14, 11)) < 0, t["air"])  # sphenoid sinus
    lo, hi = (-8, 22, -75), (8, 80, -35)
    sl, x, y, z = cv.box(lo, hi)
    turbinates = _rbf_noise(rng, (x, y, z), lo, hi, 4.0) > -0.2
    cv.paint(sl, (_sd_ellipsoid(x, y, z, (0, 50, -55), (6, 26, 17)) < 0) & turbinates, t["air"])
    sl, x, y, z = cv.box((-12, -20, -1e3), (12, 40, -45))
    airway = np.maximum(_sd_cylinder(x, y, (0.0, _cord_y(z) + 44.0), (8, 5)), z + 58.0)
    pharynx = _sd_ellipsoid(x, y, z, (0, 20, -60), (7, 9, 6))
    cv.paint(sl, _smin(airway, pharynx, 4.0) < 0, t["air"])


def _fold_field(rng: np.random.Generator, points: np.ndarray, lo, hi) -> np.ndarray:
    """Gyral pattern: smooth noise on a fixed 2 mm lattice in [lo, hi] read at ``points`` (3, N)."""
    lo, hi, step = np.asarray(lo, np.float32), np.asarray(hi, np.float32), 2.0
    axes = [np.arange(l, h + step, step, dtype=np.float32) for l, h in zip(lo, hi)]
    grid = _rbf_noise(rng, np.ix_(*axes), lo, hi, 3.5)
    return ndimage.map_coordinates(grid, (points - lo[:, None]) / step, order=1, mode="nearest")


def _paint_cerebrum(cv: _Canvas, p: dict, rng: np.random.Generator) -> None:
    """White matter, folded cortical ribbon, sulcal CSF, Sylvian fissure.

    Sulci are the zero level sets of a smooth noise read at each voxel's nearest point on the
    brain surface, so they run perpendicular to the surface down to a variable depth.
    """
    t, gm_t = p["tissue"], p["gm_thick"]
    lo, hi = (-70, -96, -45), (70, 76, 80)
    sl, x, y, z = cv.box(lo, hi)
    surface = 1.5 * _rbf_noise(rng, (x, y, z), lo, hi, 12.0)
    depth = -_sd_cerebrum(x, y, z, surface)
    sulcal = p["sulcal_depth"] + 3.0 * _rbf_noise(rng, (x, y, z), lo, hi, 15.0)
    inside = depth > 0
    cv.paint(sl, inside, t["wm"])
    shell = np.nonzero(inside & (depth < sulcal + gm_t))
    grad = np.stack([g[shell] for g in np.gradient(depth)])
    grad /= np.maximum(np.linalg.norm(grad, axis=0), 1e-6)
    pts = np.stack([c[shell] for c in np.broadcast_arrays(x, y, z)])
    both = np.concatenate([pts - 0.8 * depth[shell] * grad, pts], axis=1)  # surface point, voxel
    fold = _fold_field(rng, both, lo, hi).reshape(2, -1)
    fold = np.abs(fold[0] + 0.4 * fold[1])  # mostly perpendicular to the surface, a little bent
    d = depth[shell]
    tissue = np.where((d < gm_t) | (fold < 0.95), t["gm"], t["wm"]).astype(np.float32)
    tissue[(fold < 0.18) & (d < sulcal[shell])] = t["csf"]
    cv.vol[sl][shell] = tissue
    # Sylvian fissure: the crease where the temporal lobe meets the rest of the hemisphere
    upper, temporal = _sd_cerebrum_parts(x, y, z, surface)
    sylvian = inside & (np.abs(upper - temporal) < 1.2) & (depth < 16) & (np.abs(x) > 25)
    cv.paint(sl, sylvian, t["csf"])


def _paint_ventricles(cv: _Canvas, p: dict) -> None:
    """Lateral ventricles as chains of small tilted ellipsoids along a C-shaped path."""
    t, v = p["tissue"], p["ventricles"]
    # knots: x, y, z, half-width, half-height, outward tilt (deg); frontal tip -> temporal tip
    main = np.array([
        (6, 30, 10, 2.5, 5, 30), (8, 20, 14, 3.5, 8, 35), (10, 5, 18, 4, 7, 30),
        (12, -10, 20, 5.5, 5, 15), (17, -25, 19, 6, 5.5, 10), (23, -36, 12, 7, 8, 0),
        (28, -32, -2, 4, 5, 0), (31, -20, -12, 3, 4, 0), (32, -2, -18, 2.5, 3, 0)])
    occipital = np.array([(23, -36, 12, 7, 8, 0), (22, -50, 8, 4, 5, 0), (20, -60, 6, 2, 3, 0)])
    for knots in (main, occipital):
        seg = np.linalg.norm(np.diff(knots[:, :3], axis=0), axis=1)
        arc = np.concatenate([[0.0], np.cumsum(seg)])
        for s in np.arange(0.0, arc[-1] + 1e-6, 2.0):
            cx, cy, cz, hw, hh, tilt = (np.interp(s, arc, knots[:, k]) for k in range(6))
            hw, hh, phi = hw * v, hh * (0.5 + 0.5 * v), np.deg2rad(tilt)
            r = max(hw, hh) + 1
            for sx in (-1, 1):
                sl, x, y, z = cv.box((sx * cx - r, cy - 4, cz - r), (sx * cx + r, cy + 4, cz + r))
                u, w = sx * x - cx, z - cz
                across, up = u * np.cos(phi) - w * np.sin(phi), u * np.sin(phi) + w * np.cos(phi)
                inside = (across / hw) ** 2 + ((y - cy) / 4.0) ** 2 + (up / hh) ** 2 < 1
                cv.paint(sl, inside & (np.abs(x) > 1.0), t["csf"])


def _paint_deep(cv: _Canvas, p: dict) -> None:
    """Thalami, caudate and lentiform nuclei, ventricles."""
    t, v = p["tissue"], p["ventricles"]
    sl, x, y, z = cv.box((-45, -40, -15), (45, 35, 30))
    ax = np.abs(x)
    nuclei = np.minimum.reduce([
        _sd_ellipsoid(ax, y, z, (11, -14, 4), (9, 15, 9)),  # thalamus
        _sd_ellipsoid(ax, y, z, (13, 14, 10), (5, 11, 8)),  # caudate head
        _sd_ellipsoid(ax, y, z, (24, 3, 2), (6, 16, 10)),  # lentiform nucleus
    ])
    cv.paint(sl, nuclei < 0, t["deep_gm"])
    _paint_ventricles(cv, p)
    cv.paint(sl, _sd_ellipsoid(x, y, z, (0, -9, 1), (1.2 * v, 13, 8)) < 0, t["csf"])


def _paint_hindbrain(cv: _Canvas, p: dict, rng: np.random.Generator) -> None:
    """Foliated cerebellum, brainstem with the spinal cord, fourth ventricle."""
    t = p["tissue"]
    lo, hi = (-55, -90, -55), (55, -20, -8)
    sl, x, y, z = cv.box(lo, hi)
    depth = -_sd_cerebellum(x, y, z)
    wiggle = _rbf_noise(rng, (x, y, z), lo, hi, 6.0)
    (cx, cy, cz), _ = _CEREBELLUM
    theta = np.arctan2(z - cz, y - cy)
    folia = np.cos(26.0 * theta + 1.5 * wiggle) > 0.7
    core = 8.0 + 2.0 * wiggle
    cv.paint(sl, depth > 0, t["gm"])
    cv.paint(sl, depth > core, t["wm"])
    cv.paint(sl, (depth > 0) & (depth < core) & folia, t["csf"])
    sl, x, y, z = cv.box((-25, -70, -1e3), (25, 5, 10))
    cv.paint(sl, _sd_brainstem(x, y, z) < 0, t["stem"])
    cv.paint(sl, _sd_ellipsoid(x, y, z, (0, -34, -28), (6, 3.5, 7)) < 0, t["csf"])


def _template(size: int, spacing: float, p: dict, rng: np.random.Generator) -> np.ndarray:
    cv = _Canvas(size, spacing)
    _paint_head(cv, p, rng)
    _paint_cerebrum(cv, p, rng)
    _paint_deep(cv, p)
    _paint_hindbrain(cv, p, rng)
    return ndimage.gaussian_filter(cv.vol, 0.5, truncate=3.0)  # partial volume / scanner PSF


# --------------------------------------------------------------------------- public API
def phantom_affine(size: int, fov_mm: float = 256.0) -> np.ndarray:
    """RAS+ affine of a PSR-stored ``size``**3 grid of ``fov_mm`` centred on the world origin."""
    sp = fov_mm / size
    m = (size - 1) / 2.0
    aff = np.zeros((4, 4))
    aff[0, 2] = sp  # axis 2 -> +x (right)
    aff[1, 0] = -sp  # axis 0 -> -y (posterior)
    aff[2, 1] = sp  # axis 1 -> +z (superior)
    aff[:3, 3] = -aff[:3, :3] @ np.full(3, m)
    aff[3, 3] = 1.0
    return aff


def make_phantom(
    size: int = 128, rng: np.random.Generator | None = None, fov_mm: float = 256.0
) -> tuple[np.ndarray, np.ndarray]:
    """One synthetic T1w head: ``(volume float32 (size,)*3 stored PSR, RAS+ 4x4 affine)``.

    Voxels are isotropic ``fov_mm / size`` mm. ``rng`` drives every per-subject variation. The
    anatomy is sized in mm (adult head), so a ``fov_mm`` below ~240 crops it.
    """
    if size < 8 or fov_mm <= 0:
        raise ValueError(f"make_phantom: need size >= 8 and fov_mm > 0, got {size}, {fov_mm}")
    rng = np.random.default_rng() if rng is None else rng
    sp = fov_mm / size
    p = _subject_params(rng)
    template = _template(size, sp, p, rng)
    affine = phantom_affine(size, fov_mm)
    full = _template_index_map(size, sp, p) @ affine  # output voxel -> template voxel
    vol = ndimage.affine_transform(template, full[:3, :3], full[:3, 3], output_shape=(size,) * 3,
                                   order=1, mode="nearest")
    vol *= np.exp(p["bias"] * _bias_field(rng, size, sp))
    sigma = np.float32(p["noise"])
    real = vol + sigma * rng.standard_normal(vol.shape, dtype=np.float32)
    imag = sigma * rng.standard_normal(vol.shape, dtype=np.float32)
    vol = np.sqrt(real * real + imag * imag)
    vol *= np.float32(p["gain"])
    return vol.astype(np.float32, copy=False), affine


def _template_index_map(size: int, spacing: float, p: dict) -> np.ndarray:
    """4x4 map world (mm) -> template voxel: inverse of the subject's scale, rotation, shift."""
    ac_to_grid = np.array([0.0, 0.0, _AC_WORLD_Z])
    centre_w = _HEAD_CENTRE + ac_to_grid + p["shift"]
    lin = np.diag(1.0 / p["scale"]) @ _rotation(p["angles"]).T
    out = np.eye(4)
    out[:3, :3] = lin / spacing
    out[:3, 3] = (_HEAD_CENTRE - lin @ centre_w + ac_to_grid) / spacing + (size - 1) / 2
    return out


def _bias_field(rng: np.random.Generator, size: int, spacing: float) -> np.ndarray:
    """Smooth unit-variance field on the output grid (about 50 mm correlation)."""
    ax = ((np.arange(size) - (size - 1) / 2) * spacing).astype(np.float32)
    coords = (ax[:, None, None], ax[None, :, None], ax[None, None, :])
    return _rbf_noise(rng, coords, (-150,) * 3, (150,) * 3, 50.0)


def _save_t1w(volume: np.ndarray, affine: np.ndarray, path: Path) -> None:
    save_nifti(np.clip(np.rint(volume), 0, np.iinfo(np.int16).max), affine, path, dtype=np.int16)


def write_phantom_cohort(
    dst: str | os.PathLike,
    subjects: int = 24,
    size: int = 128,
    seed: int = 0,
    progress: bool = True,
    overwrite: bool = False,
) -> list[Path]:
    """Write a BIDS tree of ``subjects`` phantoms under ``dst``; returns the T1w file paths.

    Subject ``i`` (1-based) is drawn from ``default_rng([seed, i])``, so it does not depend on
    ``subjects``. A non-empty ``dst`` is refused unless ``overwrite`` (same-named files are
    then replaced; nothing else is deleted). Images are stored int16, scanner range.
    """
    dst = Path(dst)
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())) and not overwrite:
        raise FileExistsError(f"{dst}: folder exists and is not empty (use overwrite=True)")
    dst.mkdir(parents=True, exist_ok=True)
    description = {
        "Name": "MRNGAN synthetic T1w head phantoms",
        "BIDSVersion": "1.8.0",
        "DatasetType": "raw",
        "GeneratedBy": [{"Name": "monai_mrngan.data.phantoms",
                         "Description": f"synthetic phantoms, seed={seed}, size={size}"}],
    }
    rows, written = ["participant_id\tage\tsex"], []
    for i in range(1, subjects + 1):
        sub = f"sub-{i:03d}"
        rng = np.random.default_rng([seed, i])
        age, sex = int(rng.integers(20, 86)), str(rng.choice(["F", "M"]))
        volume, affine = make_phantom(size, rng)
        path = dst / sub / "anat" / f"{sub}_T1w.nii.gz"
        _save_t1w(volume, affine, path)
        rows.append(f"{sub}\t{age}\t{sex}")
        written.append(path)
        if progress:
            print(f"phantoms: {i}/{subjects} {sub}", file=sys.stderr, flush=True)
    save_json(description, dst / "dataset_description.json")
    with atomic_path(dst / "participants.tsv") as tmp:
        tmp.write_text("\n".join(rows) + "\n")
    return written
