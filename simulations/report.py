"""Print the README's results tables from the experiments' summaries.

    python -m simulations.report results

Reads ``<out-dir>/<experiment>/summary-<dataset>.json`` as written by
``python -m simulations.paper``, ``python -m simulations.sites`` and
``python -m simulations.biased``; prints
Markdown, with the paper's own numbers beside ours where the paper gives them.
"""

from __future__ import annotations

import json
import sys
from functools import partial
from pathlib import Path
from typing import Any

PAPER_ROUNDS = {"uniform": 10, "oblivious": 4, "proxy": 2}
"""Fig. 4a: rounds to 98.9 % on MNIST at rho = 0.05."""


def _load(out: Path, experiment: str, dataset: str) -> dict[str, Any] | None:
    path = out / experiment / f"summary-{dataset}.json"
    return json.loads(path.read_text()) if path.exists() else None


def _pm(pair: list[float], scale: float = 100.0) -> str:
    return f"{pair[0] * scale:.2f} ± {pair[1] * scale:.2f}"


def _rounds(value: int | None) -> str:
    return "not reached" if value is None else str(value)


def _row(cells: list[str]) -> str:
    """Return one Markdown table row of ``cells``."""
    return "| " + " | ".join(cells) + " |"


def _head(columns: list[str]) -> list[str]:
    """Return a Markdown table's header row and rule for ``columns``."""
    return [_row(columns), "|---" * len(columns) + "|"]


def fig4a_table(summary: dict[str, Any]) -> list[str]:
    """Return rows: rounds to target, final accuracies and bytes per scheme."""
    rows = [
        "| scheme | rounds to 98.9 % (paper) | rounds to uniform's final | "
        "final val. acc. % | final test acc. % | uploaded MB | "
        "FedAvg would upload MB |",
        "|---|---|---|---|---|---|---|",
    ]
    fedavg = summary["fedavg_bytes"] / 1e6
    for line in sorted(summary["lines"].values(), key=lambda v: v["scheme"]):
        rounds = line["rounds_to"]
        paper = (
            PAPER_ROUNDS.get(line["scheme"]) if summary["dataset"] == "mnist" else None
        )
        own = _rounds(rounds.get("paper")) if "paper" in rounds else "-"
        to_uniform = _rounds(rounds.get(f"uniform-final@{line['rho']}"))
        final = [line["accuracy_mean"][-1], line["accuracy_std"][-1]]
        rows.append(
            f"| {line['scheme']} | {own} ({paper or '-'}) | {to_uniform} | "
            f"{_pm(final)} | {_pm(line['test_accuracy_final'])} | "
            f"{line['bytes_total'][0] / 1e6:.2f} | {fedavg:.2f} |"
        )
    return rows


def fig4b_table(summary: dict[str, Any]) -> list[str]:
    """Return rows: final accuracy per rho and scheme, and bandwidth equivalence.

    Validation accuracy with its spread over seeds first, then test accuracy,
    one column per scheme each.
    """
    lines = summary["lines"]
    rhos = sorted({v["rho"] for v in lines.values()})
    schemes = sorted({v["scheme"] for v in lines.values()})
    rows = _head(
        ["rho"] + [f"{s} val." for s in schemes] + [f"{s} test" for s in schemes]
    )
    for rho in rhos:
        here = [lines[f"{s}@{rho}"] for s in schemes if f"{s}@{rho}" in lines]
        val = [_pm([v["accuracy_mean"][-1], v["accuracy_std"][-1]]) for v in here]
        test = [f"{v['test_accuracy_final'][0] * 100:.2f}" for v in here]
        rows.append(_row([str(rho), *val, *test]))
    eq = summary.get("bandwidth_equivalence")
    if eq:
        proxy = (
            f"the proxy at rho = {eq['proxy_rho']} ({eq['proxy_final_accuracy']:.2%})"
        )
        if eq["uniform_rho"] is None:
            rows += ["", f"No uniform rho up to {rhos[-1]} matched {proxy}."]
        else:
            rows += [
                "",
                f"Bandwidth equivalence: {proxy} is matched by uniform at rho = "
                f"{eq['uniform_rho']} ({eq['uniform_final_accuracy']:.2%}): "
                f"{eq['samples_ratio']:.1f}x the samples, {eq['bytes_ratio']:.1f}x the "
                "bytes (paper: 15x at rho = 0.01).",
            ]
    return rows


def _lines(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """Return the summary's lines in table order: by scheme, then rho."""
    return sorted(summary["lines"].values(), key=lambda v: (v["scheme"], v["rho"]))


def scheme_table(
    summary: dict[str, Any], extra: str | None = None, *, rounds: bool = False
) -> list[str]:
    """Return rows: final accuracy per scheme, and optionally one more total.

    Where the summary holds several rhos, each row names its rho too. With
    ``rounds``, a column says in how many rounds the mean curve first reached
    the paper's target accuracy.
    """
    target = summary["targets"].get("paper") if rounds else None
    rows = _head(
        ["scheme"]
        + ([f"rounds to {target * 100:g} %"] if target else [])
        + ["final val. acc. %", "final test acc. %", "samples sent"]
        + ([extra] if extra else [])
    )
    lines = _lines(summary)
    several = len({line["rho"] for line in lines}) > 1
    for line in lines:
        final = [line["accuracy_mean"][-1], line["accuracy_std"][-1]]
        name = f"{line['scheme']}, rho = {line['rho']}" if several else line["scheme"]
        rows.append(
            _row(
                [name]
                + ([_rounds(line["rounds_to"].get("paper"))] if target else [])
                + [_pm(final), _pm(line["test_accuracy_final"])]
                + [f"{line['samples_total'][0]:.0f}"]
                + ([f"{line[extra][0]:.1f}"] if extra else [])
            )
        )
    return rows


def allocation_table(summary: dict[str, Any]) -> list[str]:
    """Return the scheme table, then global and per-site allocation at equal bytes.

    Where only some sites' labels are flipped, the scheme table also says in how
    many rounds the audit singled out the noisy sites and how many of their
    uploads the server called likely mislabelled.
    """
    rows = scheme_table(summary)
    noisy = summary["setting"].get("noisy_sites", "all") != "all"
    if noisy and "audit_named" in _lines(summary)[0]:
        rows[0] += " rounds the audit named the noisy site | their suspect uploads |"
        rows[1] += "---|---|"
        for i, line in enumerate(_lines(summary), start=2):
            rows[i] += (
                f" {line['audit_named'][0]:.1f} of {summary['rounds']} |"
                f" {line['suspect_uploads'][0]:.1f} |"
            )
    gains = summary.get("allocation") or []
    if not gains:
        return rows
    rows += [
        "",
        "| per-site | global | rounds to 98.9 % (per-site / global) | "
        "accuracy gained (points) | global's bytes at per-site's final accuracy |",
        "|---|---|---|---|---|",
    ]
    lines = summary["lines"]
    for gain in gains:
        to = [
            lines[f"{gain[k]}@{gain['rho']}"]["rounds_to"]
            for k in ("per_site", "global")
        ]
        rounds = [_rounds(r["paper"]) if "paper" in r else "-" for r in to]
        spent = gain["bytes_to_per_site_final"]
        at = (
            "never reached"
            if spent is None
            else f"{spent / 1e6:.2f} MB ({gain['bytes_ratio']:.2f}x per-site's)"
        )
        rows.append(
            f"| {gain['per_site']} | {gain['global']} | {' / '.join(rounds)} | "
            f"{gain['accuracy_gain'] * 100:+.2f} | {at} |"
        )
    return rows


def _sites(ids: str) -> str:
    """Return partition ids as words: ``"0"`` is site 0, ``"0,1"`` sites 0 and 1."""
    *head, last = ids.split(",")
    return f"sites {', '.join(head)} and {last}" if head else f"site {last}"


def sites_title(setting: dict[str, Any]) -> str:
    """Return an N-site experiment's title from its records' setting."""
    split = (
        f"Dirichlet({setting['alpha']:g})"
        if setting["partitioner"] == "dirichlet"
        else "IID"
    )
    title = f"{setting['sites']} {split} sites through Flower"
    if setting["label_noise"]:
        where = (
            "every site"
            if setting["noisy_sites"] == "all"
            else _sites(setting["noisy_sites"])
        )
        kind = (
            ""
            if setting["label_noise_kind"] == "symmetric"
            else ", each class to the next"
        )
        title += (
            f", {setting['label_noise']:.0%} of the labels at {where} flipped{kind}"
        )
    if setting["easy_sites"]:
        title += f", {_sites(setting['easy_sites'])} easy (classes 0 and 1 only)"
    return title


def biased_table(summary: dict[str, Any]) -> list[str]:
    """Return rows: iterations to target and final accuracies per configuration."""
    target = summary["target"]
    rows = [
        f"| configuration | iterations to {target:.0%} per seed | "
        "iterations to target (mean curve) | final val. acc. % | final test acc. % | "
        "final grad-norm gap |",
        "|---|---|---|---|---|---|",
    ]
    for label, line in summary["lines"].items():
        seeds = ", ".join(_rounds(v) for v in line["iterations_to_target"])
        rows.append(
            f"| {label} | {seeds} | "
            f"{_rounds(line['iterations_to_target_mean_curve'])} | "
            f"{_pm(line['final_accuracy'])} | {_pm(line['test_accuracy'])} | "
            f"{line['grad_norm_gap'][0][-1]:.3f} |"
        )
    return rows


SECTIONS: dict[str, tuple[str, Any, str | None]] = {
    "fig4a": ("Fig. 4a: rho = 0.05", fig4a_table, None),
    "fig4b": ("Fig. 4b: final accuracy (%) against rho", fig4b_table, None),
    "fig2": (
        "Fig. 2: confidence metrics (rho = 0.05)",
        partial(scheme_table, rounds=True),
        None,
    ),
    "fig3": ("Fig. 3: one group only", scheme_table, None),
    "trimmed": ("the noise-robust policies on clean data", scheme_table, None),
    "noise": (
        "5 % of the sites' labels flipped (rho = 0.05)",
        scheme_table,
        "noisy_sent",
    ),
    "noise20": (
        "20 % of the sites' labels flipped (rho = 0.05)",
        scheme_table,
        "noisy_sent",
    ),
    "noise20-asymmetric": (
        "20 % of the sites' labels flipped, each class to the next (rho = 0.05)",
        scheme_table,
        "noisy_sent",
    ),
    "biased": ("biased sampling and reductions", biased_table, None),
}
"""Each experiment of ``simulations.paper`` and ``simulations.biased``: its title,
its table and the extra column the table shows. ``simulations.sites`` names its
experiments ``sites-<partitioner>[-noisy-site][-easy][-allocation]``: those take
:func:`allocation_table`, titled by their setting (:func:`sites_title`)."""


def section(experiment: str, summary: dict[str, Any]) -> tuple[str, Any, str | None]:
    """Return the title, table and extra column of ``experiment``'s summary."""
    if experiment in SECTIONS:
        return SECTIONS[experiment]
    return sites_title(summary["setting"]), allocation_table, None


def report(out: Path) -> str:
    """Return every table whose summary exists under ``out``, as Markdown.

    The paper's experiments come first, in the order of :data:`SECTIONS`, then
    the N-site ones by name. The docs' results page is this text.
    """
    sites = sorted({path.parent.name for path in out.glob("sites-*/summary-*.json")})
    parts = []
    for dataset in ("mnist", "fashion-mnist", "cifar10"):
        for experiment in [*SECTIONS, *sites]:
            summary = _load(out, experiment, dataset)
            if summary is None:
                continue
            title, table, extra = section(experiment, summary)
            seeds = next(iter(summary["lines"].values()))["seeds"]
            parts.append(f"\n**{dataset}, {title}** (mean ± std over seeds {seeds})\n")
            rows = table(summary, extra) if extra else table(summary)
            parts.append("\n".join(rows))
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> None:
    """Print :func:`report` of the folder given (default: ``results``)."""
    out = Path((argv if argv is not None else sys.argv[1:] or ["results"])[0])
    print(report(out))


if __name__ == "__main__":
    main()
