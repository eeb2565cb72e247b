"""Synchronous data-parallel SGD with biased batches and a chosen reduction.

Each round every worker receives the model, draws ``local_steps`` batches with
its :class:`~flwr_select.parallel.batches.Sampling` distribution and returns one
gradient: with one local step, the gradient of its batch loss at the received
parameters (classic synchronous data parallelism); with more, the
pseudo-gradient ``(w_0 - w_k) / local_lr`` of ``k`` plain SGD steps. The server
combines the gradients with a reduction from :mod:`flwr_select.parallel.reductions` and
takes one optimizer step. Both sides live here so the Flower strategy, the
worker handler and the in-process experiment share one implementation.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from flwr_select.config import RunConfigFields, check, check_name
from flwr_select.parallel.batches import Sampling, WorkerStep
from flwr_select.parallel.reductions import (
    REDUCTIONS,
    Reduction,
    make_reduction,
    reduce,
)

ACTION = "gradient"
"""The ClientApp action: messages of type ``train.gradient`` reach the worker."""
MESSAGE_TYPE = f"train.{ACTION}"
GRADIENT_KEY = "gradient"
"""Key of the worker's reply ArrayRecord, and of its one flat float32 array."""


@dataclass(frozen=True)
class DataParallelConfig(RunConfigFields):
    """How workers compute and the server combines gradients; validated when built.

    Parameters
    ----------
    reduction : str (default: "mean")
        A name from :data:`~flwr_select.parallel.reductions.REDUCTIONS`.
    trim : float (default: 0.1)
        Share trimmed at each end by ``trimmed-mean``.
    clip_norm : float (default: 0.0)
        Clip norm of ``clipped-mean`` (0: the median of the workers' norms).
    batch_size : int (default: 32)
        Samples per worker and local step.
    local_steps : int (default: 1)
        Batches (SGD steps) per worker and round.
    local_lr : float (default: 0.01)
        Step size of a worker's local SGD when ``local_steps > 1``.

    Raises
    ------
    flwr_select.config.ConfigError
        If a value is not allowed, naming the run-config key.
    """

    reduction: str = "mean"
    trim: float = 0.1
    clip_norm: float = 0.0
    batch_size: int = 32
    local_steps: int = 1
    local_lr: float = 0.01

    def __post_init__(self) -> None:
        check_name("reduction", self.reduction, REDUCTIONS)
        check("trim", self.trim, 0.0 <= self.trim < 0.5, "in [0, 0.5)")
        check("clip-norm", self.clip_norm, self.clip_norm >= 0, ">= 0")
        check("batch-size", self.batch_size, self.batch_size >= 1, ">= 1")
        check("local-steps", self.local_steps, self.local_steps >= 1, ">= 1")
        check("local-lr", self.local_lr, self.local_lr > 0, "> 0")

    def make_reduction(self) -> Reduction:
        """Return the configured reduction."""
        return make_reduction(self.reduction, trim=self.trim, clip_norm=self.clip_norm)


@dataclass(frozen=True)
class WorkerGradient:
    """What a worker returns for one round."""

    gradient: Tensor
    """Flat float32 gradient (or pseudo-gradient), one entry per parameter."""
    loss: float
    """Mean batch loss over the round's local steps."""
    num_examples: int
    """Samples the gradient was computed on."""


def flat_parameters(model: nn.Module) -> Tensor:
    """Return the model's trainable parameters as one flat vector (a copy)."""
    return torch.cat([p.detach().flatten() for p in model.parameters()]).clone()


def num_parameters(model: nn.Module) -> int:
    """Return the number of trainable parameter entries (a gradient's length)."""
    return sum(p.numel() for p in model.parameters())


def worker_gradient(
    model: nn.Module,
    images: Tensor,
    labels: Tensor,
    config: DataParallelConfig,
    sampling: Sampling,
    *,
    num_classes: int,
    worker: int,
    num_workers: int,
    server_round: int,
    num_rounds: int,
) -> WorkerGradient:
    """Return ``worker``'s gradient for ``server_round`` (1-based); ``model`` moves.

    Batches are drawn by ``sampling`` at the global steps of this round, so the
    same seed, data and round give the same gradient.
    """
    start = flat_parameters(model)
    labels_np = labels.numpy()
    total_steps = num_rounds * config.local_steps
    optimizer = torch.optim.SGD(model.parameters(), lr=config.local_lr)
    model.train()
    losses, seen = [], 0
    for local in range(config.local_steps):
        step = (server_round - 1) * config.local_steps + local
        idx = torch.from_numpy(
            sampling.draw(
                labels_np,
                config.batch_size,
                num_classes,
                WorkerStep(worker, num_workers, step, total_steps),
            )
        )
        optimizer.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(model(images[idx]), labels[idx])
        loss.backward()
        losses.append(float(loss.detach()))
        seen += len(idx)
        if config.local_steps == 1:
            gradient = torch.cat([p.grad.flatten() for p in model.parameters()])
            return WorkerGradient(gradient.float(), losses[0], seen)
        optimizer.step()
    gradient = (start - flat_parameters(model)) / config.local_lr
    return WorkerGradient(gradient.float(), float(np.mean(losses)), seen)


def apply_gradient(
    model: nn.Module, optimizer: torch.optim.Optimizer, gradient: Tensor
) -> None:
    """Set ``gradient`` (flat) as the parameters' gradients and take one step."""
    offset = 0
    for parameter in model.parameters():
        size = parameter.numel()
        parameter.grad = (
            gradient[offset : offset + size]
            .view_as(parameter)
            .to(parameter.device, parameter.dtype)
        )
        offset += size
    optimizer.step()


def combine(
    config: DataParallelConfig, updates: list[WorkerGradient]
) -> tuple[Tensor, Tensor]:
    """Return the reduced gradient and the stack of the workers' gradients."""
    grads = torch.stack([u.gradient.double() for u in updates])
    weights = torch.tensor([u.num_examples for u in updates], dtype=torch.float64)
    losses = torch.tensor([u.loss for u in updates], dtype=torch.float64)
    return reduce(config.make_reduction(), grads, weights, losses).float(), grads
