"""Node sampling and reply triage shared by this project's strategies."""

from __future__ import annotations

import random
from collections.abc import Iterable
from logging import INFO, WARNING

from flwr.app import Message
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from flwr_select.flower_private import sample_nodes


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


def replies_without_failures(
    server_round: int, replies: Iterable[Message]
) -> tuple[list[Message], int]:
    """Return the replies that carry content, and how many nodes failed instead.

    Each failure is logged with its node and Flower's reason.
    """
    good = []
    failed = 0
    for reply in replies:
        if reply.has_error():
            failed += 1
            node, reason = reply.metadata.src_node_id, reply.error.reason
            log(WARNING, "round %s: node %s failed: %s", server_round, node, reason)
        else:
            good.append(reply)
    return good, failed
