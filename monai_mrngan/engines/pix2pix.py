"""pix2pix trainer for next-slice prediction, as a ``monai.engines.Trainer`` subclass.

MONAI's ``GanTrainer`` never shows the batch to the generator and ``AdversarialTrainer`` uses an
unconditional discriminator on the inputs, so neither fits pix2pix (the discriminator must judge
``cat(condition, image)``); this trainer overrides ``_iteration`` the way MONAI's own engines do.

One iteration on a batch ``{"image": slice i, "label": slice i + d, "direction": d}`` (slices in
[-1, 1]):

- D step: ``0.5 * (adv(D(cat(x, y)), real) + adv(D(cat(x, G(x).detach())), fake))``;
- G step: ``adv_weight * adv(D(cat(x, G(x))), real) + recon_weight * L1(G(x), y)`` (pix2pix:
  binary cross-entropy adversarial loss via MONAI's ``PatchAdversarialLoss``, lambda = 100).

With ``d_direction`` the discriminator also gets the direction as a constant channel, so it can
tell a plausible slice *above* from one *below*. ``adv_weight=0`` trains the generator on the
reconstruction loss alone (the discriminator is then not updated either).
The output dict holds ``image``, ``label``, ``pred`` (detached), ``direction``, ``loss`` (= G loss),
``g_loss``, ``g_adv``, ``g_rec`` and ``d_loss`` (floats), for StatsHandler / TensorBoard handlers.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Sequence

import torch
from monai.engines import Trainer
from monai.losses import PatchAdversarialLoss
from monai.utils import CommonKeys

__all__ = ["Pix2PixTrainer", "discriminator_input"]


def discriminator_input(x: torch.Tensor, y: torch.Tensor, direction: torch.Tensor | None) -> torch.Tensor:
    """``cat(condition, image[, direction plane])`` along channels, the discriminator's input."""
    parts = [x, y]
    if direction is not None:
        parts.append(direction.reshape(-1, 1, 1, 1).to(x).expand(-1, 1, *x.shape[2:]))
    return torch.cat(parts, dim=1)


def _logits(out: Any) -> torch.Tensor:
    # PatchDiscriminator returns every intermediate map; the logits are the last one
    return out[-1] if isinstance(out, (list, tuple)) else out


class Pix2PixTrainer(Trainer):
    """Conditional-GAN (pix2pix) trainer: see the module docstring.

    Args:
        device: where to train.
        max_epochs: epochs to run.
        train_data_loader: yields dicts with ``image``, ``label`` (B, 1, H, W) and ``direction`` (B, 1).
        g_network: generator called as ``g_network(x, direction)``.
        g_optimizer, d_network, d_optimizer: the other GAN parts.
        adversarial_loss: a ``PatchAdversarialLoss`` (default binary cross-entropy); pass
            ``PatchAdversarialLoss(criterion="least_squares")`` for LSGAN.
        recon_loss: reconstruction loss (default ``torch.nn.L1Loss()``).
        recon_weight: lambda of the reconstruction term (pix2pix: 100).
        adv_weight: weight of the generator's adversarial term (0 = reconstruction only).
        d_direction: give the discriminator the direction channel (its ``in_channels`` must be 3).
        direction_key: batch key of the direction flags.
        epoch_length, non_blocking, iteration_update, postprocessing, key_train_metric,
        additional_metrics, train_handlers: as in ``monai.engines.SupervisedTrainer``.
    """

    def __init__(
        self,
        device: torch.device | str,
        max_epochs: int,
        train_data_loader: Iterable,
        g_network: torch.nn.Module,
        g_optimizer: torch.optim.Optimizer,
        d_network: torch.nn.Module,
        d_optimizer: torch.optim.Optimizer,
        adversarial_loss: Callable | None = None,
        recon_loss: Callable | None = None,
        recon_weight: float = 100.0,
        adv_weight: float = 1.0,
        d_direction: bool = True,
        direction_key: str = "direction",
        epoch_length: int | None = None,
        non_blocking: bool = False,
        iteration_update: Callable | None = None,
        postprocessing: Callable | None = None,
        key_train_metric: dict | None = None,
        additional_metrics: dict | None = None,
        train_handlers: Sequence | None = None,
    ) -> None:
        super().__init__(
            device=device,
            max_epochs=max_epochs,
            data_loader=train_data_loader,
            epoch_length=epoch_length,
            non_blocking=non_blocking,
            iteration_update=iteration_update,
            postprocessing=postprocessing,
            key_metric=key_train_metric,
            additional_metrics=additional_metrics,
            handlers=train_handlers,
            decollate=False,
        )
        self.g_network = g_network
        self.g_optimizer = g_optimizer
        self.d_network = d_network
        self.d_optimizer = d_optimizer
        self.adversarial_loss = adversarial_loss if adversarial_loss is not None else PatchAdversarialLoss(criterion="bce")
        self.recon_loss = recon_loss if recon_loss is not None else torch.nn.L1Loss()
        self.recon_weight = float(recon_weight)
        self.adv_weight = float(adv_weight)
        self.d_direction = bool(d_direction)
        self.direction_key = direction_key

    def _iteration(self, engine: "Pix2PixTrainer", batchdata: dict[str, torch.Tensor]) -> dict[str, Any]:
        if batchdata is None:
            raise ValueError("must provide batch data for current iteration.")
        kw = {"device": engine.state.device, "non_blocking": engine.non_blocking}
        x = torch.as_tensor(batchdata[CommonKeys.IMAGE]).to(**kw)
        y = torch.as_tensor(batchdata[CommonKeys.LABEL]).to(**kw)
        if engine.direction_key not in batchdata:
            raise KeyError(f"batch has no {engine.direction_key!r}; sample pairs with AdjacentSlicePaird")
        direction = torch.as_tensor(batchdata[engine.direction_key]).to(**kw).reshape(-1).float()
        d_dir = direction if engine.d_direction else None
        engine.g_network.train()
        engine.d_network.train()

        fake = engine.g_network(x, direction)

        d_loss = torch.zeros((), device=x.device)
        if engine.adv_weight > 0:
            engine.d_optimizer.zero_grad(set_to_none=True)
            d_real = _logits(engine.d_network(discriminator_input(x, y, d_dir)))
            d_fake = _logits(engine.d_network(discriminator_input(x, fake.detach(), d_dir)))
            d_loss = 0.5 * (
                engine.adversarial_loss(d_real, target_is_real=True, for_discriminator=True)
                + engine.adversarial_loss(d_fake, target_is_real=False, for_discriminator=True)
            )
            d_loss.backward()
            engine.d_optimizer.step()

        engine.g_optimizer.zero_grad(set_to_none=True)
        g_rec = engine.recon_loss(fake, y)
        g_adv = torch.zeros((), device=x.device)
        if engine.adv_weight > 0:
            g_logits = _logits(engine.d_network(discriminator_input(x, fake, d_dir)))
            g_adv = engine.adversarial_loss(g_logits, target_is_real=True, for_discriminator=False)
        g_loss = engine.adv_weight * g_adv + engine.recon_weight * g_rec
        g_loss.backward()
        engine.g_optimizer.step()

        return {
            CommonKeys.IMAGE: x,
            CommonKeys.LABEL: y,
            CommonKeys.PRED: fake.detach(),
            engine.direction_key: direction,
            CommonKeys.LOSS: g_loss.item(),
            "g_loss": g_loss.item(),
            "g_adv": g_adv.item(),
            "g_rec": g_rec.item(),
            "d_loss": d_loss.item(),
        }
