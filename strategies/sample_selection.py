"""SampleSelection: sites upload raw samples, the server trains (Jiang et al. 2017)."""

from __future__ import annotations

import functools
from collections.abc import Callable, Collection, Iterable, Mapping
from logging import INFO
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common import log
from flwr.common.serde import recorddict_to_proto
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result
from torch import nn

from flwr_select.data import SiteData
from flwr_select.messages import METRICS_KEY
from flwr_select.selection.protocol import (
    MESSAGE_TYPE,
    QUOTA_KEY,
    SUMMARY_MESSAGE_TYPE,
    TOP_UP_KEY,
    UPLOAD_KEY,
    request,
)
from flwr_select.selection.server import (
    SelectionServer,
    SiteReport,
    TopUp,
    Upload,
    site_report,
)
from flwr_select.selection.wire import UploadError, wire_bytes
from flwr_select.trainer import TrainConfig
from strategies.nodes import (
    TrainOnlyFedAvg,
    content_digest,
    exact_content,
    replies_without_failures,
    sample_round_nodes,
)

EvaluateFn = Callable[[int, ArrayRecord], MetricRecord | None]


class SampleSelection(TrainOnlyFedAvg, SelectionServer):
    """Sites upload their most informative raw samples; the server trains on them.

    Drop-in where a ``FedAvg(...)`` was; ``start`` is Flower's own loop. The
    sampled nodes get the model and the ``SelectionConfig`` in a ``train.select``
    message; the server core (:class:`~flwr_select.selection.server.SelectionServer`)
    checks, buffers, trains, and with ``run_dir`` checkpoints and resumes.

    Parameters
    ----------
    fraction_train, min_train_nodes, min_available_nodes
        As for ``FedAvg``; nodes are sampled with a generator seeded by
        ``(selection.seed, round)``.
    model_fn, num_classes, **server
        The server core's: ``model_fn``, ``num_classes``, ``selection``,
        ``server_training``, ``from_scratch``, ``buffer``, ``site_config``,
        ``run_dir``, ``sample_shape``, ``max_upload_bytes``, ``max_site_samples``,
        ``transform`` (see
        :class:`~flwr_select.selection.server.SelectionServer`).
    """

    def __init__(
        self,
        model_fn: Callable[[], nn.Module],
        num_classes: int,
        *,
        fraction_train: float = 1.0,
        min_train_nodes: int = 2,
        min_available_nodes: int = 2,
        **server: Any,
    ) -> None:
        TrainOnlyFedAvg.__init__(
            self, fraction_train, min_train_nodes, min_available_nodes
        )
        SelectionServer.__init__(self, model_fn, num_classes, **server)
        self.round_nodes: list[int] = []
        """The nodes asked for an upload in the latest round."""
        self.timeout: float = 3600.0
        """Seconds a round waits for replies (``start``'s); phase 1 waits as long."""
        self.top_up: TopUp | None = None
        """With one global budget, how the latest round asks for a top-up."""
        self.bytes_sent = 0
        """What the latest round's requests weigh (:meth:`request_to`)."""

    def summary(self) -> None:
        """Log the selection config beside FedAvg's sampling summary."""
        super().summary()
        log(INFO, "\t└──> Selection: %s", self.selection)
        log(INFO, "\t└──> Retrain from scratch: %s", self.from_scratch)

    def start(
        self,
        grid: Grid,
        initial_arrays: ArrayRecord,
        num_rounds: int = 3,
        timeout: float = 3600,
        train_config: ConfigRecord | None = None,
        evaluate_config: ConfigRecord | None = None,
        evaluate_fn: EvaluateFn | None = None,
        **options: Any,
    ) -> Result:
        """Run Flower's ``start``, durably: resume first, checkpoint every round.

        A resumed run starts from the checkpoint's model and buffer (not
        ``initial_arrays``); its done rounds pass without messages, returning
        what they returned. ``train_config`` is Flower's: sent to the sites
        (their ``load_site`` sees it), never the server's training. ``options``
        go to Flower's ``start`` as they are (``should_stop`` from Flower 1.43).
        """
        self.check_site_keys(train_config or {})
        self.timeout = timeout
        state = self.begin(initial_arrays.to_torch_state_dict(), num_rounds)
        return super().start(
            grid,
            ArrayRecord(state),
            num_rounds,
            timeout,
            train_config,
            evaluate_config,
            evaluate_fn=functools.partial(self._evaluate_and_keep, evaluate_fn),
            **options,
        )

    def _evaluate_and_keep(
        self, evaluate_fn: EvaluateFn | None, server_round: int, arrays: ArrayRecord
    ) -> MetricRecord | None:
        if self.is_finished(server_round):
            kept = self.records.get(server_round)
            return None if kept is None else MetricRecord(kept)
        record = None if evaluate_fn is None else evaluate_fn(server_round, arrays)
        self.finish_round(server_round, None if record is None else dict(record))
        return record

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Send the current model and the selection config to the sampled nodes.

        With one global budget (``allocation="global"``) this is phase 2: phase 1
        (:meth:`allocate_quotas`) runs first, and each node with a quota is
        asked for it; what other nodes then fail to send is asked of those that
        sent theirs (:meth:`ask_top_up`, from :meth:`aggregate_train`).
        """
        if self.is_finished(server_round):
            log(INFO, "round %s was completed before the restart", server_round)
            return []
        if self.fraction_train == 0.0:  # as FedAvg: no training round
            return []
        self.model.load_state_dict(arrays.to_torch_state_dict())
        nodes = sample_round_nodes(self, grid, self.seed(server_round))
        self.bytes_sent = 0
        extra = dict(config)
        quotas: dict[int, dict[str, int]] = {node: {} for node in nodes}
        self.top_up = None
        if self.selection.allocation == "global":
            phase_one = [
                self.request_to(n, SUMMARY_MESSAGE_TYPE, server_round, arrays, extra)
                for n in nodes
            ]
            replies = grid.send_and_receive(phase_one, timeout=self.timeout)
            given = self.allocate_quotas(server_round, replies)
            quotas = {n: {QUOTA_KEY: q} for n, q in given.items() if q > 0}
            self.top_up = functools.partial(
                self.ask_top_up, grid, server_round, arrays, extra
            )
        self.round_nodes = list(quotas)
        return [
            self.request_to(
                n, MESSAGE_TYPE, server_round, arrays, {**extra, **quotas[n]}
            )
            for n in self.round_nodes
        ]

    def request_to(
        self,
        node: int,
        message_type: str,
        server_round: int,
        arrays: ArrayRecord,
        extra: dict[str, object],
    ) -> Message:
        """Return the node's request: the model, ``extra`` and the round's config.

        What it weighs on the wire is added to :attr:`bytes_sent`: every node
        downloads its own copy of the model, in each phase it is asked.
        """
        content = request(arrays, {**extra, **self.round_config(server_round, node)})
        self.bytes_sent += wire_bytes(content)
        return Message(content, message_type=message_type, dst_node_id=node)

    def ask_top_up(
        self,
        grid: Grid,
        server_round: int,
        arrays: ArrayRecord,
        extra: dict[str, object],
        quotas: Mapping[int, int],
        top_ups: Collection[int],
    ) -> list[Upload]:
        """Ask each node for its second-pass quota (a ``train.select``); return uploads.

        The second pass of a global round (the server's
        :meth:`~flwr_select.selection.server.SelectionServer.allocate_top_up`):
        the model again and the quota, with ``top-up`` for the ``top_ups``
        (nodes that sent their phase-2 quota); the others were given none in
        phase 2 and are asked as phase 2 asks. Failures are logged.
        """
        messages = [
            self.request_to(
                node,
                MESSAGE_TYPE,
                server_round,
                arrays,
                {
                    **extra,
                    QUOTA_KEY: quota,
                    **({TOP_UP_KEY: True} if node in top_ups else {}),
                },
            )
            for node, quota in sorted(quotas.items())
        ]
        replies = grid.send_and_receive(messages, timeout=self.timeout)
        return self.uploads_of(server_round, replies)[0]

    def uploads_of(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[list[Upload], int]:
        """Return the replies' uploads, in content order, and how many failed."""
        replies, failures = replies_without_failures(server_round, replies)
        replies.sort(key=content_digest)  # arrival order is not the seed's
        uploads = [
            (reply.metadata.src_node_id, functools.partial(self.unpack_reply, reply))
            for reply in replies
        ]
        return uploads, failures

    def allocate_quotas(
        self, server_round: int, replies: Iterable[Message]
    ) -> dict[int, int]:
        """Return each node's quota from phase 1's replies (``allocate_round``).

        Failures are logged and counted as in phase 2; each summary is unpacked
        and checked as hostile (:meth:`unpack_summary`); what the replies weigh
        (their serialized content) is reported as ``summary-bytes``.
        """
        replies, failures = replies_without_failures(server_round, replies)
        size = sum(recorddict_to_proto(reply.content).ByteSize() for reply in replies)
        summaries = [
            (reply.metadata.src_node_id, functools.partial(self.unpack_summary, reply))
            for reply in replies
        ]
        return self.allocate_round(
            server_round, summaries, failures=failures, summary_bytes=size
        )

    @staticmethod
    def unpack_summary(reply: Message) -> MetricRecord:
        """Return a phase-1 reply's metrics, or raise ``UploadError``.

        Exactly one MetricRecord; its keys and values are checked by
        ``allocate_round``.
        """
        exact_content(reply.content, {METRICS_KEY: MetricRecord}, UploadError)
        return reply.content[METRICS_KEY]

    @staticmethod
    def unpack_reply(reply: Message) -> tuple[ArrayRecord, SiteReport]:
        """Return a reply's upload and the site's report, or raise ``UploadError``.

        Exactly an upload ArrayRecord and a MetricRecord of ``SITE_METRICS``
        keys; the upload itself is checked by :meth:`check_upload`.
        """
        content = reply.content
        exact_content(
            content, {UPLOAD_KEY: ArrayRecord, METRICS_KEY: MetricRecord}, UploadError
        )
        return content[UPLOAD_KEY], site_report(content[METRICS_KEY])

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Check and buffer every upload, then train the central model on the buffer.

        The round's metrics are the server core's and ``bytes-sent``: what the
        round's requests (phase 1, phase 2 and top-ups) weighed on the wire.
        """
        if self.is_finished(server_round):
            kept = self.rounds.get(server_round)
            return None, None if kept is None else MetricRecord(kept)
        uploads, failures = self.uploads_of(server_round, replies)
        metrics = self.accept_uploads(
            server_round,
            uploads,
            failures=failures,
            asked=self.round_nodes,
            top_up=self.top_up,
        )
        metrics["bytes-sent"] = self.bytes_sent  # top-ups were asked just now
        trained = "train-loss" in metrics
        totals = {k: v for k, v in metrics.items() if "." not in k}  # not per node
        return (
            ArrayRecord(self.model.state_dict()) if trained else None
        ), MetricRecord(totals)

    def pretrain(
        self, samples: SiteData, training: TrainConfig | None = None
    ) -> ArrayRecord:
        """Put the server's own samples in the buffer, train on them, return the model.

        The paper's initial model: 5k samples the central site already holds.
        """
        self.train_initial(samples, training)
        return ArrayRecord(self.model.state_dict())
