r"""N sites through the Flower simulation, their data split IID or by Dirichlet.

    python -m simulations.sites --partitioner dirichlet --alpha 0.5 --num-sites 5 \\
        --data-dir DIR --out-dir results
    python -m simulations.sites --partitioner dirichlet --alpha 0.1 --num-sites 10 \\
        --policies proxy --allocations per-site global --data-dir DIR

The paper studies one site; here the same protocol runs on ``--num-sites``
virtual SuperNodes of Flower's simulation engine (``flower-simulation``), each
holding an IID or a Dirichlet(alpha) non-IID share of the pool (Flower Datasets
partitioners), for the paper's three schemes. Each run's ``rounds.jsonl`` becomes
a record file like the single-site ones, so the same summary and figure follow.
``--allocations`` compares each site's own rho with one global budget of the
same bytes (``allocation="global"``; its lines are labelled ``<policy>-global``),
and each round's record holds what every site (by partition id) was given and
sent, from which :func:`~simulations.figures.plot_quotas` draws the quotas.
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

import numpy as np

from flwr_select.config import ConfigError
from flwr_select.data import load_dataset, resolve_data_dir
from flwr_select.files import read_json_lines, write_json_lines
from flwr_select.noise import CLEAN, NOISE_KINDS, LabelNoise
from flwr_select.partition import SiteShareConfig
from flwr_select.selection.checkpoint import latest
from flwr_select.selection.policies import POLICIES
from flwr_select.selection.protocol import ALLOCATIONS
from flwr_select.selection.server import SERVER_SITE
from simulations.figures import plot_quotas
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
) -> dict[str, Any]:
    """Return the run config of one run (:func:`words` makes it ``--run-config``)."""
    return {
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


def words(config: dict[str, Any]) -> str:
    """Return ``config`` as a ``--run-config`` string."""
    return " ".join(f"{k}={json.dumps(v)}" for k, v in config.items())


def simulate(
    dataset: str, num_sites: int, config: str
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], dict[str, Any]]:
    """Run ``flower-simulation``; return its rounds, execution records and buffer."""
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
        buffer = latest(out, device="cpu").buffer.to_arrays()
        return (
            read_json_lines(Path(out) / "rounds.jsonl"),
            read_json_lines(Path(out) / "execution.jsonl"),
            buffer,
        )


def node_sites(
    share: SiteShareConfig, seed: int, num_sites: int, buffer: dict[str, Any]
) -> dict[str, int]:
    """Return each engine node id's partition id, from the samples it uploaded.

    The engine's node ids are new every run; a node is told apart by the
    samples it uploaded, which lie in exactly one site's share (a node that
    uploaded nothing is missing).
    """
    labels = load_dataset(
        share.dataset, resolve_data_dir(share.dataset, share.data_dir), "train"
    )[1]
    owner = np.full(len(labels), -1)
    for site in range(num_sites):
        owner[
            share.site_pool(
                labels.numpy(), seed=seed, partition_id=site, num_partitions=num_sites
            )
        ] = site
    return {
        str(int(node)): int(owner[int(ident)])
        for node, ident in zip(buffer["sites"], buffer["ids"], strict=True)
        if int(node) != SERVER_SITE
    }


def by_site(
    execution: list[dict[str, Any]], node_site: dict[str, int]
) -> list[dict[str, dict[str, int]]]:
    """Return, per round, each site's quota, top-up and samples sent (by partition id).

    What the quotas figure draws, and what tells per-site and global allocation
    apart: with ``per-site`` only ``samples_by_site`` is there.
    """
    rounds = []
    for measured in execution[1:]:
        record = {}
        for key, name in (
            ("quota_by_node", "quota_by_site"),
            ("top_up_by_node", "top_up_by_site"),
            ("samples_received_by_node", "samples_by_site"),
        ):
            record[name] = {
                str(node_site.get(node, -1)): count
                for node, count in measured.get(key, {}).items()
            }
        rounds.append(record)
    return rounds


def audit_by_site(
    share: SiteShareConfig,
    node_site: dict[str, int],
    execution: list[dict[str, Any]],
) -> list[dict[str, int]]:
    """Return, per round, suspect counts at the noisy sites and the clean ones' most.

    ``suspect_*`` are the server's audit of the uploads, ``reported_*`` what
    the sites said of all their candidates; ``node_site`` is :func:`node_sites`.
    """
    noisy = share.noisy_sites()
    rounds = []
    for measured in execution[1:]:
        counts = {}
        for key, name in (("labels", "suspect"), ("candidates", "reported")):
            counts |= {f"{name}_noisy": 0, f"{name}_clean_max": 0}
            for node, count in measured[f"suspect_{key}_by_node"].items():
                site = node_site.get(node, -1)
                if noisy is None or site in noisy:
                    counts[f"{name}_noisy"] += count
                else:
                    counts[f"{name}_clean_max"] = max(
                        counts[f"{name}_clean_max"], count
                    )
        rounds.append(counts)
    return rounds


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
    label_noise: LabelNoise = CLEAN,
    noisy_sites: str = "all",
    allocations: tuple[str, ...] = ("per-site",),
    round_budget_bytes: int = 0,
    easy_sites: str = "",
) -> dict[str, Any]:
    """Run each (scheme, allocation, seed) not on disk yet; summarise them.

    With ``"global"`` among ``allocations`` a scheme also runs with one global
    budget of ``round_budget_bytes`` a round (0: what the per-site budgets
    allow together, so both spend the same bytes), as the line
    ``<label>-global``. ``easy_sites`` (partition ids, ``easy-sites``) hold
    only classes 0 and 1 (``easy-classes``' default: MNIST's easiest digits),
    the others the rest.

    With ``label_noise``, the sites ``noisy_sites`` names (``"all"`` or
    partition ids, comma-separated) hold flipped labels, and each round's
    record says how many uploads the server's audit found suspect at those
    sites (``suspect_noisy``) and at the most suspect other site
    (``suspect_clean_max``), and the same of the candidates as the sites
    reported them (``reported_noisy``, ``reported_clean_max``).
    """
    name = f"sites-{partitioner}"
    if label_noise.fraction and noisy_sites != "all":
        name += "-noisy-site"
    if easy_sites:
        name += "-easy"
    if "global" in allocations:
        name += "-allocation"
    runs_dir = out_dir / ("runs-short" if protocol == SHORT else "runs")
    runs_dir.mkdir(parents=True, exist_ok=True)
    split = (
        f"{partitioner}{alpha if partitioner == 'dirichlet' else ''}-{num_sites}sites"
    )
    if label_noise.fraction and noisy_sites != "all":
        split += f"{label_noise.tag}-at{noisy_sites.replace(',', '+')}"
    else:
        split += label_noise.tag
    if easy_sites:
        split += f"-easy{easy_sites.replace(',', '+')}"
    paths = []
    lines = [
        (Scheme(f"{s.label}-global", s.policy, s.confidence), "global")
        if allocation == "global"
        else (s, allocation)
        for s in schemes
        for allocation in allocations
    ]
    for scheme, allocation in lines:
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
                    "label-noise": label_noise.fraction,
                    "label-noise-kind": label_noise.kind,
                    "label-noise-sites": noisy_sites,
                    "allocation": allocation,
                    "round-budget-bytes": round_budget_bytes,
                    **({"easy-sites": easy_sites} if easy_sites else {}),
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
                "label_noise": label_noise.fraction,
                "label_noise_kind": label_noise.kind,
                "noisy_sites": noisy_sites,
                "allocation": allocation,
                "easy_sites": easy_sites,
            }
            rounds, execution, buffer = simulate(dataset, num_sites, words(config))
            share = SiteShareConfig.from_config({**config, "dataset": dataset})
            node_site = node_sites(share, seed, num_sites, buffer)
            per_site = [{}] + by_site(execution, node_site)
            audits = [{}] * len(rounds)
            if label_noise.fraction:
                audits = [{}] + audit_by_site(share, node_site, execution)
            records, samples, size = [], 0, 0
            for r, audit, sites in zip(rounds, audits, per_site, strict=True):
                samples += r["samples_received"]
                size += r["bytes_received"]
                records.append(
                    {
                        **meta,
                        **r,
                        **audit,
                        **sites,
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
    summary = summarise(name, dataset, paths, out_dir / name)
    if "global" in allocations:
        plot_quotas(
            [read_json_lines(p) for p in paths],
            out_dir / name / f"{name}-quotas-{dataset}.png",
        )
    return summary


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
    parser.add_argument(
        "--label-noise", type=float, default=0.0, help="share of labels flipped"
    )
    parser.add_argument("--label-noise-kind", default="symmetric", choices=NOISE_KINDS)
    parser.add_argument(
        "--noisy-sites", default="all", help='"all" or partition ids, e.g. "0,3"'
    )
    parser.add_argument(
        "--easy-sites",
        default="",
        help='partition ids that hold only classes 0 and 1, e.g. "0,1"',
    )
    parser.add_argument(
        "--allocations",
        nargs="+",
        default=["per-site"],
        choices=ALLOCATIONS,
        help="each site its rho, one global budget, or both side by side",
    )
    parser.add_argument(
        "--round-budget-bytes",
        type=int,
        default=0,
        help="the global budget a round (0: what the per-site budgets allow)",
    )
    parser.add_argument(
        "--policies",
        nargs="+",
        default=[s.policy for s in PAPER_SCHEMES],
        choices=sorted(POLICIES),
        help="the schemes run (default: the paper's three)",
    )
    args = parser.parse_args(argv)
    try:  # the sites' keys, checked before any run starts
        SiteShareConfig(
            partitioner=args.partitioner,
            dirichlet_alpha=args.alpha,
            label_noise=args.label_noise,
            label_noise_kind=args.label_noise_kind,
            label_noise_sites=args.noisy_sites,
            easy_sites=args.easy_sites,
        )
    except ConfigError as err:
        parser.error(str(err))
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
        schemes=[Scheme(policy, policy) for policy in args.policies],
        label_noise=LabelNoise(args.label_noise, args.label_noise_kind),
        noisy_sites=args.noisy_sites,
        allocations=tuple(args.allocations),
        round_budget_bytes=args.round_budget_bytes,
        easy_sites=args.easy_sites,
    )


if __name__ == "__main__":
    main()
