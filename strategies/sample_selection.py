"""SampleSelection: sites upload raw samples, the server trains (Jiang et al. 2017)."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Mapping
from logging import INFO, WARNING
from pathlib import Path

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, Result
from flwr.supercore import log
from torch import nn

from flwr_select.data import SiteData
from flwr_select.selection.buffer import TrainingBuffer
from flwr_select.selection.checkpoint import Checkpoint, latest
from flwr_select.selection.protocol import (
    CONFIG_KEY,
    MESSAGE_TYPE,
    METRICS_KEY,
    MODEL_KEY,
    UNDELIVERED_KEY,
    UPLOAD_KEY,
    SelectionConfig,
)
from flwr_select.selection.wire import UploadError, decode, wire_bytes
from flwr_select.trainer import TrainConfig, TrainResult, train
from strategies.nodes import replies_without_failures, sample_round_nodes

Upload = tuple[int, Callable[[], tuple[ArrayRecord, object]]]
"""A site key and a function that returns its upload and ``num-candidates``."""

SERVER_SITE = 0
"""The buffer's site key for samples the server holds itself (the initial set)."""

SITE_METRICS = frozenset(
    {
        "num-candidates",
        "num-wrong",
        "num-selected",
        "num-selected-wrong",
        "trial-accuracy",
        "upload-bytes",
    }
)
"""The metrics a site's reply may carry (see :func:`clients.site.site_round`)."""


def candidates_in(metrics: Mapping[str, object]) -> object:
    """Return a site's ``num-candidates``; refuse metrics beyond :data:`SITE_METRICS`.

    Raises
    ------
    UploadError
        If a key is unknown or ``num-candidates`` is missing (its value is
        checked with the upload, by :meth:`SampleSelection.check_upload`).
    """
    if not set(metrics) <= SITE_METRICS or "num-candidates" not in metrics:
        raise UploadError(
            f"the metrics hold num-candidates and some of {sorted(SITE_METRICS)}; "
            f"got {sorted(metrics)}"
        )
    return metrics["num-candidates"]


class SampleSelection(FedAvg):
    """Sites upload their most informative raw samples; the server trains on them.

    Drop-in where a ``FedAvg(...)`` was: ``strategy.start(grid, initial_arrays,
    num_rounds, evaluate_fn=...)``. Each round the sampled nodes get the current
    model and the :class:`~flwr_select.selection.protocol.SelectionConfig` as a
    ``train.select`` message; every upload is validated before it touches the
    training buffer, the central model is trained on the buffer, and the new
    model is returned. A rejected upload is logged with its node and reason and the
    round goes on with the others; a round with nothing accepted leaves the model
    unchanged.

    Parameters
    ----------
    model_fn : callable
        Returns a fresh model (the architecture the arrays belong to).
    num_classes : int
        Uploaded labels must lie in ``[0, num_classes)``.
    selection : SelectionConfig (default: SelectionConfig())
        What every site is asked to send.
    train_config : TrainConfig (default: TrainConfig())
        How the server trains on its buffer each round.
    from_scratch : bool (default: False)
        Retrain a fresh model on the whole buffer each round instead of continuing
        from the current one.
    buffer : TrainingBuffer, optional
        Where accepted samples go (default: a new one on CUDA if available).
    site_config : mapping, optional
        Extra config values forwarded to every site (e.g. which data set fold).
    run_dir : str or Path, optional
        Checkpoint the model, the buffer and the records here after every round,
        and resume from the last complete round (see :meth:`start`).
    sample_shape : tuple of int, optional
        The shape of one image (``(28, 28)`` for MNIST, ``(3, 32, 32)`` for
        CIFAR-10); uploads of any other shape are rejected. Default: the shape
        of the server's own samples (:meth:`pretrain`) or of a resumed buffer;
        :meth:`start` refuses to run without one, since a site must never be
        the one to decide it.
    max_upload_bytes : int (default: 256 MiB)
        Reject a reply whose upload is larger than this on the wire, or whose
        images would be larger decoded, whatever the site claims, before
        anything in it is decoded or decompressed.
    fraction_train, min_train_nodes, min_available_nodes
        As for ``FedAvg``; nodes are sampled with a generator seeded by
        ``(selection.seed, round)``.
    """

    def __init__(
        self,
        model_fn: Callable[[], nn.Module],
        num_classes: int,
        *,
        selection: SelectionConfig | None = None,
        train_config: TrainConfig | None = None,
        from_scratch: bool = False,
        buffer: TrainingBuffer | None = None,
        site_config: Mapping[str, bool | int | float | str] | None = None,
        run_dir: str | Path | None = None,
        sample_shape: tuple[int, ...] | None = None,
        max_upload_bytes: int = 256 * 2**20,
        fraction_train: float = 1.0,
        min_train_nodes: int = 2,
        min_available_nodes: int = 2,
    ) -> None:
        super().__init__(
            fraction_train=fraction_train,
            fraction_evaluate=0.0,
            min_train_nodes=min_train_nodes,
            min_evaluate_nodes=0,
            min_available_nodes=min_available_nodes,
        )
        self.model_fn = model_fn
        self.num_classes = num_classes
        self.selection = selection or SelectionConfig()
        self.train_config = train_config or TrainConfig()
        self.from_scratch = from_scratch
        self.buffer = buffer or TrainingBuffer(num_classes)
        self.site_config = dict(site_config or {})
        self.run_dir = None if run_dir is None else Path(run_dir)
        self.sample_shape = None if sample_shape is None else tuple(sample_shape)
        self.max_upload_bytes = max_upload_bytes
        self.model = model_fn().to(self.buffer.device)
        self.rounds: dict[int, dict[str, float | int]] = {}
        """Metrics of every aggregated round (what ``aggregate_train`` returned)."""
        self.records: dict[int, dict[str, float | int]] = {}
        """What ``evaluate_fn`` returned for every round, round 0 included."""
        self.completed_round: int | None = None
        """The last round whose records are in; None before the initial evaluation."""
        self.undelivered: dict[int, list[int]] = {}
        """Per node, the rounds whose upload was not kept (failed, rejected or never
        came). Each message tells the node, which offers those samples again."""
        self.round_nodes: list[int] = []
        """The nodes asked in the latest round."""

    def summary(self) -> None:
        """Log the selection config beside FedAvg's sampling summary."""
        super().summary()
        log(
            INFO,
            "\t└──> Selection: %s, from_scratch=%s",
            self.selection,
            self.from_scratch,
        )

    def _seed(self, *parts: int) -> int:
        return int(
            np.random.SeedSequence([self.selection.seed, *parts]).generate_state(1)[0]
        )

    def round_config(self, server_round: int) -> dict[str, bool | int | float | str]:
        """Return what every site is told this round (the run-config spellings)."""
        return {
            **self.site_config,
            **self.selection.to_config(),
            "server-round": server_round,
            "num-classes": self.num_classes,
        }

    def run_settings(self) -> dict[str, bool | int | float | str]:
        """Return the settings a checkpoint must share with the run resuming it."""
        settings = self.round_config(0)
        del settings["server-round"]
        return settings

    def resume(self) -> int | None:
        """Load the checkpoint in :attr:`run_dir`, if any; return its round.

        The model, the buffer (with its ledger of accepted ids), the metrics and
        the records come back as they were after that round, so :meth:`start`
        continues with the next one. Returns None when there is nothing to resume.

        Raises
        ------
        CheckpointError
            If the file is damaged, or holds another model, class count or
            sample shape (:func:`~flwr_select.selection.checkpoint.latest`
            checks it whole before anything is loaded).
        ValueError
            If the checkpoint was written by a run with other settings (it names
            them): resuming it would mix two experiments.
        """
        checkpoint = None
        if self.run_dir is not None:
            checkpoint = latest(
                self.run_dir,
                device=self.buffer.device,
                num_classes=self.num_classes,
                sample_shape=self.sample_shape,
                model_state=self.model.state_dict(),
            )
        if checkpoint is None:
            return None
        settings = self.run_settings()
        differing = sorted(
            key
            for key in settings.keys() | checkpoint.config.keys()
            if settings.get(key) != checkpoint.config.get(key)
        )
        if differing:
            raise ValueError(
                f"{self.run_dir} holds a run with other settings "
                f"({', '.join(differing)}): resume it with the same settings or "
                "start the new run in another folder"
            )
        self.model.load_state_dict(checkpoint.model_state)
        self.buffer = checkpoint.buffer
        self.rounds, self.records = checkpoint.train_metrics, checkpoint.records
        self.undelivered = checkpoint.undelivered
        self.completed_round = checkpoint.round
        log(
            INFO,
            "Resuming %s after round %s, %s samples in the buffer",
            self.run_dir,
            checkpoint.round,
            len(self.buffer),
        )
        return checkpoint.round

    def start(
        self,
        grid: Grid,
        initial_arrays: ArrayRecord,
        num_rounds: int = 3,
        timeout: float = 3600,
        train_config: ConfigRecord | None = None,
        evaluate_config: ConfigRecord | None = None,
        evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None = None,
    ) -> Result:
        """Run rounds up to ``num_rounds``, checkpointing after each; return results.

        As ``FedAvg.start``, but durable: after the server-side evaluation of
        each round (round 0 is the initial model) the model, the buffer and the
        records are checkpointed to :attr:`run_dir`, and a run that finds a
        checkpoint there continues after its round, from its model (not
        ``initial_arrays``) and buffer. Sites do not evaluate the model, so
        ``evaluate_config`` is not used.
        """
        if self.completed_round is None:
            self.resume()
        self.expected_sample_shape()  # refuse to start without it, not in round 1
        train_config = ConfigRecord() if train_config is None else train_config
        result = Result()
        if self.completed_round is None:
            arrays = initial_arrays
            self.model.load_state_dict(arrays.to_torch_state_dict())
            self._finish_round(0, arrays, evaluate_fn)
        else:
            arrays = ArrayRecord(self.model.state_dict())
        assert self.completed_round is not None
        for server_round in range(self.completed_round + 1, num_rounds + 1):
            log(INFO, "")
            log(INFO, "[ROUND %s/%s]", server_round, num_rounds)
            replies = grid.send_and_receive(
                self.configure_train(server_round, arrays, train_config, grid),
                timeout=timeout,
            )
            trained, metrics = self.aggregate_train(server_round, replies)
            log(INFO, "\t└──> Aggregated MetricRecord: %s", metrics)
            if trained is not None:
                arrays = trained
            self._finish_round(server_round, arrays, evaluate_fn)
        result.arrays = arrays
        result.train_metrics_clientapp = {
            r: MetricRecord(m) for r, m in self.rounds.items()
        }
        result.evaluate_metrics_serverapp = {
            r: MetricRecord(m) for r, m in self.records.items()
        }
        return result

    def _finish_round(
        self,
        server_round: int,
        arrays: ArrayRecord,
        evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None,
    ) -> None:
        """Evaluate the round's model, keep the record and checkpoint everything."""
        record = None if evaluate_fn is None else evaluate_fn(server_round, arrays)
        if record is not None:
            log(INFO, "\t└──> Server-side evaluation: %s", record)
            self.records[server_round] = dict(record)
        self.completed_round = server_round
        if self.run_dir is not None:
            Checkpoint(
                round=server_round,
                model_state=self.model.state_dict(),
                buffer=self.buffer,
                train_metrics=self.rounds,
                records=self.records,
                undelivered=self.undelivered,
                config=self.run_settings(),
            ).save(self.run_dir)

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Send the current model and the selection config to the sampled nodes."""
        self.model.load_state_dict(arrays.to_torch_state_dict())
        if self.fraction_train == 0.0:
            return []
        nodes = sample_round_nodes(self, grid, self._seed(server_round))
        self.round_nodes = nodes
        site_config = {**dict(config), **self.round_config(server_round)}
        return [
            Message(
                content=RecordDict(
                    {
                        MODEL_KEY: arrays,
                        CONFIG_KEY: ConfigRecord(
                            {
                                **site_config,
                                UNDELIVERED_KEY: self.undelivered.get(node, []),
                            }
                        ),
                    }
                ),
                message_type=MESSAGE_TYPE,
                dst_node_id=node,
            )
            for node in nodes
        ]

    @staticmethod
    def unpack_reply(reply: Message) -> tuple[ArrayRecord, object]:
        """Return a reply's upload and its ``num-candidates``, or raise ``UploadError``.

        A reply holds exactly the upload (an ArrayRecord) and the site's metrics
        (a MetricRecord of :data:`SITE_METRICS` keys, ``num-candidates`` among
        them); anything more or less is refused. The upload itself is checked by
        :meth:`check_upload`.
        """
        content = reply.content
        kinds = {key: type(record) for key, record in content.items()}
        if kinds != {UPLOAD_KEY: ArrayRecord, METRICS_KEY: MetricRecord}:
            raise UploadError(
                f"a reply holds ArrayRecord {UPLOAD_KEY!r} and MetricRecord "
                f"{METRICS_KEY!r} only; got "
                + ", ".join(f"{k!r} ({t.__name__})" for k, t in sorted(kinds.items()))
            )
        return content[UPLOAD_KEY], candidates_in(content[METRICS_KEY])

    def expected_sample_shape(self) -> tuple[int, ...]:
        """Return the shape every uploaded image must have; never a site's word.

        :attr:`sample_shape` if given, else the shape of the server's own
        samples in the buffer (its initial set, or a resumed buffer).

        Raises
        ------
        ValueError
            If neither is known: the operator must say it.
        """
        shape = self.sample_shape or self.buffer.image_shape
        if shape is None:
            raise ValueError(
                "SampleSelection does not know the shape of one sample: pass "
                "sample_shape=(28, 28) (or your images' shape), or pretrain() on "
                "the server's own samples first; it is never taken from an upload"
            )
        return shape

    def check_upload(
        self, site: int, record: ArrayRecord, candidates: object
    ) -> tuple[SiteData, int]:
        """Return the samples of site's upload and its wire bytes, or ``UploadError``.

        Cheap checks come first, so that nothing large is decoded or decompressed
        before it is known to be within bounds: the bytes on the wire against
        :attr:`max_upload_bytes` and the budget's ``max-bytes``, then
        ``num-candidates`` (an int >= 0: the site's number of samples this
        round, from which its ``rho`` budget follows), then the upload's
        declarations (:func:`~flwr_select.selection.wire.decode`: the image
        shape against :meth:`expected_sample_shape`, the count against the budget,
        the decoded
        size against :attr:`max_upload_bytes`), its bytes and values, and last
        that no id was accepted from this site before.
        """
        size = wire_bytes(record)
        budget = self.selection.budget()
        cap = min(self.max_upload_bytes, budget.max_bytes or self.max_upload_bytes)
        if size > cap:
            raise UploadError(f"{size} bytes exceed the cap of {cap} bytes")
        if type(candidates) is not int or candidates < 0:
            raise UploadError(f"num-candidates must be an int >= 0, got {candidates!r}")
        samples, _ = decode(
            record,
            self.num_classes,
            sample_shape=self.expected_sample_shape(),
            max_samples=budget.sample_limit(candidates),
            max_bytes=self.max_upload_bytes,
        )
        repeated = self.buffer.seen(site, samples.ids.numpy())
        if repeated.any():
            raise UploadError(
                f"{int(repeated.sum())} ids were already accepted from this site"
            )
        return samples, size

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Validate and buffer every upload, then train the central model."""
        replies, failures = replies_without_failures(server_round, replies)
        uploads = [
            (reply.metadata.src_node_id, functools.partial(self.unpack_reply, reply))
            for reply in replies
        ]
        metrics = self.aggregate_uploads(server_round, uploads, failures=failures)
        for node in self.round_nodes:
            if f"samples-received.{node}" not in metrics:
                self.undelivered.setdefault(node, []).append(server_round)
        trained = "train-loss" in metrics
        return (
            ArrayRecord(self.model.state_dict()) if trained else None
        ), MetricRecord(metrics)

    def aggregate_uploads(
        self, server_round: int, uploads: Iterable[Upload], *, failures: int = 0
    ) -> dict[str, int | float]:
        """Check and buffer each site's upload, then train if anything was accepted.

        Parameters
        ----------
        server_round : int
        uploads : iterable of (site, unpack)
            ``unpack()`` returns the upload's ArrayRecord and the site's
            ``num-candidates``, or raises ``UploadError``.
        failures : int (default: 0)
            Sites that failed instead of replying (``sites-failed``).

        Returns
        -------
        dict
            The round's metrics, also kept in :attr:`rounds`; ``train-loss`` is
            there only if the model was trained (else it is unchanged).
        """
        metrics: dict[str, int | float] = {
            "samples-received": 0,
            "bytes-received": 0,
            "sites-accepted": 0,
            "sites-rejected": 0,
            "sites-failed": failures,
        }
        self.expected_sample_shape()  # the operator's error, not a site's: raise
        for site, unpack in uploads:
            try:
                record, candidates = unpack()
                samples, size = self.check_upload(site, record, candidates)
                self.buffer.add(site, samples)
            except Exception as err:  # whatever one reply does, it rejects only itself
                reason = str(err) if isinstance(err, UploadError) else repr(err)
                log(
                    WARNING,
                    "round %s: rejected the upload of node %s: %s",
                    server_round,
                    site,
                    reason,
                )
                metrics["sites-rejected"] += 1
                continue
            metrics["sites-accepted"] += 1
            metrics["samples-received"] += len(samples)
            metrics["bytes-received"] += size
            metrics[f"samples-received.{site}"] = len(samples)
            metrics[f"bytes-received.{site}"] = size
        if metrics["sites-accepted"]:
            result = self.train_on_buffer(server_round)
            metrics.update({"train-loss": result.loss, "train-seconds": result.seconds})
        else:
            log(
                WARNING,
                "round %s: no upload accepted; the model is unchanged",
                server_round,
            )
        metrics.update(
            {"buffer-size": len(self.buffer), "buffer-bytes": self.buffer.nbytes}
        )
        self.rounds[server_round] = metrics
        return metrics

    def train_on_buffer(
        self, server_round: int, train_config: TrainConfig | None = None
    ) -> TrainResult:
        """Train the central model on the whole buffer (from scratch if configured)."""
        if self.from_scratch:
            torch.manual_seed(self._seed(server_round, 1))
            self.model = self.model_fn().to(self.buffer.device)
        assert self.buffer.images is not None
        return train(
            self.model,
            self.buffer.images,
            self.buffer.labels,
            train_config or self.train_config,
            seed=self._seed(server_round, 2),
        )

    def pretrain(
        self, samples: SiteData, train_config: TrainConfig | None = None
    ) -> ArrayRecord:
        """Put the server's own samples in the buffer, train on them, return the model.

        The paper's initial model: 5k samples the central site already holds.
        """
        self.buffer.add(SERVER_SITE, samples)
        self.train_on_buffer(0, train_config)
        return ArrayRecord(self.model.state_dict())
