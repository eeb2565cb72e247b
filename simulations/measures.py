"""What the paper measures, and what it lacks, computed from per-round records.

Runs are grouped by (scheme, rho); over their seeds each round's accuracy gets a
mean and a standard deviation. From those curves: rounds to reach a target
accuracy (the learning-time speed-up of Fig. 4a), the bandwidth equivalence of
Fig. 4b (the smallest uniform rho that matches the proxy at a small rho, in
samples and in bytes), and what FedAvg would have uploaded instead.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import numpy as np
from flwr.app import ArrayRecord

from flwr_select.data import DATASETS
from flwr_select.models import build_model
from flwr_select.selection.wire import wire_bytes
from simulations.experiments import mean_std

PAPER_TARGET = {"mnist": 0.989}
"""The paper's target accuracy (98.9 % on MNIST, Fig. 4a)."""


def curves(runs: list[list[dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Return, per ``scheme@rho``, mean and std over seeds of each round's values."""
    groups: dict[tuple[str, float], list[list[dict[str, Any]]]] = defaultdict(list)
    for run in runs:
        groups[(run[0]["scheme"], run[0]["rho"])].append(run)
    result = {}
    for (scheme, rho), group in sorted(groups.items()):
        accuracy = np.array([[r["accuracy"] for r in run] for run in group])
        result[f"{scheme}@{rho}"] = {
            "scheme": scheme,
            "rho": rho,
            "seeds": sorted(run[0]["seed"] for run in group),
            "accuracy_mean": accuracy.mean(0).tolist(),
            "accuracy_std": accuracy.std(0).tolist(),
            "test_accuracy_final": mean_std(
                [run[-1]["test_accuracy"] for run in group]
            ),
            "samples_total": mean_std([run[-1]["samples_total"] for run in group]),
            "bytes_total": mean_std([run[-1]["bytes_total"] for run in group]),
            "bytes_mean": np.array([[r["bytes_total"] for r in run] for run in group])
            .mean(0)
            .tolist(),
            "wrong_sent": mean_std(
                [sum(r["wrong_sent"] for r in run) for run in group]
            ),
            "noisy_sent": mean_std(
                [sum(r["noisy_sent"] for r in run) for run in group]
            ),
            **audit(group),
        }
    return result


def audit(group: list[list[dict[str, Any]]]) -> dict[str, list[float]]:
    """Return what the server's audit made of a run's noisy sites (N-site runs).

    ``audit_named``: rounds in which the noisy sites reported more likely
    mislabelled candidates than any clean site (the audit singles them out);
    ``suspect_uploads``: uploads from the noisy sites the server's own model
    called likely mislabelled, summed over rounds. Empty where the records
    hold no audit (no site's labels flipped).
    """
    if "reported_noisy" not in group[0][-1]:
        return {}
    return {
        "audit_named": mean_std(
            [
                sum(r["reported_noisy"] > r["reported_clean_max"] for r in run[1:])
                for run in group
            ]
        ),
        "suspect_uploads": mean_std(
            [sum(r["suspect_noisy"] for r in run[1:]) for run in group]
        ),
    }


def rounds_to(accuracy_mean: list[float], target: float) -> int | None:
    """Return the first round whose mean accuracy reaches ``target`` (None: never)."""
    return next((r for r, a in enumerate(accuracy_mean) if a >= target), None)


def bandwidth_equivalence(
    lines: dict[str, dict[str, Any]], rho: float
) -> dict[str, Any] | None:
    """Return the smallest uniform rho whose final accuracy matches proxy@``rho``."""
    proxy = lines.get(f"proxy@{rho}")
    if proxy is None:
        return None
    goal = proxy["accuracy_mean"][-1]
    uniform = sorted(
        (v for v in lines.values() if v["scheme"] == "uniform"), key=lambda v: v["rho"]
    )
    match = next((v for v in uniform if v["accuracy_mean"][-1] >= goal), None)
    if match is None:
        return {"proxy_rho": rho, "proxy_final_accuracy": goal, "uniform_rho": None}
    return {
        "proxy_rho": rho,
        "proxy_final_accuracy": goal,
        "uniform_rho": match["rho"],
        "uniform_final_accuracy": match["accuracy_mean"][-1],
        "samples_ratio": match["samples_total"][0] / proxy["samples_total"][0],
        "bytes_ratio": match["bytes_total"][0] / proxy["bytes_total"][0],
    }


def allocation_gains(lines: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Return, per ``<policy>-global`` line, what one global budget bought.

    Against the same policy with each site's own rho (the line ``<policy>`` at
    the same rho, which spent the same bytes): the final accuracy gained, and
    the bytes the global line had spent when its mean accuracy first reached the
    per-site line's final one (issue 16's "<= 0.67x the bytes"; None: never).
    """
    gains = []
    for line in lines.values():
        per_site = lines.get(f"{line['scheme'].removesuffix('-global')}@{line['rho']}")
        if not line["scheme"].endswith("-global") or per_site is None:
            continue
        goal = per_site["accuracy_mean"][-1]
        reached = rounds_to(line["accuracy_mean"], goal)
        spent = None if reached is None else line["bytes_mean"][reached]
        gains.append(
            {
                "global": line["scheme"],
                "per_site": per_site["scheme"],
                "rho": line["rho"],
                "accuracy_gain": line["accuracy_mean"][-1] - goal,
                "bytes_to_per_site_final": spent,
                "bytes_ratio": None
                if spent is None
                else spent / per_site["bytes_mean"][-1],
            }
        )
    return gains


SITES_SETTING = (
    "sites",
    "partitioner",
    "alpha",
    "label_noise",
    "label_noise_kind",
    "noisy_sites",
    "easy_sites",
)
"""What an N-site run's records say of its sites (:mod:`simulations.sites`)."""


def fedavg_bytes(model_name: str, rounds: int, sites: int = 1) -> int:
    """Bytes FedAvg's sites would upload: the model's wire size x sites x rounds."""
    model = build_model(model_name)
    return wire_bytes(ArrayRecord(model.state_dict())) * sites * rounds


def summary(runs: list[list[dict[str, Any]]]) -> dict[str, Any]:
    """Return curves, rounds to target, bandwidth equivalence and FedAvg's bytes.

    N-site runs also get what global allocation gained over per-site
    (:func:`allocation_gains`) and their sites' setting (:data:`SITES_SETTING`).
    """
    lines = curves(runs)
    dataset, rounds = runs[0][0]["dataset"], len(runs[0]) - 1
    targets = {"paper": PAPER_TARGET.get(dataset)}
    for line in lines.values():
        uniform = lines.get(f"uniform@{line['rho']}")
        if uniform is not None:
            targets[f"uniform-final@{line['rho']}"] = uniform["accuracy_mean"][-1]
    for line in lines.values():
        line["rounds_to"] = {
            name: rounds_to(line["accuracy_mean"], target)
            for name, target in targets.items()
            if target is not None
            and (name == "paper" or name.endswith(f"@{line['rho']}"))
        }
    rhos = sorted({line["rho"] for line in lines.values()})
    return {
        "dataset": dataset,
        "rounds": rounds,
        "targets": targets,
        "lines": lines,
        "bandwidth_equivalence": bandwidth_equivalence(lines, rhos[0])
        if len(rhos) > 1
        else None,
        "allocation": allocation_gains(lines),
        "setting": {k: runs[0][0][k] for k in SITES_SETTING if k in runs[0][0]},
        # the runs' own model (their recipe's), else the data set's
        "fedavg_bytes": fedavg_bytes(
            runs[0][0].get("training", {}).get("model", DATASETS[dataset].model), rounds
        ),
    }
