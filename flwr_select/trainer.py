"""The central trainer: epochs (or a step count) over the training buffer.

Batches are drawn by a permutation made on the buffer's device and used to
index the ``uint8`` images there: no DataLoader, no per-sample Python, no copy
of the buffer. The loss is summed on the device and read once at the end, so a
GPU is not synchronised every step.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from flwr_select.models import BatchTransform

OPTIMIZERS = {"sgd", "adam"}


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
    momentum : float (default: 0.9)
    weight_decay : float (default: 0.0)
    """

    epochs: int = 1
    steps: int | None = None
    batch_size: int = 64
    optimizer: str = "sgd"
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 0.0

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
        Seeds the batch order; the same seed, data and model give the same result.
    transform : callable, optional
        Applied to every ``uint8`` batch on the device before the model (see
        :func:`flwr_select.models.model_input`).
    """
    started = time.perf_counter()
    generator = torch.Generator(device=images.device).manual_seed(seed)
    optimizer = config.make_optimizer(model)
    model.train()
    total = torch.zeros((), device=images.device)
    seen = 0
    batches = batch_order(len(images), config, generator)
    for idx in batches:
        optimizer.zero_grad(set_to_none=True)
        batch = images[idx] if transform is None else transform(images[idx])
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
