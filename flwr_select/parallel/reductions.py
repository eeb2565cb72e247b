"""Ways to combine the workers' gradients into one update (Sharp 2020).

Every reduction is a pure function of a stack of flattened gradients
``grads`` (workers x parameters), the workers' example counts ``weights`` and
their batch losses ``losses``, returning one gradient. The weighted mean is the
conventional data-parallel reduction; the others trade its efficiency for
robustness (median, trimmed mean, clipping) or emphasise some workers (norm and
loss weighting, largest or smallest norm). With one worker every reduction
returns that worker's gradient, except ``clipped-mean`` with a fixed clip norm
below its norm (then it is scaled down to that norm).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import Tensor

Reduction = Callable[[Tensor, Tensor, Tensor], Tensor]


def weighted_mean(grads: Tensor, weights: Tensor, losses: Tensor) -> Tensor:
    """Mean weighted by the workers' example counts (the conventional reduction)."""
    return _weighted(grads, weights)


def coordinate_median(grads: Tensor, weights: Tensor, losses: Tensor) -> Tensor:
    """Median of each coordinate; with an even count, the mean of the middle two."""
    return grads.quantile(0.5, dim=0, interpolation="midpoint")


def trimmed_mean(
    grads: Tensor, weights: Tensor, losses: Tensor, *, trim: float = 0.1
) -> Tensor:
    """Per coordinate, the mean of the values left after trimming both ends.

    The ``floor(trim * n)`` lowest and highest values are dropped, at most
    ``(n - 1) // 2`` each side, so one value always stays.
    """
    count = len(grads)
    cut = min(int(trim * count), (count - 1) // 2)
    ordered = grads.sort(dim=0).values
    return ordered[cut : count - cut].mean(dim=0)


def gradient_sum(grads: Tensor, weights: Tensor, losses: Tensor) -> Tensor:
    """Sum over workers (an update as large as all workers' steps together)."""
    return grads.sum(dim=0)


def largest_norm(grads: Tensor, weights: Tensor, losses: Tensor) -> Tensor:
    """Pick the gradient with the largest L2 norm; on ties, the first worker's."""
    return grads[int(torch.argmax(grads.norm(dim=1)))]


def smallest_norm(grads: Tensor, weights: Tensor, losses: Tensor) -> Tensor:
    """Pick the gradient with the smallest L2 norm; on ties, the first worker's."""
    return grads[int(torch.argmin(grads.norm(dim=1)))]


def norm_weighted_mean(grads: Tensor, weights: Tensor, losses: Tensor) -> Tensor:
    """Mean weighted by each gradient's L2 norm (the plain mean if all are 0)."""
    return _weighted(grads, grads.norm(dim=1))


def loss_weighted_mean(grads: Tensor, weights: Tensor, losses: Tensor) -> Tensor:
    """Mean weighted by each worker's batch loss (the plain mean if all are 0)."""
    return _weighted(grads, losses)


def clipped_mean(
    grads: Tensor, weights: Tensor, losses: Tensor, *, clip_norm: float = 0.0
) -> Tensor:
    """Weighted mean after scaling each gradient down to at most ``clip_norm``.

    ``clip_norm = 0`` clips to the median of the workers' norms, so no worker
    can pull the mean more than a typical one (and one worker is not changed).
    """
    norms = grads.norm(dim=1)
    limit = (
        norms.quantile(0.5, interpolation="midpoint") if clip_norm == 0 else clip_norm
    )
    scale = torch.where(norms > limit, limit / norms, torch.ones_like(norms))
    return _weighted(grads * scale[:, None], weights)


def _weighted(grads: Tensor, weights: Tensor) -> Tensor:
    """Mean of ``grads`` weighted by ``weights`` (equal weights if they sum to 0)."""
    weights = weights.to(grads.dtype)
    total = weights.sum()
    if total <= 0:
        return grads.mean(dim=0)
    return (weights[:, None] * grads).sum(dim=0) / total


REDUCTIONS: dict[str, Reduction] = {
    "mean": weighted_mean,
    "median": coordinate_median,
    "trimmed-mean": trimmed_mean,
    "sum": gradient_sum,
    "largest-norm": largest_norm,
    "smallest-norm": smallest_norm,
    "norm-weighted": norm_weighted_mean,
    "loss-weighted": loss_weighted_mean,
    "clipped-mean": clipped_mean,
}
"""Every reduction by its run-config name."""


def make_reduction(
    name: str, *, trim: float = 0.1, clip_norm: float = 0.0
) -> Reduction:
    """Return the reduction ``name`` with its option bound (``trim``, ``clip_norm``)."""
    if name not in REDUCTIONS:
        raise ValueError(
            f"unknown reduction {name!r}; choose one of {', '.join(REDUCTIONS)}"
        )
    if not 0.0 <= trim < 0.5:
        raise ValueError(f"trim must be in [0, 0.5), got {trim}")
    if not clip_norm >= 0:
        raise ValueError(f"clip-norm must be >= 0, got {clip_norm}")
    if name == "trimmed-mean":
        return functools.partial(trimmed_mean, trim=trim)
    if name == "clipped-mean":
        return functools.partial(clipped_mean, clip_norm=clip_norm)
    return REDUCTIONS[name]


def reduce(
    reduction: Reduction, grads: Tensor, weights: Tensor, losses: Tensor
) -> Tensor:
    """Apply ``reduction`` after checking the stack's shapes and values."""
    if grads.ndim != 2 or len(grads) == 0:
        raise ValueError(
            f"grads must be a non-empty (workers, parameters) stack, got "
            f"shape {tuple(grads.shape)}"
        )
    if weights.shape != (len(grads),) or losses.shape != (len(grads),):
        raise ValueError(
            f"weights and losses need one value per worker ({len(grads)}), got "
            f"{tuple(weights.shape)} and {tuple(losses.shape)}"
        )
    if not all(t.isfinite().all() for t in (grads, weights, losses)):
        raise ValueError("gradients, weights and losses must be finite")
    if (weights < 0).any() or (losses < 0).any():
        raise ValueError("weights and losses must be >= 0")
    return reduction(grads, weights, losses)
