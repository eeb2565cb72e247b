"""Sample scores from a trial test (Jiang et al. 2017, sections 3.3 and 4.2).

Every score is a pure, vectorized function of ``(logits, labels)`` that returns one
float64 value per sample, and every score follows one convention: **higher means
more worth sending**. The confidence metrics therefore measure *un*certainty (a
confident prediction scores low), correctness is 1 for a wrong prediction, and the
proxy of eq. (6) puts every wrong sample above every correct one.

Probabilities come from ``log_softmax`` in float64, so no score is NaN or infinite
at p = 0 or p = 1 for finite logits.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import numpy as np
import torch
from torch import Tensor

from flwr_select import evaluation

ScoreFn = Callable[[Tensor, Tensor], Tensor]
Values = TypeVar("Values", Tensor, np.ndarray)

DEFAULT_EPS = 1e-6
"""The small constant of eq. (6) that keeps ``-1 / (H + eps)`` finite."""


def check_logits(logits: Tensor, labels: Tensor) -> None:
    """Raise ``ValueError`` naming the argument if logits and labels do not match.

    Parameters
    ----------
    logits : Tensor
        ``(n, num_classes)`` floating point, finite.
    labels : Tensor
        ``(n,)`` integer class indices in ``[0, num_classes)``.
    """
    if logits.ndim != 2 or not logits.is_floating_point():
        raise ValueError(
            f"logits must be a 2-D float tensor (n, num_classes), got shape "
            f"{tuple(logits.shape)} and dtype {logits.dtype}"
        )
    if logits.shape[1] < 2:
        raise ValueError(f"logits need at least 2 classes, got {logits.shape[1]}")
    if labels.ndim != 1 or labels.is_floating_point() or labels.dtype == torch.bool:
        raise ValueError(
            f"labels must be a 1-D integer tensor, got shape {tuple(labels.shape)} "
            f"and dtype {labels.dtype}"
        )
    if labels.shape[0] != logits.shape[0]:
        raise ValueError(
            f"labels has {labels.shape[0]} entries but logits has "
            f"{logits.shape[0]} rows"
        )
    if not bool(torch.isfinite(logits).all()):
        raise ValueError("logits contain NaN or inf; the model's output is unusable")
    if labels.numel() and (
        int(labels.min()) < 0 or int(labels.max()) >= logits.shape[1]
    ):
        raise ValueError(
            f"labels must lie in [0, {logits.shape[1]}), got values from "
            f"{int(labels.min())} to {int(labels.max())}"
        )


def _log_probs(logits: Tensor) -> Tensor:
    return logits.double().log_softmax(dim=1)


def correctness(logits: Tensor, labels: Tensor) -> Tensor:
    """Return 1.0 where the top-1 prediction is wrong, 0.0 where it is right.

    Range {0, 1}; higher (wrong) is more worth sending. Ties in the top score
    resolve to the lowest class index, as ``argmax`` does.
    """
    return (logits.argmax(dim=1) != labels).double()


def cross_entropy(logits: Tensor, labels: Tensor) -> Tensor:
    """Return ``-log p_label``, the training loss of each sample.

    Range [0, inf); higher (the model gives the true label less mass) is more
    worth sending.
    """
    return evaluation.cross_entropy(logits, labels)


def entropy(logits: Tensor, labels: Tensor) -> Tensor:
    """Return ``-sum_i p_i log p_i`` of the predicted distribution.

    Range [0, log C]; higher (a flatter prediction) is more worth sending. The
    label is not used.
    """
    log_p = _log_probs(logits)
    return (-(log_p.exp() * log_p).sum(dim=1)).clamp_min(0.0)


def gini_simpson(logits: Tensor, labels: Tensor) -> Tensor:
    """Return the Gini-Simpson index ``1 - sum_i p_i^2``.

    Range [0, 1 - 1/C]; higher (mass spread over classes) is more worth sending.
    The label is not used.
    """
    p = _log_probs(logits).exp()
    return (1.0 - (p * p).sum(dim=1)).clamp_min(0.0)


def max_likelihood(logits: Tensor, labels: Tensor) -> Tensor:
    """Return ``1 - max_i p_i``.

    Range [0, 1 - 1/C]; higher (a less likely top class) is more worth sending.
    The label is not used.
    """
    return 1.0 - _log_probs(logits).max(dim=1).values.exp()


def margin(logits: Tensor, labels: Tensor) -> Tensor:
    """Return ``1 - (p_top1 - p_top2)``, one minus the gap between the top two.

    Range [0, 1]; higher (a closer call between the two best classes) is more
    worth sending. The label is not used.
    """
    top2 = _log_probs(logits).topk(2, dim=1).values.exp()
    return 1.0 - (top2[:, 0] - top2[:, 1])


CONFIDENCE_METRICS: dict[str, ScoreFn] = {
    "cross-entropy": cross_entropy,
    "entropy": entropy,
    "gini-simpson": gini_simpson,
    "max-likelihood": max_likelihood,
    "margin": margin,
}
"""The confidence metrics of section 3.3 (plus margin), by the name a config uses."""


def combine_proxy(
    wrong: Values, confidence: Values, *, eps: float = DEFAULT_EPS
) -> Values:
    """Return eq. (6) from correctness and confidence already computed.

    ``H`` where the prediction is wrong, ``-1 / (H + eps)`` where it is right, so
    every wrong sample (score >= 0) ranks above every right one (score < 0), and
    within each group a less confident sample ranks higher. Works on torch tensors
    and NumPy arrays alike (``wrong`` as 0/1 or bool, ``confidence`` >= 0).
    """
    check_eps(eps)
    wrong = wrong * 1.0
    return wrong * confidence - (1.0 - wrong) / (confidence + eps)


def check_eps(eps: float) -> None:
    """Raise ``ValueError`` unless the epsilon of eq. (6) is > 0."""
    if not eps > 0:
        raise ValueError(f"eps must be > 0, got {eps}")


def check_confidence(name: str) -> None:
    """Raise ``ValueError`` if ``name`` is not a confidence metric."""
    if name not in CONFIDENCE_METRICS:
        raise ValueError(
            f"unknown confidence metric {name!r}; choose one of "
            f"{sorted(CONFIDENCE_METRICS)}"
        )


def proxy(
    logits: Tensor,
    labels: Tensor,
    *,
    confidence: str = "cross-entropy",
    eps: float = DEFAULT_EPS,
) -> Tensor:
    """Return the correctness & confidence proxy of eq. (6).

    Range: [0, inf) for wrong samples, [-1/eps, 0) for right ones; higher is more
    worth sending. ``confidence`` names the metric ``H`` (cross-entropy, as the
    paper settles on, by default).
    """
    check_confidence(confidence)
    h = CONFIDENCE_METRICS[confidence](logits, labels)
    return combine_proxy(correctness(logits, labels), h, eps=eps)


SCORES: dict[str, ScoreFn] = {
    **CONFIDENCE_METRICS,
    "correctness": correctness,
    "proxy": proxy,
}
"""Every score by its short name; all follow "higher = more worth sending"."""


def score(name: str, logits: Tensor, labels: Tensor) -> Tensor:
    """Return the score called ``name`` for each sample, after checking the inputs.

    Examples
    --------
    >>> import torch
    >>> logits = torch.tensor([[2.0, 0.0], [0.0, 2.0]])
    >>> score("correctness", logits, torch.tensor([0, 0])).tolist()
    [0.0, 1.0]
    """
    if name not in SCORES:
        raise ValueError(f"unknown score {name!r}; choose one of {sorted(SCORES)}")
    check_logits(logits, labels)
    return SCORES[name](logits, labels)
