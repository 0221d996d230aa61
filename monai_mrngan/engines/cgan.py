"""Ignite trainer for the general-brain GANs (position-conditioned GAN, DCGAN, DCGAN set).

Why not MONAI's ``GanTrainer``: its generator never sees the batch (so it cannot be conditioned on
the slice position) and its ``d_train_steps`` only runs one or more discriminator steps per
generator step, while the paper updates the discriminator once for every three generator updates.
This trainer does both; with an unconditional generator (route ``"dcgan"``) it is the paper's plain
DCGAN with the same ratio.

Batches are dictionaries with ``image`` (B, 1, H, W) in [-1, 1] and ``position`` (B, 1); each
iteration draws latents, updates G with BCE against "real", and every ``g_steps_per_d``-th
iteration updates D with BCE on real vs generated slices at the same positions. The output
dictionary holds ``reals``, ``fakes``, ``positions``, ``g_loss``, ``d_loss`` (the last D loss).
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Sequence

import torch
from ignite.engine import Engine, Events
from monai.engines import Trainer
from torch import nn

logger = logging.getLogger(__name__)


def _call(net: nn.Module, x: torch.Tensor, p: torch.Tensor, conditional: bool) -> torch.Tensor:
    return net(x, p) if conditional else net(x)


class ConditionalGanTrainer(Trainer):
    """GAN trainer whose generator and discriminator both receive the slice position ``p``.

    Args:
        device, max_epochs, train_data_loader: as for MONAI trainers.
        g_network, d_network: generator ``G(z, p)`` in [-1, 1] and discriminator ``D(x, p)`` -> logits.
        g_optimizer, d_optimizer: their optimizers (Adam 2e-4, betas (0.5, 0.999) in the paper).
        latent_size: size of ``z`` (100 in the paper).
        g_steps_per_d: generator updates per discriminator update (3 in the paper).
        conditional: pass ``p`` to the networks (False: a plain DCGAN).
        loss_function: on logits; default ``BCEWithLogitsLoss`` (binary cross-entropy).
        real_label: the discriminator's target for real slices (< 1: one-sided label smoothing).
        aux_weight: weight of the position term when D has a second (position) output (AC-GAN);
            the term is the same BCE, with ``p`` in [0, 1] as a soft target.
        train_handlers, key_train_metric, epoch_length: as for MONAI trainers.
    """

    def __init__(
        self,
        device: str | torch.device,
        max_epochs: int,
        train_data_loader: Any,
        g_network: nn.Module,
        g_optimizer: torch.optim.Optimizer,
        d_network: nn.Module,
        d_optimizer: torch.optim.Optimizer,
        latent_size: int = 100,
        g_steps_per_d: int = 3,
        conditional: bool = True,
        loss_function: Callable | None = None,
        epoch_length: int | None = None,
        key_train_metric: dict | None = None,
        train_handlers: Sequence | None = None,
        image_key: str = "image",
        position_key: str = "position",
        real_label: float = 1.0,
        aux_weight: float = 1.0,
    ) -> None:
        if g_steps_per_d < 1:
            raise ValueError(f"g_steps_per_d must be >= 1, got {g_steps_per_d}")
        super().__init__(
            device=device, max_epochs=max_epochs, data_loader=train_data_loader, epoch_length=epoch_length,
            key_metric=key_train_metric, handlers=train_handlers, decollate=False,
        )
        self.g_network, self.d_network = g_network, d_network
        self.g_optimizer, self.d_optimizer = g_optimizer, d_optimizer
        self.latent_size = int(latent_size)
        self.g_steps_per_d = int(g_steps_per_d)
        self.conditional = conditional
        self.loss_function = loss_function or nn.BCEWithLogitsLoss()
        self.image_key, self.position_key = image_key, position_key
        self._last_d_loss = float("nan")
        self.real_label = float(real_label)
        self.aux_weight = float(aux_weight)

    def _iteration(self, engine: Engine, batchdata: dict) -> dict:  # type: ignore[override]
        if not isinstance(batchdata, dict) or self.image_key not in batchdata:
            raise ValueError(f"GAN batches must be dictionaries with {self.image_key!r} and {self.position_key!r}")
        reals = batchdata[self.image_key].to(engine.state.device).float()
        pos = batchdata[self.position_key].to(engine.state.device).float().reshape(-1)
        b = reals.shape[0]
        self.g_network.train()
        self.d_network.train()
        z = torch.randn(b, self.latent_size, device=reals.device)
        fakes = _call(self.g_network, z, pos, self.conditional)
        ones = torch.ones(b, 1, device=reals.device)
        zeros = torch.zeros(b, 1, device=reals.device)
        # discriminator: once every g_steps_per_d iterations (the first iteration included)
        if (engine.state.iteration - 1) % self.g_steps_per_d == 0:
            self.d_optimizer.zero_grad(set_to_none=True)
            d_real = _call(self.d_network, reals, pos, self.conditional).reshape(b, -1)
            d_fake = _call(self.d_network, fakes.detach(), pos, self.conditional).reshape(b, -1)
            d_loss = 0.5 * (self.loss_function(d_real[:, :1], ones * self.real_label) + self.loss_function(d_fake[:, :1], zeros))
            if d_real.shape[1] > 1:  # auxiliary position output (AC-GAN): learn p from real slices
                d_loss = d_loss + self.aux_weight * self.loss_function(d_real[:, 1:2], pos[:, None])
            d_loss.backward()
            self.d_optimizer.step()
            self._last_d_loss = float(d_loss.item())
        # generator: every iteration
        self.g_optimizer.zero_grad(set_to_none=True)
        d_gen = _call(self.d_network, fakes, pos, self.conditional).reshape(b, -1)
        g_loss = self.loss_function(d_gen[:, :1], ones)
        if d_gen.shape[1] > 1:  # generated slices must look like their position p
            g_loss = g_loss + self.aux_weight * self.loss_function(d_gen[:, 1:2], pos[:, None])
        g_loss.backward()
        self.g_optimizer.step()
        return {"reals": reals, "fakes": fakes.detach(), "positions": pos, "g_loss": float(g_loss.item()), "d_loss": self._last_d_loss}


class BinSchedule:
    """DCGAN-set curriculum: bins join training one after another, each starting from its trained neighbour.

    The set starts with its centre bin active (the others borrow its networks); every
    ``epochs_per_bin`` epochs the next bin outwards (centre, centre+1, centre-1, ...) is activated
    by copying its nearest active neighbour's weights (generator and discriminator), then fine-tuned.
    """

    def __init__(self, g_set: nn.Module, d_set: nn.Module, epochs_per_bin: int = 1):
        self.g_set = getattr(g_set, "module", g_set)
        self.d_set = getattr(d_set, "module", d_set)
        if not hasattr(self.g_set, "activate") or not hasattr(self.d_set, "activate"):
            raise TypeError("BinSchedule needs DCGANSet generator and discriminator (route 'dcgan_set')")
        self.epochs_per_bin = max(1, int(epochs_per_bin))
        n = self.g_set.num_bins
        c = n // 2
        self.order = [c] + [b for k in range(1, n) for b in (c + k, c - k) if 0 <= b < n]

    def attach(self, engine: Engine) -> "BinSchedule":
        engine.add_event_handler(Events.EPOCH_STARTED, self)
        return self

    def __call__(self, engine: Engine) -> None:
        upto = min(len(self.order), (engine.state.epoch - 1) // self.epochs_per_bin + 1)
        for b in self.order[:upto]:
            if self.g_set.activate(b) | self.d_set.activate(b):
                logger.info("DCGAN set: bin %d starts from its neighbour's weights", b)


class GeneratedGridHandler:
    """Every epoch: one generated slice per position (fixed latents) as an image grid in TensorBoard.

    Args:
        generator: the generator (``generate(z, p)``; DDP unwrapped).
        log_dir: TensorBoard folder (a ``summary_writer`` may be passed instead).
        positions: the positions shown, left to right.
        tag: the image tag.
    """

    def __init__(self, generator: nn.Module, log_dir: str | None = None, positions: Sequence[float] = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9), tag: str = "generated_by_position", summary_writer: Any = None, seed: int = 0):
        self.generator = generator
        self.positions = torch.as_tensor(list(positions), dtype=torch.float32)
        self.tag = tag
        self.seed = seed
        self._writer = summary_writer
        self.log_dir = log_dir

    def attach(self, engine: Engine) -> "GeneratedGridHandler":
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)
        return self

    def __call__(self, engine: Engine) -> None:
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=self.log_dir)
        self._writer.add_image(self.tag, self._grid(), engine.state.epoch, dataformats="CHW")
        self._writer.flush()

    def _grid(self) -> torch.Tensor:
        gen = getattr(self.generator, "module", self.generator)
        was = gen.training
        gen.eval()
        dev = next(gen.parameters()).device
        g = torch.Generator().manual_seed(self.seed)
        z = torch.randn(len(self.positions), gen.latent_size, generator=g).to(dev)
        with torch.no_grad():
            imgs = ((gen.generate(z, self.positions.to(dev)) + 1) / 2).clamp(0, 1).cpu()
        gen.train(was)
        return torch.cat(list(imgs[:, 0].transpose(-1, -2).flip(-2)), dim=1)[None]  # (1, H, N*W), display orientation


class PositionBatch:
    """``prepare_batch`` for evaluators of a general brain: network input = ``position``, target = ``image`` (or None)."""

    def __init__(self, position_key: str = "position", image_key: str = "image"):
        self.position_key, self.image_key = position_key, image_key

    def __call__(self, batchdata: dict, device: Any = None, non_blocking: bool = False, **kwargs: Any) -> tuple:
        pos = batchdata[self.position_key].to(device=device, non_blocking=non_blocking).float()
        img = batchdata.get(self.image_key)
        return pos, (img.to(device=device, non_blocking=non_blocking).float() if img is not None else None)
