"""What the biased-sampling paper watches during training (Sharp 2020).

Output predictions: per-class type I and type II error rates. Network
structure: redundancy among each convolutional layer's filters, and the largest
distance between the workers' gradient norms. Accuracy and loss come from
:func:`~flwr_select.evaluation.evaluate`.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn

from flwr_select.data import SiteData
from flwr_select.evaluation import evaluate


def class_error_rates(
    predictions: np.ndarray, labels: np.ndarray, num_classes: int
) -> tuple[list[float], list[float]]:
    """Return each class's type I and type II error rates.

    For class ``c``: type I (false positive rate) is the share of samples not of
    ``c`` that are predicted ``c``; type II (false negative rate) is the share
    of samples of ``c`` predicted otherwise (1 - recall). A rate whose
    denominator is empty (no sample of, or none outside, ``c``) is 0.
    """
    predictions = np.asarray(predictions, dtype=np.int64)
    labels = np.asarray(labels, dtype=np.int64)
    confusion = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(confusion, (labels, predictions), 1)
    true_positive = np.diag(confusion)
    positives = confusion.sum(axis=1)
    false_positive = confusion.sum(axis=0) - true_positive
    negatives = len(labels) - positives
    type1 = false_positive / np.maximum(negatives, 1)
    type2 = (positives - true_positive) / np.maximum(positives, 1)
    return type1.tolist(), type2.tolist()


def filter_redundancy(model: nn.Module) -> tuple[list[float], list[float]]:
    """Return the mean and largest pairwise |cosine| of each conv layer's filters.

    One value per ``nn.Conv2d`` in module order; each filter is flattened over
    its input channels and kernel. The absolute value counts a filter and its
    negation as redundant (the next layer can undo the sign). 1 means the layer
    holds copies; a layer with one filter gets 0.
    """
    means, largest = [], []
    for layer in model.modules():
        if not isinstance(layer, nn.Conv2d):
            continue
        filters = layer.weight.detach().flatten(1).double()
        if len(filters) < 2:
            means.append(0.0)
            largest.append(0.0)
            continue
        unit = filters / filters.norm(dim=1, keepdim=True).clamp_min(1e-12)
        cosine = (unit @ unit.T).abs()
        pairs = cosine[torch.triu_indices(len(unit), len(unit), offset=1).unbind()]
        means.append(float(pairs.mean()))
        largest.append(float(pairs.max()))
    return means, largest


def grad_norm_gap(grads: Tensor) -> float:
    """Return the largest distance between two workers' gradient norms (max - min)."""
    norms = grads.norm(dim=1)
    return float(norms.max() - norms.min())


def monitor(model: nn.Module, samples: SiteData) -> dict[str, float | list[float]]:
    """Return accuracy, loss, per-class error rates and filter redundancy of ``model``.

    The record keys of ``rounds.jsonl``: ``accuracy``, ``loss`` (mean
    cross-entropy), ``type1_error`` and ``type2_error`` (one rate per class),
    ``filter_redundancy`` and ``filter_redundancy_max`` (one value per conv
    layer).
    """
    result = evaluate(model, samples)
    type1, type2 = class_error_rates(
        result.predictions, samples.labels.numpy(), samples.num_classes
    )
    redundancy, redundancy_max = filter_redundancy(model)
    return {
        "accuracy": result.accuracy,
        "loss": result.loss,
        "type1_error": type1,
        "type2_error": type2,
        "filter_redundancy": redundancy,
        "filter_redundancy_max": redundancy_max,
    }
