"""The sample-selection paper's experiments, one command each (Jiang et al. 2017).

    python -m simulations.paper fig4a --dataset mnist --data-dir DIR --out-dir results

The paper's single site, run in-process on the engine (no network in the way):
the server trains the initial model on ``initial`` samples, holds out
``validation``, and each round the site receives the model, trial-tests a fresh
fold of ``fold`` samples and uploads its rho share; the server retrains on
everything received so far (continuing from its model) and evaluates. Every run
is one JSON-lines file of per-round records under ``out-dir/<experiment>/runs``;
a run whose file exists is not run again, so a long experiment resumes where it
stopped. Each command ends by writing ``summary.json`` and a PNG figure.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from flwr_select.data import DATASETS, SiteData
from flwr_select.evaluation import held_out_metrics
from flwr_select.files import read_json_lines
from flwr_select.models import build_model
from flwr_select.partition import PaperSplit, paper_split, round_fold
from flwr_select.selection.buffer import TrainingBuffer
from flwr_select.selection.policies import GROUPS, Budget, Policy, make_policy, select
from flwr_select.selection.scores import CONFIDENCE_METRICS
from flwr_select.selection.trial import trial_test
from flwr_select.selection.wire import decode, pack, wire_bytes
from flwr_select.trainer import TrainConfig, train
from simulations.experiments import Data, write_run


@dataclass(frozen=True)
class Protocol:
    """Sizes and training of one experiment; the paper's section 4 by default."""

    validation: int = 5_000
    initial: int = 5_000
    fold: int = 5_000
    rounds: int = 10
    initial_epochs: int = 10
    round_epochs: int = 2
    lr: float = 0.01
    batch_size: int = 64


PROTOCOLS = {
    "mnist": Protocol(),
    "fashion-mnist": Protocol(),
    "cifar10": Protocol(initial=10_000, rounds=8, initial_epochs=20),
}
SHORT = Protocol(
    validation=1_000,
    initial=1_000,
    fold=1_000,
    rounds=3,
    initial_epochs=5,
    round_epochs=1,
    lr=0.05,
)
"""The short mode: a quick look, and what the tests run."""


@dataclass(frozen=True)
class Scheme:
    """One line of a figure: a policy, its confidence metric and options."""

    label: str
    policy: str
    confidence: str = "cross-entropy"
    group: str = ""

    def make(self) -> Policy:
        """Return the policy object."""
        return make_policy(self.policy, **({"group": self.group} if self.group else {}))


PAPER_SCHEMES = [
    Scheme("uniform", "uniform"),
    Scheme("oblivious", "oblivious"),
    Scheme("proxy", "proxy"),
]
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
    "noise": {"schemes": PAPER_SCHEMES, "rhos": [0.05], "label_noise": 0.05},
}
"""Each command: its schemes and rhos (and a data set or label noise it fixes)."""
SHORT_RHOS = [0.05, 0.3]


def flip_labels(
    labels: torch.Tensor,
    positions: np.ndarray,
    fraction: float,
    seed: int,
    num_classes: int,
) -> tuple[torch.Tensor, np.ndarray]:
    """Return labels with ``fraction`` of ``positions`` flipped, and which ones."""
    rng = np.random.default_rng([seed, 7])
    flipped = rng.choice(positions, size=int(fraction * len(positions)), replace=False)
    noisy = labels.clone()
    shift = torch.from_numpy(rng.integers(1, num_classes, len(flipped)))
    noisy[flipped] = (noisy[flipped] + shift) % num_classes
    return noisy, flipped


def run_site(
    data: Data,
    protocol: Protocol,
    scheme: Scheme,
    rho: float,
    seed: int,
    label_noise: float = 0.0,
    initial_cache: dict | None = None,
) -> list[dict[str, Any]]:
    """Run one single-site experiment; return its per-round records (round 0 first)."""
    split = paper_split(
        len(data.images),
        seed=seed,
        validation=protocol.validation,
        initial=protocol.initial,
        pool=protocol.fold * protocol.rounds,
    )
    labels, flipped = data.labels, np.zeros(0, np.int64)
    if label_noise:
        labels, flipped = flip_labels(
            data.labels, split.pool, label_noise, seed, data.num_classes
        )
    config = TrainConfig(
        epochs=protocol.round_epochs, batch_size=protocol.batch_size, lr=protocol.lr
    )
    model, buffer = initial_model(data, protocol, split, seed, initial_cache)
    held_out = {
        "": data.samples(split.validation),
        "test_": SiteData(data.test_images, data.test_labels, data.num_classes),
    }
    records, total_bytes, total_samples = [], 0, 0
    for server_round in range(protocol.rounds + 1):
        started = time.perf_counter()
        record: dict[str, Any] = {
            "round": server_round,
            "samples": 0,
            "bytes": 0,
            "wrong_sent": 0,
            "noisy_sent": 0,
        }
        if server_round:
            fold = round_fold(split.pool, server_round, protocol.rounds)
            site = data.samples(fold, labels)
            trial = trial_test(model, site)
            chosen = select(
                trial,
                Budget(rho=rho),
                scheme.make(),
                confidence=scheme.confidence,
                seed=(seed, server_round),
            )
            upload = pack(site, chosen)
            buffer.add(
                1,
                decode(upload, data.num_classes, sample_shape=site.images.shape[1:])[0],
            )  # what the server gets
            train(
                model,
                buffer.images,
                buffer.labels,
                config,
                seed=seed * 1000 + server_round,
            )
            record.update(
                samples=len(chosen),
                bytes=wire_bytes(upload),
                wrong_sent=int(trial.wrong[chosen].sum()),
                noisy_sent=int(np.isin(fold[chosen], flipped).sum()),
                trial_accuracy=trial.accuracy,
            )
        record.update(held_out_metrics(model, held_out))
        total_samples += record["samples"]
        total_bytes += record["bytes"]
        record.update(
            samples_total=total_samples,
            bytes_total=total_bytes,
            buffer_size=len(buffer),
            seconds=round(time.perf_counter() - started, 3),
        )
        records.append(record)
    return records


def initial_model(
    data: Data,
    protocol: Protocol,
    split: PaperSplit,
    seed: int,
    cache: dict | None,
) -> tuple[torch.nn.Module, TrainingBuffer]:
    """Train (or reuse for the same seed and protocol) the initial model; new buffer."""
    buffer = TrainingBuffer(data.num_classes)
    buffer.add(0, data.samples(split.initial))
    key = (data.dataset, seed, protocol)
    model = build_model(DATASETS[data.dataset].model, seed=seed).to(buffer.device)
    if cache is not None and key in cache:
        model.load_state_dict(cache[key])
    else:
        config = TrainConfig(
            epochs=protocol.initial_epochs,
            batch_size=protocol.batch_size,
            lr=protocol.lr,
        )
        train(model, buffer.images, buffer.labels, config, seed=seed)
        if cache is not None:
            cache[key] = {k: v.clone() for k, v in model.state_dict().items()}
    return model, buffer


def run_path(
    runs_dir: Path,
    dataset: str,
    scheme: Scheme,
    rho: float,
    seed: int,
    label_noise: float,
) -> Path:
    """Where one run's records live; experiments that share a run share the file."""
    noise = f"-noise{label_noise}" if label_noise else ""
    return runs_dir / f"{dataset}-{scheme.label}-rho{rho}-seed{seed}{noise}.jsonl"


def run_experiment(
    name: str,
    data: Data,
    protocol: Protocol,
    out_dir: Path,
    seeds: list[int],
    rhos: list[float] | None = None,
) -> dict[str, Any]:
    """Run every (scheme, rho, seed) of experiment ``name`` not on disk yet; summarise.

    Runs live in ``out_dir/runs-<protocol>`` so that experiments share them (Fig. 4a's
    are a subset of Fig. 4b's) and an interrupted experiment resumes.
    """
    spec = EXPERIMENTS[name]
    runs_dir = out_dir / ("runs-short" if protocol == SHORT else "runs")
    runs_dir.mkdir(parents=True, exist_ok=True)
    cache: dict = {}
    noise = spec.get("label_noise", 0.0)
    jobs = [
        (s, r, seed)
        for r in rhos or spec["rhos"]
        for s in spec["schemes"]
        for seed in seeds
    ]
    paths = []
    for count, (scheme, rho, seed) in enumerate(jobs, 1):
        path = run_path(runs_dir, data.dataset, scheme, rho, seed, noise)
        paths.append(path)
        if path.exists():
            continue
        started = time.perf_counter()
        records = run_site(data, protocol, scheme, rho, seed, noise, cache)
        meta = {
            "experiment": name,
            "dataset": data.dataset,
            "scheme": scheme.label,
            "policy": scheme.policy,
            "confidence": scheme.confidence,
            "rho": rho,
            "seed": seed,
            "label_noise": noise,
            "protocol": asdict(protocol),
        }
        write_run(path, meta, records)
        print(
            f"[{name} {count}/{len(jobs)}] {data.dataset} {scheme.label} rho={rho} "
            f"seed={seed}: "
            f"final accuracy {records[-1]['accuracy']:.4f} "
            f"({time.perf_counter() - started:.0f} s)",
            flush=True,
        )
    return summarise(name, data.dataset, paths, out_dir / name)


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
        "--short", action="store_true", help="small folds, 3 rounds, 2 rhos"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dataset = args.dataset or EXPERIMENTS[args.experiment].get("dataset", "mnist")
    protocol = SHORT if args.short else PROTOCOLS[dataset]
    rhos = args.rhos or (
        SHORT_RHOS if args.short and args.experiment == "fig4b" else None
    )
    data = Data(dataset, args.data_dir)
    run_experiment(
        args.experiment, data, protocol, Path(args.out_dir), args.seeds, rhos
    )


if __name__ == "__main__":
    main()
