"""Label noise for experiments: a seeded share of the sites' labels flipped.

Real sites' labels are never clean; these flips let a run show what noise does
to each selection policy. The flipped samples are a seeded fraction of the
sites' pool, the same whatever the partition (so every scheme and every site
layout of a seed meets the same noisy samples); the server's own samples and
its held-out ones are never in the pool, so they stay clean.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

NOISE_KINDS = ("symmetric", "asymmetric")
"""How a flipped label is chosen (the run-config key ``label-noise-kind``)."""


@dataclass(frozen=True)
class LabelNoise:
    """How much of the sites' labels an experiment flips, and how.

    Parameters
    ----------
    fraction : float (default: 0.0)
        Share of the pool flipped, in [0, 1).
    kind : str (default: "symmetric")
        A name from :data:`NOISE_KINDS` (see :func:`flip_labels`).
    """

    fraction: float = 0.0
    kind: str = "symmetric"

    def __post_init__(self) -> None:
        if not 0.0 <= self.fraction < 1.0:
            raise ValueError(f"label noise must be in [0, 1), got {self.fraction}")
        if self.kind not in NOISE_KINDS:
            raise ValueError(f"unknown label-noise kind {self.kind!r}")

    @property
    def tag(self) -> str:
        """Return the noise as a file-name part: ``""`` (clean), ``"-noise0.2"``...

        >>> LabelNoise(0.2, "asymmetric").tag
        '-noise0.2-asymmetric'
        """
        if not self.fraction:
            return ""
        kind = "" if self.kind == "symmetric" else f"-{self.kind}"
        return f"-noise{self.fraction}{kind}"

    def flip(
        self, labels: torch.Tensor, positions: np.ndarray, seed: int, num_classes: int
    ) -> tuple[torch.Tensor, np.ndarray]:
        """Return :func:`flip_labels` of ``positions`` (none flipped without noise)."""
        if not self.fraction:
            return labels, np.zeros(0, np.int64)
        return flip_labels(
            labels, positions, self.fraction, seed, num_classes, self.kind
        )


CLEAN = LabelNoise()
"""No label flipped."""


def flip_labels(
    labels: torch.Tensor,
    positions: np.ndarray,
    fraction: float,
    seed: int,
    num_classes: int,
    kind: str = "symmetric",
) -> tuple[torch.Tensor, np.ndarray]:
    """Return ``labels`` with ``fraction`` of ``positions`` flipped, and which ones.

    ``int(fraction * len(positions))`` positions are drawn without replacement
    with a generator seeded by ``(seed, 7)``. ``"symmetric"``: each flipped
    label becomes one of the other classes, uniformly. ``"asymmetric"``: class
    ``c`` always becomes ``(c + 1) % num_classes``, the same wrong class for
    every sample of a class (as a systematic confusion would).

    Examples
    --------
    >>> labels = torch.tensor([0, 1, 2, 3])
    >>> noisy, flipped = flip_labels(labels, np.arange(4), 0.5, 0, 4, "asymmetric")
    >>> len(flipped), int((noisy != labels).sum())
    (2, 2)
    """
    if kind not in NOISE_KINDS:
        raise ValueError(
            f"unknown label-noise kind {kind!r}; choose one of {NOISE_KINDS}"
        )
    rng = np.random.default_rng([seed, 7])
    flipped = rng.choice(positions, size=int(fraction * len(positions)), replace=False)
    noisy = labels.clone()
    if kind == "symmetric":
        shift = torch.from_numpy(rng.integers(1, num_classes, len(flipped)))
    else:
        shift = torch.ones(len(flipped), dtype=torch.int64)
    index = torch.from_numpy(flipped)
    noisy[index] = (noisy[index] + shift) % num_classes
    return noisy, flipped
