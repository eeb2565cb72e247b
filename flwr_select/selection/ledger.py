"""What was sent and what was kept: the ledgers that make each sample land once.

A site offers no sample twice (:class:`SentLedger`, the ids it uploaded), and
knows which of its uploads the server kept (:class:`SiteLedger`, each id with its
round, released again when the server says the round was not kept); the server's
buffer keeps a :class:`SentLedger` of the ids it accepted from each site. A
:class:`SiteLedger` also remembers every request the site answered (its round,
its bytes, whether a top-up), never released: what bounds a round whatever the
server asks.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


class SentLedger:
    """The ids a site has already uploaded, so that none is offered twice.

    Parameters
    ----------
    ids : array-like of int (default: empty)
        Ids sent before (a ledger restored from a node's state or from disk).
    """

    def __init__(self, ids: Sequence[int] | np.ndarray = ()) -> None:
        self._ids = np.unique(np.asarray(ids, dtype=np.int64))

    def __len__(self) -> int:
        return len(self._ids)

    def contains(self, ids: np.ndarray) -> np.ndarray:
        """Return a bool mask, True where an id was sent before.

        A binary search of the sorted ledger per id: O(len(ids) log n), where
        ``np.isin`` would sort the whole ledger again on every upload.
        """
        ids = np.asarray(ids, dtype=np.int64)
        at = np.searchsorted(self._ids, ids)
        found = np.zeros(len(ids), bool)
        inside = at < len(self._ids)
        found[inside] = self._ids[at[inside]] == ids[inside]
        return found

    def add(self, ids: Sequence[int] | np.ndarray) -> None:
        """Record ``ids`` as sent: merged into a copy of the ledger, no sort."""
        new = np.unique(np.asarray(ids, dtype=np.int64))
        new = new[~self.contains(new)]
        self._ids = np.insert(self._ids, np.searchsorted(self._ids, new), new)

    def to_array(self) -> np.ndarray:
        """Return the sent ids, sorted, as int64 (to store the ledger)."""
        return self._ids.copy()


class SiteLedger:
    """The ids a site has sent, each with the round it was sent in.

    A sample sent in round r counts as kept once the server asks for a later
    round, unless the server lists r among this node's undelivered rounds (the
    upload failed on the way, was rejected or never came). The server moves on
    only after it has checkpointed round r, so a request for round k also
    releases what was sent in round k or later: a server that crashed and
    resumed from an earlier checkpoint never kept it. Released samples are
    offered again; with the server's refusal of ids it holds from a node, every
    sample lands in the buffer exactly once.

    With one global budget a round may have a second pass (a top-up, after
    other sites failed to send their quotas): its ids are marked, so that a
    top-up the server did not keep releases only its own ids, not the round's
    first upload, which the server kept.

    Every answer (an upload or a top-up, empty ones included) is also kept as
    one row of ``answered_rounds``, ``answered_bytes`` and
    ``answered_top_ups``, which nothing releases: the site's latest round
    (:meth:`latest_round`), what it sent in a round (:meth:`bytes_sent_in`) and
    whether the round had its upload and its top-up hold however often the
    server asks again.

    Parameters
    ----------
    ids, rounds : array-like of int (default: empty)
        A stored ledger (:meth:`to_arrays`).
    top_ups : array-like of bool, optional
        Which ids a top-up sent (default: none; a ledger stored before top-ups).
    answered_rounds, answered_bytes : array-like of int (default: empty)
        The round and the wire bytes of each answer (none: a ledger stored
        before answers were kept).
    answered_top_ups : array-like of bool (default: empty)
        Which answers were top-ups.
    """

    def __init__(
        self,
        ids: np.ndarray | tuple = (),
        rounds: np.ndarray | tuple = (),
        top_ups: np.ndarray | tuple | None = None,
        answered_rounds: np.ndarray | tuple = (),
        answered_bytes: np.ndarray | tuple = (),
        answered_top_ups: np.ndarray | tuple = (),
    ) -> None:
        self.ids = np.asarray(ids, dtype=np.int64)
        self.rounds = np.asarray(rounds, dtype=np.int64)
        self.top_ups = (
            np.zeros(self.ids.shape, bool)
            if top_ups is None
            else np.asarray(top_ups, dtype=bool)
        )
        if not self.ids.shape == self.rounds.shape == self.top_ups.shape:
            raise ValueError("a ledger needs one round and one top-up flag per id")
        if self.ids.ndim != 1:
            raise ValueError("a ledger's ids are one-dimensional")
        self.answered_rounds = np.asarray(answered_rounds, dtype=np.int64)
        self.answered_bytes = np.asarray(answered_bytes, dtype=np.int64)
        self.answered_top_ups = np.asarray(answered_top_ups, dtype=bool)
        shapes = {self.answered_bytes.shape, self.answered_top_ups.shape}
        if shapes != {self.answered_rounds.shape} or self.answered_rounds.ndim != 1:
            raise ValueError("a ledger needs one size and top-up flag per answer")
        if (self.answered_bytes < 0).any():
            raise ValueError("a ledger's answers have sizes >= 0")

    def kept_by_server(
        self,
        server_round: int,
        undelivered: Sequence[int] = (),
        undelivered_top_ups: Sequence[int] = (),
    ) -> SentLedger:
        """Release what the server did not keep; return the ids it did.

        Released: what was sent in ``server_round`` or later, in one of the
        ``undelivered`` rounds the server lists for this node, or by the top-up
        of one of its ``undelivered_top_ups`` rounds.
        """
        kept = (
            (self.rounds < server_round)
            & ~np.isin(self.rounds, undelivered)
            & ~(self.top_ups & np.isin(self.rounds, undelivered_top_ups))
        )
        self._keep(kept)
        return SentLedger(self.ids)

    def sent_in(self, server_round: int) -> np.ndarray:
        """Return the ids sent in ``server_round`` (a top-up skips them)."""
        return self.ids[self.rounds == server_round]

    def before(self, server_round: int) -> SentLedger:
        """Return the ids sent before ``server_round``, releasing nothing.

        A top-up ranks with what the round's first upload ranked with: these,
        after that upload's :meth:`kept_by_server`.
        """
        return SentLedger(self.ids[self.rounds < server_round])

    def record(
        self,
        ids: np.ndarray,
        server_round: int,
        *,
        top_up: bool = False,
        sent_bytes: int = 0,
    ) -> None:
        """Note an answer: ``ids`` sent in ``server_round``, ``sent_bytes`` on the wire.

        ``top_up``: the answer was the round's top-up.
        """
        self.ids = np.concatenate([self.ids, np.asarray(ids, dtype=np.int64)])
        self.rounds = np.concatenate(
            [self.rounds, np.full(len(ids), server_round, np.int64)]
        )
        self.top_ups = np.concatenate([self.top_ups, np.full(len(ids), top_up)])
        self.answered_rounds = np.append(self.answered_rounds, np.int64(server_round))
        self.answered_bytes = np.append(self.answered_bytes, np.int64(sent_bytes))
        self.answered_top_ups = np.append(self.answered_top_ups, top_up)

    def latest_round(self) -> int:
        """Return the latest round the site answered (0 before any)."""
        rounds = np.concatenate([self.answered_rounds, self.rounds])
        return int(rounds.max()) if len(rounds) else 0

    def bytes_sent_in(self, server_round: int) -> int:
        """Return the wire bytes the site sent in ``server_round``, top-up included."""
        return int(self.answered_bytes[self.answered_rounds == server_round].sum())

    def answered_in(self, server_round: int, *, top_up: bool) -> bool:
        """Return whether the site answered ``server_round``'s upload (or top-up)."""
        answers = (self.answered_rounds == server_round) & (
            self.answered_top_ups == top_up
        )
        ids = (self.rounds == server_round) & (self.top_ups == top_up)
        return bool(answers.any() or ids.any())

    def _keep(self, kept: np.ndarray) -> None:
        self.ids, self.rounds = self.ids[kept], self.rounds[kept]
        self.top_ups = self.top_ups[kept]

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Return the ledger as arrays to store: ``ids``, ``rounds``, ``top-ups``.

        And the answers: ``answered-rounds``, ``answered-bytes`` and
        ``answered-top-ups``.
        """
        return {
            "ids": self.ids,
            "rounds": self.rounds,
            "top-ups": self.top_ups,
            "answered-rounds": self.answered_rounds,
            "answered-bytes": self.answered_bytes,
            "answered-top-ups": self.answered_top_ups,
        }
