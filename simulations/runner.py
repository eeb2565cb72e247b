"""The paper's protocol as a Flower ServerApp: initial model, uploads, records.

Section 4 of Jiang et al.: the server trains the initial model on 5k samples it
holds, holds out 5k to validate, and each round every site receives the model,
trial-tests a fresh fold of its data and uploads its rho share; the server
trains on everything accepted so far and evaluates. Every round is one JSON line
in ``out-dir/rounds.jsonl`` (round 0 is the initial model). After every round the
model, the training buffer and the records are checkpointed to
``out-dir/checkpoint.npz`` and ``out-dir/segments/``
(:mod:`flwr_select.selection.checkpoint`). Without an ``out-dir`` every run
gets a fresh folder (:func:`fresh_run_dir`), so a second run never meets the
first's; a run started again on the ``out-dir`` it printed resumes after the
last complete round.
"""

from __future__ import annotations

import functools
import json
import resource
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp

from flwr_select.config import check, check_name
from flwr_select.data import DATASETS, SiteData, load_dataset, resolve_data_dir
from flwr_select.evaluation import held_out_metrics
from flwr_select.files import read_json_lines, write_json_lines
from flwr_select.models import build_model
from flwr_select.partition import ShareConfig, SiteShareConfig
from flwr_select.selection.protocol import SelectionConfig
from flwr_select.selection.server import (
    MAX_SITE_SAMPLES,
    check_round_budget,
    check_server_bounds,
)
from flwr_select.selection.wire import encode, wire_bytes
from flwr_select.trainer import AUGMENTATIONS, OPTIMIZERS, SCHEDULES, TrainConfig
from simulations.recipes import DATASET_RECIPES, RECIPES
from strategies.nodes import check_fraction_train, check_min_nodes
from strategies.sample_selection import SampleSelection


@dataclass(frozen=True)
class ServerConfig(ShareConfig):
    """The run-config keys every ServerApp here reads; validated when built.

    The data keys the nodes get too (:class:`~flwr_select.partition.ShareConfig`),
    and these.

    Parameters
    ----------
    out_dir : str (default: "")
        Where records go: a folder named to resume the run in it; empty: a fresh
        folder each run, ``runs/<app>-<date>-<time>``.
    optimizer : str (default: "sgd")
        A name from :data:`~flwr_select.trainer.OPTIMIZERS`.
    lr : float (default: 0.01)
        The server optimizer's step size; > 0.
    fraction_train : float (default: 1.0)
        Share of the nodes asked each round; in (0, 1].
    min_nodes : int (default: 2)
        Nodes a round waits for and asks at least; >= 1.

    Raises
    ------
    flwr_select.config.ConfigError
        If a value is not allowed, naming the run-config key.
    """

    out_dir: str = ""
    optimizer: str = "sgd"
    lr: float = 0.01
    fraction_train: float = 1.0
    min_nodes: int = 2

    def __post_init__(self) -> None:
        super().__post_init__()
        check_name("optimizer", self.optimizer, sorted(OPTIMIZERS))
        check("lr", self.lr, self.lr > 0, "> 0")
        # the strategies' constructors check their arguments the same way
        check_fraction_train("fraction-train", self.fraction_train)
        check_min_nodes("min-nodes", self.min_nodes)


@dataclass(frozen=True)
class SelectionServerConfig(ServerConfig, SiteShareConfig):
    """The sample-selection server's run-config keys; validated when built.

    :class:`ServerConfig`'s, the sites' data keys
    (:class:`~flwr_select.partition.SiteShareConfig`), and these; what the sites
    select by is :class:`~flwr_select.selection.protocol.SelectionConfig`.
    The defaults below are the fields'; an app's defaults for the model and its
    training come from its data set's recipe (:func:`defaults`,
    :mod:`simulations.recipes`).

    Parameters
    ----------
    initial_epochs, server_epochs : int (default: 10, 5)
        Epochs of the initial model and of each round; >= 1.
    batch_size : int (default: 64)
        The server trainer's batch size; >= 1.
    lr_schedule : str (default: "constant")
        The learning rate within each training call (the initial one and every
        round's): a name from :data:`~flwr_select.trainer.SCHEDULES`.
    warmup : float (default: 0.0)
        Share of each call's steps the rate rises over, linearly; in [0, 1).
    augment : str (default: "none")
        ``"translate"``: random shifts of up to ``max-shift`` pixels.
    max_shift : int (default: 2)
        Pixels; >= 1.
    weight_decay : float (default: 0.0)
        L2 penalty on the weights; >= 0.
    from_scratch : bool (default: False)
        Retrain a fresh model each round (else continue from the current one,
        with a fresh schedule).
    max_upload_bytes : int (default: 256 MiB)
        The server rejects a larger upload before decoding it; >= 1.
    max_site_samples : int (default: 10,000)
        The most samples the server accepts from one site in one round; >= 1
        (see :class:`~flwr_select.selection.server.SelectionServer`).
    round_timeout : float (default: 3600.0)
        Seconds a round waits for replies; > 0.
    """

    initial_epochs: int = 10
    server_epochs: int = 5
    batch_size: int = 64
    lr_schedule: str = "constant"
    warmup: float = 0.0
    augment: str = "none"
    max_shift: int = 2
    weight_decay: float = 0.0
    from_scratch: bool = False
    max_upload_bytes: int = 256 * 2**20
    max_site_samples: int = MAX_SITE_SAMPLES
    round_timeout: float = 3600.0

    def __post_init__(self) -> None:
        super().__post_init__()
        check("initial-epochs", self.initial_epochs, self.initial_epochs >= 1, ">= 1")
        check("server-epochs", self.server_epochs, self.server_epochs >= 1, ">= 1")
        check("batch-size", self.batch_size, self.batch_size >= 1, ">= 1")
        check_name("lr-schedule", self.lr_schedule, SCHEDULES)
        check("warmup", self.warmup, 0 <= self.warmup < 1, "in [0, 1)")
        check_name("augment", self.augment, AUGMENTATIONS)
        check("max-shift", self.max_shift, self.max_shift >= 1, ">= 1")
        check("weight-decay", self.weight_decay, self.weight_decay >= 0, ">= 0")
        check_server_bounds(self.max_upload_bytes, self.max_site_samples)
        check("round-timeout", self.round_timeout, self.round_timeout > 0, "> 0")

    def train_config(self, epochs: int) -> TrainConfig:
        """Return the server trainer's config for ``epochs`` epochs."""
        return TrainConfig(
            epochs=epochs,
            batch_size=self.batch_size,
            optimizer=self.optimizer,
            lr=self.lr,
            weight_decay=self.weight_decay,
            schedule=self.lr_schedule,
            warmup=self.warmup,
            augment=self.augment,
            max_shift=self.max_shift,
        )


def defaults(dataset: str) -> dict[str, Any]:
    """Return the run config of the sample-selection app for ``dataset``.

    The server's defaults, with the training of the data set's recipe
    (:data:`DATASET_RECIPES`), and the selection's.
    """
    server = SelectionServerConfig(dataset=dataset)
    return {
        **server.to_config(),
        **RECIPES[DATASET_RECIPES[dataset]],
        **SelectionConfig().to_config(),
    }


def empty_upload_bytes(dataset: str, *, compress: bool) -> int:
    """Return the wire size of an upload of no samples: the least any upload takes."""
    images = torch.zeros((0, *DATASETS[dataset].sample_shape), dtype=torch.uint8)
    empty = SiteData(
        images, torch.zeros(0, dtype=torch.long), DATASETS[dataset].num_classes
    )
    return wire_bytes(encode(empty, compress=compress))


def check_config(
    config: Mapping[str, Any],
) -> tuple[SelectionServerConfig, SelectionConfig]:
    """Return the server's and the sites' settings; refuse any bad value of ``config``.

    ``flower-simulation`` calls this before the engine starts and :func:`run`
    before anything is loaded.

    Raises
    ------
    flwr_select.config.ConfigError
        Naming the key, the value and what is allowed.
    """
    server = SelectionServerConfig.from_config(config)
    selection = SelectionConfig.from_config(config)
    empty = empty_upload_bytes(server.dataset, compress=selection.compress)
    least = f"an empty {server.dataset} upload" + (
        " (compressed)" if selection.compress else ""
    )
    check(
        "max-bytes",
        selection.max_bytes,
        selection.max_bytes == 0 or selection.max_bytes >= empty,
        f"0 (no limit) or >= {empty}, the size of {least}",
    )
    check(
        "max-upload-bytes",
        server.max_upload_bytes,
        server.max_upload_bytes >= empty,
        f">= {empty}, the size of {least}",
    )
    check_round_budget(selection, DATASETS[server.dataset].sample_shape)
    return server, selection


PROGRESS_KEYS = (
    "loss",
    "samples_received",
    "bytes_received",
    "buffer_size",
    "train_loss",
    "grad_norm_gap",
    "suspect_labels",
)
"""Record values a progress line shows where a record has them."""


class RoundLog:
    """Writes each round to ``rounds.jsonl`` and ``execution.jsonl``; prints progress.

    ``rounds.jsonl`` holds what the seed, data and config determine (accuracy,
    loss, samples and bytes): two runs of the same give the same bytes.
    ``execution.jsonl`` holds what this execution measured besides: the seconds
    since the previous round, the server's peak memory, and figures per node
    under the SuperLink's node ids (new ones in every simulation). ``previous``
    are a resumed run's complete rounds: ``rounds.jsonl`` starts with them (and
    loses any line of a round that was not completed); ``execution.jsonl`` goes
    on from where it was.
    """

    def __init__(
        self, out_dir: str | Path, previous: Iterable[Mapping[str, Any]] = ()
    ) -> None:
        self.path = Path(out_dir) / "rounds.jsonl"
        self.execution_path = Path(out_dir) / "execution.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        previous = list(previous)
        write_json_lines(self.path, previous)
        if not previous:
            write_json_lines(self.execution_path, [])
        self.last = time.perf_counter()

    def write(
        self, record: Mapping[str, Any], measured: Mapping[str, Any] | None = None
    ) -> None:
        """Append ``record``, and ``measured`` with the seconds; print progress."""
        now = time.perf_counter()
        execution = {
            "round": record["round"],
            "seconds": round(now - self.last, 3),
            **(measured or {}),
        }
        self.last = now
        for path, line in ((self.path, record), (self.execution_path, execution)):
            with path.open("a") as file:
                file.write(json.dumps(line) + "\n")
        extras = ", ".join(
            f"{key} {record[key]:.4g}"
            for key in PROGRESS_KEYS
            if isinstance(record.get(key), int | float)
        )
        by_node = "".join(
            f", {words} by node {shown_by_node(counts)}"
            for words, key in (
                ("suspect labels", "suspect_labels_by_node"),
                ("suspect candidates", "suspect_candidates_by_node"),
                ("quotas", "quota_by_node"),
                ("top-ups", "top_up_by_node"),
            )
            if (counts := {n: c for n, c in (measured or {}).get(key, {}).items() if c})
        )
        replied = record.get("sites_accepted", 0) + record.get("sites_rejected", 0)
        asked = replied + record.get("sites_failed", 0)
        sites = (
            f", sites replied {replied}/{asked} ({record['sites_rejected']} rejected)"
            if asked
            else ""
        )
        print(
            f"round {record['round']:>3}: accuracy {record['accuracy']:.4f}, "
            f"{extras}{sites}{by_node}",
            flush=True,
        )


SHOWN_NODES = 5
"""A progress line names at most this many nodes per figure (the largest counts)."""


def shown_by_node(counts: Mapping[str, int]) -> str:
    """Return ``counts`` for a progress line: all, or the largest and how many more.

    With hundreds of sites a line naming every node would be unreadable; the
    ones with the most (say, suspect labels) are the ones an operator looks for.
    ``execution.jsonl`` keeps every node's count.
    """
    largest = dict(sorted(counts.items(), key=lambda item: -item[1])[:SHOWN_NODES])
    more = len(counts) - len(largest)
    return f"{largest}" + (f" and {more} more nodes" if more else "")


def run(grid: Grid, config: Mapping[str, Any]) -> None:
    """Run the sample-selection experiment described by ``config``.

    Every value is checked (:func:`check_config`) before anything is loaded.
    """
    server, selection = check_config(config)
    data_dir = resolve_data_dir(server.dataset, server.data_dir)
    images, labels = load_dataset(server.dataset, data_dir, "train")
    test_images, test_labels = load_dataset(server.dataset, data_dir, "test")
    num_classes = DATASETS[server.dataset].num_classes
    sites = SiteShareConfig.from_config(server.to_config())
    split = sites.split(len(images), seed=selection.seed)  # the sites' own
    held_out = {
        "": SiteData(images[split.validation], labels[split.validation], num_classes),
        "test_": SiteData(test_images, test_labels, num_classes),
    }
    torch.manual_seed(selection.seed)
    strategy = SampleSelection(
        functools.partial(build_model, server.model, num_classes=num_classes),
        num_classes,
        selection=selection,
        server_training=server.train_config(server.server_epochs),
        from_scratch=server.from_scratch,
        site_config=sites.to_config(),
        run_dir=server.out_dir,
        sample_shape=DATASETS[server.dataset].sample_shape,
        max_upload_bytes=server.max_upload_bytes,
        max_site_samples=server.max_site_samples,
        fraction_train=server.fraction_train,
        min_train_nodes=server.min_nodes,
        min_available_nodes=server.min_nodes,
    )
    if strategy.resume() is None:
        initial = torch.from_numpy(split.initial)
        print(
            f"Training the initial model on the server's {len(initial)} samples, "
            f"{server.initial_epochs} epochs (minutes on a CPU; it says how far "
            "it is as it goes)",
            flush=True,
        )
        initial_arrays = strategy.pretrain(
            SiteData(images[initial], labels[initial], num_classes, ids=initial),
            server.train_config(server.initial_epochs),
        )
    else:
        initial_arrays = ArrayRecord(strategy.model.state_dict())
    log = RoundLog(
        server.out_dir, (strategy.records[r] for r in sorted(strategy.records))
    )
    evaluation_model = strategy.model_fn().to(strategy.buffer.device)

    def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        evaluation_model.load_state_dict(arrays.to_torch_state_dict())
        record: dict[str, Any] = {
            "round": server_round,
            **held_out_metrics(evaluation_model, held_out),
        }
        metrics = strategy.rounds.get(server_round, {})
        record["samples_received"] = int(metrics.get("samples-received", 0))
        record["bytes_received"] = int(metrics.get("bytes-received", 0))
        record["bytes_sent"] = int(metrics.get("bytes-sent", 0))
        for key in ("sites-accepted", "sites-rejected", "sites-failed"):
            record[key.replace("-", "_")] = int(metrics.get(key, 0))
        record["suspect_labels"] = int(metrics.get("suspect-labels", 0))
        record["suspect_candidates"] = int(metrics.get("suspect-candidates", 0))
        record["summary_bytes"] = int(metrics.get("summary-bytes", 0))
        record["top_up_samples"] = int(metrics.get("top-up-samples", 0))
        record["model_updated"] = int("train-loss" in metrics)
        record["train_loss"] = metrics.get("train-loss")
        record["buffer_size"] = len(strategy.buffer)
        log.write(
            record,
            {
                "server_peak_rss_bytes": peak_rss_bytes(),
                "samples_received_by_node": by_node(metrics, "samples-received"),
                "suspect_labels_by_node": by_node(metrics, "suspect-labels"),
                "suspect_candidates_by_node": by_node(metrics, "suspect-candidates"),
                "quota_by_node": by_node(metrics, "quota"),
                "top_up_by_node": by_node(metrics, "top-up"),
            },
        )
        return MetricRecord(
            {k: v for k, v in record.items() if isinstance(v, int | float)}
        )

    strategy.start(
        grid,
        initial_arrays,
        num_rounds=server.num_server_rounds,
        timeout=server.round_timeout,
        evaluate_fn=evaluate,
    )


def by_node(metrics: Mapping[str, Any], name: str) -> dict[str, Any]:
    """Return the per-node values of metric ``name`` (``name.<node id>`` keys)."""
    prefix = f"{name}."
    return {k[len(prefix) :]: v for k, v in metrics.items() if k.startswith(prefix)}


def peak_rss_bytes() -> int:
    """Return the most resident memory this process has held so far, in bytes."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def fresh_run_dir(name: str, parent: str | Path = "runs") -> Path:
    """Create and return a new folder for one run: ``<parent>/<name>-<date>-<time>``.

    A second run in the same second gets ``-2`` (then ``-3``...) appended; the
    folder is created here, so two runs never share one.
    """
    stem = Path(parent) / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    for attempt in range(1, 1000):
        folder = stem if attempt == 1 else stem.with_name(f"{stem.name}-{attempt}")
        try:
            folder.mkdir(parents=True)
        except FileExistsError:
            continue
        return folder
    raise FileExistsError(f"{stem} and 998 more exist already")


def run_summary(folder: Path) -> str:
    """Return what a finished run says last: its final figures and where they are.

    From ``rounds.jsonl``: the last round's accuracies, and the bytes the
    rounds moved each way where the app records them.
    """
    records = read_json_lines(folder / "rounds.jsonl")
    last = records[-1]
    figures = [
        f"{name} {last[key]:.4f}"
        for key, name in (("accuracy", "accuracy"), ("test_accuracy", "test"))
        if isinstance(last.get(key), float)
    ] + [
        f"{sum(r[key] for r in records):,} bytes {way}"
        for key, way in (("bytes_received", "up"), ("bytes_sent", "down"))
        if key in last
    ]
    return (
        f"Done after round {last['round']}: {', '.join(figures)}.\n"
        f"Records are in {folder} (rounds.jsonl, execution.jsonl); to go on with "
        f'this run, start it again with out-dir="{folder}"'
    )


def make_server_app(
    dataset: str,
    run_fn: Callable[[Grid, Mapping[str, Any]], None] = run,
    defaults_fn: Callable[[str], dict[str, Any]] = defaults,
    name: str = "",
) -> ServerApp:
    """Return a ServerApp that runs ``run_fn`` on ``dataset``'s ``defaults_fn``.

    The run config overrides the defaults; the defaults are sample selection's.
    Without an ``out-dir`` the run gets a fresh folder named after ``name``
    (default: ``dataset``; :func:`fresh_run_dir`); either way the folder is
    printed when the run starts and when it ends, with how to resume it.
    """
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        config = {**defaults_fn(dataset), **context.run_config}
        if not config["out-dir"]:
            config["out-dir"] = str(fresh_run_dir(name or dataset))
        folder = Path(config["out-dir"]).absolute()
        print(f"Records go to {folder}", flush=True)
        run_fn(grid, config)
        print(run_summary(folder), flush=True)

    return app
