"""One batched forward pass over labelled samples, shared by both engines.

A site's trial test (:func:`flwr_select.selection.trial.trial_test`), the
server's held-out evaluation and the data-parallel monitors all run a model over
``uint8`` samples the same way: under inference mode, in eval mode (restored
afterwards), ``batch_size`` images moved to the device and converted at a time,
so memory is bounded by the batch size whatever the data holds.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from flwr_select.data import SiteData
from flwr_select.models import BatchTransform, Transform, model_input


def cross_entropy(logits: Tensor, labels: Tensor) -> Tensor:
    """Return ``-log p_label`` per sample, in float64 (finite for finite logits)."""
    log_probs = logits.double().log_softmax(dim=1)
    return -log_probs.gather(1, labels.long().unsqueeze(1)).squeeze(1)


def batched_logits(
    model: nn.Module,
    images: Tensor,
    *,
    batch_size: int = 1024,
    device: torch.device | str | None = None,
    transform: BatchTransform | None = None,
) -> Iterator[tuple[slice, Tensor]]:
    """Yield ``(rows, logits)`` for each batch of ``images``, in order.

    The model runs in eval mode under ``torch.inference_mode`` on ``device``
    (default: where its parameters are) and is put back in the mode it had.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if device is None:
        device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for start in range(0, len(images), batch_size):
                rows = slice(start, start + batch_size)
                batch = images[rows].to(device, non_blocking=True)
                yield rows, model(batch if transform is None else transform(batch))
    finally:
        model.train(was_training)


@dataclass(frozen=True)
class Evaluation:
    """How a model does on labelled samples: top-1 accuracy and mean loss."""

    accuracy: float
    loss: float
    predictions: np.ndarray
    """int64 top-1 predictions, one per sample."""


def evaluate(
    model: nn.Module,
    samples: SiteData,
    *,
    batch_size: int = 1024,
    transform: Transform = None,
) -> Evaluation:
    """Return the accuracy and mean cross-entropy of ``model`` on ``samples``.

    ``transform``: how the raw samples become model input, as for training
    (see :func:`flwr_select.models.model_input`).

    Examples
    --------
    >>> from flwr_select.models import build_model
    >>> samples = SiteData(torch.zeros(4, 28, 28, dtype=torch.uint8),
    ...                    torch.tensor([0, 1, 2, 3]), 10)
    >>> result = evaluate(build_model("lenet5", seed=0), samples)
    >>> result.predictions.shape, 0.0 <= result.accuracy <= 1.0
    ((4,), True)
    """
    if len(samples) == 0:
        raise ValueError("there are no samples to evaluate on")
    predictions, losses = [], []
    batches = batched_logits(
        model, samples.images, batch_size=batch_size, transform=model_input(transform)
    )
    for rows, logits in batches:
        predictions.append(logits.argmax(dim=1).cpu())
        losses.append(
            cross_entropy(logits, samples.labels[rows].to(logits.device)).cpu()
        )
    predicted = torch.cat(predictions).numpy()
    return Evaluation(
        accuracy=float(1.0 - (predicted != samples.labels.numpy()).mean()),
        loss=float(torch.cat(losses).numpy().mean()),
        predictions=predicted,
    )


def held_out_metrics(
    model: nn.Module, held_out: Mapping[str, SiteData]
) -> dict[str, float]:
    """Return ``{prefix}accuracy`` and ``{prefix}loss`` for each held-out set.

    The record fields of ``rounds.jsonl`` and of the experiments' runs: with
    ``{"": validation, "test_": test}``, ``accuracy``, ``loss``,
    ``test_accuracy`` and ``test_loss``.
    """
    metrics = {}
    for prefix, samples in held_out.items():
        result = evaluate(model, samples)
        metrics[f"{prefix}accuracy"] = result.accuracy
        metrics[f"{prefix}loss"] = result.loss
    return metrics
