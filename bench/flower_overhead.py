"""Flower overhead per round: a real simulation's round time less the work in it.

Runs the project's own command, as a user would, in a subprocess::

    flower-simulation --app simulations.mnist --num-supernodes 2
        --run-config 'model="lenet5" optimizer="sgd" ... (the ``paper`` recipe)
        num-server-rounds=10 validation-size=1000 initial-size=1000
        pool-size=10000 initial-epochs=1 server-epochs=1 data-dir=... out-dir=...'

so each site sees a 500-image fold per round and uploads 25 samples (rho 0.05),
and the server's buffer grows from 1,000 to 1,500 samples. The wall time of
each round is the ``seconds`` field of ``out-dir/execution.jsonl`` (from the end
of one round's evaluation to the end of the next); round 1 includes Ray's and
the sites' start-up, so rounds 2-10 are used. From each round is subtracted the
work the project itself does in it, leaving what Flower adds (messages,
serialization, the simulation engine's queues and 0.1 s polling, Ray, the
ArrayRecord <-> state-dict conversions):

* the server's training, **measured**: ``train-seconds`` of the strategy's
  MetricRecord, read from the "Aggregated MetricRecord" line Flower logs each
  round (``rounds.jsonl`` does not carry it); estimated if that line is missing;
* a site's step, **estimated** in-process: ``trial_test`` of a 500-image fold
  plus ``select`` + ``pack`` + ``wire_bytes``, at one thread, as a Ray actor with
  ``num_cpus=1`` runs it. The two sites run concurrently on two actors, so a
  round waits for one site step, not two;
* the server evaluation, **estimated**: ``trial_test`` over the 1,000
  validation and 10,000 test images, and the round's checkpoint
  (``Checkpoint.save`` of the round's 50 new samples and the manifest), at
  torch's default threads as the ServerApp runs them;
* the server's handling of the two uploads, **estimated**: ``decode``,
  ``wire_bytes`` and ``TrainingBuffer.add`` of 25 samples each.

Each estimate is timed ``--reps`` times, half before and half after the
simulation, and the fastest is subtracted: the work's cost on an idle machine.
Under load the run's own copy of that work took longer, so the overhead
printed errs high rather than low (a median taken at a busier moment than the run
would make it come out negative). As a check on how loaded the run was, the
server's training on a buffer of the run's median size is timed the same way
and printed beside the ``train-seconds`` the run measured (not subtracted).

The estimates would be measurements if the library recorded them: in
``rounds.jsonl``, ``train_seconds`` (the strategy's ``train-seconds``),
``evaluate_seconds`` (the held-out trial tests), ``save_seconds``
(the checkpoint) and ``site_seconds`` (the slowest site's handler time); in
the site's reply metrics, ``trial-seconds`` (``trial_test``) and
``site-seconds`` (the whole handler).

The per-round overhead is the round's wall time less its training and the
estimates; the median over rounds 2-10 is the result (target < 0.5 s). One
simulation cannot be interleaved with anything, so every round is printed to
show the spread.

Run from the repository root (about 45 s on 2 idle cores)::

    python bench/flower_overhead.py --data-dir ../shared/data/mnist

``--data-dir`` defaults to the environment variable FLWR_SELECT_DATA_DIR.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from flwr_select.data import SiteData, add_data_dir_option, load_mnist
from flwr_select.files import read_json_lines
from flwr_select.models import build_model
from flwr_select.partition import paper_split, round_fold, site_partition
from flwr_select.selection.buffer import TrainingBuffer, default_device
from flwr_select.selection.checkpoint import Checkpoint
from flwr_select.selection.policies import Budget, select
from flwr_select.selection.trial import trial_test
from flwr_select.selection.wire import decode, pack, wire_bytes
from flwr_select.trainer import TrainConfig, train
from simulations.recipes import RECIPES

ROUNDS, SITES, FIRST = 10, 2, 2  # rounds 2..10 are measured
RUN_CONFIG = {
    **RECIPES["paper"],  # LeNet-5 and plain SGD, as the estimates below time them
    "num-server-rounds": ROUNDS,
    "validation-size": 1000,
    "initial-size": 1000,
    "pool-size": 10_000,
    "initial-epochs": 1,
    "server-epochs": 1,
}
RHO, SEED, BATCH_SIZE = 0.05, 0, 64  # the app's defaults
ENV = {"FLWR_DISABLE_UPDATE_CHECK": "1", "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0"}
ROUND_LINE = re.compile(r"\[ROUND (\d+)/\d+\]")
AGGREGATED = re.compile(r"Aggregated MetricRecord: (\{.*\})")


def run_simulation(
    data_dir: Path,
    out_dir: Path,
    timeout: float,
    *,
    sites: int = SITES,
    **config: object,
) -> float:
    """Run the app through ``flower-simulation``; return its wall time.

    The run config is :data:`RUN_CONFIG` with ``config``'s keys over it.
    """
    config = {
        **RUN_CONFIG,
        **config,
        "data-dir": str(data_dir),
        "out-dir": str(out_dir),
    }
    run_config = " ".join(f"{key}={json.dumps(value)}" for key, value in config.items())
    command = [
        str(Path(sys.executable).with_name("flower-simulation")),
        *("--app", "simulations.mnist", "--num-supernodes", str(sites)),
        *("--run-config", run_config),
    ]
    log = out_dir / "simulation.log"
    started = time.perf_counter()
    with log.open("w") as file:
        done = subprocess.run(
            command,
            stdout=file,
            stderr=subprocess.STDOUT,
            env={**os.environ, **ENV},
            cwd=Path(__file__).resolve().parents[1],
            timeout=timeout,
            check=False,
        )
    if done.returncode != 0 or not (out_dir / "rounds.jsonl").is_file():
        tail = "\n".join(log.read_text().splitlines()[-30:])
        sys.exit(f"flower-simulation failed (exit {done.returncode}):\n{tail}")
    return time.perf_counter() - started


def logged_train_seconds(log: Path) -> dict[int, float]:
    """Return ``train-seconds`` by round from Flower's log of the strategy's metrics."""
    seconds, current = {}, None
    for line in log.read_text(errors="replace").splitlines():
        if match := ROUND_LINE.search(line):
            current = int(match.group(1))
        elif (match := AGGREGATED.search(line)) and current is not None:
            metrics = ast.literal_eval(match.group(1))
            if "train-seconds" in metrics:
                seconds[current] = float(metrics["train-seconds"])
    return seconds


def clocked(fn: Callable[[], object]) -> Callable[[], float]:
    """Return ``fn`` made to return its own wall time."""

    def timed() -> float:
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start

    return timed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_data_dir_option(parser)
    parser.add_argument(
        "--reps", type=int, default=6, help="repetitions of each estimate (even)"
    )
    parser.add_argument(
        "--timeout", type=float, default=300.0, help="limit for the simulation, s"
    )
    parser.add_argument(
        "--out-dir",
        default=None,
        help="keep the run's files here (default: a temp folder)",
    )
    args = parser.parse_args()
    data_dir = Path(args.data_dir).resolve()
    torch.manual_seed(SEED)

    # The same data the run uses: its split, site 0's round-2 fold, the held-out sets.
    images, labels = load_mnist(data_dir, "train")
    test_images, test_labels = load_mnist(data_dir, "test")
    split = paper_split(
        len(images),
        seed=SEED,
        validation=RUN_CONFIG["validation-size"],
        initial=RUN_CONFIG["initial-size"],
        pool=RUN_CONFIG["pool-size"],
    )
    fold = torch.from_numpy(
        round_fold(site_partition(split.pool, 0, SITES), FIRST, ROUNDS)
    )
    site = SiteData(images[fold], labels[fold], 10, ids=fold)
    validation = SiteData(images[split.validation], labels[split.validation], 10)
    test = SiteData(test_images, test_labels, 10)
    sent = int(RHO * len(site))
    largest = RUN_CONFIG["initial-size"] + ROUNDS * SITES * sent
    typical = RUN_CONFIG["initial-size"] + (FIRST + ROUNDS) // 2 * SITES * sent
    buffer = TrainingBuffer(10, device=default_device())
    buffer.add(0, SiteData(images[:largest], labels[:largest], 10))
    model = build_model("lenet5", seed=SEED).to(buffer.device)
    upload = pack(site, select(trial_test(model, site), Budget(rho=RHO), seed=SEED))
    site_model = build_model("lenet5", seed=SEED)
    threads = torch.get_num_threads()
    assert buffer.images is not None

    def one_thread(fn: Callable[[], float]) -> Callable[[], float]:
        def wrapped() -> float:
            torch.set_num_threads(1)
            try:
                return fn()
            finally:
                torch.set_num_threads(threads)

        return wrapped

    def site_rest() -> float:  # what the site does after its trial test
        trial = trial_test(site_model, site)
        start = time.perf_counter()
        chosen = select(trial, Budget(rho=RHO), "proxy", seed=(SEED, FIRST, 0))
        wire_bytes(pack(site, chosen))
        return time.perf_counter() - start

    def handle_uploads() -> float:  # into a buffer of the run's median size
        server = TrainingBuffer(10, device=buffer.device)
        server.add(0, SiteData(images[:typical], labels[:typical], 10))
        start = time.perf_counter()
        for node in range(1, SITES + 1):
            samples, _ = decode(upload, 10, sample_shape=(28, 28))
            wire_bytes(upload)
            server.add(node, samples)
        return time.perf_counter() - start

    def server_train() -> float:
        fresh = build_model("lenet5", seed=SEED).to(buffer.device)
        config = TrainConfig(epochs=RUN_CONFIG["server-epochs"], batch_size=BATCH_SIZE)
        images, labels = buffer.images[:typical], buffer.labels[:typical]
        return train(fresh, images, labels, config, seed=SEED).seconds

    def save_round() -> float:  # a round's checkpoint: its new samples + manifest
        checkpoint = Checkpoint(1, model.state_dict(), buffer, {}, {}, {}, {})
        fresh = SiteData(images[: SITES * sent], labels[: SITES * sent], 10)
        buffer.add(len(buffer), fresh)  # a new site each time: all of it is new
        start = time.perf_counter()
        checkpoint.save(tmp)
        return time.perf_counter() - start

    with tempfile.TemporaryDirectory() as tmp:
        held_out = (validation, test)
        estimates: dict[str, Callable[[], float]] = {
            f"site trial test ({len(site)} images, 1 thread)": one_thread(
                clocked(lambda: trial_test(site_model, site))
            ),
            "site select + pack + wire_bytes (1 thread)": one_thread(site_rest),
            f"evaluation trial tests ({len(validation)} + {len(test)} images)": (
                clocked(lambda: [trial_test(model, held) for held in held_out])
            ),
            f"checkpoint save ({SITES} x {sent} new samples)": save_round,
            f"upload handling ({SITES} x {sent} samples)": handle_uploads,
        }
        calibration = f"server train ({typical} samples; not subtracted)"
        times: dict[str, list[float]] = {name: [] for name in [*estimates, calibration]}

        def measure(reps: int) -> None:
            for _ in range(reps):
                for name, fn in estimates.items():
                    times[name].append(fn())
                times[calibration].append(server_train())

        for fn in [*estimates.values(), server_train]:  # warm-up
            fn()
        measure(args.reps // 2)
        out_dir = Path(args.out_dir) if args.out_dir else Path(tmp) / "run"
        out_dir.mkdir(parents=True, exist_ok=True)
        total = run_simulation(data_dir, out_dir, args.timeout)
        measure(args.reps - args.reps // 2)
        rounds = read_json_lines(out_dir / "execution.jsonl")  # has the seconds
        trained = logged_train_seconds(out_dir / "simulation.log")

    fastest = {name: min(ts) for name, ts in times.items()}
    subtracted = sum(fastest[name] for name in estimates)
    missing = [r["round"] for r in rounds[1:] if r["round"] not in trained]
    trained.update({r: statistics.median(times[calibration]) for r in missing})
    print(
        f"flower-simulation, {ROUNDS} rounds, {SITES} sites, fold {len(site)}/site, "
        f"upload {sent}/site: {total:.1f} s in all, "
        f"{sum(r['seconds'] for r in rounds):.1f} s of it in rounds 0-{ROUNDS}"
    )
    print(
        f"estimated per round, in-process, {args.reps} reps ({threads} threads "
        "unless said); the fastest is subtracted:"
    )
    for name, ts in times.items():
        print(
            f"  {name:<52} min {fastest[name]:6.3f} s  "
            f"median {statistics.median(ts):6.3f} s"
        )
    print(f"  {'total subtracted (estimated)':<52} {subtracted:10.3f} s")
    print(
        "\nround   wall s  train s   est. s  overhead s   (train measured"
        + (f"; estimated in rounds {missing})" if missing else ")")
    )
    overhead: dict[int, float] = {}
    for record in rounds[1:]:
        r = record["round"]
        overhead[r] = record["seconds"] - trained[r] - subtracted
        note = "  (start-up: excluded)" if r < FIRST else ""
        print(
            f"{r:>5} {record['seconds']:8.3f} {trained[r]:8.3f} {subtracted:8.3f}"
            f" {overhead[r]:11.3f}{note}"
        )
    kept = [r["round"] for r in rounds if r["round"] >= FIRST]
    walls = [r["seconds"] for r in rounds if r["round"] >= FIRST]
    print(
        f"rounds {FIRST}-{ROUNDS}: wall median {statistics.median(walls):.3f} s "
        f"(min {min(walls):.3f}, max {max(walls):.3f}); train median "
        f"{statistics.median(trained[r] for r in kept):.3f} s in the run, "
        f"{fastest[calibration]:.3f} s at best in-process; overhead mean "
        f"{np.mean([overhead[r] for r in kept]):.3f} s, "
        f"min {min(overhead[r] for r in kept):.3f} s"
    )
    print(
        f"Flower overhead per round (rounds {FIRST}-{ROUNDS}) = "
        f"{statistics.median(overhead[r] for r in kept):.3f} s (target < 0.5 s)"
    )


if __name__ == "__main__":
    main()
