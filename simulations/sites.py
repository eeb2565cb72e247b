r"""N sites through the Flower simulation, their data split IID or by Dirichlet.

    python -m simulations.sites --partitioner dirichlet --alpha 0.5 --num-sites 5 \\
        --data-dir DIR --out-dir results

The paper studies one site; here the same protocol runs on ``--num-sites``
virtual SuperNodes of Flower's simulation engine (``flower-simulation``), each
holding an IID or a Dirichlet(alpha) non-IID share of the pool (Flower Datasets
partitioners), for the paper's three schemes. Each run's ``rounds.jsonl`` becomes
a record file like the single-site ones, so the same summary and figure follow.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from flwr_select.files import read_json_lines, write_json_lines
from simulations.paper import (
    PAPER_SCHEMES,
    PROTOCOLS,
    SHORT,
    Protocol,
    Scheme,
    summarise,
)
from simulations.recipes import RECIPES

APPS = {"mnist": "simulations.mnist", "fashion-mnist": "simulations.fashion_mnist"}


def run_config(
    protocol: Protocol, scheme: Scheme, rho: float, seed: int, **extra: Any
) -> str:
    """Return the ``--run-config`` string of one run."""
    config = {
        "num-server-rounds": protocol.rounds,
        "rho": rho,
        "selection-policy": scheme.policy,
        "confidence": scheme.confidence,
        "seed": seed,
        "validation-size": protocol.validation,
        "initial-size": protocol.initial,
        "pool-size": protocol.fold * protocol.rounds,
        **RECIPES[protocol.recipe],
        **extra,
    }
    return " ".join(f"{k}={json.dumps(v)}" for k, v in config.items())


def simulate(dataset: str, num_sites: int, config: str) -> list[dict[str, Any]]:
    """Run ``flower-simulation`` and return its ``rounds.jsonl`` records."""
    with tempfile.TemporaryDirectory() as out:
        command = [
            str(Path(sys.executable).with_name("flower-simulation")),
            "--app",
            APPS[dataset],
            "--num-supernodes",
            str(num_sites),
            "--run-config",
            f'{config} out-dir="{out}"',
        ]
        env = {
            **os.environ,
            "FLWR_DISABLE_UPDATE_CHECK": "1",
            "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
        }
        done = subprocess.run(command, env=env, capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(f"flower-simulation failed:\n{done.stderr[-3000:]}")
        return read_json_lines(Path(out) / "rounds.jsonl")


def run_sites(
    dataset: str,
    data_dir: str,
    out_dir: Path,
    *,
    partitioner: str,
    alpha: float,
    num_sites: int,
    seeds: list[int],
    protocol: Protocol,
    rho: float = 0.05,
    schemes: list[Scheme] = PAPER_SCHEMES,
) -> dict[str, Any]:
    """Run each (scheme, seed) not on disk yet; summarise as for the paper's runs."""
    name = f"sites-{partitioner}"
    runs_dir = out_dir / ("runs-short" if protocol == SHORT else "runs")
    runs_dir.mkdir(parents=True, exist_ok=True)
    split = (
        f"{partitioner}{alpha if partitioner == 'dirichlet' else ''}-{num_sites}sites"
    )
    paths = []
    for scheme in schemes:
        for seed in seeds:
            stem = f"{dataset}-{protocol.recipe}-{split}-{scheme.label}"
            path = runs_dir / f"{stem}-rho{rho}-seed{seed}.jsonl"
            paths.append(path)
            if path.exists():
                continue
            config = run_config(
                protocol,
                scheme,
                rho,
                seed,
                partitioner=partitioner,
                **{
                    "dirichlet-alpha": alpha,
                    "data-dir": data_dir,
                    "min-nodes": num_sites,
                },
            )
            meta = {
                "experiment": name,
                "dataset": dataset,
                "scheme": scheme.label,
                "policy": scheme.policy,
                "rho": rho,
                "seed": seed,
                "sites": num_sites,
                "partitioner": partitioner,
                "alpha": alpha,
            }
            records, samples, size = [], 0, 0
            for r in simulate(dataset, num_sites, config):
                samples += r["samples_received"]
                size += r["bytes_received"]
                records.append(
                    {
                        **meta,
                        **r,
                        "samples": r["samples_received"],
                        "bytes": r["bytes_received"],
                        "samples_total": samples,
                        "bytes_total": size,
                        "wrong_sent": 0,
                        "noisy_sent": 0,
                    }
                )
            write_json_lines(path, records)  # atomically: a file is a finished run
            print(
                f"[{name}] {scheme.label} seed={seed}: final accuracy "
                f"{records[-1]['accuracy']:.4f}",
                flush=True,
            )
    return summarise(name, dataset, paths, out_dir / name)


def main(argv: list[str] | None = None) -> None:
    """Parse the command line and run the N-site experiment."""
    parser = argparse.ArgumentParser(
        prog="python -m simulations.sites", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--dataset", default="mnist", choices=sorted(APPS))
    parser.add_argument("--data-dir", default="", help="the data set's folder")
    parser.add_argument("--out-dir", default="results")
    parser.add_argument("--partitioner", default="iid", choices=["iid", "dirichlet"])
    parser.add_argument(
        "--alpha", type=float, default=0.5, help="Dirichlet concentration"
    )
    parser.add_argument("--num-sites", type=int, default=5)
    parser.add_argument("--rho", type=float, default=0.05)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--short", action="store_true", help="small folds, 3 rounds")
    args = parser.parse_args(argv)
    protocol = SHORT if args.short else PROTOCOLS[args.dataset]
    run_sites(
        args.dataset,
        str(Path(args.data_dir).resolve()) if args.data_dir else "",
        Path(args.out_dir),
        partitioner=args.partitioner,
        alpha=args.alpha,
        num_sites=args.num_sites,
        seeds=args.seeds,
        protocol=protocol,
        rho=args.rho,
    )


if __name__ == "__main__":
    main()
