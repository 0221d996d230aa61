"""GAN networks for the general-brain prior (data in [-1, 1] inside, tanh output).

- :class:`DCGANGenerator`: the paper's DCGAN generator, 100-d latent -> slice, MONAI ``Generator``
  (linear + transposed convolutions) followed by tanh (MONAI's has no output activation).
- :class:`ConditionalGenerator` / :class:`ConditionalDiscriminator`: the position-conditioned GAN; the
  position ``p`` is embedded (Fourier features + linear) and concatenated to the latent, and fed to
  the discriminator as a constant extra image channel. MONAI's ``Generator`` / ``Discriminator``
  do the convolutional work; these wrappers add the condition, which MONAI's classes cannot take.
- :class:`DCGANSet`: the paper's other route, one generator (or discriminator) per position bin,
  selected per sample by ``p``; bins not yet trained borrow the nearest trained bin's network, and
  :meth:`DCGANSet.activate` copies that neighbour's weights into a bin before it is fine-tuned.

Every generator has ``latent_size``, ``kind``, ``config`` (its constructor arguments) and
``generate(z, p)``, so :func:`export_generator` / :func:`build_generator_from_checkpoint` can save
and rebuild any of them, and :class:`GeneralBrain` (the average over several latents at a
position, in [0, 1]) works for all. The position-conditioned generator (and a generator set) also
accept ONE tensor ``(B, latent_size + 1)`` (or ``(B, latent_size + 1, 1, 1)``) whose last channel is
``p`` (:func:`split_latent_position`): the single-input form MONAI's ``verify_net_in_out`` checks.
"""

from __future__ import annotations

import copy
import math
from typing import Sequence

import torch
from monai.networks.nets import Discriminator, Generator
from torch import nn

__all__ = [
    "DCGANGenerator", "DCGANDiscriminator", "ConditionalGenerator", "ConditionalDiscriminator", "DCGANSet",
    "GeneralBrain", "make_generator", "split_latent_position", "make_discriminator", "export_generator", "build_generator_from_checkpoint",
]


def _channels(image_size: int, base: int) -> tuple[tuple[int, ...], tuple[int, ...], int]:
    """Up-sampling plan from a 4x4 (or 8x8) start to ``image_size``: channels, strides, start size."""
    if image_size < 8 or image_size & (image_size - 1):
        raise ValueError(f"image_size must be a power of two >= 8, got {image_size}")
    n = int(math.log2(image_size)) - 2  # number of x2 stages from 4x4
    chans = tuple(max(base // 2**i, 8) for i in range(1, n)) + (1,)
    return chans, (2,) * n, 4


class DCGANGenerator(nn.Module):
    """Latent (B, latent_size) -> slice (B, 1, S, S) in [-1, 1]."""

    kind = "dcgan"

    def __init__(self, image_size: int = 128, latent_size: int = 100, base_channels: int = 128, num_res_units: int = 0, output_bias: float = -2.0):
        super().__init__()
        self.config = {"image_size": image_size, "latent_size": latent_size, "base_channels": base_channels, "num_res_units": num_res_units, "output_bias": output_bias}
        self.latent_size = latent_size
        chans, strides, start = _channels(image_size, base_channels)
        self.net = Generator(
            latent_shape=(self._in_size(),), start_shape=(base_channels, start, start), channels=chans, strides=strides,
            num_res_units=num_res_units, norm="BATCH", act=("LEAKYRELU", {"negative_slope": 0.2}),
        )
        self.apply(_dcgan_init)
        # most of a slice is air (-1 after scaling): start the output there (tanh(-2) = -0.96) rather than at
        # mid-grey, so early samples are black slices the generator adds a head to
        last = [m for m in self.net.modules() if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))][-1]
        if last.bias is not None:
            nn.init.constant_(last.bias, output_bias)

    def _in_size(self) -> int:
        return self.latent_size

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.net(z))

    def generate(self, z: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        """Uniform interface: the unconditional generator ignores ``positions``."""
        return self(z)


class DCGANDiscriminator(nn.Module):
    """Slice (B, 1, S, S) -> real/fake logit (B, 1) (no sigmoid: pair with ``BCEWithLogitsLoss``)."""

    kind = "dcgan"

    def __init__(self, image_size: int = 128, base_channels: int = 32, in_channels: int = 1, dropout: float = 0.25):
        super().__init__()
        n = int(math.log2(image_size)) - 2
        chans = tuple(min(base_channels * 2**i, 256) for i in range(n))
        self.net = Discriminator(
            in_shape=(in_channels, image_size, image_size), channels=chans, strides=(2,) * n, num_res_units=0,
            act=("LEAKYRELU", {"negative_slope": 0.2}), norm="BATCH", dropout=dropout, last_act=None,
        )
        self.apply(_dcgan_init)

    def forward(self, x: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        return self.net(x)


class PositionEmbedding(nn.Module):
    """p in [0, 1] -> learnt embedding from Fourier features (so nearby positions stay close)."""

    def __init__(self, dim: int = 16, frequencies: int = 6):
        super().__init__()
        self.register_buffer("freqs", math.pi * 2.0 ** torch.arange(frequencies, dtype=torch.float32), persistent=False)
        self.proj = nn.Sequential(nn.Linear(1 + 2 * frequencies, dim), nn.LeakyReLU(0.2), nn.Linear(dim, dim))

    def forward(self, p: torch.Tensor) -> torch.Tensor:
        p = p.reshape(-1, 1).float()
        f = p * self.freqs
        return self.proj(torch.cat([p, torch.sin(f), torch.cos(f)], 1))


class ConditionalGenerator(DCGANGenerator):
    """(latent, p) -> slice at position p, in [-1, 1]."""

    kind = "cgan"

    def __init__(self, image_size: int = 128, latent_size: int = 100, base_channels: int = 128, num_res_units: int = 0, output_bias: float = -2.0, embed_dim: int = 16):
        self.embed_dim = embed_dim
        super().__init__(image_size, latent_size, base_channels, num_res_units, output_bias)
        self.config["embed_dim"] = embed_dim
        self.embed = PositionEmbedding(embed_dim)

    def _in_size(self) -> int:
        return self.latent_size + self.embed_dim

    def forward(self, z: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:  # type: ignore[override]
        """``G(z, p)``; or ``G(x)`` with ONE tensor ``x`` (B, latent_size + 1) or (B, latent_size + 1, 1, 1)
        whose last channel is ``p`` (the single-input form MONAI's ``verify_net_in_out`` / export use)."""
        if positions is None:
            z, positions = split_latent_position(z, self.latent_size)
        return torch.tanh(self.net(torch.cat([z, self.embed(positions)], 1)))

    def generate(self, z: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        if positions is None:
            raise ValueError("the conditional generator needs the positions p")
        return self(z, positions)


class ConditionalDiscriminator(DCGANDiscriminator):
    """(slice, p) -> logits.

    Two ways to condition (``aux_position``):
    - False: p enters as a constant second image channel, output (B, 1) real/fake logit;
    - True (default): an auxiliary-classifier discriminator (AC-GAN): the image alone in, output
      (B, 2) = [real/fake logit, position logit]; the trainer teaches D to read ``p`` from real
      slices and G to make slices D places at the ``p`` they were drawn for. On IXI the
      channel-conditioned version collapsed to one slice for every p within a CPU budget.
    """

    kind = "cgan"

    def __init__(self, image_size: int = 128, base_channels: int = 32, dropout: float = 0.25, aux_position: bool = True):
        self.aux_position = bool(aux_position)
        super().__init__(image_size, base_channels, in_channels=1 if self.aux_position else 2, dropout=dropout)
        if self.aux_position:
            from monai.networks.nets import Classifier

            n = int(math.log2(image_size)) - 2
            chans = tuple(min(base_channels * 2**i, 256) for i in range(n))
            self.net = Classifier(
                in_shape=(1, image_size, image_size), classes=2, channels=chans, strides=(2,) * n, num_res_units=0,
                act=("LEAKYRELU", {"negative_slope": 0.2}), norm="BATCH", dropout=dropout, last_act=None,
            )
            self.apply(_dcgan_init)

    def forward(self, x: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        if self.aux_position:
            return self.net(x)
        if positions is None:
            raise ValueError("the conditional discriminator needs the positions p")
        pmap = (positions.reshape(-1, 1, 1, 1).float() * 2 - 1).expand(-1, 1, *x.shape[-2:])
        return self.net(torch.cat([x, pmap], 1))


class DCGANSet(nn.Module):
    """One network per position bin (all DCGAN generators, or all discriminators), routed by ``p``.

    ``active`` marks trained bins; a sample in an inactive bin uses the nearest active bin's network.
    :meth:`activate` copies the nearest active neighbour's weights into a bin (transfer learning) and
    marks it active.
    """

    kind = "dcgan_set"

    def __init__(self, members: Sequence[nn.Module], num_bins: int | None = None, active: Sequence[int] | None = None):
        super().__init__()
        self.members = nn.ModuleList(members)
        self.num_bins = len(self.members) if num_bins is None else int(num_bins)
        if self.num_bins != len(self.members):
            raise ValueError(f"{len(self.members)} networks for {self.num_bins} bins")
        first = self.num_bins // 2 if active is None else None
        self.register_buffer("active", torch.zeros(self.num_bins, dtype=torch.bool))
        for b in ([first] if first is not None else active):
            self.active[int(b)] = True
        m0 = self.members[0]
        self.latent_size = getattr(m0, "latent_size", None)
        self.config = {"num_bins": self.num_bins, "member": getattr(m0, "config", {})}

    def bins(self, positions: torch.Tensor) -> torch.Tensor:
        return (positions.reshape(-1).float() * self.num_bins).floor().clamp(0, self.num_bins - 1).long()

    def route(self, b: int) -> int:
        """The bin whose network serves bin ``b`` (itself when active, else the nearest active bin)."""
        idx = torch.nonzero(self.active).reshape(-1)
        return int(idx[(idx - b).abs().argmin()])

    @torch.no_grad()
    def activate(self, b: int) -> bool:
        """Start training bin ``b`` from its nearest active neighbour's weights; False if already active."""
        if bool(self.active[b]):
            return False
        self.members[b].load_state_dict(copy.deepcopy(self.members[self.route(b)].state_dict()))
        self.active[b] = True
        return True

    def forward(self, x: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        if positions is None:  # a generator set called with one (B, latent_size + 1) tensor: p is the last channel
            if self.latent_size is None or x.ndim not in (2, 4):
                raise ValueError("the DCGAN set needs the positions p to pick a bin")
            x, positions = split_latent_position(x, self.latent_size)
        bins = self.bins(positions)
        out = None
        for b in bins.unique().tolist():
            sel = bins == b
            y = self.members[self.route(b)](x[sel])
            if out is None:
                out = y.new_zeros((x.shape[0], *y.shape[1:]))
            out[sel] = y
        return out

    def generate(self, z: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        if positions is None:
            raise ValueError("the DCGAN set needs the positions p to pick a bin")
        return self(z, positions)


def split_latent_position(x: torch.Tensor, latent_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, latent_size + 1) or (B, latent_size + 1, 1, 1) -> latent (B, latent_size), positions (B,) (the last channel)."""
    if x.ndim == 4 and x.shape[2:] == (1, 1):
        x = x.flatten(1)
    if x.ndim != 2 or x.shape[1] != latent_size + 1:
        raise ValueError(
            f"expected one tensor (B, {latent_size + 1}) or (B, {latent_size + 1}, 1, 1) = latent + position p, got {tuple(x.shape)}"
        )
    return x[:, :latent_size], x[:, latent_size]


def _dcgan_init(m: nn.Module) -> None:
    """DCGAN initialisation: N(0, 0.02) weights, batch norm N(1, 0.02)."""
    if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
        nn.init.normal_(m.weight, 0.0, 0.02)
        if getattr(m, "bias", None) is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.BatchNorm2d) and m.weight is not None:
        nn.init.normal_(m.weight, 1.0, 0.02)
        nn.init.zeros_(m.bias)


def make_generator(route: str = "cgan", image_size: int = 128, latent_size: int = 100, base_channels: int = 128, num_bins: int = 5) -> nn.Module:
    """Generator for a training route: ``"cgan"``, ``"dcgan"`` (one unconditional) or ``"dcgan_set"`` (one per bin)."""
    if route == "cgan":
        return ConditionalGenerator(image_size, latent_size, base_channels)
    if route == "dcgan":
        return DCGANGenerator(image_size, latent_size, base_channels)
    if route == "dcgan_set":
        return DCGANSet([DCGANGenerator(image_size, latent_size, base_channels) for _ in range(num_bins)])
    raise ValueError(f"unknown GAN route {route!r}; expected 'cgan', 'dcgan' or 'dcgan_set'")


def make_discriminator(route: str = "cgan", image_size: int = 128, base_channels: int = 32, num_bins: int = 5, aux_position: bool = True) -> nn.Module:
    """Discriminator matching :func:`make_generator` (``aux_position``: AC-GAN style cGAN discriminator)."""
    if route == "cgan":
        return ConditionalDiscriminator(image_size, base_channels, aux_position=aux_position)
    if route == "dcgan":
        return DCGANDiscriminator(image_size, base_channels)
    if route == "dcgan_set":
        return DCGANSet([DCGANDiscriminator(image_size, base_channels) for _ in range(num_bins)])
    raise ValueError(f"unknown GAN route {route!r}; expected 'cgan', 'dcgan' or 'dcgan_set'")


class GeneralBrain(nn.Module):
    """The generator's general brain: the mean of ``num_samples`` generated slices at each position, in [0, 1].

    ``forward(positions)`` with positions (B,) or (B, 1); fixed latents (``seed``) so validation is repeatable.
    """

    def __init__(self, generator: nn.Module, num_samples: int = 8, seed: int = 0):
        super().__init__()
        self.generator = generator
        self.num_samples = int(num_samples)
        self.seed = int(seed)

    def forward(self, positions: torch.Tensor) -> torch.Tensor:
        gen = getattr(self.generator, "module", self.generator)
        p = positions.reshape(-1).float()
        g = torch.Generator().manual_seed(self.seed)
        acc = 0.0
        for _ in range(self.num_samples):
            z = torch.randn(len(p), gen.latent_size, generator=g).to(p.device)
            acc = acc + gen.generate(z, p)
        return ((acc / self.num_samples + 1.0) / 2.0).clamp(0, 1)


def export_generator(generator: nn.Module) -> dict:
    """A self-describing checkpoint (``kind``, ``config``, ``state_dict``) readable with ``weights_only=True``."""
    gen = getattr(generator, "module", generator)
    return {"kind": gen.kind, "config": dict(gen.config), "state_dict": gen.state_dict()}


def build_generator_from_checkpoint(checkpoint: dict) -> tuple[nn.Module, str, dict]:
    """Rebuild a generator from :func:`export_generator`'s dict; returns (generator, kind, config)."""
    kind, cfg = checkpoint.get("kind"), dict(checkpoint.get("config", {}))
    if kind == "cgan":
        gen: nn.Module = ConditionalGenerator(**cfg)
    elif kind == "dcgan":
        gen = DCGANGenerator(**cfg)
    elif kind == "dcgan_set":
        gen = DCGANSet([DCGANGenerator(**cfg["member"]) for _ in range(int(cfg["num_bins"]))])
    else:
        raise ValueError(f"unknown generator kind {kind!r} in checkpoint")
    gen.load_state_dict(checkpoint["state_dict"])
    return gen, kind, cfg
