"""The paper's protocol as a Flower ServerApp: initial model, uploads, records.

Section 4 of Jiang et al.: the server trains the initial model on 5k samples it
holds, holds out 5k to validate, and each round every site receives the model,
trial-tests a fresh fold of its data and uploads its rho share; the server
trains on everything accepted so far and evaluates. Every round is one JSON line
in ``out-dir/rounds.jsonl`` (round 0 is the initial model). After every round the
model, the training buffer and the records are checkpointed to
``out-dir/checkpoint.npz`` (:mod:`flwr_select.checkpoint`); a run started again
on the same ``out-dir`` resumes after the last complete round.
"""

from __future__ import annotations

import functools
import json
import resource
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp

from flwr_select.data import DATASETS, SiteData, load_dataset, resolve_data_dir
from flwr_select.files import write_json_lines
from flwr_select.models import build_model
from flwr_select.partition import check_partitioner, paper_split
from flwr_select.protocol import SelectionConfig
from flwr_select.trainer import TrainConfig
from flwr_select.trial import trial_test
from strategies.sample_selection import SampleSelection

SITE_KEYS = (
    "dataset",
    "data-dir",
    "model",
    "seed",
    "validation-size",
    "initial-size",
    "pool-size",
    "num-server-rounds",
    "partitioner",
    "dirichlet-alpha",
)
"""Run-config keys the sites need to find their fold of the data."""


def defaults(dataset: str) -> dict[str, Any]:
    """Return the run config of the sample-selection app for ``dataset``."""
    return {
        "num-server-rounds": 10,
        "rho": 0.05,
        "selection-policy": "proxy",
        "confidence": "cross-entropy",
        "max-count": 0,
        "max-bytes": 0,
        "compress": False,
        "group": "",
        "temperature": 1.0,
        "seed": 0,
        "dataset": dataset,
        "model": DATASETS[dataset].model,
        "data-dir": "",
        "out-dir": f"runs/{dataset}",
        "validation-size": 5000,
        "initial-size": 5000,
        "pool-size": 0,
        "partitioner": "iid",
        "dirichlet-alpha": 0.5,
        "initial-epochs": 10,
        "server-epochs": 5,
        "batch-size": 64,
        "optimizer": "sgd",
        "lr": 0.01,
        "from-scratch": False,
        "max-upload-bytes": 256 * 2**20,
        "round-timeout": 3600.0,
        "fraction-train": 1.0,
        "min-nodes": 2,
    }


PROGRESS_KEYS = (
    "loss",
    "samples_received",
    "bytes_received",
    "buffer_size",
    "train_loss",
    "grad_norm_gap",
)
"""Record values a progress line shows where a record has them."""


class RoundLog:
    """Writes one JSON object per round to ``rounds.jsonl`` and a progress line.

    ``previous`` are the records of a resumed run's complete rounds: the file
    starts with them (and loses any line of a round that was not completed).
    """

    def __init__(
        self, out_dir: str | Path, previous: Iterable[Mapping[str, Any]] = ()
    ) -> None:
        self.path = Path(out_dir) / "rounds.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_json_lines(self.path, previous)
        self.last = time.perf_counter()

    def write(self, record: dict[str, Any]) -> None:
        """Append ``record`` with the seconds since the last one; print progress."""
        now = time.perf_counter()
        record["seconds"] = round(now - self.last, 3)
        self.last = now
        with self.path.open("a") as file:
            file.write(json.dumps(record) + "\n")
        extras = ", ".join(
            f"{key} {record[key]:.4g}"
            for key in PROGRESS_KEYS
            if isinstance(record.get(key), int | float)
        )
        print(
            f"round {record['round']:>3}: accuracy {record['accuracy']:.4f}, {extras}",
            flush=True,
        )


def run(grid: Grid, config: Mapping[str, Any]) -> None:
    """Run the sample-selection experiment described by ``config``."""
    dataset, seed = str(config["dataset"]), int(config["seed"])
    # The sites partition the pool; refuse a bad partitioner before they start.
    check_partitioner(str(config["partitioner"]), float(config["dirichlet-alpha"]))
    data_dir = resolve_data_dir(dataset, str(config["data-dir"]))
    images, labels = load_dataset(dataset, data_dir, "train")
    test_images, test_labels = load_dataset(dataset, data_dir, "test")
    num_classes = DATASETS[dataset].num_classes
    split = paper_split(
        len(images),
        seed=seed,
        validation=int(config["validation-size"]),
        initial=int(config["initial-size"]),
        pool=int(config["pool-size"]) or None,
    )
    held_out = {
        "": SiteData(images[split.validation], labels[split.validation], num_classes),
        "test_": SiteData(test_images, test_labels, num_classes),
    }

    def train_config(epochs_key: str) -> TrainConfig:
        return TrainConfig(
            epochs=int(config[epochs_key]),
            batch_size=int(config["batch-size"]),
            optimizer=str(config["optimizer"]),
            lr=float(config["lr"]),
        )

    torch.manual_seed(seed)
    strategy = SampleSelection(
        functools.partial(build_model, str(config["model"]), num_classes=num_classes),
        num_classes,
        selection=SelectionConfig.from_config(config),
        train_config=train_config("server-epochs"),
        from_scratch=bool(config["from-scratch"]),
        site_config={key: config[key] for key in SITE_KEYS},
        run_dir=str(config["out-dir"]),
        max_upload_bytes=int(config["max-upload-bytes"]),
        fraction_train=float(config["fraction-train"]),
        min_train_nodes=int(config["min-nodes"]),
        min_available_nodes=int(config["min-nodes"]),
    )
    if strategy.resume() is None:
        initial = torch.from_numpy(split.initial)
        initial_arrays = strategy.pretrain(
            SiteData(images[initial], labels[initial], num_classes, ids=initial),
            train_config("initial-epochs"),
        )
    else:
        initial_arrays = ArrayRecord(strategy.model.state_dict())
    log = RoundLog(
        str(config["out-dir"]), (strategy.records[r] for r in sorted(strategy.records))
    )
    evaluation_model = strategy.model_fn().to(strategy.buffer.device)

    def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        evaluation_model.load_state_dict(arrays.to_torch_state_dict())
        record: dict[str, Any] = {"round": server_round}
        for prefix, samples in held_out.items():
            trial = trial_test(evaluation_model, samples)
            record[f"{prefix}accuracy"] = trial.accuracy
            record[f"{prefix}loss"] = float(trial.confidence["cross-entropy"].mean())
        metrics = strategy.rounds.get(server_round, {})
        record["samples_received"] = int(metrics.get("samples-received", 0))
        record["bytes_received"] = int(metrics.get("bytes-received", 0))
        for key in ("sites-accepted", "sites-rejected", "sites-failed"):
            record[key.replace("-", "_")] = int(metrics.get(key, 0))
        record["model_updated"] = int("train-loss" in metrics)
        record["train_loss"] = metrics.get("train-loss")
        record["buffer_size"] = len(strategy.buffer)
        record["server_peak_rss_bytes"] = peak_rss_bytes()
        log.write(record)
        return MetricRecord(
            {k: v for k, v in record.items() if isinstance(v, int | float)}
        )

    strategy.start(
        grid,
        initial_arrays,
        num_rounds=int(config["num-server-rounds"]),
        timeout=float(config["round-timeout"]),
        evaluate_fn=evaluate,
    )


def peak_rss_bytes() -> int:
    """Return the most resident memory this process has held so far, in bytes."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def make_server_app(
    dataset: str,
    run_fn: Callable[[Grid, Mapping[str, Any]], None] = run,
    defaults_fn: Callable[[str], dict[str, Any]] = defaults,
) -> ServerApp:
    """Return a ServerApp that runs ``run_fn`` on ``dataset``'s ``defaults_fn``.

    The run config overrides the defaults; the defaults are sample selection's.
    """
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        run_fn(grid, {**defaults_fn(dataset), **context.run_config})

    return app
