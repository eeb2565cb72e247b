"""BiasedDataParallel: workers send gradients of class-biased batches (Sharp 2020)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from logging import INFO, WARNING
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common import log
from flwr.serverapp import Grid
from torch import nn

from flwr_select.messages import (
    CONFIG_KEY,
    METRICS_KEY,
    MODEL_KEY,
)
from flwr_select.parallel.gradients import GRADIENT_KEY, MESSAGE_TYPE, WorkerGradient
from flwr_select.parallel.server import DataParallelServer, GradientError
from strategies.nodes import (
    TrainOnlyFedAvg,
    content_digest,
    exact_content,
    replies_without_failures,
    sample_round_nodes,
)


class BiasedDataParallel(TrainOnlyFedAvg, DataParallelServer):
    """Synchronous data-parallel SGD: biased batches, a chosen reduction.

    Drop-in where a ``FedAvg(...)`` was. Each round every sampled node gets the
    model and a ``train.gradient`` message naming its worker index, the
    :class:`~flwr_select.parallel.batches.Sampling` distribution and the
    :class:`~flwr_select.parallel.gradients.DataParallelConfig`; it replies with
    one flat gradient. The server core
    (:class:`~flwr_select.parallel.server.DataParallelServer`) checks every
    reply; a bad one is logged with its node and reason and left out, and the
    rest are reduced and applied with one optimizer step. A round with no valid
    gradient leaves the model unchanged.

    Parameters
    ----------
    model_fn : callable
        Returns a fresh model (the architecture the arrays belong to).
    worker_config : mapping, optional
        Extra config values forwarded to every worker (e.g. where its data is).
    fraction_train, min_train_nodes, min_available_nodes
        As for ``FedAvg``; nodes are sampled with a generator seeded by
        ``(sampling.seed, round)``.
    **server
        ``config``, ``sampling``, ``optimizer``: see
        :class:`~flwr_select.parallel.server.DataParallelServer`.
    """

    def __init__(
        self,
        model_fn: Callable[[], nn.Module],
        *,
        worker_config: Mapping[str, bool | int | float | str] | None = None,
        fraction_train: float = 1.0,
        min_train_nodes: int = 2,
        min_available_nodes: int = 2,
        **server: Any,
    ) -> None:
        TrainOnlyFedAvg.__init__(
            self, fraction_train, min_train_nodes, min_available_nodes
        )
        DataParallelServer.__init__(self, model_fn, **server)
        self.worker_config = dict(worker_config or {})

    def summary(self) -> None:
        """Log the reduction and sampling beside FedAvg's sampling summary."""
        super().summary()
        log(INFO, "\t└──> Data parallel: %s, %s", self.config, self.sampling)

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Send the model and each worker's index and batch config to the nodes."""
        self.model.load_state_dict(arrays.to_torch_state_dict())
        seed = np.random.SeedSequence([self.sampling.seed, server_round])
        nodes = sample_round_nodes(self, grid, int(seed.generate_state(1)[0]))
        return self.worker_messages(server_round, arrays, config, nodes)

    def worker_messages(
        self,
        server_round: int,
        arrays: ArrayRecord,
        config: ConfigRecord,
        nodes: list[int],
    ) -> list[Message]:
        """Return one ``train.gradient`` message per node of ``nodes`` (sorted).

        The i-th node is worker ``i`` of ``len(nodes)``: the index a biased
        distribution assigns favoured classes by.
        """
        shared = {
            **dict(config),
            **self.worker_config,
            **self.sampling.to_config(),
            **self.config.to_config(),
            "server-round": server_round,
            "num-workers": len(nodes),
        }
        return [
            Message(
                content=RecordDict(
                    {
                        MODEL_KEY: arrays,
                        CONFIG_KEY: ConfigRecord({**shared, "worker-index": index}),
                    }
                ),
                message_type=MESSAGE_TYPE,
                dst_node_id=node,
            )
            for index, node in enumerate(sorted(nodes))
        ]

    def unpack_reply(self, reply: Message) -> WorkerGradient:
        """Return a reply's gradient, or raise ``GradientError`` saying why.

        A reply holds exactly an ArrayRecord and a MetricRecord, checked by
        :meth:`~flwr_select.parallel.server.DataParallelServer.check_gradient`.
        """
        content = reply.content
        exact_content(
            content,
            {GRADIENT_KEY: ArrayRecord, METRICS_KEY: MetricRecord},
            GradientError,
        )
        return self.check_gradient(content[GRADIENT_KEY], content[METRICS_KEY])

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Check the gradients, reduce the valid ones and step the model.

        Gradients are taken in the order of what they carry, not of arrival
        (:func:`~strategies.nodes.content_digest`): float reductions depend on
        the order, and a seeded run must give the same model.
        """
        replies, failed = replies_without_failures(server_round, replies)
        updates: list[WorkerGradient] = []
        rejected = 0
        for reply in sorted(replies, key=content_digest):
            node = reply.metadata.src_node_id
            try:
                updates.append(self.unpack_reply(reply))
            except Exception as err:  # whatever one reply does, it rejects only itself
                rejected += 1
                log(
                    WARNING,
                    "round %s: rejected the gradient of node %s: %s",
                    server_round,
                    node,
                    str(err) if isinstance(err, GradientError) else repr(err),
                )
        metrics = self.step(server_round, updates)
        metrics.update({"workers-rejected": rejected, "workers-failed": failed})
        self.rounds[server_round] = metrics
        stepped = bool(updates)
        return (
            ArrayRecord(self.model.state_dict()) if stepped else None
        ), MetricRecord(metrics)
