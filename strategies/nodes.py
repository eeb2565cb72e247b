"""What this project's strategies share: FedAvg minus evaluation, sampling, replies."""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterable, Mapping
from logging import INFO, WARNING

from flwr.app import Message, RecordDict
from flwr.common import log
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from flwr_select.config import check
from flwr_select.flower_private import sample_nodes


def check_fraction_train(key: str, fraction: object) -> None:
    """Refuse a share of the nodes to ask each round that is not in (0, 1].

    Above 1 a round asks for more nodes than are connected and waits for ever
    for the rest; 0 asks none. One check for the run config's
    ``fraction-train`` and the strategies' ``fraction_train``: ``key`` is the
    name the caller knows.

    Raises
    ------
    flwr_select.config.ConfigError
        Naming ``key`` and what is allowed.
    """
    number = isinstance(fraction, int | float) and not isinstance(fraction, bool)
    check(key, fraction, number and 0 < fraction <= 1, "a number in (0, 1]")


def check_min_nodes(key: str, count: object) -> None:
    """Refuse a number of nodes a round waits for or asks that is not an int >= 1.

    One check for the run config's ``min-nodes`` and the strategies'
    ``min_train_nodes`` and ``min_available_nodes``: ``key`` is the name the
    caller knows.

    Raises
    ------
    flwr_select.config.ConfigError
        Naming ``key`` and what is allowed.
    """
    integer = isinstance(count, int) and not isinstance(count, bool)
    check(key, count, integer and count >= 1, "an integer >= 1")


def sample_round_nodes(strategy: FedAvg, grid: Grid, seed: int) -> list[int]:
    """Return the nodes for a training round, sorted, as ``FedAvg`` would pick them.

    Waits for ``min_available_nodes`` like FedAvg, then samples
    ``max(fraction_train * nodes, min_train_nodes)`` with ``random.Random(seed)``
    instead of the global generator, so a seeded run samples the same nodes.
    """
    num_nodes = int(len(list(grid.get_node_ids())) * strategy.fraction_train)
    sample_size = max(num_nodes, strategy.min_train_nodes)
    _, all_nodes = sample_nodes(grid, strategy.min_available_nodes, sample_size)
    nodes = random.Random(seed).sample(sorted(all_nodes), sample_size)
    log(
        INFO,
        "configure_train: sampled %s nodes (out of %s)",
        len(nodes),
        len(all_nodes),
    )
    return sorted(nodes)


def error_cause(reason: str) -> str:
    """Return the last line of Flower's error reason: the exception, without its trace.

    Under the simulation engine a reason is Ray's whole traceback, with the
    worker's pid and actor id (so two nodes' differ); its last line is the
    exception the ClientApp raised, the same on every node that raised it. A
    SuperNode's reason is that one line already.
    """
    lines = [line for line in reason.strip().splitlines() if line.strip()]
    return lines[-1] if lines else reason


class EverySiteFailed(RuntimeError):
    """Every node of a round raised the same error: every round would, so stop."""


def replies_without_failures(
    server_round: int, replies: Iterable[Message]
) -> tuple[list[Message], int]:
    """Return the replies that carry content, and how many nodes failed instead.

    Each failure is logged with its node and Flower's reason. When there are
    no replies with content and every node's app raised the same error (a model
    that cannot take the data, a missing package), every round would end the
    same: :class:`EverySiteFailed` stops the run with that reason. Failures of
    another kind (a node gone, a timeout) or with different reasons do not.
    """
    good, reasons = [], []
    for reply in replies:
        if reply.has_error():
            node, reason = reply.metadata.src_node_id, error_cause(reply.error.reason)
            log(WARNING, "round %s: node %s failed: %s", server_round, node, reason)
            raised = reply.error.code == ErrorCode.CLIENT_APP_RAISED_EXCEPTION
            reasons.append(reason if raised else None)
        else:
            good.append(reply)
    if not good and reasons and None not in reasons and len(set(reasons)) == 1:
        raise EverySiteFailed(
            f"round {server_round}: all {len(reasons)} nodes failed the same way, "
            f"so every round would: {reasons[0]}"
        )
    return good, len(reasons)


def content_digest(reply: Message) -> bytes:
    """Return a digest of every array in a reply's content, in key order.

    Replies arrive in whatever order the nodes finish, and the node ids of a
    simulation are new every run; sorted by what they carry, the same uploads
    are taken in the same order, so a seeded run gives the same buffer and model.
    """
    return digest_of(
        part
        for key, record in sorted(reply.content.array_records.items())
        for name, array in sorted(record.items())
        for part in (key.encode(), name.encode(), array.data)
    )


def digest_of(chunks: Iterable[bytes]) -> bytes:
    """Return the BLAKE2b digest of ``chunks``, each prefixed by its length.

    Anything unreadable (a hostile reply's odd content) gives ``b""``: ordering
    must not fail, and such a reply is rejected when it is unpacked.
    """
    digest = hashlib.blake2b(digest_size=16)
    try:
        for chunk in chunks:
            digest.update(len(chunk).to_bytes(8, "little"))
            digest.update(chunk)
    except Exception:  # whatever a hostile reply holds
        return b""
    return digest.digest()


class TrainOnlyFedAvg(FedAvg):
    """``FedAvg``'s node sampling and loop, with no evaluation round at the nodes.

    The base of this project's strategies: sites and workers do not evaluate the
    model (the server does, with ``evaluate_fn``). The sampling arguments are
    checked as the run config's ``fraction-train`` and ``min-nodes`` are
    (:func:`check_fraction_train`, :func:`check_min_nodes`), so a strategy built
    in code cannot wait for ever for nodes that a bad value asks for.

    Raises
    ------
    flwr_select.config.ConfigError
        Where ``fraction_train`` is not in (0, 1], or ``min_train_nodes`` or
        ``min_available_nodes`` is not an integer >= 1; naming the argument.
    """

    def __init__(
        self,
        fraction_train: float = 1.0,
        min_train_nodes: int = 2,
        min_available_nodes: int = 2,
    ) -> None:
        check_fraction_train("fraction_train", fraction_train)
        check_min_nodes("min_train_nodes", min_train_nodes)
        check_min_nodes("min_available_nodes", min_available_nodes)
        super().__init__(
            fraction_train=fraction_train,
            min_train_nodes=min_train_nodes,
            min_available_nodes=min_available_nodes,
        )
        # Set after FedAvg's init, which warns at every start that 0.0 skips
        # federated evaluation: here that is the design, not news.
        self.fraction_evaluate, self.min_evaluate_nodes = 0.0, 0


def exact_content(
    content: RecordDict, expected: Mapping[str, type], error: type[Exception]
) -> None:
    """Raise ``error`` unless ``content`` holds exactly the ``expected`` records.

    ``expected`` maps each record's key to its type (``ArrayRecord``,
    ``MetricRecord``...); an extra, missing or other-typed record is refused.
    """
    kinds = {key: type(record) for key, record in content.items()}
    if kinds != dict(expected):
        wanted = " and ".join(f"{t.__name__} {k!r}" for k, t in expected.items())
        got = ", ".join(f"{k!r} ({t.__name__})" for k, t in sorted(kinds.items()))
        raise error(f"a reply holds {wanted} only; got {got}")
