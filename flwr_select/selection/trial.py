"""The trial test: a site runs the current model once over its own labelled samples.

One batched forward pass (:func:`flwr_select.evaluation.batched_logits`: inference
mode, on the site's device, ``batch_size`` images at a time) yields every score of
:mod:`flwr_select.selection.scores` for every sample.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from flwr_select.data import SiteData
from flwr_select.evaluation import batched_logits
from flwr_select.models import BatchTransform
from flwr_select.selection.scores import (
    CONFIDENCE_METRICS,
    DEFAULT_EPS,
    check_confidence,
    check_logits,
    combine_proxy,
)


@dataclass(frozen=True)
class TrialResult:
    """Every score of one trial test, aligned with the site's samples.

    Attributes
    ----------
    ids : np.ndarray
        int64 sample ids.
    labels : np.ndarray
        int64 true labels.
    predictions : np.ndarray
        int64 top-1 predictions.
    confidence : dict of str to np.ndarray
        Each confidence metric of
        :data:`~flwr_select.selection.scores.CONFIDENCE_METRICS` (float64, higher
        = less confident).
    """

    ids: np.ndarray
    labels: np.ndarray
    predictions: np.ndarray
    confidence: dict[str, np.ndarray]

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def wrong(self) -> np.ndarray:
        """Bool, True where the prediction is wrong."""
        return self.predictions != self.labels

    @property
    def label_probability(self) -> np.ndarray:
        """The model's probability of each sample's label (from its cross-entropy)."""
        return np.exp(-self.confidence["cross-entropy"])

    @property
    def accuracy(self) -> float:
        """Fraction of the site's samples the model gets right."""
        return float(1.0 - self.wrong.mean())

    def score(
        self, name: str, *, confidence: str = "cross-entropy", eps: float = DEFAULT_EPS
    ) -> np.ndarray:
        """Return the score called ``name`` (see :data:`.scores.SCORES`).

        ``confidence`` and ``eps`` configure ``"proxy"``; higher is more worth
        sending, as for every score.
        """
        if name == "correctness":
            return self.wrong.astype(np.float64)
        if name == "proxy":
            check_confidence(confidence)
            return combine_proxy(self.wrong, self.confidence[confidence], eps=eps)
        check_confidence(name)
        return self.confidence[name]


def trial_test(
    model: nn.Module,
    site: SiteData,
    *,
    batch_size: int = 1024,
    device: torch.device | str | None = None,
    transform: BatchTransform | None = None,
) -> TrialResult:
    """Run ``model`` over the site's samples and score every one.

    Parameters
    ----------
    model : nn.Module
        Maps a batch to ``(B, num_classes)`` logits. The built-in models take the
        ``uint8`` batch as it is; it is left in the train/eval mode it had.
    site : SiteData
        The site's samples.
    batch_size : int (default: 1024)
        Images moved to the device and scored at once.
    device : torch.device or str, optional
        Where to run; default: where the model's parameters are.
    transform : callable, optional
        Applied to each ``uint8`` batch on the device before the model, for a
        model that expects other input (e.g. ``lambda x: x.float() / 255``).

    Returns
    -------
    TrialResult
        Predictions and every confidence metric, one per sample.
    """
    if len(site) == 0:
        raise ValueError("the site has no samples to trial-test")
    if device is None:
        device = next(model.parameters()).device
    labels = site.labels.to(device)
    predictions = torch.empty(len(site), dtype=torch.long, device=device)
    confidence = {
        name: torch.empty(len(site), dtype=torch.float64, device=device)
        for name in CONFIDENCE_METRICS
    }
    batches = batched_logits(
        model, site.images, batch_size=batch_size, device=device, transform=transform
    )
    for rows, logits in batches:
        if rows.start == 0:  # shapes and classes; later batches cannot differ
            check_logits(logits, labels[rows])
        predictions[rows] = logits.argmax(dim=1)
        for name, metric in CONFIDENCE_METRICS.items():
            confidence[name][rows] = metric(logits, labels[rows])
    # Non-finite logits make entropy NaN; one check here avoids a device sync per batch.
    if not all(bool(torch.isfinite(values).all()) for values in confidence.values()):
        raise ValueError(
            "the model produced NaN or inf logits; its scores are unusable"
        )
    return TrialResult(
        ids=site.ids.numpy(),
        labels=site.labels.numpy(),
        predictions=predictions.cpu().numpy(),
        confidence={name: values.cpu().numpy() for name, values in confidence.items()},
    )
