"""The sample-selection paper's experiments, one command each (Jiang et al. 2017).

    python -m simulations.paper fig4a --dataset mnist --data-dir DIR --out-dir results

The paper's single site, run in-process on the engine (no network in the way):
the server trains the initial model on ``initial`` samples, holds out
``validation``, and each round the site receives the model, trial-tests a fresh
fold of ``fold`` samples and uploads its rho share; the server retrains on
everything received so far (continuing from its model) and evaluates. Every run
is one JSON-lines file of per-round records under ``out-dir/runs`` (the same
seed, data and protocol give the same bytes; how long it took goes to
``runs/timings.jsonl``); a run whose file exists is not run again, so a long
experiment resumes where it stopped. Each command ends by writing
``summary-<dataset>.json`` and a PNG figure.
"""

from __future__ import annotations

import argparse
import functools
import json
import multiprocessing
import os
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from flwr_select.data import SiteData
from flwr_select.evaluation import held_out_metrics
from flwr_select.files import read_json_lines
from flwr_select.models import build_model
from flwr_select.noise import CLEAN, LabelNoise
from flwr_select.partition import PaperSplit, paper_split, round_fold
from flwr_select.selection.ledger import SiteLedger
from flwr_select.selection.policies import GROUPS
from flwr_select.selection.protocol import SelectionConfig
from flwr_select.selection.scores import CONFIDENCE_METRICS
from flwr_select.selection.server import SelectionServer, site_report
from flwr_select.selection.site import site_round
from simulations.experiments import Data, write_run
from simulations.recipes import DATASET_RECIPES, RECIPES
from simulations.runner import SelectionServerConfig


@dataclass(frozen=True)
class Protocol:
    """Sizes of one experiment (the paper's section 4 by default) and its recipe."""

    validation: int = 5_000
    initial: int = 5_000
    fold: int = 5_000
    rounds: int = 10
    recipe: str = DATASET_RECIPES["mnist"]
    """A name from :data:`simulations.runner.RECIPES`: the model and its training."""
    test: int | None = None
    """How many of the official test images (the first ones) each round of
    :func:`run_site` is evaluated on; ``None``: all of them, as the paper's
    tables report. The Flower apps that ``simulations.sites`` runs evaluate all."""

    def training(self) -> SelectionServerConfig:
        """Return the recipe's model and training, as the Flower app reads them."""
        return SelectionServerConfig.from_config(RECIPES[self.recipe])


PROTOCOLS = {
    "mnist": Protocol(recipe=DATASET_RECIPES["mnist"]),
    "fashion-mnist": Protocol(recipe=DATASET_RECIPES["fashion-mnist"]),
    "cifar10": Protocol(initial=10_000, rounds=8, recipe=DATASET_RECIPES["cifar10"]),
}
SHORT = Protocol(
    validation=1_000, initial=1_000, fold=1_000, rounds=3, recipe="quick", test=2_000
)
"""The short mode: a quick look, and what the tests run. It evaluates 2,000 test
images, not 10,000: on the whole test set, evaluation took three quarters of a
short run's time here."""


@dataclass(frozen=True)
class Scheme:
    """One line of a figure: a policy, its confidence metric and options."""

    label: str
    policy: str
    confidence: str = "cross-entropy"
    group: str = ""

    def selection(self, rho: float, seed: int) -> SelectionConfig:
        """Return what the site is asked to do in a run at ``rho`` with ``seed``."""
        return SelectionConfig(
            rho=rho,
            selection_policy=self.policy,
            confidence=self.confidence,
            group=self.group,
            seed=seed,
        )


PAPER_SCHEMES = [
    Scheme("uniform", "uniform"),
    Scheme("oblivious", "oblivious"),
    Scheme("proxy", "proxy"),
]
TRIMMED = Scheme("trimmed-proxy", "trimmed-proxy")
TRIMMED_LOWEST = Scheme("trimmed-lowest-confidence", "trimmed-lowest-confidence")
NOISE_SCHEMES = [*PAPER_SCHEMES, TRIMMED, TRIMMED_LOWEST]
EXPERIMENTS: dict[str, dict[str, Any]] = {
    "fig2": {
        "schemes": [Scheme("uniform", "uniform"), Scheme("oblivious", "oblivious")]
        + [
            Scheme(m, "lowest-confidence", m)
            for m in CONFIDENCE_METRICS
            if m != "margin"
        ],
        "rhos": [0.05],
    },
    "fig3": {"schemes": [Scheme(g, "group", group=g) for g in GROUPS], "rhos": [1.0]},
    "fig4a": {"schemes": PAPER_SCHEMES, "rhos": [0.05]},
    "fig4b": {
        "schemes": PAPER_SCHEMES,
        "rhos": [0.01, 0.02, 0.05, 0.1, 0.15, 0.2, 0.3],
    },
    "fig5": {"schemes": PAPER_SCHEMES, "rhos": [0.3], "dataset": "cifar10"},
    "noise": {
        "schemes": NOISE_SCHEMES,
        "rhos": [0.05],
        "label_noise": LabelNoise(0.05),
    },
    "noise20": {
        "schemes": NOISE_SCHEMES,
        "rhos": [0.05],
        "label_noise": LabelNoise(0.2),
    },
    "noise20-asymmetric": {
        "schemes": NOISE_SCHEMES,
        "rhos": [0.05],
        "label_noise": LabelNoise(0.2, "asymmetric"),
    },
    "trimmed": {"schemes": [TRIMMED, TRIMMED_LOWEST], "rhos": [0.01, 0.05]},
}
"""Each command: its schemes and rhos (and a data set or label noise it fixes).

``noise``, ``noise20`` and ``noise20-asymmetric`` flip 5 %, 20 % and 20 % (class
c to c + 1) of the site's labels; ``trimmed`` runs the noise-robust policies on
clean data, beside Fig. 4b's proxy at the same rhos.
"""
SHORT_RHOS = [0.05, 0.3]
SITE = 1
"""The single site's key in the server's buffer (0 is the server's own samples)."""


def protocol_split(data: Data, protocol: Protocol, seed: int) -> PaperSplit:
    """Return the seed's validation, initial and pool positions in ``data``."""
    return paper_split(
        len(data.images),
        seed=seed,
        validation=protocol.validation,
        initial=protocol.initial,
        pool=protocol.fold * protocol.rounds,
    )


def new_server(
    data: Data, protocol: Protocol, selection: SelectionConfig
) -> SelectionServer:
    """Return the central site of one run: the recipe's model and training."""
    training = protocol.training()
    return SelectionServer(
        functools.partial(build_model, training.model, seed=selection.seed),
        data.num_classes,
        selection=selection,
        server_training=training.train_config(training.server_epochs),
        from_scratch=training.from_scratch,
    )


def initial_state(data: Data, protocol: Protocol, seed: int) -> dict[str, Tensor]:
    """Return the seed's initial model, trained once per process and remembered.

    Every scheme, rho and noise level of a seed starts from the same model (the
    server's own samples stay clean), and training is seeded per call, so the
    remembered model is the one each run would train anew, to the bit; it is the
    largest share of a run's time under the ``small-data`` recipe. Float sums
    depend on the thread count, so a model is remembered per thread count.
    """
    return _trained_initial_state(data, protocol, seed, torch.get_num_threads())


@functools.lru_cache(maxsize=8)
def _trained_initial_state(
    data: Data, protocol: Protocol, seed: int, threads: int
) -> dict[str, Tensor]:
    """:func:`initial_state`, remembered by its arguments and the thread count."""
    server = new_server(data, protocol, SelectionConfig(seed=seed))
    initial = protocol_split(data, protocol, seed).initial
    training = protocol.training()
    server.train_initial(
        data.samples(initial), training.train_config(training.initial_epochs)
    )
    return server.model.state_dict()


def run_site(
    data: Data,
    protocol: Protocol,
    scheme: Scheme,
    rho: float,
    seed: int,
    label_noise: LabelNoise = CLEAN,
) -> list[dict[str, Any]]:
    """Run one single-site experiment; return its per-round records (round 0 first).

    The site and the server are the Flower app's own
    (:func:`~flwr_select.selection.site.site_round` and
    :class:`~flwr_select.selection.server.SelectionServer`), with the upload
    handed over in memory instead of in a message.
    """
    split = protocol_split(data, protocol, seed)
    labels, flipped = label_noise.flip(data.labels, split.pool, seed, data.num_classes)
    server = new_server(data, protocol, scheme.selection(rho, seed))
    server.hold_own(data.samples(split.initial))
    server.begin(initial_state(data, protocol, seed), protocol.rounds)
    held_out = {
        "": data.samples(split.validation),
        "test_": SiteData(
            data.test_images[: protocol.test],
            data.test_labels[: protocol.test],
            data.num_classes,
        ),
    }
    ledger = SiteLedger()
    records: list[dict[str, Any]] = []
    for server_round in range(protocol.rounds + 1):
        record: dict[str, Any] = {"round": server_round, "samples": 0, "bytes": 0}
        record.update(wrong_sent=0, noisy_sent=0)
        if server_round:
            fold = round_fold(split.pool, server_round, protocol.rounds)
            site = data.samples(fold, labels)
            upload, sent = site_round(
                server.model,
                site,
                server.selection,
                server_round=server_round,
                site_key=SITE,
                ledger=ledger,
            )
            handed = (upload, site_report(sent))  # what a reply message carries
            received = server.accept_uploads(
                server_round, [(SITE, lambda handed=handed: handed)], asked=[SITE]
            )
            record.update(
                samples=received["samples-received"],
                bytes=received["bytes-received"],
                wrong_sent=sent["num-selected-wrong"],
                noisy_sent=int(np.isin(upload["ids"].numpy(), flipped).sum()),
                trial_accuracy=sent["trial-accuracy"],
            )
        record.update(held_out_metrics(server.model, held_out))
        record.update(
            samples_total=sum(r["samples"] for r in records) + record["samples"],
            bytes_total=sum(r["bytes"] for r in records) + record["bytes"],
            buffer_size=len(server.buffer),
        )
        records.append(record)
    return records


def run_path(
    runs_dir: Path,
    dataset: str,
    recipe: str,
    scheme: Scheme,
    rho: float,
    seed: int,
    label_noise: LabelNoise,
) -> Path:
    """Where one run's records live; experiments that share a run share the file."""
    noise = label_noise.tag
    name = f"{dataset}-{recipe}-{scheme.label}-rho{rho}-seed{seed}{noise}.jsonl"
    return runs_dir / name


Job = tuple[Scheme, float, int]
"""One run of an experiment: its scheme, rho and seed."""

_worker_data: Data | None = None
"""A worker process's copy of the data set (:func:`_start_worker`)."""


def _start_worker(dataset: str, folder: Path) -> None:
    """Set up a worker process: one torch thread, the data set read once."""
    global _worker_data
    torch.set_num_threads(1)
    _worker_data = Data(dataset, folder)


def _timed_run(
    data: Data | None, protocol: Protocol, job: Job, noise: LabelNoise
) -> tuple[list[dict[str, Any]], float]:
    """Run one job; return its records and the seconds it took."""
    scheme, rho, seed = job
    started = time.perf_counter()
    records = run_site(data or _worker_data, protocol, scheme, rho, seed, noise)
    return records, time.perf_counter() - started


def run_jobs(
    data: Data, protocol: Protocol, jobs: list[Job], noise: LabelNoise, workers: int
) -> Iterator[tuple[Job, list[dict[str, Any]], float]]:
    """Run ``jobs`` on ``workers`` processes; yield each as it finishes.

    Every run computes on one torch thread, in this process (``workers=1``) or
    in a worker: float sums depend on how the work is split across threads, so
    one thread makes a run's records the same bits whatever ``workers`` is and
    however many cores the machine has. Runs of the same seed in one process
    share their initial model (:func:`initial_state`).
    """
    if workers == 1 or len(jobs) <= 1:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            for job in jobs:
                yield (job, *_timed_run(data, protocol, job, noise))
        finally:
            torch.set_num_threads(threads)
        return
    with ProcessPoolExecutor(
        max_workers=min(workers, len(jobs)),
        mp_context=multiprocessing.get_context("spawn"),
        initializer=_start_worker,
        initargs=(data.dataset, data.folder),
    ) as pool:
        running = {
            pool.submit(_timed_run, None, protocol, job, noise): job for job in jobs
        }
        for done in as_completed(running):
            yield (running[done], *done.result())


def run_experiment(
    name: str,
    data: Data,
    protocol: Protocol,
    out_dir: Path,
    seeds: list[int],
    rhos: list[float] | None = None,
    workers: int = 1,
    schemes: list[str] | None = None,
) -> dict[str, Any]:
    """Run every (scheme, rho, seed) of experiment ``name`` not on disk yet; summarise.

    Runs live in ``out_dir/runs-<protocol>`` so that experiments share them (Fig. 4a's
    are a subset of Fig. 4b's) and an interrupted experiment resumes; ``workers``
    processes run them side by side (:func:`run_jobs`). ``schemes`` (labels) keeps
    only those of the experiment's lines, in runs and summary alike.
    """
    spec = EXPERIMENTS[name]
    chosen = [s for s in spec["schemes"] if schemes is None or s.label in schemes]
    runs_dir = out_dir / ("runs-short" if protocol == SHORT else "runs")
    runs_dir.mkdir(parents=True, exist_ok=True)
    noise = spec.get("label_noise", CLEAN)
    jobs = [  # seed first: a worker's runs of one seed share the initial model
        (s, r, seed) for seed in seeds for r in rhos or spec["rhos"] for s in chosen
    ]

    def path_of(job: Job) -> Path:
        scheme, rho, seed = job
        return run_path(
            runs_dir, data.dataset, protocol.recipe, scheme, rho, seed, noise
        )

    pending = [job for job in jobs if not path_of(job).exists()]
    finished = run_jobs(data, protocol, pending, noise, workers)
    for count, ((scheme, rho, seed), records, seconds) in enumerate(finished, 1):
        meta = {
            "experiment": name,
            "dataset": data.dataset,
            "scheme": scheme.label,
            "policy": scheme.policy,
            "confidence": scheme.confidence,
            "rho": rho,
            "seed": seed,
            "label_noise": noise.fraction,
            "label_noise_kind": noise.kind,
            "protocol": asdict(protocol),
            "training": RECIPES[protocol.recipe],
        }
        write_run(path_of((scheme, rho, seed)), meta, records)
        with (runs_dir / "timings.jsonl").open("a") as file:  # not in the records
            name_seconds = {"run": path_of((scheme, rho, seed)).name}
            file.write(json.dumps({**name_seconds, "seconds": round(seconds, 1)}))
            file.write("\n")
        print(
            f"[{name} {count}/{len(pending)}] {data.dataset} {scheme.label} "
            f"rho={rho} seed={seed}: final accuracy {records[-1]['accuracy']:.4f} "
            f"({seconds:.0f} s)",
            flush=True,
        )
    return summarise(name, data.dataset, [path_of(job) for job in jobs], out_dir / name)


def summarise(name: str, dataset: str, paths: list[Path], out: Path) -> dict[str, Any]:
    """Write ``<name>/summary-<dataset>.json`` and the figure; return the summary."""
    from simulations.figures import plot_experiment
    from simulations.measures import summary

    runs = [read_json_lines(p) for p in paths]
    result = summary(runs)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"summary-{dataset}.json").write_text(json.dumps(result, indent=1))
    plot_experiment(name, dataset, result, out / f"{name}-{dataset}.png")
    return result


def main(argv: list[str] | None = None) -> None:
    """Parse the command line and run one experiment."""
    parser = argparse.ArgumentParser(
        prog="python -m simulations.paper", description=__doc__.splitlines()[0]
    )
    parser.add_argument("experiment", choices=sorted(EXPERIMENTS))
    parser.add_argument(
        "--dataset", default=None, help="mnist, fashion-mnist or cifar10"
    )
    parser.add_argument("--data-dir", default=None, help="the data set's folder")
    parser.add_argument(
        "--out-dir", default="results", help="where runs, summaries and figures go"
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument(
        "--rhos", type=float, nargs="+", default=None, help="override the rhos"
    )
    parser.add_argument(
        "--schemes", nargs="+", default=None, help="run only these of its lines"
    )
    parser.add_argument(
        "--short", action="store_true", help="small folds, 3 rounds, 2 rhos"
    )
    parser.add_argument(
        "--recipe",
        choices=sorted(RECIPES),
        default=None,
        help="the model and its training (default: the data set's; --short: quick)",
    )
    parser.add_argument(
        "--jobs",
        type=int,
        default=len(os.sched_getaffinity(0)),
        help="runs side by side, one process and one thread each (default: the "
        "cores this process may use); the records do not depend on it",
    )
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error(f"--jobs must be >= 1, got {args.jobs}")
    labels = [s.label for s in EXPERIMENTS[args.experiment]["schemes"]]
    unknown = sorted(set(args.schemes or []) - set(labels))
    if unknown:
        parser.error(f"--schemes: {args.experiment} has no {unknown}; it has {labels}")
    dataset = args.dataset or EXPERIMENTS[args.experiment].get("dataset", "mnist")
    protocol = SHORT if args.short else PROTOCOLS[dataset]
    if args.recipe:
        protocol = replace(protocol, recipe=args.recipe)
    rhos = args.rhos or (
        SHORT_RHOS if args.short and args.experiment == "fig4b" else None
    )
    data = Data(dataset, args.data_dir)
    run_experiment(
        args.experiment,
        data,
        protocol,
        Path(args.out_dir),
        args.seeds,
        rhos,
        workers=args.jobs,
        schemes=args.schemes,
    )


if __name__ == "__main__":
    main()
