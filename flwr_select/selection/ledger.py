"""What was sent and what was kept: the ledgers that make each sample land once.

A site offers no sample twice (:class:`SentLedger`, the ids it uploaded), and
knows which of its uploads the server kept (:class:`SiteLedger`, each id with its
round, released again when the server says the round was not kept); the server's
buffer keeps a :class:`SentLedger` of the ids it accepted from each site.
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
        """Return a bool mask, True where an id was sent before."""
        return np.isin(ids, self._ids)

    def add(self, ids: Sequence[int] | np.ndarray) -> None:
        """Record ``ids`` as sent."""
        self._ids = np.union1d(self._ids, np.asarray(ids, dtype=np.int64))

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

    Parameters
    ----------
    ids, rounds : array-like of int (default: empty)
        A stored ledger (:meth:`to_arrays`).
    """

    def __init__(
        self, ids: np.ndarray | tuple = (), rounds: np.ndarray | tuple = ()
    ) -> None:
        self.ids = np.asarray(ids, dtype=np.int64)
        self.rounds = np.asarray(rounds, dtype=np.int64)
        if self.ids.shape != self.rounds.shape or self.ids.ndim != 1:
            raise ValueError("a ledger needs one round per id")

    def kept_by_server(
        self, server_round: int, undelivered: Sequence[int] = ()
    ) -> SentLedger:
        """Release what the server did not keep; return the ids it did.

        Released: what was sent in ``server_round`` or later, or in one of the
        ``undelivered`` rounds the server lists for this node.
        """
        kept = (self.rounds < server_round) & ~np.isin(self.rounds, undelivered)
        self.ids, self.rounds = self.ids[kept], self.rounds[kept]
        return SentLedger(self.ids)

    def record(self, ids: np.ndarray, server_round: int) -> None:
        """Note ``ids`` as sent in ``server_round``."""
        self.ids = np.concatenate([self.ids, np.asarray(ids, dtype=np.int64)])
        self.rounds = np.concatenate(
            [self.rounds, np.full(len(ids), server_round, np.int64)]
        )

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Return the ledger as ``ids`` and ``rounds`` arrays (to store it)."""
        return {"ids": self.ids, "rounds": self.rounds}
