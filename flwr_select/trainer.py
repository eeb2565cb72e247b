"""The central trainer: epochs (or a step count) over the training buffer.

Batches are drawn by a permutation made on the buffer's device and used to
index the ``uint8`` images there: no DataLoader, no per-sample Python, no copy
of the buffer. The loss is summed on the device and read once at the end, so a
GPU is not synchronised every step.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from flwr_select.models import BatchTransform

logger = logging.getLogger("flwr.select")

PROGRESS_EVERY_S = 20.0
"""A training call that runs longer says how far it is this often (wall seconds):
the initial model's minutes would otherwise look like a hang."""

OPTIMIZERS = {"sgd", "adam"}
SCHEDULES = ("constant", "cosine")
"""Learning-rate schedules of one training call, after its warm-up (``warmup``)."""
AUGMENTATIONS = ("none", "translate")
"""On-device augmentations of every batch: none, or random shifts (``max_shift``)."""


@dataclass(frozen=True)
class TrainConfig:
    """How the server trains on its buffer each round.

    Parameters
    ----------
    epochs : int (default: 1)
        Passes over the buffer; ignored when ``steps`` is given.
    steps : int, optional
        Exactly this many batches instead (the buffer is cycled as needed).
    batch_size : int (default: 64)
    optimizer : str (default: "sgd")
        ``"sgd"`` (with ``momentum``) or ``"adam"``.
    lr : float (default: 0.01)
        The peak learning rate.
    momentum : float (default: 0.9)
    weight_decay : float (default: 0.0)
        L2 penalty on the weights; >= 0.
    schedule : str (default: "constant")
        ``"constant"``: ``lr`` after the warm-up; ``"cosine"``: from ``lr`` down
        to 0 by the call's last step (with ``warmup=0.3``, the one-cycle shape).
        Every call (every round) runs its own schedule.
    warmup : float (default: 0.0)
        Share of the call's steps over which the rate rises linearly to ``lr``;
        in [0, 1).
    augment : str (default: "none")
        ``"translate"``: every image of every batch is shifted by its own random
        whole-pixel offset in ``[-max_shift, max_shift]`` along each axis, the
        border filled with 0, on the buffer's device.
    max_shift : int (default: 2)
        The largest shift of ``"translate"``, in pixels; >= 1.
    """

    epochs: int = 1
    steps: int | None = None
    batch_size: int = 64
    optimizer: str = "sgd"
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 0.0
    schedule: str = "constant"
    warmup: float = 0.0
    augment: str = "none"
    max_shift: int = 2

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(
                f"unknown optimizer {self.optimizer!r}; choose one of "
                f"{sorted(OPTIMIZERS)}"
            )
        if (
            self.epochs < 1
            or self.batch_size < 1
            or (self.steps is not None and self.steps < 1)
        ):
            raise ValueError(
                f"epochs, batch_size and steps must be >= 1, got {self.epochs}, "
                f"{self.batch_size}, {self.steps}"
            )
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if not self.weight_decay >= 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if self.schedule not in SCHEDULES:
            raise ValueError(
                f"unknown schedule {self.schedule!r}; choose one of {list(SCHEDULES)}"
            )
        if not 0 <= self.warmup < 1:
            raise ValueError(f"warmup must be in [0, 1), got {self.warmup}")
        if self.augment not in AUGMENTATIONS:
            raise ValueError(
                f"unknown augment {self.augment!r}; choose one of {list(AUGMENTATIONS)}"
            )
        if self.max_shift < 1:
            raise ValueError(f"max_shift must be >= 1, got {self.max_shift}")

    def lr_at(self, step: int, total: int) -> float:
        """Return the learning rate of ``step`` (0-based) of a call of ``total`` steps.

        Examples
        --------
        >>> config = TrainConfig(lr=0.1, schedule="cosine", warmup=0.5)
        >>> [round(config.lr_at(step, 4), 3) for step in range(4)]
        [0.05, 0.1, 0.1, 0.0]
        """
        ramp = int(self.warmup * total)
        if step < ramp:
            return self.lr * (step + 1) / ramp
        if self.schedule == "constant":
            return self.lr
        decay = max(total - ramp - 1, 1)
        return self.lr * 0.5 * (1 + math.cos(math.pi * min((step - ramp) / decay, 1)))

    def make_optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        """Return a fresh optimizer over ``model``'s parameters."""
        if self.optimizer == "adam":
            return torch.optim.Adam(
                model.parameters(), lr=self.lr, weight_decay=self.weight_decay
            )
        return torch.optim.SGD(
            model.parameters(),
            lr=self.lr,
            momentum=self.momentum,
            weight_decay=self.weight_decay,
        )


@dataclass(frozen=True)
class TrainResult:
    """What one training call did: mean loss, samples seen, steps and seconds."""

    loss: float
    samples: int
    steps: int
    seconds: float


def batch_order(
    num_samples: int, config: TrainConfig, generator: torch.Generator
) -> list[Tensor]:
    """Return the index tensor of every batch of one call, on the generator's device."""
    if num_samples < 1:
        raise ValueError("nothing to train on: the buffer is empty")
    device = generator.device
    if config.steps is None:
        return [
            idx
            for _ in range(config.epochs)
            for idx in torch.randperm(
                num_samples, generator=generator, device=device
            ).split(config.batch_size)
        ]
    batches: list[Tensor] = []
    while len(batches) < config.steps:
        perm = torch.randperm(num_samples, generator=generator, device=device)
        batches.extend(perm.split(config.batch_size))
    return batches[: config.steps]


def translate(images: Tensor, max_shift: int, generator: torch.Generator) -> Tensor:
    """Return ``images`` each shifted by its own random offset, the border 0.

    Offsets are whole pixels in ``[-max_shift, max_shift]`` along height and
    width, drawn from ``generator`` on the images' device; one gather, no loop
    over samples. Works on ``(B, H, W)`` and ``(B, C, H, W)`` batches of any dtype.

    Examples
    --------
    >>> image = torch.zeros(1, 3, 3, dtype=torch.uint8)
    >>> image[0, 1, 1] = 9
    >>> moved = translate(image, 1, torch.Generator().manual_seed(0))
    >>> int(moved.sum()), moved.shape
    (9, torch.Size([1, 3, 3]))
    """
    count, (height, width) = len(images), images.shape[-2:]
    device = images.device
    padded = nn.functional.pad(images, (max_shift,) * 4)
    if padded.ndim == 4:  # (B, C, H, W) -> (B, H, W, C): index the image axes first
        padded = padded.permute(0, 2, 3, 1)
    offsets = torch.randint(
        0, 2 * max_shift + 1, (2, count), generator=generator, device=device
    )
    rows = offsets[0, :, None] + torch.arange(height, device=device)
    cols = offsets[1, :, None] + torch.arange(width, device=device)
    which = torch.arange(count, device=device)[:, None, None]
    shifted = padded[which, rows[:, :, None], cols[:, None, :]]
    return shifted.permute(0, 3, 1, 2) if shifted.ndim == 4 else shifted


def train(
    model: nn.Module,
    images: Tensor,
    labels: Tensor,
    config: TrainConfig,
    *,
    seed: int,
    transform: BatchTransform | None = None,
) -> TrainResult:
    """Train ``model`` in place on ``images``/``labels`` (on the model's device).

    Parameters
    ----------
    model : nn.Module
        Takes ``uint8`` batches (the built-in models do), or what ``transform``
        makes of them; left in train mode.
    images, labels : Tensor
        The buffer's tensors, already on the training device.
    config : TrainConfig
    seed : int
        Seeds the batch order, the augmentation and the model's own randomness
        (dropout) for this call, without touching torch's global generator
        outside it: the same seed, data and model give the same result.
    transform : callable, optional
        Applied to every ``uint8`` batch on the device before the model (see
        :func:`flwr_select.models.model_input`).
    """
    devices = [images.device] if images.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)  # dropout and any other global draw of the model
        return _train(model, images, labels, config, seed, transform)


def _train(
    model: nn.Module,
    images: Tensor,
    labels: Tensor,
    config: TrainConfig,
    seed: int,
    transform: BatchTransform | None,
) -> TrainResult:
    """:func:`train`'s loop, under its forked and seeded global generator."""
    started = time.perf_counter()
    generator = torch.Generator(device=images.device).manual_seed(seed)
    optimizer = config.make_optimizer(model)
    model.train()
    total = torch.zeros((), device=images.device)
    seen = 0
    batches = batch_order(len(images), config, generator)
    said = started
    for step, idx in enumerate(batches):
        if time.perf_counter() - said >= PROGRESS_EVERY_S:
            said = time.perf_counter()
            logger.info(
                "training on %s samples: step %s of %s, %.0f s so far",
                len(images),
                step,
                len(batches),
                said - started,
            )
        if config.schedule != "constant" or config.warmup:
            for group in optimizer.param_groups:
                group["lr"] = config.lr_at(step, len(batches))
        optimizer.zero_grad(set_to_none=True)
        batch = images[idx]
        if config.augment == "translate":
            batch = translate(batch, config.max_shift, generator)
        if transform is not None:
            batch = transform(batch)
        loss = nn.functional.cross_entropy(model(batch), labels[idx])
        loss.backward()
        optimizer.step()
        total += loss.detach() * len(idx)
        seen += len(idx)
    return TrainResult(
        loss=float(total) / seen,
        samples=seen,
        steps=len(batches),
        seconds=time.perf_counter() - started,
    )
