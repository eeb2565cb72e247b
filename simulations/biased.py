"""Biased sampling and non-standard reductions against the baseline (Sharp 2020).

    python -m simulations.biased --data-dir DIR --out-dir results --seeds 0 1 2

Compares uniform batches with the weighted mean (conventional data parallelism)
against class-biased batches with every reduction, on MNIST. Runs in-process
with the same worker and server code as ``simulations.mnist_data_parallel``
(:func:`~flwr_select.parallel.gradients.worker_gradient` for each worker,
:meth:`~flwr_select.parallel.server.DataParallelServer.step` on the server), so
hundreds of iterations cost no per-round messaging. Each run is one JSON-lines
file under ``out-dir/biased/runs``; a run on disk is not run again, so the
command resumes. It ends by writing ``summary-<dataset>.json`` and a figure.
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from flwr_select.data import DATASETS, SiteData
from flwr_select.files import read_json_lines
from flwr_select.models import build_model
from flwr_select.parallel.batches import Sampling
from flwr_select.parallel.gradients import DataParallelConfig, worker_gradient
from flwr_select.parallel.reductions import REDUCTIONS
from flwr_select.parallel.server import DataParallelServer
from flwr_select.partition import paper_split, site_partition
from flwr_select.trainer import TrainConfig
from simulations.data_parallel import IterationsToTarget, round_record
from simulations.experiments import Data, mean_std, write_run


@dataclass(frozen=True)
class Setup:
    """Sizes and training shared by every configuration of the experiment."""

    workers: int = 4
    batch_size: int = 32
    iterations: int = 400
    eval_every: int = 20
    validation: int = 5_000
    pool: int | None = None
    lr: float = 0.01
    momentum: float = 0.9
    bias: float = 0.5
    target: float = 0.95


FULL = Setup()
SHORT = Setup(
    workers=2, iterations=30, eval_every=10, validation=1_000, pool=4_000, lr=0.05
)
"""The short mode: a quick look, and what the tests run."""


@dataclass(frozen=True)
class Configuration:
    """One line of the comparison: a batch distribution and a reduction."""

    label: str
    sampling: str
    reduction: str
    schedule: str = "constant"


CONFIGURATIONS = [
    Configuration("uniform+mean", "uniform", "mean"),
    *(Configuration(f"favoured+{r}", "favoured", r) for r in REDUCTIONS),
    Configuration("dirichlet+mean", "dirichlet", "mean"),
    Configuration("favoured-decay+mean", "favoured", "mean", "linear-decay"),
]
"""The baseline, biased batches with each reduction, and the other distributions."""


def run_configuration(
    data: Data, setup: Setup, configuration: Configuration, seed: int
) -> list[dict[str, Any]]:
    """Train from a seeded fresh model; return the evaluated rounds' records."""
    split = paper_split(
        len(data.images),
        seed=seed,
        validation=setup.validation,
        initial=0,
        pool=setup.pool,
    )
    validation = data.samples(split.validation)
    test = SiteData(data.test_images, data.test_labels, data.num_classes)
    shares = [
        data.samples(site_partition(split.pool, w, setup.workers))
        for w in range(setup.workers)
    ]
    torch.manual_seed(seed)
    config = DataParallelConfig(
        reduction=configuration.reduction, batch_size=setup.batch_size
    )
    sampling = Sampling(
        sampling=configuration.sampling,
        bias=setup.bias,
        bias_schedule=configuration.schedule,
        seed=seed,
    )
    server = DataParallelServer(
        functools.partial(build_model, DATASETS[data.dataset].model),
        config=config,
        sampling=sampling,
        optimizer=TrainConfig(lr=setup.lr, momentum=setup.momentum),
    )
    to_target = IterationsToTarget(setup.target)

    def record(server_round: int, metrics: dict[str, Any]) -> dict[str, Any]:
        return round_record(
            server.model,
            validation,
            server_round=server_round,
            iterations=server_round,
            metrics=metrics,
            to_target=to_target,
            test=test if server_round == setup.iterations else None,
        )

    records = [record(0, {})]
    for server_round in range(1, setup.iterations + 1):
        updates = [
            worker_gradient(
                copy.deepcopy(server.model),
                share.images,
                share.labels,
                config,
                sampling,
                num_classes=data.num_classes,
                worker=worker,
                num_workers=setup.workers,
                server_round=server_round,
                num_rounds=setup.iterations,
            )
            for worker, share in enumerate(shares)
        ]
        metrics = server.step(server_round, updates)
        if server_round % setup.eval_every == 0 or server_round == setup.iterations:
            records.append(record(server_round, metrics))
    return records


CURVES = ("accuracy", "loss", "grad_norm_gap", "filter_redundancy")
"""Values summarised as curves over iterations (mean and std over seeds)."""


def summarise(runs: list[list[dict[str, Any]]], target: float) -> dict[str, Any]:
    """Per configuration: mean and std over seeds of every curve, and the measures.

    ``iterations_to_target`` is per seed (None: not reached) and from the mean
    curve; the final per-class type I/II error rates are averaged over seeds.
    """
    groups: dict[str, list[list[dict[str, Any]]]] = {}
    for run in runs:
        groups.setdefault(run[0]["configuration"], []).append(run)
    lines = {}
    for label, group in groups.items():
        iterations = [r["iterations"] for r in group[0]]
        accuracy = _curve(group, "accuracy")
        reached = [
            i for i, a in zip(iterations, accuracy[0], strict=True) if a >= target
        ]
        final = [run[-1] for run in group]
        lines[label] = {
            "seeds": sorted(run[0]["seed"] for run in group),
            "iterations": iterations,
            "accuracy": accuracy,
            **{key: _curve(group, key) for key in CURVES[1:]},
            "iterations_to_target": [r["iterations_to_target"] for r in final],
            "iterations_to_target_mean_curve": reached[0] if reached else None,
            "final_accuracy": mean_std([r["accuracy"] for r in final]),
            "test_accuracy": mean_std([r["test_accuracy"] for r in final]),
            "type1_error": np.mean([r["type1_error"] for r in final], 0).tolist(),
            "type2_error": np.mean([r["type2_error"] for r in final], 0).tolist(),
        }
    return {"target": target, "lines": lines}


def _curve(group: list[list[dict[str, Any]]], key: str) -> list[list[float]]:
    """Mean and std over seeds of one value per record (per-layer lists averaged).

    A missing value (``None``: round 0 has no gradients) stays ``None``.
    """
    values = np.array(
        [
            [np.nan if r[key] is None else float(np.mean(r[key])) for r in run]
            for run in group
        ]
    )
    missing = np.isnan(values).all(0)
    values[:, missing] = 0.0
    return [
        [None if m else float(v) for m, v in zip(missing, stat, strict=True)]
        for stat in (np.nanmean(values, 0), np.nanstd(values, 0))
    ]


def run_experiment(
    data: Data, setup: Setup, out_dir: Path, seeds: list[int]
) -> dict[str, Any]:
    """Run every (configuration, seed) not on disk yet; write summary and figure."""
    from simulations.figures import plot_data_parallel

    mode = "short" if setup == SHORT else "full"
    runs_dir = out_dir / "biased" / f"runs-{mode}"
    runs_dir.mkdir(parents=True, exist_ok=True)
    jobs = [(c, seed) for c in CONFIGURATIONS for seed in seeds]
    runs = []
    for count, (configuration, seed) in enumerate(jobs, 1):
        path = runs_dir / f"{data.dataset}-{configuration.label}-seed{seed}.jsonl"
        if not path.exists():
            started = time.perf_counter()
            records = run_configuration(data, setup, configuration, seed)
            meta = {
                "configuration": configuration.label,
                **asdict(configuration),
                "seed": seed,
                "setup": asdict(setup),
            }
            write_run(path, meta, records)
            print(
                f"[biased {count}/{len(jobs)}] {configuration.label} seed={seed}: "
                f"accuracy {records[-1]['accuracy']:.4f}, to {setup.target}: "
                f"{records[-1]['iterations_to_target']} iterations "
                f"({time.perf_counter() - started:.0f} s)",
                flush=True,
            )
        runs.append(read_json_lines(path))
    summary = {"dataset": data.dataset, "mode": mode, **summarise(runs, setup.target)}
    out = out_dir / "biased"
    (out / f"summary-{data.dataset}.json").write_text(json.dumps(summary, indent=1))
    plot_data_parallel(summary, out / f"biased-{data.dataset}.png")
    return summary


def main(argv: list[str] | None = None) -> None:
    """Parse the command line and run the comparison."""
    parser = argparse.ArgumentParser(
        prog="python -m simulations.biased", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--dataset", default="mnist", help="mnist or fashion-mnist")
    parser.add_argument("--data-dir", default=None, help="the data set's folder")
    parser.add_argument(
        "--out-dir", default="results", help="where runs, summaries and figures go"
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--short", action="store_true", help="2 workers, 30 steps")
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    data = Data(args.dataset, args.data_dir)
    run_experiment(data, SHORT if args.short else FULL, Path(args.out_dir), args.seeds)


if __name__ == "__main__":
    main()
