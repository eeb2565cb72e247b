"""BiasedDataParallel: workers send gradients of class-biased batches (Sharp 2020)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from logging import INFO, WARNING

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from flwr.supercore import log
from torch import nn

from flwr_select.npy import NpyError, array_from_bytes
from flwr_select.parallel.batches import Sampling
from flwr_select.parallel.gradients import (
    GRADIENT_KEY,
    MESSAGE_TYPE,
    DataParallelConfig,
    WorkerGradient,
    apply_gradient,
    combine,
    num_parameters,
)
from flwr_select.parallel.monitors import grad_norm_gap
from flwr_select.selection.protocol import CONFIG_KEY, METRICS_KEY, MODEL_KEY
from flwr_select.trainer import TrainConfig
from strategies.nodes import replies_without_failures, sample_round_nodes


class GradientError(ValueError):
    """A worker's reply is not a usable gradient; the message says why."""


class BiasedDataParallel(FedAvg):
    """Synchronous data-parallel SGD: biased batches, a chosen reduction.

    Drop-in where a ``FedAvg(...)`` was. Each round every sampled node gets the
    model and a ``train.gradient`` message naming its worker index, the
    :class:`~flwr_select.parallel.batches.Sampling` distribution and the
    :class:`~flwr_select.parallel.gradients.DataParallelConfig`; it replies with one
    flat gradient. Every reply is validated (length, dtype, finite values, a
    loss and an example count); a bad one is logged with its node and reason and
    left out, and the rest are reduced and applied with one optimizer step. A
    round with no valid gradient leaves the model unchanged.

    Parameters
    ----------
    model_fn : callable
        Returns a fresh model (the architecture the arrays belong to).
    config : DataParallelConfig (default: DataParallelConfig())
        The reduction and the workers' batches.
    sampling : Sampling (default: Sampling())
        The workers' batch distribution over classes.
    optimizer : TrainConfig (default: TrainConfig(lr=0.01))
        The server's optimizer (its ``optimizer``, ``lr``, ``momentum``,
        ``weight_decay``); the state persists across rounds.
    worker_config : mapping, optional
        Extra config values forwarded to every worker (e.g. where its data is).
    fraction_train, min_train_nodes, min_available_nodes
        As for ``FedAvg``; nodes are sampled with a generator seeded by
        ``(sampling.seed, round)``.
    """

    def __init__(
        self,
        model_fn: Callable[[], nn.Module],
        *,
        config: DataParallelConfig | None = None,
        sampling: Sampling | None = None,
        optimizer: TrainConfig | None = None,
        worker_config: Mapping[str, bool | int | float | str] | None = None,
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
        self.config = config or DataParallelConfig()
        self.sampling = sampling or Sampling()
        self.model = model_fn()
        self.optimizer = (optimizer or TrainConfig()).make_optimizer(self.model)
        self.worker_config = dict(worker_config or {})
        self.rounds: dict[int, dict[str, float | int | list[float]]] = {}
        """Metrics of every aggregated round (what ``aggregate_train`` returned)."""

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

        A reply holds exactly an ArrayRecord with the one flat float32 gradient
        of the model's size (a ``.npy`` of exactly that, read without trusting
        its header: :func:`~flwr_select.npy.array_from_bytes`) and a
        MetricRecord of ``loss`` and ``num-examples``.
        """
        content = reply.content
        kinds = {key: type(record) for key, record in content.items()}
        if kinds != {GRADIENT_KEY: ArrayRecord, METRICS_KEY: MetricRecord}:
            raise GradientError(
                f"a reply holds ArrayRecord {GRADIENT_KEY!r} and MetricRecord "
                f"{METRICS_KEY!r} only; got "
                + ", ".join(f"{k!r} ({t.__name__})" for k, t in sorted(kinds.items()))
            )
        record = content[GRADIENT_KEY]
        if list(record) != [GRADIENT_KEY]:
            raise GradientError(f"the gradient record holds {list(record)}")
        array = record[GRADIENT_KEY]
        expected = (num_parameters(self.model),)
        if (array.stype, array.dtype, tuple(array.shape)) != (
            "numpy.ndarray",
            "float32",
            expected,
        ):
            raise GradientError(
                f"gradient of dtype {array.dtype} and shape {array.shape} "
                f"({array.stype!r}), expected float32 of shape {expected}"
            )
        try:
            values = array_from_bytes(array.data, [np.dtype(np.float32)])
        except NpyError as err:
            raise GradientError(
                f"the gradient is not a readable array: {err}"
            ) from None
        if values.shape != expected:
            raise GradientError(f"the gradient's data has shape {values.shape}")
        gradient = torch.from_numpy(values.copy())
        if not gradient.isfinite().all():
            raise GradientError("the gradient holds NaN or inf")
        metrics = content[METRICS_KEY]
        if set(metrics) != {"loss", "num-examples"}:
            raise GradientError(
                f"the metrics hold loss and num-examples; got {sorted(metrics)}"
            )
        loss, examples = metrics["loss"], metrics["num-examples"]
        if type(loss) is not float or not np.isfinite(loss) or loss < 0:
            raise GradientError(f"loss must be a finite float >= 0, got {loss!r}")
        if type(examples) is not int or examples < 1:
            raise GradientError(f"num-examples must be an int >= 1, got {examples!r}")
        return WorkerGradient(gradient, loss, examples)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Validate the gradients, reduce the valid ones and step the model."""
        replies, failed = replies_without_failures(server_round, replies)
        updates: list[WorkerGradient] = []
        rejected = 0
        for reply in replies:
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

    def step(
        self, server_round: int, updates: list[WorkerGradient]
    ) -> dict[str, float | int | list[float]]:
        """Reduce ``updates`` and take one optimizer step; return the metrics.

        With no update the model is unchanged and the metrics say so
        (``workers-accepted`` is 0, no ``train-loss``). Also what the in-process
        experiment calls, so both run the same server step.
        """
        metrics: dict[str, float | int | list[float]] = {
            "workers-accepted": len(updates)
        }
        if not updates:
            log(
                WARNING,
                "round %s: no valid gradient; the model is unchanged",
                server_round,
            )
            return metrics
        reduced, grads = combine(self.config, updates)
        apply_gradient(self.model, self.optimizer, reduced)
        metrics.update(
            {
                "train-loss": float(np.mean([u.loss for u in updates])),
                "grad-norm-gap": grad_norm_gap(grads),
                "grad-norms": grads.norm(dim=1).tolist(),
                "update-norm": float(reduced.norm()),
            }
        )
        return metrics
