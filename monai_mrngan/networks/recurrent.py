"""The MRNGAN recurrent cell and the module that unrolls it along the axial axis.

The paper's cell is ``s_t = tanh(U x_t + W s_{t-1})``, ``o_t = softmax(V s_t)``, with
``x_t = cat(previous output, pix2pix(previous output), prior slice at p_t)``. Here ``U``, ``W`` and
``V`` are convolutions (slices are images), and the output head reads the softmax literally as a
per-pixel *blend* of the three candidate slices plus a small bounded correction, so the model starts
as a sensible mixture, trains quickly on a CPU and, far from the input, can lean on the prior
instead of compounding pix2pix errors. Two constant maps tell the cell where it is: ``p_t`` and the
distance travelled from the input slice ``min(1, 5 |p_t - p_0|)`` (saturating at 40 mm, so runs
far longer than the training runs look like the far end of those).

With ``far_end=True`` the cell also sees the far end of the gap it is filling (few-slice input):
``x_t`` gains the next given real slice, its distance ``min(1, 5 |p_far - p_t|)``, a flag map
(1: there is a far end) and the linear-interpolation weight of the far end seen from the previous
slice, ``w = |p_t - p_{t-1}| / |p_far - p_{t-1}|``; the far slice becomes a fourth blend candidate
whose logit is offset by ``logit(w)``, so the untrained cell fills a gap by exact linear
interpolation between its previous output mixture and the far end, and training learns what to
add. With no far end (one-slice input, the runs beyond the outermost given slices, or once a run
has passed its far end) the far slice is zeros, the distance 1, the flag and ``w`` 0 and the far
candidate's weight is 0, so one set of weights serves both modes. ``far_end=False`` is the paper's
three-input cell (old weights load).

With ``far_next=True`` (needs ``far_end``) the cell also sees pix2pix's prediction one step back
from the far end (``pix2pix(far, -direction)``, one call per run), and the far candidate becomes a
learned per-pixel mix of the far slice and that prediction (half each before training): the slices
just before a given one get pix2pix's estimate from that side, not a copy of it.

With ``interp=True`` (needs ``far_end``) the cell also sees, at each step, the slice that
registration-based interpolation between the run's start and its far end gives at ``p_t``
(``interp_fn`` of :meth:`MRNGAN.unroll`, computed once per run by the caller: the two ends registered
and moved partway towards each other); it is one more channel and one more blend candidate, masked like
the far slice when there is no far end. Without an ``interp_fn`` the channel holds the linear blend of
the two ends.

With ``cubic=True`` (needs ``far_end``) the cell also sees, at each step, the monotone cubic (PCHIP) through the
given slices around its gap at ``p_t`` (the run's start, its far end and one more given slice beyond each,
computed by the caller: ``cubic`` of :meth:`MRNGAN.unroll`); one more channel and blend candidate, masked like
the far slice. On thick slabs the cubic interpolation beats the linear one and the cell; measured in a retraining,
the candidate did not close that (mrngan docs; off in every preset).

With ``miss=True`` the cell also sees, at every step, how far the run's prior misses its real start
slice: ``|start - prior(p_0)|``, one map per run (not a blend candidate). The first state already
sees both, but a constant channel lets every step weigh the prior by how well it fits this head
(measured in retrainings with mismatched priors: no gain, mrngan docs; off in every preset).

With ``state_scale=2`` the encoder, the recurrent state and the head run on the step input
area-averaged to half the slice size, and only the blend (the head's weights and correction, upsampled
bilinearly) runs at full size, on the full-size candidates: a step costs about a third (most of it was
convolutions and ``tanh`` over 16 full-size channels), and fine detail still comes from the candidates.
The parameters are the same at any scale; the weights record the scale they were trained at and a
cell loading them runs at that scale.

- :class:`ConvRNNCell`: the paper's Elman cell, convolutional.
- :class:`ConvGRUCell`: a convolutional GRU (selectable with ``cell="gru"``).
- :class:`MRNGAN`: cell + output head; :meth:`MRNGAN.unroll` generates ``T`` slices from a start
  slice given callables for the next-slice prediction (pix2pix) and the prior; ``MRNGAN(x_t)``
  (``forward``) is one step from a zero state, for single-tensor tools (``verify_net_in_out``).

MONAI has no convolutional recurrent cell, hence these small modules.
"""

from __future__ import annotations

from typing import Callable

import logging
import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ConvRNNCell", "ConvGRUCell", "MRNGAN", "NextFn", "PriorFn", "OUTPUT_MODES", "CELLS"]

logger = logging.getLogger(__name__)

NextFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""``next_fn(slices (B,1,H,W) [0,1], direction (B,) +-1) -> (B,1,H,W)`` (pix2pix's prediction)."""
PriorFn = Callable[[torch.Tensor], torch.Tensor]
"""``prior_fn(positions (B,T)) -> (B,T,1,H,W)``: prior slices (already fitted to each sample's head)."""

OUTPUT_MODES = ("blend", "residual", "direct")
CELLS = ("rnn", "gru")
DIST_SCALE = 5.0  # distance map = min(1, 5 |p_t - p_0|): 1 from 40 mm away on
STEP_CHANNELS = ("previous", "pix2pix", "prior", "p", "distance",  # every cell
                 "far", "far_distance", "far_flag", "far_weight",  # far_end
                 "far_next",  # far_next
                 "interp",  # interp
                 "miss",  # miss
                 "cubic")  # cubic
"""The step input's channels in order, the one home of that order (:meth:`MRNGAN.forward` describes
each): a cell reads the first 5, with ``far_end`` the first 9, with ``far_next`` the first 10; ``interp``,
``miss`` and ``cubic`` add their channels after those (``MRNGAN.step_channels``)."""
CH = {name: i for i, name in enumerate(STEP_CHANNELS)}
"""Channel index of each name in :data:`STEP_CHANNELS`."""
CANDIDATES = ("previous", "pix2pix", "prior", "far", "far_next", "interp", "cubic")
"""The step input's slices that the blend mixes, in the order of the blend's logits."""


def _conv(cin: int, cout: int, k: int, bias: bool = True) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, k, padding=k // 2, bias=bias)


class ConvRNNCell(nn.Module):
    """``s_t = tanh(U * x_t + W * s_{t-1})`` with convolutions ``U``, ``W`` (kernel ``k``)."""

    def __init__(self, in_channels: int, hidden_channels: int, kernel_size: int = 3) -> None:
        super().__init__()
        self.hidden_channels = hidden_channels
        self.u = _conv(in_channels, hidden_channels, kernel_size)
        self.w = _conv(hidden_channels, hidden_channels, kernel_size, bias=False)

    def forward(self, x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.u(x) + self.w(s))


class ConvGRUCell(nn.Module):
    """Convolutional GRU: update gate ``z``, reset gate ``r``, candidate ``n``."""

    def __init__(self, in_channels: int, hidden_channels: int, kernel_size: int = 3) -> None:
        super().__init__()
        self.hidden_channels = hidden_channels
        self.gates = _conv(in_channels + hidden_channels, 2 * hidden_channels, kernel_size)
        self.cand_x = _conv(in_channels, hidden_channels, kernel_size)
        self.cand_s = _conv(hidden_channels, hidden_channels, kernel_size, bias=False)

    def forward(self, x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        z, r = torch.sigmoid(self.gates(torch.cat([x, s], 1))).chunk(2, 1)
        n = torch.tanh(self.cand_x(x) + r * self.cand_s(s))
        return (1 - z) * n + z * s


class MRNGAN(nn.Module):
    """Recurrent cell over (previous output, pix2pix(previous), prior(p_t)) with an output head.

    Args:
        cell: ``"rnn"`` (the paper's tanh cell) or ``"gru"``.
        hidden_channels: channels of the state ``s_t``.
        features: channels of the small input encoder before ``U`` (0: none, ``x_t`` goes to ``U``).
        kernel_size: convolution kernel of encoder, cell and head.
        output: ``"blend"`` (softmax weights over the three candidates + bounded correction),
            ``"residual"`` (previous output + bounded correction) or ``"direct"`` (sigmoid head).
        max_correction: bound of the additive correction (``tanh`` scaled), in [0, 1] intensity.
        init_weights: initial blend weights of (previous, pix2pix, prior) for ``"blend"``.
        far_end: the step input also holds the far end of the gap (slice, distance, flag, linear
            weight) and the far slice is a blend candidate, starting at its linear-interpolation
            weight; False: the paper's cell.
        far_next: with ``far_end``, pix2pix's prediction one step back from the far slice is one
            more input and mixes into the far candidate (a learned per-pixel share).
        state_scale: encoder, state and head run at ``1 / state_scale`` of the slice size (the
            blend of the candidates stays at full size); 1: everything at full size.
        both_ways: with ``far_end``, how reconstruction fills a gap between two given slices: two
            runs, one from each end (each knowing the other), blended by distance (True), or one
            run from the lower end (False). Not a weight: it does not change training.
        interp: with ``far_end``, the registration-based interpolation between the run's start and
            its far end at ``p_t`` is one more input channel and blend candidate (see the module docstring).
        miss: ``|start - prior(p_0)|`` (how far the prior misses the run's real start slice) is one more
            input channel at every step (see the module docstring).
    """

    def __init__(
        self,
        cell: str = "rnn",
        hidden_channels: int = 16,
        features: int = 16,
        kernel_size: int = 3,
        output: str = "blend",
        max_correction: float = 0.25,
        init_weights: tuple[float, float, float] = (0.2, 0.6, 0.2),
        far_end: bool = False,
        state_scale: int = 1,
        far_next: bool = False,
        both_ways: bool = True,
        interp: bool = False,
        miss: bool = False,
        cubic: bool = False,
    ) -> None:
        super().__init__()
        if far_next and not far_end:
            raise ValueError("far_next needs far_end")
        if interp and not far_end:
            raise ValueError("interp needs far_end")
        if cubic and not far_end:
            raise ValueError("cubic needs far_end")
        self.interp, self.miss, self.cubic = bool(interp), bool(miss), bool(cubic)
        self.far_next = bool(far_next)
        if int(state_scale) < 1:
            raise ValueError(f"state_scale must be a positive integer, got {state_scale!r}")
        self.state_scale = int(state_scale)
        # saved with the weights, so a cell always runs at the scale it was trained at
        self.register_buffer("trained_state_scale", torch.tensor(self.state_scale))
        if cell not in CELLS:
            raise ValueError(f"cell must be one of {CELLS}, got {cell!r}")
        if output not in OUTPUT_MODES:
            raise ValueError(f"output must be one of {OUTPUT_MODES}, got {output!r}")
        self.output, self.max_correction, self.far_end = output, float(max_correction), bool(far_end)
        self.both_ways = bool(both_ways) and self.far_end
        self.record_spread = False  # inference: unroll keeps last_candidate_spread (on during the mrngan runner's rollouts)
        last = "far_next" if self.far_next else "far_weight" if self.far_end else "distance"
        self.step_channels = STEP_CHANNELS[: CH[last] + 1] + tuple(n for n in ("interp", "miss", "cubic") if getattr(self, n))
        self.ch = {name: i for i, name in enumerate(self.step_channels)}
        in_ch = len(self.step_channels)
        self.in_channels = in_ch
        if features > 0:
            self.encoder: nn.Module = nn.Sequential(
                _conv(in_ch, features, kernel_size), nn.LeakyReLU(0.1), _conv(features, features, kernel_size), nn.LeakyReLU(0.1)
            )
            cell_in = features
        else:
            self.encoder, cell_in = nn.Identity(), in_ch
        self.cell = (ConvRNNCell if cell == "rnn" else ConvGRUCell)(cell_in, hidden_channels, kernel_size)
        # blend: 3 logits, [far logit, [interp logit], [cubic logit]], the correction, [far_next's share]
        head_out = {"blend": 4 + int(self.far_end) + int(self.interp) + int(self.cubic) + int(self.far_next), "residual": 1, "direct": 1}[output]
        self.head = nn.Sequential(
            _conv(hidden_channels + in_ch, hidden_channels, kernel_size), nn.LeakyReLU(0.1), _conv(hidden_channels, head_out, 1)
        )
        last = self.head[-1]
        nn.init.zeros_(last.weight)  # start from the plain blend / identity: no correction yet
        nn.init.zeros_(last.bias)
        if output == "blend":
            w = torch.tensor(init_weights, dtype=torch.float32).clamp_min(1e-3)
            with torch.no_grad():  # the far logit's bias stays 0: its weight starts at the linear weight
                last.bias[:3] = torch.log(w / w.sum())

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:  # noqa: ANN001
        """Weights run at the scale they were trained at: a cell built at another scale takes theirs
        (with a warning; the parameters are the same at every scale). Older weights ran at full size."""
        head = state_dict.get(prefix + "head.0.weight")
        if head is not None and head.shape[1] != self.head[0].weight.shape[1]:  # hidden + step-input channels
            got, want = head.shape[1] - self.head[0].out_channels, self.in_channels
            raise ValueError(f"MRNGAN weights for a {got}-channel step input, this cell reads {want} ({', '.join(self.step_channels)}): "
                             "set network_def far_end / far_next / interp / miss / cubic as they were in training")
        key = prefix + "trained_state_scale"
        trained = int(state_dict.get(key, 1))
        if trained != self.state_scale:
            logger.warning("MRNGAN weights trained with state_scale %d loaded into a cell built with %d: "
                           "running at %d, as trained", trained, self.state_scale, trained)
            self.state_scale = trained
        state_dict[key] = torch.tensor(trained)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def use_channels_last(self) -> "MRNGAN":
        """Hold the weights, and run every step, in the channels-last layout (inference on a CPU): the
        cell's small 3x3 convolutions ran a step 1.3-1.5x faster that way (128 px, two runs, 2 threads:
        best of 15, 0.34 -> 0.23 s under a load of 9), with identical outputs. Returns ``self``."""
        self.to(memory_format=torch.channels_last)
        self._channels_last = True
        return self

    def _layout(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if getattr(self, "_channels_last", False) else x

    def _pool(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` area-averaged to the state's size (itself at ``state_scale`` 1)."""
        if self.state_scale > 1:  # ceil_mode: a last partial window averages what it covers (any size)
            x = F.avg_pool2d(x, self.state_scale, ceil_mode=True)
        return x

    def _reduced(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` at the state's size, in the module's layout."""
        return self._layout(self._pool(x))

    def state_size(self, size: tuple[int, int] | torch.Size) -> tuple[int, int]:
        """The state's (H, W) for slices of ``size`` (H, W)."""
        return tuple(math.ceil(int(n) / self.state_scale) for n in size)  # type: ignore[return-value]

    def zero_state(self, x: torch.Tensor) -> torch.Tensor:
        """``s = 0`` for step inputs like ``x`` (B,C,H,W)."""
        return x.new_zeros(x.shape[0], self.cell.hidden_channels, *self.state_size(x.shape[-2:]))

    def init_state(self, x0: torch.Tensor) -> torch.Tensor:
        """``s_0`` from the input step ``x_0`` (the start slice, itself, the prior at ``p_0``)."""
        return self._first_state(self._reduced(x0), x0)

    def _first_state(self, xs: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """``s_0`` from the first step input already at the state's size ``xs``; ``like``: a full-size slice of the run."""
        return self.cell(self.encoder(xs), self.zero_state(like))

    def step(self, x: torch.Tensor, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One step: ``x`` (B,C,H,W) (channels as in :meth:`forward`) -> (slice (B,1,H,W), new state)."""
        if x.shape[1] != self.in_channels:
            raise ValueError(f"step input must have {self.in_channels} channels (far_end={self.far_end}), got {x.shape[1]}")
        candidates = [x[:, self.ch[name] : self.ch[name] + 1] for name in CANDIDATES if name in self.ch]
        return self._advance(self._reduced(x), s, candidates)

    def _advance(self, xs: torch.Tensor, s: torch.Tensor, candidates: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """The step from its input at the state's size ``xs`` and the full-size candidate slices
        (previous, pix2pix, prior, [far, [far_next]]): encoder, cell and head at the state's size, blend at
        full size. A far-end cell given only the first three (a run with no far end: its far weight would
        be exactly 0) leaves the far candidate out of the blend and upsamples only what the blend reads."""
        s = self.cell(self.encoder(xs), s)
        h = self.head(torch.cat([s, xs], 1))
        with_far = self.far_end and len(candidates) > 3
        extra = int(self.interp) + int(self.cubic)  # candidates between the ends: their logits follow the far one's
        n = 4 + extra if with_far else 3
        if self.output == "blend" and with_far:  # logit(linear weight) offset; no far end (flag 0): no weight
            lin = xs[:, CH["far_weight"] : CH["far_weight"] + 1].clamp(1e-4, 1.0 - 1e-4)
            none = 1e4 * (1.0 - xs[:, CH["far_flag"] : CH["far_flag"] + 1])
            logits = [h[:, :3], h[:, 3:4] + torch.log(lin / (1.0 - lin)) - none] + ([h[:, 4 : 4 + extra] - none] if extra else [])
            h = torch.cat(logits + [h[:, n:]], 1)
        elif self.output == "blend" and self.far_end:  # the three logits and the correction only
            c = 4 + extra
            h = torch.cat([h[:, :3], h[:, c : c + 1]], 1)
        if self.state_scale > 1:  # the blend logits and the correction, back to the slice size
            h = F.interpolate(h, size=candidates[0].shape[-2:], mode="bilinear", align_corners=False)
        prev = candidates[0]
        if self.output == "blend":
            w = torch.softmax(h[:, :n], 1)
            self.last_weights = w.detach()  # read by unroll: how much each candidate counted
            out = self.max_correction * torch.tanh(h[:, n : n + 1])
            if with_far and self.far_next:  # the far candidate: far slice and pix2pix's step back from it, mixed per pixel
                share = torch.sigmoid(h[:, n + 1 : n + 2])
                candidates = candidates[:3] + [(1.0 - share) * candidates[3] + share * candidates[4]] + candidates[5:]
            for i, c in enumerate(candidates[:n]):
                out = out + w[:, i : i + 1] * c
            if self.record_spread:  # how much the blended candidates disagree where the cell trusts them
                spread = sum(w[:, i : i + 1] * (c - out.detach()).abs() for i, c in enumerate(candidates[:n]))
                self.last_spread = spread.detach()
        elif self.output == "residual":
            out = prev + self.max_correction * torch.tanh(h)
        else:
            out = torch.sigmoid(h + 4.0 * (prev - 0.5))  # starts close to the previous slice
        return out.clamp(0.0, 1.0), s

    def forward(self, x: torch.Tensor, state: torch.Tensor | None = None) -> torch.Tensor:
        """ONE recurrent step as a plain module call: ``x`` (B,C,H,W) -> the output slice (B,1,H,W) in [0,1].

        ``x`` is the step input ``x_t`` exactly as :meth:`unroll` stacks it (channels: previous output,
        pix2pix prediction from it, prior slice at ``p_t``, ``p_t`` map, distance map
        ``min(1, 5 |p_t - p_0|)``; with ``far_end`` also the far slice, the far distance map
        ``min(1, 5 |p_far - p_t|)``, the far flag map and the far end's linear weight map
        ``|p_t - p_{t-1}| / |p_far - p_{t-1}|``; with ``far_next`` pix2pix's step back from the far slice, with
        ``interp`` the interpolation between the ends at ``p_t``, with ``miss`` ``|start - prior(p_0)|``, with ``cubic``
        the PCHIP through the given slices at ``p_t``; slices in [0, 1]; C = ``len(self.step_channels)``);
        ``state`` is ``s_{t-1}`` (B,hidden,H/state_scale,W/state_scale), zeros when
        None. Equals ``self.step(x, state)[0]``; this is the single-tensor entry point MONAI's
        ``verify_net_in_out`` and exporters call. Generating a volume needs :meth:`unroll` (it carries the state).
        """
        if state is None:
            state = self.zero_state(x)
        return self.step(x, state)[0]

    def _step_input(self, images: torch.Tensor, values: dict[str, torch.Tensor], maps: dict[str, torch.Tensor]) -> torch.Tensor:
        """The step input at the state's size from the candidate slices already at that size
        (B,K,h,w: the cell's candidates in :data:`CANDIDATES` order), per-sample ``values`` (B,) of the
        constant maps and other ``maps`` (B,1,h,w), by channel name, in the order of ``step_channels``."""
        b, _, hh, ww = images.shape
        parts = {name: images[:, i : i + 1] for i, name in enumerate(n for n in CANDIDATES if n in self.ch)} | maps
        parts.update({name: v.reshape(b, 1, 1, 1).to(images).expand(b, 1, hh, ww) for name, v in values.items()})
        return self._layout(torch.cat([parts[name] for name in self.step_channels], 1))

    def _far_values(self, far_p: torch.Tensor, p0: torch.Tensor, pt: torch.Tensor, p_prev: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Far-end values at ``p_t``: its flag (1: a far end still ahead) and the far channels' values (far
        distance ``min(1, 5 |p_far - p_t|)``, flag, linear weight); none once past it (NaN ``far_p``: none)."""
        ahead = torch.isfinite(far_p) & ((pt - p0).abs() <= (far_p - p0).abs() + 1e-6)
        flag = ahead.to(pt.dtype)
        far_p = torch.where(ahead, far_p, pt)
        dist = torch.where(ahead, (DIST_SCALE * (far_p - pt).abs()).clamp(max=1.0), torch.ones_like(pt))
        lin = torch.where(ahead, (pt - p_prev).abs() / (far_p - p_prev).abs().clamp_min(1e-8), torch.zeros_like(pt)).clamp(0.0, 1.0)
        return flag, {"far_distance": dist, "far_flag": flag, "far_weight": lin}

    def _inputs(self, prev, pix, prior, prior_small, ends, far_p, p0, pt, p_prev, between=None, miss=None, cubic=None) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(step input at the state's size, full-size candidates) at ``p_t``. ``prior_small``: the prior
        slice already at the state's size; ``ends``: the run's far slices ([far, [far_next]] at full size,
        the same at the state's size) or None (no run has a far end: the far channels are zeros and
        there is no far candidate); ``between``: with ``interp``, the interpolation between the ends at
        ``p_t`` (full size, state's size); ``miss``: with ``miss``, the run's miss map at the state's size; ``cubic``:
        with ``cubic``, the PCHIP at ``p_t`` (full size, state's size).
        Only the previous output and its pix2pix prediction are pooled here."""
        near = self._pool(torch.cat([prev, pix], 1))
        small, candidates = [near, prior_small], [prev, pix, prior]
        values = {"p": pt, "distance": (DIST_SCALE * (pt - p0).abs()).clamp(max=1.0)}
        if self.far_end:
            flag, far_values = self._far_values(far_p, p0, pt, p_prev)
            values.update(far_values)
            if ends is None:
                small.append(near.new_zeros(near.shape[0], 1 + int(self.far_next) + int(self.interp) + int(self.cubic), *near.shape[-2:]))
            else:  # a far end behind a run counts no more (flag 0): its slices are zeros
                f = flag.to(prev).view(-1, 1, 1, 1)
                inner = ([between] if self.interp else []) + ([cubic] if self.cubic else [])
                candidates += [x * f for x in ends[0]] + [x[0] * f for x in inner]
                small += [x * f for x in ends[1]] + [x[1] * f for x in inner]
        return self._step_input(torch.cat(small, 1), values, {"miss": miss} if self.miss else {}), candidates

    def unroll(
        self,
        start: torch.Tensor,
        positions: torch.Tensor,
        direction: torch.Tensor,
        next_fn: NextFn,
        prior_fn: PriorFn,
        far: torch.Tensor | None = None,
        far_positions: torch.Tensor | None = None,
        interp_fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
        cubic: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Generate slices 1..T-1 of a run from ``start`` (B,1,H,W) [0,1].

        ``positions`` (B,T): ``p`` of the start slice and of each slice to generate; ``direction``
        (B,) +-1 (array-index direction, handed to ``next_fn``). ``far`` (B,1,H,W) / ``far_positions``
        (B,): the given slice at the far end of each run's gap and its ``p`` (NaN: none); ignored by
        the paper cell (``far_end=False``). ``interp_fn(start, far, fractions (B,T)) -> (B,T,1,H,W)``: with
        ``interp``, the slices between each run's ends at those fractions of the way (e.g.
        :func:`~monai_mrngan.atlas.registration.interpolate_between`); None: the linear blend of the ends.
        ``cubic`` (B,T,1,H,W): with ``cubic``, the PCHIP through each run's given slices at ``positions`` (any values
        past the far end and for open runs, which are masked); None: the linear blend of the ends.
        Returns (B,T-1,H,W) in [0,1].
        """
        if start.ndim != 4 or start.shape[1] != 1:
            raise ValueError(f"start must be (B,1,H,W), got {tuple(start.shape)}")
        b = start.shape[0]
        positions = positions.to(start.device, start.dtype)
        direction = direction.to(start.device).reshape(-1)
        if far_positions is None:
            far, far_p = None, torch.full((b,), float("nan"), device=start.device, dtype=start.dtype)
        else:
            far_p = torch.as_tensor(far_positions).to(start.device, start.dtype).reshape(b)
            if far is None or tuple(far.shape) != tuple(start.shape):
                raise ValueError(f"far must be (B,1,H,W) like start {tuple(start.shape)} when far_positions are given")
            far = torch.nan_to_num(far.to(start))
        priors = prior_fn(positions).to(start)  # (B,T,1,H,W)
        priors_small = self._pool(priors.flatten(0, 1)).unflatten(0, priors.shape[:2])  # at the state's size, once per run
        ends = None  # the far slices at full and at the state's size, once per run; none: no far candidate
        if self.far_end and far is not None and bool(torch.isfinite(far_p).any()):
            # pix2pix one step back from the far end, once per run (far_next)
            full = [far] + ([next_fn(far, -direction).to(start)] if self.far_next else [])
            ends = (full, [self._pool(x) for x in full])
        p0 = positions[:, 0]
        between = cubics = [None] * positions.shape[1]  # per step: (full size, state's size) slices between the ends
        if (self.interp or self.cubic) and ends is not None:
            has = torch.isfinite(far_p)  # open runs: no far end, the candidates are masked; nothing to register
            frac = ((positions[has] - p0[has, None]).abs() / (far_p[has] - p0[has]).abs().clamp_min(1e-8)[:, None]).clamp(0, 1)

            def per_step(mid: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
                mid_small = self._pool(mid.flatten(0, 1)).unflatten(0, mid.shape[:2])
                return [(mid[:, t], mid_small[:, t]) for t in range(positions.shape[1])]

            def linear() -> torch.Tensor:
                mid = start.new_zeros(b, positions.shape[1], *start.shape[1:])
                mid[has] = torch.lerp(start[has, None], far[has, None], frac[..., None, None, None])
                return mid

            if self.interp:
                if interp_fn is None:
                    mid = linear()
                else:
                    mid = start.new_zeros(b, positions.shape[1], *start.shape[1:])
                    mid[has] = interp_fn(start[has], far[has], frac).to(start)
                between = per_step(mid)
            if self.cubic:
                if cubic is not None and tuple(cubic.shape) != (b, positions.shape[1], *start.shape[1:]):
                    raise ValueError(f"cubic must be (B,T,1,H,W) = {(b, positions.shape[1], *start.shape[1:])}, got {tuple(cubic.shape)}")
                cubics = per_step(linear() if cubic is None else torch.nan_to_num(cubic.to(start)))
        miss = self._pool((start - priors[:, 0]).abs()) if self.miss else None  # the prior's miss at the start, once per run
        x0, _ = self._inputs(start, start, priors[:, 0], priors_small[:, 0], ends, far_p, p0, p0, p0, between[0], miss, cubics[0])
        s = self._first_state(x0, start)
        prev, outs, prior_w, spreads = start, [], [], []
        for t in range(1, positions.shape[1]):
            pix = next_fn(prev, direction).to(start)
            xs, candidates = self._inputs(prev, pix, priors[:, t], priors_small[:, t], ends, far_p, p0, positions[:, t], positions[:, t - 1],
                                          between[t], miss, cubics[t])
            prev, s = self._advance(xs, s, candidates)
            outs.append(prev)
            if self.output == "blend":
                prior_w.append(self.last_weights[:, 2].mean((1, 2)))
                if self.record_spread:
                    spreads.append(self.last_spread)
        # the blend's mean weight on the prior per sample and step (B,T-1), for reports; NaN for other heads
        self.last_prior_weight = torch.stack(prior_w, 1) if prior_w else torch.full((b, positions.shape[1] - 1), float("nan"))
        # with record_spread, per pixel sum_i w_i |c_i - output| (B,T-1,H,W) (the uncertainty map's candidate_spread)
        self.last_candidate_spread = torch.cat(spreads, 1) if spreads else None
        return torch.cat(outs, 1)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

