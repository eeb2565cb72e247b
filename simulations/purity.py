"""What each policy picks when labels are noisy: flipped samples and clean hard ones.

    python -m simulations.purity --data-dir DIR --out-dir results

No training: the paper protocol's initial model (the recipe's, seed ``--seed``)
trial-tests the site's first ``--folds`` folds with a share of the pool's labels
flipped, and each policy picks its rho share of every fold. Counted per fold
(mean over folds): the picks whose label was flipped, and the clean picks the
model gets wrong under their true label (hard samples, what selection is for).
The measurement the ``trimmed-proxy`` policy and its ``trim`` were chosen by;
the accuracy it buys is measured by the paper's experiments.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from flwr_select.models import build_model
from flwr_select.noise import flip_labels
from flwr_select.partition import round_fold
from flwr_select.selection.policies import Budget, make_policy, select
from flwr_select.selection.trial import trial_test
from simulations.experiments import Data
from simulations.paper import PROTOCOLS, initial_state, protocol_split

NOISE = [("clean", 0.0), ("symmetric", 0.05), ("symmetric", 0.2), ("asymmetric", 0.2)]
"""The label-noise settings measured: kind and share of the pool flipped."""
POLICIES = [
    ("uniform", {}),
    ("oblivious", {}),
    ("proxy", {}),
    *[("trimmed-proxy", {"trim": trim}) for trim in (0.001, 0.01, 0.05, 0.2)],
    ("trimmed-lowest-confidence", {}),
]
"""The policies measured, with their options."""


def measure(
    data: Data, seed: int, rho: float, folds: int
) -> dict[str, dict[str, list[float]]]:
    """Return, per noise setting and policy, mean flipped and clean-hard picks."""
    torch.set_num_threads(1)  # the paper runner's: the same initial model, to the bit
    protocol = PROTOCOLS[data.dataset]
    model = build_model(protocol.training().model, seed=seed)
    model.load_state_dict(initial_state(data, protocol, seed))
    model.eval()
    split = protocol_split(data, protocol, seed)
    result: dict[str, dict[str, list[float]]] = {}
    for kind, fraction in NOISE:
        noisy_labels, flipped = data.labels, np.zeros(0, np.int64)
        if fraction:
            noisy_labels, flipped = flip_labels(
                data.labels, split.pool, fraction, seed, data.num_classes, kind
            )
        counts: dict[str, list[tuple[int, int]]] = {}
        for server_round in range(1, folds + 1):
            fold = round_fold(split.pool, server_round, protocol.rounds)
            trial = trial_test(model, data.samples(fold, noisy_labels))
            is_flipped = np.isin(trial.ids, flipped)
            true_labels = data.labels.numpy()[trial.ids]
            hard = (trial.predictions != true_labels) & ~is_flipped
            for name, options in POLICIES:
                label = name + "".join(f" {k}={v}" for k, v in options.items())
                picks = select(
                    trial,
                    Budget(rho=rho),
                    make_policy(name, **options),
                    seed=(seed, server_round),
                )
                pair = (int(is_flipped[picks].sum()), int(hard[picks].sum()))
                counts.setdefault(label, []).append(pair)
        setting = f"{kind} {fraction}" if fraction else kind
        result[setting] = {
            label: np.mean(pairs, axis=0).round(1).tolist()
            for label, pairs in counts.items()
        }
    return result


def table(result: dict[str, dict[str, list[float]]], picks: int) -> str:
    """Return the result as a markdown table: flipped / clean hard per setting."""
    settings = list(result)
    lines = [
        "| policy | " + " | ".join(settings) + " |",
        "|---|" + "---|" * len(settings),
    ]
    for label in result[settings[0]]:
        cells = [f"{result[s][label][0]:g} / {result[s][label][1]:g}" for s in settings]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return f"(of {picks} picks a fold: flipped / clean hard)\n" + "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """Parse the command line, measure, write the summary, print the table."""
    parser = argparse.ArgumentParser(
        prog="python -m simulations.purity", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--dataset", default="mnist")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--out-dir", default="results")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rho", type=float, default=0.05)
    parser.add_argument("--folds", type=int, default=3)
    args = parser.parse_args(argv)
    data = Data(args.dataset, args.data_dir)
    result = measure(data, args.seed, args.rho, args.folds)
    out = Path(args.out_dir) / "purity"
    out.mkdir(parents=True, exist_ok=True)
    summary: dict[str, Any] = {**vars(args), "result": result}
    (out / f"summary-{args.dataset}.json").write_text(json.dumps(summary, indent=1))
    picks = int(args.rho * PROTOCOLS[args.dataset].fold)
    print(table(result, picks))


if __name__ == "__main__":
    main()
