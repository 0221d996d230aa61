"""The atlas scan and fit as a few batched tensor operations (all atlases, and several input slices, at once).

:class:`~monai_mrngan.atlas.prior.BrainPrior` calls these; they work on any device the bank is on.

- :class:`WorkBank`: the bank once at the registration's work size (fp16, plain and blurred), so
  a scan over atlases x candidate positions reads small slices instead of resampling full ones;
- :func:`gather_slices`: slices of chosen atlases at chosen positions (linear in ``p``) in one gather;
- :func:`scan`: NCC of every atlas at every candidate position after the head-moment alignment,
  and that alignment (``theta``), which the fit starts from (refinement and fit share it);
- :func:`fit_batch`: the fit of :meth:`BrainPrior.fit` for N input slices together: per-atlas
  position choice, affine refinement of all atlases, deformable refinement of the preselected,
  the ``top_k`` kept, and their volumes warped and averaged.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from .registration import FitConfig, SliceFit, affine_grid, align, gauss_blur, identity_theta, intensity_map, moment_theta, ncc, warp

__all__ = ["WorkBank", "ScanResult", "gather_slices", "scan", "fit_batch", "to_unit"]

CHUNK_PIXELS = 2**24  # pixels per chunk when building the work-size bank or warping volumes (64 MiB in float32)


def to_unit(x: torch.Tensor) -> torch.Tensor:
    """A stored bank tensor (uint8 quantised, or float) as float32 in [0, 1]."""
    return x.float() / 255.0 if x.dtype == torch.uint8 else x.float()


def gather_slices(bank: torch.Tensor, grid: torch.Tensor, atlas: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """Slices (N, 1, H, W) float32 of ``bank`` (K, P, H, W) for atlas ``atlas[i]`` at position ``p[i]``,
    linear between the grid positions ``grid`` (P,) ascending, clamped to its range."""
    p = p.to(grid).clamp(grid[0], grid[-1])
    hi = torch.searchsorted(grid, p).clamp(1, len(grid) - 1)
    lo = hi - 1
    w = ((p - grid[lo]) / (grid[hi] - grid[lo]).clamp_min(1e-12)).float()
    if bool(((w < 1e-6) | (w > 1 - 1e-6)).all()):  # every p on the grid (candidates step as the grid does): one read
        return to_unit(bank[atlas, torch.where(w > 0.5, hi, lo)])[:, None]
    w = w.view(-1, 1, 1)
    return torch.lerp(to_unit(bank[atlas, lo]), to_unit(bank[atlas, hi]), w)[:, None]


class WorkBank:
    """The bank at ``size`` px (area-downsampled, as the registration sees it): ``raw`` for the head
    moments and ``blur`` (Gaussian ``sigma``) for the NCC, both (K, P, size, size) fp16."""

    def __init__(self, bank: torch.Tensor, size: int, sigma: float):
        k, p = bank.shape[:2]
        self.size, self.sigma = int(size), float(sigma)
        self.raw = torch.empty(k, p, size, size, dtype=torch.float16, device=bank.device)
        self.blur = torch.empty_like(self.raw)
        step = max(1, CHUNK_PIXELS // max(1, p * bank.shape[-1] * bank.shape[-2]))
        for a in range(0, k, step):
            x = to_unit(bank[a : a + step]).flatten(0, 1)[:, None]
            small = F.interpolate(x, size=(size, size), mode="area")
            self.raw[a : a + step] = small.view(-1, p, size, size).half()
            self.blur[a : a + step] = gauss_blur(small, sigma).view(-1, p, size, size).half()


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
    k, c = work.raw.shape[0], len(cands)
    atlas = torch.arange(k, device=grid.device).repeat_interleave(c)
    p = cands.to(grid).repeat(k)
    fixed, fixed_blur = _small_ref(ref, work)
    moving = gather_slices(work.raw, grid, atlas, p)
    theta = identity_theta(k * c, grid.device) if mode == "none" else moment_theta(moving, fixed)
    del moving
    mv = gather_slices(work.blur, grid, atlas, p)
    score = ncc(warp(mv, affine_grid(theta, (work.size, work.size))), fixed_blur)
    return ScanResult(cands.to(grid), score.view(k, c), theta.view(k, c, 2, 3))


def fit_batch(bank: torch.Tensor, work: WorkBank, grid: torch.Tensor, refs: torch.Tensor, p0: torch.Tensor, allowed: torch.Tensor,
              scans: list[ScanResult], cfg: FitConfig, spread: bool = False) -> tuple:
    """Fit the prior to N input slices together.

    ``refs`` (N, 1, H, W) in [0, 1] at positions ``p0`` (N,); ``allowed`` (N, K) which atlases each
    may use (subjects left out); ``scans[n]``: :func:`scan` of input n over its candidate positions
    (one candidate, ``p0``, without position search). Returns the fitted volumes (N, P, H, W) on
    the grid and one :class:`SliceFit` per input (``atlas_index`` into the bank); with ``spread``
    also the per-voxel standard deviation of the kept warped atlases around that mean (N, P, H, W).
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
    gain, offset = intensity_map(warped0, refs[pair_n]) if cfg.intensity == "linear" else (kfit.gain, kfit.offset)
    vols, spreads = _warp_volumes(bank, grid, pair_n, pair_a, shift[pair_n, pair_a], kfit, gain, offset, p0, n_in, cfg, spread)
    fits = []
    conf = asdict(cfg)
    for i in range(n_in):
        sel = (pair_n == i).nonzero(as_tuple=True)[0]
        f = SliceFit(theta[sel], disp[sel], gain[sel], offset[sel], pair_a[sel], score[sel], float(p0[i]), dict(conf))
        f.config["shifts"] = shift[i, pair_a[sel]].tolist()
        fits.append(f)
    return (vols, fits, spreads) if spread else (vols, fits)


def _top_per_input(score: torch.Tensor, pair_n: torch.Tensor, n_in: int, m: int) -> torch.Tensor:
    """Indices of the ``m`` best-scoring pairs of each input (all of them where it has fewer), best first, input by input."""
    big = torch.full((n_in, int(pair_n.bincount(minlength=n_in).max())), float("-inf"), device=score.device)
    first = torch.searchsorted(pair_n, torch.arange(n_in, device=score.device))  # pairs are grouped by input
    col = torch.arange(len(pair_n), device=score.device) - first[pair_n]
    big[pair_n, col] = score
    vals, cols = big.topk(min(m, big.shape[1]), dim=1)
    idx = first.view(-1, 1) + cols
    return idx[torch.isfinite(vals)]


def _warp_volumes(bank: torch.Tensor, grid: torch.Tensor, pair_n: torch.Tensor, pair_a: torch.Tensor, shift: torch.Tensor, fit: SliceFit,
                  gain: torch.Tensor, offset: torch.Tensor, p0: torch.Tensor, n_in: int, cfg: FitConfig,
                  spread: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Every grid slice of each kept atlas (at its shift) warped by its transform, the displacement
    fading as ``exp(-|p - p0| / decay)``, intensity-mapped, clamped and averaged per input: (N, P, H, W);
    with ``spread`` also their per-voxel standard deviation around that mean (else None)."""
    n_pos = len(grid)
    h, w = bank.shape[-2:]
    out = torch.zeros(n_in, n_pos, h, w, device=grid.device)
    sq = torch.zeros_like(out) if spread else None  # sum of squares beside the sum: the atlases' disagreement
    count = torch.zeros(n_in, device=grid.device)
    base = affine_grid(fit.theta, (h, w))  # (M, H, W, 2)
    moves = bool(fit.disp.any())
    disp = F.interpolate(fit.disp, size=(h, w), mode="bicubic", align_corners=True).permute(0, 2, 3, 1) if moves else None
    step = max(1, CHUNK_PIXELS // (n_pos * h * w))
    for j0 in range(0, len(pair_a), step):
        js = torch.arange(j0, min(j0 + step, len(pair_a)), device=grid.device)
        atlas = pair_a[js].repeat_interleave(n_pos)
        p = (grid.view(1, -1) + shift[js].view(-1, 1)).flatten()
        vol = gather_slices(bank, grid, atlas, p)  # (J*P, 1, H, W)
        g = base[js][:, None].expand(-1, n_pos, -1, -1, -1)
        if moves:
            weight = torch.exp(-(grid.view(1, -1) - p0.to(grid)[pair_n[js]].view(-1, 1)).abs() / cfg.decay).float() if cfg.decay > 0 \
                else torch.ones(len(js), n_pos, device=grid.device)
            g = g + disp[js][:, None] * weight[..., None, None, None]
        warped = warp(vol, g.reshape(-1, h, w, 2)).view(len(js), n_pos, h, w)
        warped = (warped * gain[js].view(-1, 1, 1, 1) + offset[js].view(-1, 1, 1, 1)).clamp(0, 1)
        out.index_add_(0, pair_n[js], warped)
        if sq is not None:
            sq.index_add_(0, pair_n[js], warped * warped)
        count.index_add_(0, pair_n[js], torch.ones(len(js), device=grid.device))
    n = count.clamp_min(1).view(-1, 1, 1, 1)
    mean = out / n
    return mean, ((sq / n - mean * mean).clamp_min(0).sqrt() if sq is not None else None)
