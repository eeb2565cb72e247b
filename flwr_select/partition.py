"""The paper's data protocol: held-out, initial and site data, presented in folds.

Section 4 of Jiang et al.: from the training set, 5k samples validate, 5k train
the initial model, and the rest arrive at the sites in folds, one per round. The
server and every site compute the same split from the same seed, so no index
list ever crosses the wire.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class PaperSplit:
    """Positions into a training set, disjoint.

    Attributes
    ----------
    validation : np.ndarray
        Held-out samples the server evaluates on.
    initial : np.ndarray
        Samples the server trains the initial model on.
    pool : np.ndarray
        Samples that arrive at the sites.
    """

    validation: np.ndarray
    initial: np.ndarray
    pool: np.ndarray


def paper_split(
    num_samples: int,
    *,
    seed: int,
    validation: int = 5_000,
    initial: int = 5_000,
    pool: int | None = None,
) -> PaperSplit:
    """Shuffle ``num_samples`` positions with ``seed`` and cut them in three.

    Parameters
    ----------
    num_samples : int
        Size of the training set.
    seed : int
        The run's seed; the same seed gives the same split on every process.
    validation, initial : int (default: 5000 each)
        Sizes of the held-out and initial parts.
    pool : int, optional
        Size of the sites' part (default: everything left), for short runs.

    Examples
    --------
    >>> split = paper_split(20, seed=0, validation=5, initial=5, pool=6)
    >>> [len(split.validation), len(split.initial), len(split.pool)]
    [5, 5, 6]
    """
    available = num_samples - validation - initial
    if validation < 0 or initial < 0 or available < 1:
        raise ValueError(
            f"validation={validation} and initial={initial} leave no samples of "
            f"{num_samples} for the sites"
        )
    if pool is not None and not 1 <= pool <= available:
        raise ValueError(f"pool must be in [1, {available}], got {pool}")
    order = np.random.default_rng(seed).permutation(num_samples)
    end = validation + initial + (available if pool is None else pool)
    return PaperSplit(
        order[:validation],
        order[validation : validation + initial],
        order[validation + initial : end],
    )


def site_partition(
    pool: np.ndarray, partition_id: int, num_partitions: int
) -> np.ndarray:
    """Return site ``partition_id``'s share of the (already shuffled) pool: IID."""
    if not 0 <= partition_id < num_partitions:
        raise ValueError(
            f"partition-id must be in [0, {num_partitions}), got {partition_id}"
        )
    return np.array_split(pool, num_partitions)[partition_id]


def round_fold(partition: np.ndarray, server_round: int, num_rounds: int) -> np.ndarray:
    """Return the fold a site sees in ``server_round`` (1-based) of ``num_rounds``.

    The partition is cut into ``num_rounds`` near-equal folds, so every sample
    arrives exactly once over the run: the paper's continuous arrival.
    """
    if not 1 <= server_round <= num_rounds:
        raise ValueError(
            f"server-round must be in [1, {num_rounds}], got {server_round}"
        )
    return np.array_split(partition, num_rounds)[server_round - 1]
