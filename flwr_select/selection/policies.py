"""Which samples a site sends: selection policies, budgets and the site's ledger.

A policy puts a site's eligible samples in priority order (most worth sending
first); the budget then keeps the head of that order. Every policy ranks through
one helper, :func:`rank`, which sorts by descending keys and breaks ties with the
seeded generator, so direction is declared once and the same seed, data and
config always give the same indices.

Policies of the paper (Jiang et al. 2017): ``uniform`` (Fig. 4, black),
``oblivious`` (wrong samples first, the rest uniform; red), ``proxy`` (greedy by
eq. 6; blue), ``lowest-confidence`` (Fig. 2) and ``group`` (Fig. 3). Beyond the
paper: ``class-balanced`` and ``stochastic``, which temper the class and
confidence bias of a greedy top-k, and ``trimmed-proxy`` and
``trimmed-lowest-confidence``, which keep the proxy's gain where labels may be
wrong or classes ambiguous.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar, Protocol

import numpy as np

from flwr_select.selection.ledger import SentLedger
from flwr_select.selection.scores import (
    DEFAULT_EPS,
    check_confidence,
    check_eps,
    combine_proxy,
)
from flwr_select.selection.trial import TrialResult

Seed = int | Sequence[int]


@dataclass(frozen=True)
class Candidates:
    """The scores of the samples a policy may choose from, aligned by position.

    Parameters
    ----------
    wrong : np.ndarray
        bool, True where the trial test's prediction is wrong.
    confidence : np.ndarray
        float, the chosen confidence metric (higher = less confident).
    labels : np.ndarray
        int, the samples' labels (as the site holds them: maybe wrong).
    label_probability : np.ndarray
        float, the model's probability of each sample's label, in [0, 1].
    eps : float (default: 1e-6)
        The epsilon of eq. (6).
    """

    wrong: np.ndarray
    confidence: np.ndarray
    labels: np.ndarray
    label_probability: np.ndarray
    eps: float = DEFAULT_EPS

    def __post_init__(self) -> None:
        check_eps(self.eps)

    def __len__(self) -> int:
        return len(self.wrong)

    @property
    def proxy(self) -> np.ndarray:
        """Eq. (6) of each candidate: wrong ones first, then by confidence."""
        return combine_proxy(self.wrong, self.confidence, eps=self.eps)

    def likely_mislabelled(self, trim: float) -> np.ndarray:
        """Bool, True where the model gives the label a probability below ``trim``."""
        return likely_mislabelled(self.label_probability, trim)


def check_trim(trim: float) -> None:
    """Raise ``ValueError`` unless ``trim`` is in (0, 1)."""
    if not 0 < trim < 1:
        raise ValueError(f"trim must be in (0, 1), got {trim}")


def likely_mislabelled(label_probability: np.ndarray, trim: float) -> np.ndarray:
    """Bool, True where a label's probability under the model is below ``trim``.

    What the ``trimmed-proxy`` policy skips and the server's audit counts: the
    model is all but sure the sample belongs to another class.

    Examples
    --------
    >>> likely_mislabelled(np.array([0.001, 0.3, 0.99]), 0.01).tolist()
    [True, False, False]
    """
    return np.asarray(label_probability) < trim


def rank(rng: np.random.Generator, *keys: np.ndarray) -> np.ndarray:
    """Return positions sorted by ``keys`` descending, the first key primary.

    Ties on every key are broken by a random permutation from ``rng``, never by
    array order.

    Examples
    --------
    >>> rank(np.random.default_rng(0), np.array([0.1, 0.9, 0.5])).tolist()
    [1, 2, 0]
    """
    tiebreak = rng.permutation(len(keys[0]))
    descending = [-np.asarray(key, dtype=np.float64) for key in reversed(keys)]
    return np.lexsort((tiebreak, *descending))


def squash(values: np.ndarray) -> np.ndarray:
    """Map scores monotonically into (-1, 1), so that keys of policies can stack.

    Examples
    --------
    >>> squash(np.array([-3.0, 0.0, 1.0])).tolist()
    [-0.75, 0.0, 0.5]
    """
    values = np.asarray(values, dtype=np.float64)
    return values / (1.0 + np.abs(values))


class Policy(Protocol):
    """Puts candidates in priority order; the budget keeps the head of it."""

    name: ClassVar[str]

    def order(self, candidates: Candidates, rng: np.random.Generator) -> np.ndarray:
        """Return candidate positions, most worth sending first."""
        ...

    def priority(self, candidates: Candidates) -> np.ndarray:
        """Return each candidate's worth, comparable between sites (float64).

        Along :meth:`order` it never increases, so a site's best k are its k
        highest: what one global budget across sites compares
        (:mod:`~flwr_select.selection.allocation`). A policy with no such
        value (a random one) gives every candidate 0: sites then share by size.
        """
        ...


@dataclass(frozen=True)
class Uniform:
    """Every sample equally likely: the paper's baseline (Fig. 4, black)."""

    name: ClassVar[str] = "uniform"

    def order(self, candidates: Candidates, rng: np.random.Generator) -> np.ndarray:
        """Return a uniformly random permutation."""
        return rng.permutation(len(candidates))

    def priority(self, candidates: Candidates) -> np.ndarray:
        """Return 0 for every candidate: none is worth more than another."""
        return np.zeros(len(candidates))


@dataclass(frozen=True)
class Oblivious:
    """Confidence-oblivious: wrong samples first, then right ones (Fig. 4, red).

    Uniform within each of the two groups.
    """

    name: ClassVar[str] = "oblivious"

    def order(self, candidates: Candidates, rng: np.random.Generator) -> np.ndarray:
        """Return wrong before right, random within each."""
        return rank(rng, candidates.wrong)

    def priority(self, candidates: Candidates) -> np.ndarray:
        """Return 1 for a wrong prediction, 0 for a right one."""
        return candidates.wrong.astype(np.float64)


@dataclass(frozen=True)
class Proxy:
    """Greedy by the correctness & confidence proxy of eq. (6) (Fig. 4, blue)."""

    name: ClassVar[str] = "proxy"

    def order(self, candidates: Candidates, rng: np.random.Generator) -> np.ndarray:
        """Return by descending eq. (6)."""
        return rank(rng, candidates.proxy)

    def priority(self, candidates: Candidates) -> np.ndarray:
        """Return eq. (6), squashed into (-1, 1)."""
        return squash(candidates.proxy)


@dataclass(frozen=True)
class LowestConfidence:
    """Wrong samples first, then right ones of lowest confidence (Fig. 2).

    Wrong samples are in uniform order among themselves, as in ``oblivious``, so
    the two differ only in how the right ones are chosen: the experiment that
    isolates the confidence metric.
    """

    name: ClassVar[str] = "lowest-confidence"

    def order(self, candidates: Candidates, rng: np.random.Generator) -> np.ndarray:
        """Return wrong first, then right ones by descending uncertainty."""
        right_confidence = np.where(candidates.wrong, 0.0, candidates.confidence)
        return rank(rng, candidates.wrong, right_confidence)

    def priority(self, candidates: Candidates) -> np.ndarray:
        """Return 2 for a wrong prediction, the squashed confidence for a right one."""
        return np.where(candidates.wrong, 2.0, squash(candidates.confidence))


GROUPS = (
    "wrong-unconfident",
    "wrong-confident",
    "correct-unconfident",
    "correct-confident",
)
"""The four groups of section 4.2 (Fig. 3)."""


@dataclass(frozen=True)
class Group:
    """Only one of the four groups of section 4.2, in uniform order.

    Wrong and right samples are each split in half at their median confidence:
    the ``m // 2`` least confident of the ``m`` are "unconfident", the rest
    (the median one included when ``m`` is odd) "confident".

    Parameters
    ----------
    group : str
        One of :data:`GROUPS`.
    """

    group: str
    name: ClassVar[str] = "group"

    def __post_init__(self) -> None:
        if self.group not in GROUPS:
            raise ValueError(f"unknown group {self.group!r}; choose one of {GROUPS}")

    def order(self, candidates: Candidates, rng: np.random.Generator) -> np.ndarray:
        """Return the members of the group, uniformly shuffled."""
        unconfident = np.zeros(len(candidates), dtype=bool)
        for wrong in (True, False):
            members = np.flatnonzero(candidates.wrong == wrong)
            by_doubt = members[rank(rng, candidates.confidence[members])]
            unconfident[by_doubt[: len(members) // 2]] = True
        want_wrong = self.group.startswith("wrong")
        want_unconfident = "-unconfident" in self.group
        chosen = (candidates.wrong == want_wrong) & (unconfident == want_unconfident)
        return rng.permutation(np.flatnonzero(chosen))

    def priority(self, candidates: Candidates) -> np.ndarray:
        """Return 0 for every candidate: the group's members are in random order."""
        return np.zeros(len(candidates))


@dataclass(frozen=True)
class TrimmedProxy:
    """The proxy with the likely mislabelled last: for labels that may be wrong.

    A flipped label looks exactly like a confidently wrong prediction: the
    model gives the label almost no probability, so eq. (6) puts it first, and
    with 5 % of a site's labels flipped nearly all of the proxy's uploads are
    flipped ones. Candidates whose label gets a probability below ``trim``
    (:func:`likely_mislabelled`) go to the end; the rest keep the proxy's
    order. On clean data that skips only the confidently wrong, the kind of
    wrong that helps least (the paper's Fig. 3). Beyond the paper.

    Parameters
    ----------
    trim : float (default: 0.01)
        In (0, 1); the server's audit of uploads uses the same threshold.
    """

    trim: float = 0.01
    name: ClassVar[str] = "trimmed-proxy"

    def __post_init__(self) -> None:
        check_trim(self.trim)

    def order(self, candidates: Candidates, rng: np.random.Generator) -> np.ndarray:
        """Return by descending eq. (6), the likely mislabelled last."""
        plausible = ~candidates.likely_mislabelled(self.trim)
        return rank(rng, plausible, candidates.proxy)

    def priority(self, candidates: Candidates) -> np.ndarray:
        """Return the squashed eq. (6), 2 higher where the label is plausible."""
        plausible = ~candidates.likely_mislabelled(self.trim)
        return squash(candidates.proxy) + 2.0 * plausible


@dataclass(frozen=True)
class TrimmedLowestConfidence:
    """Fig. 2's order with the likely mislabelled last: for noisy or ambiguous data.

    ``lowest-confidence`` (wrong predictions first, in random order, then right
    ones of lowest confidence) with ``trimmed-proxy``'s trim: candidates whose
    label gets a probability below ``trim`` go to the end. It differs from the
    trimmed proxy only in the order among the plausible wrong ones, which
    decides what is sent only where a site has more of them than its budget
    (ambiguous classes, such as Fashion-MNIST's shirts and T-shirts). There eq.
    (6) sends the most confidently wrong first, and the reverse (the label with
    the highest probability first) was measured no better (README); drawn at
    random, as the oblivious scheme draws them, they gave the best accuracy
    measured there.
    Beyond the paper.

    Parameters
    ----------
    trim : float (default: 0.01)
        In (0, 1), as for ``trimmed-proxy``.
    """

    trim: float = 0.01
    name: ClassVar[str] = "trimmed-lowest-confidence"

    def __post_init__(self) -> None:
        check_trim(self.trim)

    def order(self, candidates: Candidates, rng: np.random.Generator) -> np.ndarray:
        """Return plausible first; wrong (random) before right (least sure first)."""
        right_confidence = np.where(candidates.wrong, 0.0, candidates.confidence)
        plausible = ~candidates.likely_mislabelled(self.trim)
        return rank(rng, plausible, candidates.wrong, right_confidence)

    def priority(self, candidates: Candidates) -> np.ndarray:
        """Return ``lowest-confidence``'s priority, 4 higher for a plausible label."""
        plausible = ~candidates.likely_mislabelled(self.trim)
        return LowestConfidence().priority(candidates) + 4.0 * plausible


@dataclass(frozen=True)
class ClassBalanced:
    """Equal per-class quotas, each filled in proxy order.

    Round robin over classes: the best sample of every class by eq. (6), then the
    second best of every class, and so on; a class that runs out leaves its share
    to the others. Within one round, higher proxy first.
    """

    name: ClassVar[str] = "class-balanced"

    def order(self, candidates: Candidates, rng: np.random.Generator) -> np.ndarray:
        """Return candidates by rank within their class, then by proxy."""
        by_proxy = rank(rng, candidates.proxy)
        labels = candidates.labels[by_proxy]
        by_class = np.argsort(labels, kind="stable")
        sorted_labels = labels[by_class]
        class_start = np.searchsorted(sorted_labels, sorted_labels, side="left")
        rank_in_class = np.empty(len(candidates), dtype=np.int64)
        rank_in_class[by_class] = np.arange(len(candidates)) - class_start
        return by_proxy[np.argsort(rank_in_class, kind="stable")]

    def priority(self, candidates: Candidates) -> np.ndarray:
        """Return 0 for every candidate: the round robin is no order of worth."""
        return np.zeros(len(candidates))


@dataclass(frozen=True)
class Stochastic:
    """Sampling without replacement, with weights ``exp(confidence / temperature)``.

    With cross-entropy that is ``p_label ** (-1 / temperature)``: wrong and
    unconfident samples are likelier, but no sample is certain, which counters the
    bias of a greedy top-k. A small temperature approaches greedy by confidence, a
    large one approaches uniform. Drawn with the Gumbel top-k trick, so any head of
    the order is itself such a sample.

    Parameters
    ----------
    temperature : float (default: 1.0)
        In the units of the confidence metric; must be > 0.
    """

    temperature: float = 1.0
    name: ClassVar[str] = "stochastic"

    def __post_init__(self) -> None:
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")

    def order(self, candidates: Candidates, rng: np.random.Generator) -> np.ndarray:
        """Return a Plackett-Luce sample of the whole order."""
        gumbel = rng.gumbel(size=len(candidates))
        return rank(rng, candidates.confidence / self.temperature + gumbel)

    def priority(self, candidates: Candidates) -> np.ndarray:
        """Return 0 for every candidate: the order is a random draw."""
        return np.zeros(len(candidates))


POLICIES: dict[str, type[Policy]] = {
    policy.name: policy
    for policy in (
        Uniform,
        Oblivious,
        Proxy,
        TrimmedProxy,
        TrimmedLowestConfidence,
        LowestConfidence,
        Group,
        ClassBalanced,
        Stochastic,
    )
}
"""Every policy class by the name a run config uses (``selection-policy``)."""


def make_policy(name: str, **options: object) -> Policy:
    """Return the policy called ``name``, built with its options.

    Examples
    --------
    >>> make_policy("group", group="correct-unconfident")
    Group(group='correct-unconfident')
    """
    if name not in POLICIES:
        raise ValueError(f"unknown policy {name!r}; choose one of {sorted(POLICIES)}")
    try:
        return POLICIES[name](**options)
    except TypeError as err:
        raise ValueError(f"policy {name!r} got bad options {options}: {err}") from None


@dataclass(frozen=True)
class Budget:
    """How much one site may send in one round; every limit given applies.

    Parameters
    ----------
    rho : float, optional
        Fraction of the site's samples this round, in (0, 1]: at most
        ``floor(rho * n)`` samples (the paper's sum z_i < rho n, never more).
    count : int, optional
        At most this many samples.
    max_bytes : int, optional
        At most this many bytes on the wire; applied when the upload is packed
        (:func:`~flwr_select.selection.wire.pack`), since only the wire format
        knows sizes.
    """

    rho: float | None = None
    count: int | None = None
    max_bytes: int | None = None

    def __post_init__(self) -> None:
        if self.rho is None and self.count is None and self.max_bytes is None:
            raise ValueError("a Budget needs rho, count or max_bytes")
        if self.rho is not None and not 0 < self.rho <= 1:
            raise ValueError(f"rho must be in (0, 1], got {self.rho}")
        if self.count is not None and not (int(self.count) == self.count >= 0):
            raise ValueError(f"count must be an integer >= 0, got {self.count}")
        if self.max_bytes is not None and not self.max_bytes > 0:
            raise ValueError(f"max_bytes must be > 0, got {self.max_bytes}")

    def sample_limit(self, num_samples: int) -> int:
        """Return the most samples a site holding ``num_samples`` may send."""
        limit = num_samples
        if self.rho is not None:
            # The tolerance absorbs float error (0.29 * 100 = 28.999...96).
            limit = min(limit, math.floor(self.rho * num_samples + 1e-9))
        if self.count is not None:
            limit = min(limit, int(self.count))
        return limit


def select(
    trial: TrialResult,
    budget: Budget,
    policy: str | Policy = "proxy",
    *,
    confidence: str = "cross-entropy",
    seed: Seed = 0,
    sent: SentLedger | None = None,
    eps: float = DEFAULT_EPS,
) -> np.ndarray:
    """Return the positions (into ``trial``) of the samples to send, best first.

    Parameters
    ----------
    trial : TrialResult
        The site's trial test.
    budget : Budget
        Its ``rho`` and ``count`` limits are applied here; ``max_bytes`` when
        packing.
    policy : str or Policy (default: "proxy")
        A name from :data:`POLICIES` or a policy object.
    confidence : str (default: "cross-entropy")
        The confidence metric the policy uses.
    seed : int or sequence of int (default: 0)
        Seeds the tie-breaks and random draws; ``(seed, round, site)`` gives each
        round and site its own stream.
    sent : SentLedger, optional
        Samples already sent; they are never offered again.
    eps : float (default: 1e-6)
        The epsilon of eq. (6).

    Returns
    -------
    np.ndarray
        int64 positions, most worth sending first, at most
        ``budget.sample_limit(len(trial))`` of them.
    """
    positions, _ = ranked(
        trial, policy, confidence=confidence, seed=seed, sent=sent, eps=eps
    )
    return positions[: budget.sample_limit(len(trial))]


def ranked(
    trial: TrialResult,
    policy: str | Policy = "proxy",
    *,
    confidence: str = "cross-entropy",
    seed: Seed = 0,
    sent: SentLedger | None = None,
    eps: float = DEFAULT_EPS,
) -> tuple[np.ndarray, np.ndarray]:
    """Return the positions the policy would send, best first, and their priorities.

    The arguments are :func:`select`'s; a budget keeps the head of the first
    array. The second is each one's :meth:`Policy.priority`, never increasing:
    what a site tells the server of its candidates for a global budget
    (:mod:`~flwr_select.selection.allocation`).
    """
    policy = make_policy(policy) if isinstance(policy, str) else policy
    if sent is None:
        eligible = np.arange(len(trial))
    else:
        eligible = np.flatnonzero(~sent.contains(trial.ids))
    candidates = candidates_of(trial, eligible, confidence=confidence, eps=eps)
    order = policy.order(candidates, np.random.default_rng(seed))
    return eligible[order], policy.priority(candidates)[order]


def candidates_of(
    trial: TrialResult,
    positions: np.ndarray,
    *,
    confidence: str = "cross-entropy",
    eps: float = DEFAULT_EPS,
) -> Candidates:
    """Return what a policy sees of the trial's samples at ``positions``."""
    check_confidence(confidence)
    return Candidates(
        wrong=trial.wrong[positions],
        confidence=trial.confidence[confidence][positions],
        labels=trial.labels[positions],
        label_probability=trial.label_probability[positions],
        eps=eps,
    )
