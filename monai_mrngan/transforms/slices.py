"""Slice sampling from cached 3D volumes, as MONAI dictionary transforms.

Each transform takes a volume dictionary as produced by ``LoadImaged(ensure_channel_first=True)``
on a datalist entry (``image``: (1, H, W, D) RAS volume, ``positions``: the ``p`` of each of
the D axial indices) and returns a *list* of ``num_samples`` slice dictionaries, like MONAI's
``RandSpatialCropSamplesd``, so ``CacheDataset`` caches the loaded volumes and only the cheap
indexing runs per iteration. With ``num_samples=None`` they are deterministic and return every
valid sample in index order (for validation and evaluation).

Outputs are plain tensors (no MetaTensor metadata) so collation stays fast:
- :class:`AxialSliced`:        ``image`` (1, H, W), ``position`` (1,), ``slice_index``
- :class:`AdjacentSlicePaird`: ``image`` slice i, ``label`` slice i + direction, ``direction`` (1,)
  in {+1, -1} (+1 = next array index, towards the vertex in RAS), ``position`` / ``target_position``
- :class:`SliceRund`:           ``image`` (T, H, W) in generation order, ``positions`` (T,),
  ``direction`` (1,), ``slice_index`` of the first slice of the run; with ``starts_key`` a run
  starts only at the slice indices the volume dictionary lists there (e.g. the input slices of the
  fitted-prior cache), and ``carry_keys`` are copied into every run
- :class:`GapRund`:             a :class:`SliceRund` run plus the far end of the gap it fills:
  ``far_image`` (1, H, W) (zeros for an open run), ``far_position`` (1,) (NaN for an open run),
  ``gap`` (the far end's distance in slices, 0 for an open run); with ``slab_prob`` some runs' given slices
  (``image[0]`` and the far end) are thick slabs (:func:`slab_mean`) while the targets stay sharp; with
  ``cubic`` also ``cubic_image`` (T, H, W): :func:`axial_pchip` through the given slices around the gap at each
  slice of the run (zeros for an open run and past the far end)
- :class:`OpenRunsOnlyd`:       applies other transforms to open runs only (``far_position`` NaN or absent)

MONAI has crop samplers but none that carries a per-slice position or pairs slices along an
axis with a direction flag, hence these small transforms.
"""

from __future__ import annotations

from typing import Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import Compose, MapTransform, Randomizable
from monai.transforms.traits import MultiSampleTrait

from .slabs import slab_mean

__all__ = ["AxialSliced", "AdjacentSlicePaird", "SliceRund", "GapRund", "OpenRunsOnlyd", "axial_pchip"]

_PASS_THROUGH = ("subject", "session")


def _volume(data: Mapping, key: Hashable) -> torch.Tensor:
    img = data[key]
    img = img.as_tensor() if hasattr(img, "as_tensor") else torch.as_tensor(np.asarray(img))
    if img.ndim == 3:
        img = img[None]
    if img.ndim != 4:
        raise ValueError(f"{key!r} must be a (C, H, W, D) volume, got shape {tuple(img.shape)}")
    return img


def _positions(data: Mapping, key: str, depth: int) -> torch.Tensor:
    if key not in data:
        raise KeyError(f"volume dictionary has no {key!r}; prepare the dataset with `python -m monai_mrngan prepare`")
    pos = torch.as_tensor(np.asarray(data[key], dtype=np.float32))
    if pos.numel() != depth:
        raise ValueError(f"{key!r} has {pos.numel()} entries but the volume has {depth} axial slices")
    return pos


def axial_pchip(slices: torch.Tensor, at: Sequence[float] | np.ndarray, query: Sequence[float] | np.ndarray) -> torch.Tensor:
    """(M, ...) monotone cubic (PCHIP) interpolation per pixel through ``slices`` (N, ...) placed at axial
    coordinates ``at`` (N,), read at ``query`` (M,) inside their range: the one home of the cubic that the
    few-slice baseline (``inference.volume.cubic_fill``) and the cell's cubic candidate use. Two slices give
    the straight line. PCHIP is local, so between two slices it depends only on them and on one more on each
    side: a gap run that holds those four gets the same curve as the whole stack.

    scipy's ``PchipInterpolator``: neither MONAI nor torch interpolates along one axis through irregularly placed
    samples.
    """
    from scipy.interpolate import PchipInterpolator

    x = np.asarray(at, dtype=np.float64)
    q = np.asarray(query, dtype=np.float64)
    order = np.argsort(x)
    y = torch.as_tensor(slices, dtype=torch.float32)[torch.as_tensor(order)]
    x = x[order]
    if len(x) < 2:
        raise ValueError(f"PCHIP needs at least two slices, got {len(x)}")
    flat = y.reshape(len(x), -1).numpy().astype(np.float64)
    if len(x) == 2:  # scipy's PCHIP through two points is the line; this skips its setup
        t = ((q - x[0]) / (x[1] - x[0]))[:, None]
        out = (1.0 - t) * flat[0] + t * flat[1]
    else:
        out = PchipInterpolator(x, flat, axis=0)(q)
    return torch.from_numpy(out.astype(np.float32)).reshape(len(q), *y.shape[1:])


class _SliceSampler(Randomizable, MapTransform, MultiSampleTrait):
    """Shared machinery: choose sample indices (random or all) and build output dictionaries."""

    def __init__(
        self,
        keys: KeysCollection = "image",
        positions_key: str = "positions",
        num_samples: int | None = 1,
        allow_missing_keys: bool = False,
    ) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        if num_samples is not None and num_samples < 1:
            raise ValueError(f"num_samples must be >= 1 or None (all), got {num_samples}")
        self.positions_key = positions_key
        self.num_samples = num_samples

    def _starts(self, num_valid: int) -> np.ndarray:
        if num_valid <= 0:
            raise ValueError("volume too short for this sampler")
        if self.num_samples is None:
            return np.arange(num_valid)
        return self.R.randint(0, num_valid, size=self.num_samples)

    def _directions(self, count: int, directions: Sequence[int]) -> np.ndarray:
        if self.num_samples is None:
            return np.asarray([directions[0]] * count)
        return self.R.choice(np.asarray(directions), size=count)

    def _base(self, data: Mapping) -> dict:
        # identifiers as strings ("" for a missing session) so batches always collate
        return {k: "" if data[k] is None else str(data[k]) for k in _PASS_THROUGH if k in data}

    def randomize(self, data=None) -> None:  # randomness is drawn inside __call__ via self.R
        pass


class AxialSliced(_SliceSampler):
    """Sample axial slices with their anatomical position ``p``."""

    def __call__(self, data: Mapping) -> list[dict]:
        key = self.first_key(data)
        vol = _volume(data, key)
        pos = _positions(data, self.positions_key, vol.shape[-1])
        out = []
        for i in self._starts(vol.shape[-1]).tolist():
            d = self._base(data)
            for k in self.key_iterator(data):
                d[k] = _volume(data, k)[..., i].contiguous()
            d["position"] = pos[i : i + 1].clone()
            d["slice_index"] = i
            out.append(d)
        return out


class AdjacentSlicePaird(_SliceSampler):
    """Sample neighbouring slice pairs (i -> i + step * direction) with a direction flag.

    ``directions`` lists the allowed directions (+1, -1 or both); deterministic mode
    (``num_samples=None``) uses the first one.
    """

    def __init__(
        self,
        keys: KeysCollection = "image",
        label_key: str = "label",
        positions_key: str = "positions",
        num_samples: int | None = 1,
        directions: Sequence[int] = (1, -1),
        step: int = 1,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, positions_key, num_samples, allow_missing_keys)
        if not directions or any(d not in (1, -1) for d in directions):
            raise ValueError(f"directions must be a non-empty subset of (1, -1), got {directions}")
        if step < 1:
            raise ValueError(f"step must be >= 1, got {step}")
        self.label_key = label_key
        self.directions = tuple(int(d) for d in directions)
        self.step = int(step)

    def __call__(self, data: Mapping) -> list[dict]:
        key = self.first_key(data)
        vol = _volume(data, key)
        pos = _positions(data, self.positions_key, vol.shape[-1])
        lows = self._starts(vol.shape[-1] - self.step)
        dirs = self._directions(len(lows), self.directions)
        out = []
        for low, direction in zip(lows.tolist(), dirs.tolist()):
            src, dst = (low, low + self.step) if direction > 0 else (low + self.step, low)
            d = self._base(data)
            d[key] = vol[..., src].contiguous()
            d[self.label_key] = vol[..., dst].contiguous()
            d["direction"] = torch.tensor([float(direction)])
            d["position"] = pos[src : src + 1].clone()
            d["target_position"] = pos[dst : dst + 1].clone()
            d["slice_index"] = src
            out.append(d)
        return out


class SliceRund(_SliceSampler):
    """Sample contiguous runs of ``run_length`` slices, in generation order, with positions.

    A run in direction -1 starts at a higher index and walks down, so ``image[0]`` is always the
    slice generation starts from.
    """

    def __init__(
        self,
        keys: KeysCollection = "image",
        run_length: int = 8,
        positions_key: str = "positions",
        num_samples: int | None = 1,
        directions: Sequence[int] = (1, -1),
        allow_missing_keys: bool = False,
        starts_key: str | None = None,
        carry_keys: Sequence[str] = (),
    ) -> None:
        super().__init__(keys, positions_key, num_samples, allow_missing_keys)
        if run_length < 2:
            raise ValueError(f"run_length must be >= 2, got {run_length}")
        if not directions or any(d not in (1, -1) for d in directions):
            raise ValueError(f"directions must be a non-empty subset of (1, -1), got {directions}")
        self.run_length = int(run_length)
        self.directions = tuple(int(d) for d in directions)
        self.starts_key = starts_key
        self.carry_keys = tuple(carry_keys)

    def _plan(self, depth: int) -> list[tuple[int, int, int]]:
        """(start index, direction, gap k: 0 = open run) per sample."""
        lows = self._starts(depth - self.run_length + 1)
        dirs = self._directions(len(lows), self.directions)
        return [(low if d > 0 else low + self.run_length - 1, d, 0) for low, d in zip(lows.tolist(), dirs.tolist())]

    def _fits(self, start: int, reach: int, depth: int) -> list[int]:
        """The directions in which a run reaching ``reach`` slices beyond ``start`` stays inside the volume."""
        return [d for d in self.directions if 0 <= start + d * reach < depth]

    def _given_starts(self, data: Mapping, depth: int) -> list[int]:
        """The listed start indices (``starts_key``) from which an open run fits in some direction."""
        if self.starts_key not in data:
            raise KeyError(f"volume dictionary has no {self.starts_key!r} (the allowed run starts); is the prior cache loaded?")
        listed = sorted({int(i) for i in np.asarray(data[self.starts_key]).reshape(-1)})
        starts = [i for i in listed if self._fits(i, self.run_length - 1, depth)]
        if not starts:
            raise ValueError(f"no run of {self.run_length} slices fits from any of the given starts {listed} in a volume of {depth} slices")
        return starts

    def _plan_from(self, starts: list[int], depth: int) -> list[tuple[int, int, int]]:
        """:meth:`_plan` with runs starting only at ``starts``: a random start, then a random direction that fits."""
        span = self.run_length - 1
        if self.num_samples is None:
            return [(i, self._fits(i, span, depth)[0], 0) for i in starts]
        plan = []
        for i in self.R.choice(np.asarray(starts), size=self.num_samples).tolist():
            plan.append((i, int(self.R.choice(np.asarray(self._fits(i, span, depth)))), 0))
        return plan

    def _given_ends(self, d: dict, key: Hashable, vol: torch.Tensor, pos: torch.Tensor, start: int, direction: int, gap: int,
                    thickness: float | None = None) -> None:
        """Hook for samplers that shape the run's given slices: add the far end of its gap, thicken them (none here);
        ``thickness``: a slab thickness the plan fixed for this run (None: the sampler's own draw)."""

    def __call__(self, data: Mapping) -> list[dict]:
        key = self.first_key(data)
        vol = _volume(data, key)
        depth = vol.shape[-1]
        pos = _positions(data, self.positions_key, depth)
        if depth < self.run_length:
            raise ValueError(f"volume has {depth} slices, fewer than run_length {self.run_length}")
        plan = self._plan(depth) if self.starts_key is None else self._plan_from(self._given_starts(data, depth), depth)
        out = []
        for start, direction, gap, *planned in plan:  # a sampler's plan may fix a run's slab thickness too
            idx = start + direction * torch.arange(self.run_length)
            d = self._base(data)
            d.update({k: data[k] for k in self.carry_keys})
            d[key] = vol[0][..., idx].permute(2, 0, 1).contiguous()
            d["positions"] = pos[idx].clone()
            d["direction"] = torch.tensor([float(direction)])
            d["slice_index"] = int(start)
            self._given_ends(d, key, vol, pos, start, direction, gap, *planned)
            out.append(d)
        return out


class GapRund(SliceRund):
    """Runs of ``run_length`` slices, a mix of open runs and runs inside a bounded gap.

    With probability ``gap_fraction`` a run is a gap run: a spacing ``k`` is drawn uniformly from
    ``min_gap .. max_gap`` and the true slice ``k`` steps from the start, in the run's direction,
    is the run's far end (as if every k-th slice were given). ``k`` may exceed the run (the run
    covers the first ``run_length - 1`` slices of a longer gap) or fall inside it (the run passes
    its far end and continues as an open run, as the cell sees it). Open runs have no far end
    (``far_image`` zeros, ``far_position`` NaN, ``gap`` 0), like one-slice reconstruction.
    Deterministic mode (``num_samples=None``): every open run of the first direction, then (when
    ``gap_fraction > 0``) every gap run with ``k = max_gap`` in that direction. With ``starts_key``
    (see :class:`SliceRund`) runs start only at the listed slices, in a direction that fits.

    ``slab_prob``: the share of random runs whose given slices (the start ``image[0]`` and the far end) are thick
    slabs, :func:`slab_mean` over a thickness drawn from ``slab_slices`` (in slices; at most ``k`` for a gap run, as
    a thick-slice scan's slabs do not overlap), while the slices to generate stay sharp: a cell trained so learns to
    fill a thick-slice scan with the sharp anatomy between its slabs, not with more slab blur. 0 (the default) draws
    nothing, so runs are as before; deterministic mode never makes slabs.

    ``slab_contiguous``: slab runs are drawn like a thick-slice acquisition instead: with probability ``slab_prob`` a
    random run is a gap run with ``k`` drawn from ``slab_gaps`` and slabs as thick as the gap (contiguous slabs, as
    5 mm slices on a 2 mm grid); every other run is drawn as without slabs and has sharp given slices.

    ``cubic``: gap runs also carry ``cubic_image`` (T, H, W), :func:`axial_pchip` at each slice of the run up to
    its far end through the given slices of the regular ``k`` grid around the gap (the one before the start, the
    start, the far end and the one after it, where the volume holds them; slabs like the ends), as the whole
    stack's PCHIP gives it at inference; zeros past the far end and for open runs (the cell's ``cubic`` candidate).
    """

    def __init__(
        self,
        keys: KeysCollection = "image",
        run_length: int = 8,
        positions_key: str = "positions",
        num_samples: int | None = 1,
        directions: Sequence[int] = (1, -1),
        gap_fraction: float = 0.5,
        min_gap: int = 2,
        max_gap: int = 16,
        allow_missing_keys: bool = False,
        starts_key: str | None = None,
        carry_keys: Sequence[str] = (),
        slab_prob: float = 0.0,
        slab_slices: Sequence[float] = (1.5, 3.0),
        cubic: bool = False,
        slab_contiguous: bool = False,
        slab_gaps: Sequence[int] = (2, 5),
    ) -> None:
        super().__init__(keys, run_length, positions_key, num_samples, directions, allow_missing_keys, starts_key, carry_keys)
        self.cubic = bool(cubic)
        if len(slab_gaps) != 2 or not 2 <= slab_gaps[0] <= slab_gaps[1]:
            raise ValueError(f"slab_gaps must be (low, high) with 2 <= low <= high, got {slab_gaps}")
        self.slab_contiguous, self.slab_gaps = bool(slab_contiguous), (int(slab_gaps[0]), int(slab_gaps[1]))
        if not 0.0 <= gap_fraction <= 1.0:
            raise ValueError(f"gap_fraction must be in [0, 1], got {gap_fraction}")
        if not 2 <= min_gap <= max_gap:
            raise ValueError(f"need 2 <= min_gap <= max_gap, got {min_gap}, {max_gap}")
        if not 0.0 <= slab_prob <= 1.0:
            raise ValueError(f"slab_prob must be in [0, 1], got {slab_prob}")
        if len(slab_slices) != 2 or not 1.0 <= slab_slices[0] <= slab_slices[1]:
            raise ValueError(f"slab_slices must be (low, high) with 1 <= low <= high, got {slab_slices}")
        self.gap_fraction, self.min_gap, self.max_gap = float(gap_fraction), int(min_gap), int(max_gap)
        self.slab_prob, self.slab_slices = float(slab_prob), (float(slab_slices[0]), float(slab_slices[1]))

    def _plan(self, depth: int) -> list[tuple]:
        """(start index, direction, gap k or 0[, slab thickness with ``slab_contiguous``]) per sample."""
        span = self.run_length - 1
        if self.num_samples is None:
            d = self.directions[0]
            plan = [(low if d > 0 else low + span, d, 0) for low in range(depth - span)]
            if self.gap_fraction > 0:
                far = max(span, self.max_gap)
                plan += [(low if d > 0 else low + far, d, self.max_gap) for low in range(depth - far)]
            return plan
        plan = []
        for _ in range(self.num_samples):
            d = int(self.R.choice(np.asarray(self.directions)))
            k, thickness = self._draw_gap()
            reach = max(span, k)
            if reach >= depth:  # the volume cannot hold this gap: an open run instead
                k, reach, thickness = 0, span, 1.0
            low = int(self.R.randint(0, depth - reach))
            plan.append((low if d > 0 else low + reach, d, k) + ((thickness,) if self.slab_contiguous else ()))
        return plan

    def _draw_gap(self) -> tuple[int, float]:
        """A random run's gap ``k`` (0: an open run) and, with ``slab_contiguous``, its slab thickness (1: sharp)."""
        if self.slab_contiguous and self.slab_prob > 0 and self.R.rand() < self.slab_prob:
            k = int(self.R.randint(self.slab_gaps[0], self.slab_gaps[1] + 1))
            return k, float(k)
        return (int(self.R.randint(self.min_gap, self.max_gap + 1)) if self.R.rand() < self.gap_fraction else 0), 1.0

    def _plan_from(self, starts: list[int], depth: int) -> list[tuple]:
        """:meth:`_plan` from the given starts: a random start, gap k (or an open run) as in :meth:`_plan`,
        then a random direction in which the run and its far end fit (none: an open run from that start)."""
        span = self.run_length - 1
        if self.num_samples is None:
            plan = [(i, self._fits(i, span, depth)[0], 0) for i in starts]
            if self.gap_fraction > 0:
                far = max(span, self.max_gap)
                plan += [(i, self._fits(i, far, depth)[0], self.max_gap) for i in starts if self._fits(i, far, depth)]
            return plan
        plan = []
        for _ in range(self.num_samples):
            i = int(self.R.choice(np.asarray(starts)))
            k, thickness = self._draw_gap()
            dirs = self._fits(i, max(span, k), depth)
            if not dirs:  # this start cannot hold this gap: an open run instead
                k, dirs, thickness = 0, self._fits(i, span, depth), 1.0
            plan.append((i, int(self.R.choice(np.asarray(dirs))), k) + ((thickness,) if self.slab_contiguous else ()))
        return plan

    def _slab(self, gap: int) -> float:
        """This run's slab thickness in slices (1: sharp given slices); draws only when ``slab_prob`` > 0."""
        if self.num_samples is None or self.slab_prob <= 0 or self.R.rand() >= self.slab_prob:
            return 1.0
        thickness = float(self.R.uniform(*self.slab_slices))
        return min(thickness, float(gap)) if gap else thickness

    def _given_ends(self, d: dict, key: Hashable, vol: torch.Tensor, pos: torch.Tensor, start: int, direction: int, gap: int,
                    thickness: float | None = None) -> None:
        thickness = self._slab(gap) if thickness is None else thickness
        given = (lambda i: slab_mean(vol[0], i, thickness)) if thickness > 1.0 else (lambda i: vol[0][..., i])
        if thickness > 1.0:
            d[key][0] = given(start)
        if gap:
            far = start + direction * gap
            d["far_image"] = given(far)[None].clone()
            d["far_position"] = pos[far : far + 1].clone()
        else:
            d["far_image"] = torch.zeros_like(vol[0][..., start][None])
            d["far_position"] = torch.tensor([float("nan")])
        d["gap"] = gap
        if self.cubic:
            d["cubic_image"] = self._cubic(d[key], vol, start, direction, gap, given)

    def _cubic(self, run: torch.Tensor, vol: torch.Tensor, start: int, direction: int, gap: int, given) -> torch.Tensor:  # noqa: ANN001
        """(T, H, W): the PCHIP through the run's given slices at each of its slices up to the far end, zeros after."""
        out = torch.zeros_like(run)
        if not gap:
            return out
        depth = vol.shape[-1]
        nodes = [i for i in (start - direction * gap, start, start + direction * gap, start + direction * 2 * gap) if 0 <= i < depth]
        steps = min(gap, run.shape[0] - 1)
        query = start + direction * np.arange(steps + 1)
        out[: steps + 1] = axial_pchip(torch.stack([given(i) for i in nodes]), nodes, query)
        out[0] = run[0]  # the start itself, exactly as the run gives it (a slab when the ends are slabs)
        return out


class OpenRunsOnlyd(Randomizable):
    """Applies ``transforms`` (a MONAI transform or a list of them) to open runs only: run dictionaries whose
    ``far_position`` is NaN or absent (one-slice mode); gap runs pass through untouched. MONAI's
    transforms choose by chance (``prob``), not by what a sample holds, hence this wrapper."""

    def __init__(self, transforms) -> None:  # noqa: ANN001 (a transform or a sequence of them, as Compose takes)
        self.transforms = Compose(transforms)

    def set_random_state(self, seed: int | None = None, state: np.random.RandomState | None = None) -> "OpenRunsOnlyd":
        self.transforms.set_random_state(seed, state)
        return self

    def randomize(self, data: object = None) -> None:  # the wrapped transforms draw for themselves
        pass

    def __call__(self, data: Mapping) -> Mapping:
        far = data.get("far_position")
        if far is None or not bool(torch.isfinite(torch.as_tensor(far, dtype=torch.float32)).any()):
            return self.transforms(data)
        return data
