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
from typing import Any

import torch
from flwr.app import ArrayRecord, MetricRecord
from flwr.serverapp import Grid
from torch import nn

from flwr_select.data import DATASETS, SiteData, load_dataset, resolve_data_dir
from flwr_select.data_parallel import DataParallelConfig
from flwr_select.models import build_model
from flwr_select.monitors import monitor
from flwr_select.partition import paper_split
from flwr_select.sampling import Sampling
from flwr_select.trainer import TrainConfig
from flwr_select.trial import trial_test
from simulations.runner import RoundLog
from strategies.data_parallel import BiasedDataParallel

WORKER_KEYS = (
    "dataset",
    "data-dir",
    "model",
    "seed",
    "validation-size",
    "pool-size",
    "num-server-rounds",
)
"""Run-config keys the workers need to find their share of the data."""


def defaults(dataset: str) -> dict[str, Any]:
    """Return the run config of the data-parallel app for ``dataset``."""
    return {
        "num-server-rounds": 300,
        **DataParallelConfig().to_config(),
        **Sampling().to_config(),
        "dataset": dataset,
        "model": DATASETS[dataset].model,
        "data-dir": "",
        "out-dir": f"runs/{dataset}-data-parallel",
        "validation-size": 5000,
        "pool-size": 0,
        "optimizer": "sgd",
        "lr": 0.01,
        "momentum": 0.9,
        "eval-every": 10,
        "target-accuracy": 0.95,
        "fraction-train": 1.0,
        "min-nodes": 2,
    }


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

    ``metrics`` are what :meth:`BiasedDataParallel.step` returned for the round
    (empty for round 0); ``test``, if given, adds ``test_accuracy`` and
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
        trial = trial_test(model, test)
        record["test_accuracy"] = trial.accuracy
        record["test_loss"] = float(trial.confidence["cross-entropy"].mean())
    return record


def run(grid: Grid, config: Mapping[str, Any]) -> None:
    """Run the data-parallel experiment described by ``config``."""
    dataset, seed = str(config["dataset"]), int(config["seed"])
    num_rounds, eval_every = int(config["num-server-rounds"]), int(config["eval-every"])
    data_dir = resolve_data_dir(dataset, str(config["data-dir"]))
    images, labels = load_dataset(dataset, data_dir, "train")
    test_images, test_labels = load_dataset(dataset, data_dir, "test")
    num_classes = DATASETS[dataset].num_classes
    held_out = torch.from_numpy(
        paper_split(
            len(images),
            seed=seed,
            validation=int(config["validation-size"]),
            initial=0,
            pool=int(config["pool-size"]) or None,
        ).validation
    )
    validation = SiteData(images[held_out], labels[held_out], num_classes)
    test = SiteData(test_images, test_labels, num_classes)
    dp_config = DataParallelConfig.from_config(config)
    torch.manual_seed(seed)
    model_fn = functools.partial(
        build_model, str(config["model"]), num_classes=num_classes
    )
    strategy = BiasedDataParallel(
        model_fn,
        config=dp_config,
        sampling=Sampling.from_config(config),
        optimizer=TrainConfig(
            optimizer=str(config["optimizer"]),
            lr=float(config["lr"]),
            momentum=float(config["momentum"]),
        ),
        worker_config={
            **{key: config[key] for key in WORKER_KEYS},
            "num-classes": num_classes,
        },
        fraction_train=float(config["fraction-train"]),
        min_train_nodes=int(config["min-nodes"]),
        min_available_nodes=int(config["min-nodes"]),
    )
    log = RoundLog(str(config["out-dir"]))
    evaluation_model = model_fn()
    to_target = IterationsToTarget(float(config["target-accuracy"]))

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
