"""The atlas scan and fit as a few batched tensor operations (all atlases, and several input slices, at once).

:class:`~monai_mrngan.atlas.prior.BrainPrior` calls these; they work on any device the bank is on.

- :class:`WorkBank`: the bank once at the registration's work size (fp16 blurred slices, head moments), so
  a scan over atlases x candidate positions reads small slices instead of resampling full ones;
- :func:`gather_slices`: slices of chosen atlases at chosen positions (linear in ``p``) in one gather;
- :func:`scan`: NCC of every atlas at every candidate position after the head-moment alignment,
  and that alignment (``theta``), which the fit starts from (refinement and fit share it);
- :func:`fit_batch`: the fit of :meth:`BrainPrior.fit` for N input slices together: per-atlas
  position choice, affine refinement of all atlases, deformable refinement of the preselected,
  the ``top_k`` kept;
- :func:`warp_fits`: those atlases' volumes (or only the grid slices asked for) warped and averaged;
- :func:`monotone_lut` / :func:`apply_lut`: with ``intensity="monotone"``, the averaged prior's intensities
  mapped to the input slice's contrast (a monotone regression at the input position; air stays 0).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from ..data.positions import HEAD_THRESHOLD
from .registration import FitConfig, SliceFit, affine_grid, align, gauss_blur, head_sums, identity_theta, intensity_map, ncc, theta_from_sums, warp

__all__ = ["WorkBank", "ScanResult", "bracket", "gather_slices", "scan", "moment_match", "fit_batch", "warp_fits", "to_unit", "monotone_lut", "apply_lut"]

CHUNK_PIXELS = 2**24  # pixels per chunk when building the work-size bank (64 MiB in float32)
# pixels per chunk when warping fitted volumes: each chunk's gathered slices, sampling grids and warped
# slices (4-8 MiB each) stay in cache. 2**24 read and wrote them through memory: a one-slice fit at 128 px
# took 1.13-1.41 s, against 0.74-0.87 s at 2**20 (2 cores, AVX2; 2**18 and 2**16 no faster).
WARP_CHUNK_PIXELS = 2**20
LUT_BINS = 16  # bins (knots) of the monotone intensity lookup table


def to_unit(x: torch.Tensor) -> torch.Tensor:
    """A stored bank tensor (uint8 quantised, or float) as float32 in [0, 1]."""
    return x.float() / 255.0 if x.dtype == torch.uint8 else x.float()


def bracket(grid: torch.Tensor, p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Grid indices below / above each ``p`` (clamped to the grid's range) and the weight of the upper one."""
    p = p.to(grid).clamp(grid[0], grid[-1])
    hi = torch.searchsorted(grid, p).clamp(1, len(grid) - 1)
    lo = hi - 1
    return lo, hi, ((p - grid[lo]) / (grid[hi] - grid[lo]).clamp_min(1e-12)).float()


def gather_slices(bank: torch.Tensor, grid: torch.Tensor, atlas: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """Slices (N, 1, H, W) float32 of ``bank`` (K, P, H, W) for atlas ``atlas[i]`` at position ``p[i]``,
    linear between the grid positions ``grid`` (P,) ascending, clamped to its range."""
    lo, hi, w = bracket(grid, p)
    if bool(((w < 1e-6) | (w > 1 - 1e-6)).all()):  # every p on the grid (candidates step as the grid does): one read
        return to_unit(bank[atlas, torch.where(w > 0.5, hi, lo)])[:, None]
    w = w.view(-1, 1, 1)
    return torch.lerp(to_unit(bank[atlas, lo]), to_unit(bank[atlas, hi]), w)[:, None]


class WorkBank:
    """The bank at ``size`` px (area-downsampled, as the registration sees it): ``blur`` (Gaussian
    ``sigma``, (K, P, size, size) fp16) for the NCC, and ``sums`` ((K, P, 3): :func:`head_sums`) for the
    head-moment alignment, so a scan reads neither full-size slices nor recomputes masks."""

    def __init__(self, bank: torch.Tensor, size: int, sigma: float):
        k, p = bank.shape[:2]
        self.size, self.sigma = int(size), float(sigma)
        self.blur = torch.empty(k, p, size, size, dtype=torch.float16, device=bank.device)
        self.sums = torch.empty(k, p, 3, device=bank.device)
        step = max(1, CHUNK_PIXELS // max(1, p * bank.shape[-1] * bank.shape[-2]))
        for a in range(0, k, step):
            x = to_unit(bank[a : a + step]).flatten(0, 1)[:, None]
            small = F.interpolate(x, size=(size, size), mode="area")
            self.sums[a : a + step] = head_sums(small).view(-1, p, 3)
            self.blur[a : a + step] = gauss_blur(small, sigma).view(-1, p, size, size).half()

    def head_sums(self, atlas: torch.Tensor, p: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
        """:func:`head_sums` (N, 3) of atlas ``atlas[i]`` at ``p[i]``, linear between grid slices."""
        lo, hi, w = bracket(grid, p)
        return torch.lerp(self.sums[atlas, lo], self.sums[atlas, hi], w.view(-1, 1))


@dataclass
class ScanResult:
    """Candidate positions (C,), NCC (K, C) and the moment alignment (K, C, 2, 3) of every atlas there."""

    cands: torch.Tensor
    score: torch.Tensor
    theta: torch.Tensor

    def columns(self, cands: torch.Tensor) -> "ScanResult | None":
        """The same scan restricted to ``cands`` when it holds all of them (else None)."""
        if cands.device != self.cands.device:
            return None
        d = (cands.view(-1, 1) - self.cands.view(1, -1)).abs()
        best, idx = d.min(1)
        if bool((best > 1e-6).any()):  # 1e-6 in p: 0.2 µm, float32 rounding of a position
            return None
        return ScanResult(self.cands[idx], self.score[:, idx], self.theta[:, idx])


def _small_ref(ref: torch.Tensor, work: WorkBank) -> tuple[torch.Tensor, torch.Tensor]:
    small = F.interpolate(ref.float(), size=(work.size, work.size), mode="area")
    return small, gauss_blur(small, work.sigma)


@torch.no_grad()
def scan(work: WorkBank, grid: torch.Tensor, ref: torch.Tensor, cands: torch.Tensor, mode: str = "affine") -> ScanResult:
    """Every atlas at every candidate position ``cands`` (C,) against the input ``ref`` (1, 1, H, W):
    moment alignment (identity for ``mode="none"``) and the NCC of the blurred slices after it."""
    k, c = work.blur.shape[0], len(cands)
    atlas = torch.arange(k, device=grid.device).repeat_interleave(c)
    p = cands.to(grid).repeat(k)
    fixed, fixed_blur = _small_ref(ref, work)
    sums = None if mode == "none" else work.head_sums(atlas, p, grid)
    score, theta = moment_match(gather_slices(work.blur, grid, atlas, p), sums, fixed, fixed_blur)
    return ScanResult(cands.to(grid), score.view(k, c), theta.view(k, c, 2, 3))


def moment_match(blur: torch.Tensor, sums: torch.Tensor | None, fixed: torch.Tensor, fixed_blur: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """NCC (M,) of blurred slices ``blur`` (M, 1, s, s) with ``fixed_blur`` (1, 1, s, s) after the head-moment alignment
    of each (its :func:`head_sums` ``sums`` (M, 3) against those of ``fixed``; None: no alignment), and that alignment (M, 2, 3):
    :func:`register_slices` without refinement, on slices whose blur and moments were computed once."""
    m = blur.shape[0]
    theta = identity_theta(m, blur.device) if sums is None else theta_from_sums(sums, head_sums(fixed))
    return ncc(warp(blur, affine_grid(theta, tuple(blur.shape[-2:]))), fixed_blur), theta


def fit_batch(bank: torch.Tensor, work: WorkBank, grid: torch.Tensor, refs: torch.Tensor, p0: torch.Tensor, allowed: torch.Tensor,
              scans: list[ScanResult], cfg: FitConfig, need: torch.Tensor | None = None,
              spread: bool = False) -> tuple[torch.Tensor, list[SliceFit], torch.Tensor | None]:
    """Fit the prior to N input slices together.

    ``refs`` (N, 1, H, W) in [0, 1] at positions ``p0`` (N,); ``allowed`` (N, K) which atlases each
    may use (subjects left out); ``scans[n]``: :func:`scan` of input n over its candidate positions
    (one candidate, ``p0``, without position search); ``need``, ``spread``: see :func:`warp_fits`.
    Returns the fitted volumes (N, P, H, W) on the grid, one :class:`SliceFit` per input
    (``atlas_index`` into the bank, ``shift`` the position offset of each kept atlas) and the atlases'
    spread (N, P, H, W) (None without ``spread``).
    """
    dev = grid.device
    n_in, k = allowed.shape
    # each atlas at its best-matching candidate position, with the moment alignment found there
    best = torch.stack([sc.score.argmax(1) for sc in scans])  # (N, K)
    shift = torch.stack([sc.cands[b] for sc, b in zip(scans, best)]) - p0.to(grid).view(-1, 1)  # (N, K)
    theta0 = torch.stack([sc.theta[torch.arange(k, device=dev), b] for sc, b in zip(scans, best)])  # (N, K, 2, 3)
    pair_n, pair_a = allowed.nonzero(as_tuple=True)  # the (input, atlas) pairs to align
    if cfg.prescreen > 0 and cfg.mode != "none":  # only the best-matching atlases after the moment alignment
        first = torch.stack([sc.score.max(1).values for sc in scans])[pair_n, pair_a]
        sel = _top_per_input(first, pair_n, n_in, cfg.prescreen).sort().values
        pair_n, pair_a = pair_n[sel], pair_a[sel]
    pair_p = p0.to(grid)[pair_n] + shift[pair_n, pair_a]
    mv = gather_slices(work.blur, grid, pair_a, pair_p)
    _, fixed_blur = _small_ref(refs, work)
    fx = fixed_blur[pair_n]
    th0 = theta0[pair_n, pair_a]
    m = cfg.preselect * cfg.top_k
    per_input = pair_n.bincount(minlength=n_in)
    if cfg.mode == "none":
        fit = align(mv, fx, th0, cfg, affine_iters=0, deform=False)
    elif cfg.mode == "deformable" and bool((per_input > m).any()):
        aff = align(mv, fx, th0, cfg, deform=False)
        sel = _top_per_input(aff.score, pair_n, n_in, m)
        fit = align(mv[sel], fx[sel], aff.theta[sel], cfg, affine_iters=0, deform=True)
        pair_n, pair_a, pair_p = pair_n[sel], pair_a[sel], pair_p[sel]
    else:
        fit = align(mv, fx, th0, cfg)
    keep = _top_per_input(fit.score, pair_n, n_in, cfg.top_k)
    pair_n, pair_a, pair_p = pair_n[keep], pair_a[keep], pair_p[keep]
    theta, disp, score = fit.theta[keep], fit.disp[keep], fit.score[keep]
    full = gather_slices(bank, grid, pair_a, pair_p)  # the kept atlases' slices at full size
    kfit = SliceFit(theta, disp, torch.ones_like(score), torch.zeros_like(score), pair_a, score)
    warped0 = warp(full, kfit.grid(tuple(bank.shape[-2:])))
    gain, offset = intensity_map(warped0, refs[pair_n]) if cfg.intensity != "none" else (kfit.gain, kfit.offset)
    luts = [None] * n_in
    if cfg.intensity == "monotone":  # the averaged prior at the input position, as warp_fits gives it there
        at_input = torch.zeros_like(refs).index_add_(0, pair_n, (warped0 * gain.view(-1, 1, 1, 1) + offset.view(-1, 1, 1, 1)).clamp(0, 1))
        at_input /= pair_n.bincount(minlength=n_in).clamp_min(1).view(-1, 1, 1, 1).float()
        luts = [monotone_lut(at_input[i], refs[i]) for i in range(n_in)]
    fits = []
    conf = asdict(cfg)
    for i in range(n_in):
        sel = (pair_n == i).nonzero(as_tuple=True)[0]
        f = SliceFit(theta[sel], disp[sel], gain[sel], offset[sel], pair_a[sel], score[sel], float(p0[i]), dict(conf), shift[i, pair_a[sel]], luts[i])
        f.config["shifts"] = f.shift.tolist()
        fits.append(f)
    vols, spreads = warp_fits(bank, grid, fits, need, cfg.decay, spread)
    return vols, fits, spreads


@torch.no_grad()  # fitted volumes are outputs, never trained through (and the spread is finished in place)
def warp_fits(bank: torch.Tensor, grid: torch.Tensor, fits: list[SliceFit], need: torch.Tensor | None = None, decay: float = 0.1,
              spread: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The fitted volumes (N, P, H, W) of :func:`fit_batch`'s ``fits``: every grid slice of each kept atlas
    (at its shift) warped by its transform, the displacement fading as ``exp(-|p - p0| / decay)``,
    intensity-mapped, clamped and averaged per input, then put through the input's lookup table (``lut``) if it
    has one. ``need`` (N, P) bool: only those grid slices are warped (the rest stay 0), so a few-slice
    reconstruction warps each input's gaps, not whole volumes. ``spread``: also the per-voxel standard
    deviation of the kept atlases around their mean (how much they disagree: a signal of the uncertainty
    map; before the lookup table), else None."""
    n_pos = len(grid)
    h, w = bank.shape[-2:]
    dev = grid.device
    need = torch.ones(len(fits), n_pos, dtype=torch.bool, device=dev) if need is None else need.to(dev)
    out = torch.zeros(len(fits), n_pos, h, w, device=dev)
    sq = torch.zeros_like(out) if spread else None  # sum of squares beside the sum
    pair_n = torch.cat([torch.full((len(f.atlas_index),), i, dtype=torch.long, device=dev) for i, f in enumerate(fits)])
    cat = {k: torch.cat([getattr(f, k) for f in fits]) for k in ("theta", "disp", "gain", "offset", "atlas_index", "shift")}
    p0 = torch.as_tensor([f.reference_position for f in fits], dtype=grid.dtype, device=dev)
    base = affine_grid(cat["theta"], (h, w))  # (M, H, W, 2)
    moves = bool(cat["disp"].any())
    disp = F.interpolate(cat["disp"], size=(h, w), mode="bicubic", align_corners=True).permute(0, 2, 3, 1) if moves else None
    scale = 1 / 255.0 if bank.dtype == torch.uint8 else 1.0  # folded into the gain: the slices are read raw
    jobs = need[pair_n].nonzero()  # (pair, grid slice) to warp
    step = max(1, WARP_CHUNK_PIXELS // (h * w))
    for c0 in range(0, len(jobs), step):
        j, q = jobs[c0 : c0 + step].unbind(1)
        lo, hi, frac = bracket(grid, grid[q] + cat["shift"][j].to(grid))
        a = cat["atlas_index"][j]
        exact = bool(((frac < 1e-6) | (frac > 1 - 1e-6)).all())  # shifts are multiples of the grid step: one read
        vol = bank[a, torch.where(frac > 0.5, hi, lo)].float() if exact else torch.lerp(bank[a, lo].float(), bank[a, hi].float(), frac.view(-1, 1, 1))
        if moves:
            weight = torch.exp(-(grid[q] - p0[pair_n[j]]).abs() / decay).float() if decay > 0 else torch.ones(len(j), device=dev)
            g = torch.addcmul(base[j], disp[j], weight.view(-1, 1, 1, 1))
        else:
            g = base[j]
        warped = warp(vol[:, None], g)[:, 0]
        warped.mul_((cat["gain"][j] * scale).view(-1, 1, 1)).add_(cat["offset"][j].view(-1, 1, 1)).clamp_(0, 1)
        # index_add_ along the flattened (input, grid slice) axis: the same sums as an accumulating index_put_,
        # at about half its CPU time (a 128 px fit's warps: 0.27 -> 0.16 s with the spread kept)
        rows = pair_n[j] * n_pos + q
        out.view(-1, h, w).index_add_(0, rows, warped)
        if sq is not None:
            sq.view(-1, h, w).index_add_(0, rows, warped.square_())  # warped is not read again
    count = pair_n.bincount(minlength=len(fits)).clamp_min(1).float().view(-1, 1, 1, 1)
    mean = out / count
    spreads = sq.div_(count).sub_(mean * mean).clamp_min_(0).sqrt_() if sq is not None else None  # in place: sq is done
    for i, f in enumerate(fits):
        if f.lut is not None:  # only the warped slices (the table is a search per voxel)
            mean[i][need[i]] = apply_lut(mean[i][need[i]], f.lut.to(mean))
    return mean, spreads


def monotone_lut(prior: torch.Tensor, ref: torch.Tensor, knots: int = LUT_BINS) -> torch.Tensor:
    """A monotone lookup table (2, Q) from ``prior`` intensities to ``ref``'s, fitted voxel by voxel over the head
    (the union of both slices' head masks): the head voxels in ``knots`` equal-count bins of ``prior``, each bin's
    mean ``prior`` -> its mean ``ref`` (a binned regression), made non-decreasing by pooling adjacent violators;
    ``(0, 0)`` is the first knot (air stays 0) and ``(1, y)`` the last (the top knot's gain carried on to 1, at most 1).

    A regression, not quantile matching: on IXI (6 test subjects) matching the quantiles of the blurred
    atlas average to those of a real slice sharpened its contrast and cost 0.4 dB unshifted; the
    conditional means keep the average's hedging where the anatomy does not correspond.
    """
    mask = (prior > HEAD_THRESHOLD) | (ref > HEAD_THRESHOLD)
    xs, ys = prior[mask].float(), ref[mask].float()
    if xs.numel() < 4 * knots:  # too little head to fit: identity
        x = torch.linspace(0, 1, 2, device=prior.device)
        return torch.stack([x, x])
    edges = torch.quantile(xs, torch.linspace(0, 1, knots + 1, device=xs.device)[1:-1])
    b = torch.bucketize(xs, edges)
    count = torch.bincount(b, minlength=knots).float()
    x = torch.bincount(b, xs, minlength=knots)
    y = torch.bincount(b, ys, minlength=knots)
    keep = count > 0
    x, y, count = (x[keep] / count[keep]).tolist(), (y[keep] / count[keep]).tolist(), count[keep].tolist()
    # pool adjacent violators (weighted by voxel count): isotonic regression of y on x over at most `knots` points
    blocks: list[list[float]] = []  # [count, sum x, sum y]
    for c, xi, yi in zip(count, x, y):
        blocks.append([c, c * xi, c * yi])
        while len(blocks) > 1 and blocks[-2][2] / blocks[-2][0] >= blocks[-1][2] / blocks[-1][0]:
            last = blocks.pop()
            blocks[-1] = [u + v for u, v in zip(blocks[-1], last)]
    kx = [0.0] + [min(max(bx / c, 1e-4), 1.0) for c, bx, _ in blocks]
    ky = [0.0] + [min(max(by / c, 0.0), 1.0) for c, _, by in blocks]
    px, py = [kx[0]], [ky[0]]
    for xi, yi in zip(kx[1:], ky[1:]):  # strictly increasing knots (a pooled block can share its neighbour's x)
        if xi > px[-1] + 1e-4:
            px.append(xi)
            py.append(max(yi, py[-1]))
    if px[-1] < 1.0:
        py.append(max(py[-1], min(1.0, py[-1] / px[-1])) if px[-1] > 0 else py[-1])
        px.append(1.0)
    return torch.tensor([px, py], dtype=torch.float32, device=prior.device)


def apply_lut(x: torch.Tensor, lut: torch.Tensor) -> torch.Tensor:
    """``x`` through the piecewise-linear lookup table ``lut`` (2, Q) (knots ascending), clamped to [0, 1].

    torch has no ``interp``; MONAI's piecewise-linear mapping is a method of ``RandHistogramShift``, not a function.
    """
    xs, ys = lut[0], lut[1]
    hi = torch.searchsorted(xs, x.reshape(-1).contiguous()).clamp(1, len(xs) - 1)
    lo = hi - 1
    t = ((x.reshape(-1) - xs[lo]) / (xs[hi] - xs[lo])).clamp(0, 1)
    return torch.lerp(ys[lo], ys[hi], t).reshape(x.shape).clamp(0, 1)


def _top_per_input(score: torch.Tensor, pair_n: torch.Tensor, n_in: int, m: int) -> torch.Tensor:
    """Indices of the ``m`` best-scoring pairs of each input (all of them where it has fewer), best first, input by input."""
    big = torch.full((n_in, int(pair_n.bincount(minlength=n_in).max())), float("-inf"), device=score.device)
    first = torch.searchsorted(pair_n, torch.arange(n_in, device=score.device))  # pairs are grouped by input
    col = torch.arange(len(pair_n), device=score.device) - first[pair_n]
    big[pair_n, col] = score
    vals, cols = big.topk(min(m, big.shape[1]), dim=1)
    idx = first.view(-1, 1) + cols
    return idx[torch.isfinite(vals)]
