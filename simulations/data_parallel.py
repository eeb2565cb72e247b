"""Biased-sampling data parallelism as a Flower ServerApp (Sharp 2020).

The server holds out ``validation-size`` samples, starts from a fresh model
(seeded), and each round every worker returns the gradient of its class-biased
batch; the strategy reduces them and steps the model. Every ``eval-every``
rounds (and the last) one JSON line goes to ``out-dir/rounds.jsonl``, with the
sample-selection app's ``round``, ``accuracy``, ``loss`` and ``train_loss`` and
the monitors: ``type1_error``, ``type2_error`` (per class),
``filter_redundancy`` (per conv layer), ``grad_norm_gap``, ``iterations`` and
``iterations_to_target``; the last record also has ``test_accuracy`` and
``test_loss`` on the official test set.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from flwr.app import ArrayRecord, MetricRecord
from flwr.serverapp import Grid
from torch import nn

from flwr_select.config import check
from flwr_select.data import DATASETS, SiteData, load_dataset, resolve_data_dir
from flwr_select.evaluation import held_out_metrics
from flwr_select.models import build_model
from flwr_select.parallel.batches import Sampling
from flwr_select.parallel.gradients import DataParallelConfig
from flwr_select.parallel.monitors import monitor
from flwr_select.partition import ShareConfig
from flwr_select.trainer import TrainConfig
from simulations.runner import RoundLog, ServerConfig
from strategies.data_parallel import BiasedDataParallel


@dataclass(frozen=True)
class DataParallelServerConfig(ServerConfig):
    """The data-parallel server's run-config keys; validated when built.

    The keys of :class:`~simulations.runner.ServerConfig` (:func:`defaults`
    sets 300 rounds) and these; the workers' keys are
    :class:`~flwr_select.parallel.gradients.DataParallelConfig`'s and
    :class:`~flwr_select.parallel.batches.Sampling`'s.

    Parameters
    ----------
    momentum : float (default: 0.9)
        The server optimizer's momentum; >= 0.
    eval_every : int (default: 10)
        Evaluate every this many rounds (and the last); >= 1.
    target_accuracy : float (default: 0.95)
        The accuracy ``iterations_to_target`` counts to; in [0, 1].
    """

    momentum: float = 0.9
    eval_every: int = 10
    target_accuracy: float = 0.95

    def __post_init__(self) -> None:
        super().__post_init__()
        check("momentum", self.momentum, self.momentum >= 0, ">= 0")
        check("eval-every", self.eval_every, self.eval_every >= 1, ">= 1")
        target = self.target_accuracy
        check("target-accuracy", target, 0 <= target <= 1, "in [0, 1]")


def defaults(dataset: str) -> dict[str, Any]:
    """Return the run config of the data-parallel app for ``dataset``."""
    server = DataParallelServerConfig(
        dataset=dataset,
        model=DATASETS[dataset].model,
        num_server_rounds=300,
    )
    return {
        **server.to_config(),
        **DataParallelConfig().to_config(),
        **Sampling().to_config(),
    }


def check_config(
    config: Mapping[str, Any],
) -> tuple[DataParallelServerConfig, DataParallelConfig, Sampling]:
    """Return the server's and the workers' settings, as ``runner.check_config``.

    Refuses any bad value (``ConfigError``, naming the key, the value and what
    is allowed) before the engine starts or anything is loaded.
    """
    return (
        DataParallelServerConfig.from_config(config),
        DataParallelConfig.from_config(config),
        Sampling.from_config(config),
    )


class IterationsToTarget:
    """Remembers the first iteration count at which accuracy reached the target."""

    def __init__(self, target: float) -> None:
        self.target = target
        self.reached: int | None = None

    def update(self, accuracy: float, iterations: int) -> int | None:
        """Record one evaluation; return the iterations to target so far (or None)."""
        if self.reached is None and accuracy >= self.target:
            self.reached = iterations
        return self.reached


def round_record(
    model: nn.Module,
    validation: SiteData,
    *,
    server_round: int,
    iterations: int,
    metrics: Mapping[str, Any],
    to_target: IterationsToTarget,
    test: SiteData | None = None,
) -> dict[str, Any]:
    """Return one ``rounds.jsonl`` record: the monitors and the strategy's metrics.

    ``metrics`` are what
    :meth:`~flwr_select.parallel.server.DataParallelServer.step` returned for
    the round (empty for round 0); ``test``, if given, adds ``test_accuracy`` and
    ``test_loss``.
    """
    record: dict[str, Any] = {
        "round": server_round,
        "iterations": iterations,
        **monitor(model, validation),
    }
    record["iterations_to_target"] = to_target.update(record["accuracy"], iterations)
    for key in ("train-loss", "grad-norm-gap", "grad-norms", "workers-accepted"):
        record[key.replace("-", "_")] = metrics.get(key)
    record["workers_rejected"] = metrics.get("workers-rejected", 0)
    record["workers_failed"] = metrics.get("workers-failed", 0)
    if test is not None:
        record.update(held_out_metrics(model, {"test_": test}))
    return record


def run(grid: Grid, config: Mapping[str, Any]) -> None:
    """Run the data-parallel experiment described by ``config``.

    Every value is checked (:func:`check_config`) before anything is loaded.
    """
    server, dp_config, sampling = check_config(config)
    num_rounds, eval_every = server.num_server_rounds, server.eval_every
    data_dir = resolve_data_dir(server.dataset, server.data_dir)
    images, labels = load_dataset(server.dataset, data_dir, "train")
    test_images, test_labels = load_dataset(server.dataset, data_dir, "test")
    num_classes = DATASETS[server.dataset].num_classes
    workers = ShareConfig.from_config(server.to_config())
    held_out = torch.from_numpy(
        workers.split(len(images), seed=sampling.seed).validation
    )
    validation = SiteData(images[held_out], labels[held_out], num_classes)
    test = SiteData(test_images, test_labels, num_classes)
    torch.manual_seed(sampling.seed)
    model_fn = functools.partial(build_model, server.model, num_classes=num_classes)
    strategy = BiasedDataParallel(
        model_fn,
        config=dp_config,
        sampling=sampling,
        optimizer=TrainConfig(
            optimizer=server.optimizer, lr=server.lr, momentum=server.momentum
        ),
        worker_config={**workers.to_config(), "num-classes": num_classes},
        fraction_train=server.fraction_train,
        min_train_nodes=server.min_nodes,
        min_available_nodes=server.min_nodes,
    )
    log = RoundLog(server.out_dir)
    evaluation_model = model_fn()
    to_target = IterationsToTarget(server.target_accuracy)

    def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        if server_round % eval_every and server_round != num_rounds:
            return None
        evaluation_model.load_state_dict(arrays.to_torch_state_dict())
        record = round_record(
            evaluation_model,
            validation,
            server_round=server_round,
            iterations=server_round * dp_config.local_steps,
            metrics=strategy.rounds.get(server_round, {}),
            to_target=to_target,
            test=test if server_round == num_rounds else None,
        )
        log.write(record)
        return MetricRecord(
            {k: v for k, v in record.items() if isinstance(v, int | float)}
        )

    strategy.start(
        grid,
        ArrayRecord(strategy.model.state_dict()),
        num_rounds=num_rounds,
        evaluate_fn=evaluate,
    )
