"""One upload budget for all sites: the best samples anywhere, not rho of each.

The paper's future work ("coordination across multiple remote sites"). In phase
1 of a round every site trial-tests its candidates and says, in a
:class:`ScoreSketch` of fixed size, what its best ones are worth (the policy's
:meth:`~flwr_select.selection.policies.Policy.priority`, comparable between
sites). :func:`allocate` gives each site the quota that makes the budget's
best samples across all sites the ones uploaded in phase 2, where each site
sends its quota, best first, exactly as it would send its rho.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from flwr_select.selection.wire import UploadError

SKETCH_POINTS = 128
"""Ranks a site's sketch holds at most: 128 priorities and ranks, about 2 KB."""


@dataclass(frozen=True)
class ScoreSketch:
    """A site's best candidates' priorities at a few ranks, for phase 1.

    Parameters
    ----------
    ranks : np.ndarray
        int64, increasing, from 1: the k of "the k-th best"; the last is the
        most the site can send this round (:attr:`limit`).
    values : np.ndarray
        float64, never increasing: the priority of the site's k-th best.
    """

    ranks: np.ndarray
    values: np.ndarray

    @classmethod
    def check(cls, ranks: object, values: object, candidates: int) -> ScoreSketch:
        """Return a site's sketch from what its reply holds, or raise ``UploadError``.

        ``ranks`` must be at most :data:`SKETCH_POINTS` increasing ints from 1
        to at most ``candidates`` (already checked: an int >= 0), ``values``
        as many finite floats, never increasing.
        """
        if not isinstance(ranks, list) or not isinstance(values, list):
            raise UploadError("a sketch's ranks and values must be lists")
        if len(ranks) > SKETCH_POINTS or len(values) != len(ranks):
            raise UploadError(
                f"a sketch holds as many values as ranks, at most {SKETCH_POINTS}; "
                f"got {len(ranks)} ranks and {len(values)} values"
            )
        if not all(type(r) is int for r in ranks) or not all(
            type(v) is float for v in values
        ):
            raise UploadError("a sketch's ranks must be ints and its values floats")
        r, v = np.array(ranks, np.int64), np.array(values, np.float64)
        increasing = len(r) == 0 or (r[0] >= 1 and (np.diff(r) > 0).all())
        if not increasing or (len(r) and r[-1] > candidates):
            raise UploadError(
                f"a sketch's ranks must increase from 1 to at most num-candidates "
                f"= {candidates}"
            )
        if not np.isfinite(v).all() or (np.diff(v) > 0).any():
            raise UploadError("a sketch's values must be finite and never increase")
        return cls(r, v)

    @classmethod
    def of(
        cls, priorities: np.ndarray, limit: int, points: int = SKETCH_POINTS
    ) -> ScoreSketch:
        """Sketch the first ``limit`` of ``priorities`` (best first) at ``points``.

        The ranks are evenly spaced from 1 to the limit, both included.

        Examples
        --------
        >>> sketch = ScoreSketch.of(np.array([0.9, 0.5, 0.4, 0.1]), limit=3, points=2)
        >>> sketch.ranks.tolist(), sketch.values.tolist(), sketch.limit
        ([1, 3], [0.9, 0.4], 3)
        """
        limit = min(limit, len(priorities))
        ranks = np.unique(np.linspace(1, limit, min(points, limit)).round())
        ranks = ranks.astype(np.int64)
        return cls(ranks, np.asarray(priorities, np.float64)[ranks - 1])

    def clipped(self, limit: int) -> ScoreSketch:
        """Return the sketch of at most ``limit`` samples (the same ranking).

        Examples
        --------
        >>> sketch = ScoreSketch(np.array([1, 5]), np.array([1.0, 0.0]))
        >>> sketch.clipped(3).ranks.tolist(), sketch.clipped(3).values.tolist()
        ([1, 3], [1.0, 0.5])
        """
        if self.limit <= limit:
            return self
        keep = self.ranks < limit
        ranks = np.append(self.ranks[keep], limit)[: max(limit, 0)]
        values = np.append(self.values[keep], np.interp(limit, self.ranks, self.values))
        return ScoreSketch(ranks, values[: len(ranks)])

    def after(self, count: int) -> ScoreSketch:
        """Return the sketch of what follows the site's ``count`` best.

        A top-up asks for the samples after those a site already sent; its
        k-th best is the (count + k)-th of this sketch. Only sketched ranks are
        kept (no interpolated value is claimed for the site).

        Examples
        --------
        >>> sketch = ScoreSketch(np.array([1, 3, 5]), np.array([0.9, 0.5, 0.1]))
        >>> sketch.after(2).ranks.tolist(), sketch.after(2).values.tolist()
        ([1, 3], [0.5, 0.1])
        """
        keep = self.ranks > count
        return ScoreSketch(self.ranks[keep] - count, self.values[keep])

    @property
    def limit(self) -> int:
        """The most samples the site can send (0 for none)."""
        return int(self.ranks[-1]) if len(self.ranks) else 0

    def curve(self, depth: int) -> np.ndarray:
        """Return the priority of the site's 1st to ``min(depth, limit)``-th best.

        Linear between the sketched ranks: the site's ranking, as the server
        sees it.
        """
        ranks = np.arange(1, min(depth, self.limit) + 1)
        if len(ranks) == 0:
            return np.zeros(0)
        return np.interp(ranks, self.ranks, self.values)


def allocate(sketches: Mapping[int, ScoreSketch], budget: int) -> dict[int, int]:
    """Return each site's quota: together, the ``budget`` best samples of all sites.

    What the k-th best of a site is worth is its :meth:`ScoreSketch.curve`; the
    quotas take the ``budget`` highest values of all curves together, never
    more than a site's limit. Equal values are shared in proportion to the
    sites' limits (by the fraction k / limit, then by site key), so a policy
    that ranks nothing (all priorities 0) splits the budget by size, and the
    same sketches give the same quotas, in whatever order they came. Work and
    memory grow with the sum over sites of ``min(limit, budget)``.

    Examples
    --------
    >>> a = ScoreSketch(np.array([1, 4]), np.array([0.9, 0.6]))
    >>> b = ScoreSketch(np.array([1, 4]), np.array([0.8, 0.1]))
    >>> allocate({7: a, 3: b}, 5)
    {3: 1, 7: 4}
    """
    sites = sorted(sketches)
    quotas = dict.fromkeys(sites, 0)
    curves = [sketches[site].curve(budget) for site in sites]
    if budget <= 0 or not any(len(c) for c in curves):
        return quotas
    values = np.concatenate(curves)
    share = np.concatenate(
        [
            np.arange(1, len(c) + 1) / max(sketches[site].limit, 1)
            for site, c in zip(sites, curves, strict=True)
        ]
    )
    owner = np.concatenate([np.full(len(c), i) for i, c in enumerate(curves)])
    best = np.lexsort((owner, share, -values))[:budget]
    for i, count in enumerate(np.bincount(owner[best], minlength=len(sites))):
        quotas[sites[i]] = int(count)
    return quotas


def round_budget(shares: Mapping[int, int]) -> int:
    """Return the samples a round buys: the sites' shares, none above another's.

    ``shares`` are each site's per-site budget (its rho share of the candidates
    it says it holds), which the server cannot check. Each counts at most as
    much as the second largest, so no single site can raise the round's total by
    more than the largest share of another site, whatever it claims: the
    budget the round would have if that site were an honest site as large as
    the largest other. Honest sites of equal size (an iid split) lose nothing;
    of unequal ones, only the largest loses what it holds beyond the second;
    one site alone counts as it is.

    Examples
    --------
    >>> round_budget({1: 50, 2: 50, 3: 2**40})
    150
    >>> round_budget({1: 50, 2: 30, 3: 0}), round_budget({1: 50})
    (60, 50)
    """
    ordered = sorted(shares.values(), reverse=True)
    if len(ordered) < 2:
        return sum(ordered)
    return sum(min(share, ordered[1]) for share in ordered)


PROBATION_LEVELS = 4
"""A site caught is held at 1/2**4 of an even share; each round it keeps its word
doubles that, and after 4 such rounds it is trusted again."""


@dataclass
class Probation:
    """The sites that did not deliver the quota they won, and how far each is held.

    A site given a quota in a round with one global budget that then does not
    send it in full, as its sketch said it could (its upload failed, was
    rejected, or held fewer samples), is caught: in later rounds it may be
    given at most ``2**level / 2**PROBATION_LEVELS`` of an even share of the
    budget (:meth:`cap`), starting at level 0, and at least one sample, so that
    it can earn trust back. Each round in which it delivers a quota > 0 in full
    raises its level by one; at :data:`PROBATION_LEVELS` it is released. Caught
    again, it starts over at level 0. A liar therefore wins little of any
    round's budget after the first, and an honest site that crashed once is
    back in full after four rounds.

    Examples
    --------
    >>> held = Probation()
    >>> held.caught(3)
    >>> held.cap(3, even_share=160), held.cap(4, even_share=160)
    (10, None)
    >>> for _ in range(PROBATION_LEVELS):
    ...     held.delivered(3)
    >>> held.cap(3, even_share=160)
    """

    levels: dict[int, int] = field(default_factory=dict)
    """Per site held: rounds kept in full since it was last caught."""

    def caught(self, site: int) -> None:
        """Hold ``site`` at the lowest level: it did not deliver its quota."""
        self.levels[site] = 0

    def delivered(self, site: int) -> None:
        """Raise ``site`` one level, if held: it delivered a quota > 0 in full."""
        if site in self.levels:
            self.levels[site] += 1
            if self.levels[site] >= PROBATION_LEVELS:
                del self.levels[site]

    def cap(self, site: int, even_share: float) -> int | None:
        """Return the most ``site`` may be given in a round, or None if not held."""
        level = self.levels.get(site)
        if level is None:
            return None
        return max(1, math.floor(even_share * 2**level / 2**PROBATION_LEVELS))
