"""The experiments' figures as PNG files, in the spirit of the paper's."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot_experiment(
    name: str, dataset: str, summary: dict[str, Any], path: Path
) -> None:
    """Draw an experiment's figure to ``path`` (PNG).

    Accuracy against round, one line per scheme with +-1 std over seeds; for an
    experiment over several rhos, final accuracy against rho and against bytes.
    """
    lines = summary["lines"]
    rhos = sorted({line["rho"] for line in lines.values()})
    schemes = sorted({line["scheme"] for line in lines.values()})
    panels = 2 if len(rhos) > 1 else 1
    fig, axes = plt.subplots(1, panels, figsize=(6 * panels, 4.2), squeeze=False)
    if len(rhos) > 1:
        for scheme in schemes:
            own = sorted(
                (v for v in lines.values() if v["scheme"] == scheme),
                key=lambda v: v["rho"],
            )
            final = [v["accuracy_mean"][-1] for v in own]
            axes[0][0].plot([v["rho"] for v in own], final, marker="o", label=scheme)
            axes[0][1].plot(
                [v["bytes_total"][0] / 1e6 for v in own],
                final,
                marker="o",
                label=scheme,
            )
        axes[0][0].set(
            xscale="log",
            xlabel="rho (fraction uploaded per round)",
            ylabel=f"accuracy after round {summary['rounds']}",
        )
        axes[0][1].set(
            xscale="log", xlabel="MB uploaded in all", ylabel="final accuracy"
        )
    else:
        ax = axes[0][0]
        for key in sorted(lines):
            line = lines[key]
            mean, std = line["accuracy_mean"], line["accuracy_std"]
            rounds = range(len(mean))
            ax.plot(rounds, mean, marker="o", label=line["scheme"])
            ax.fill_between(
                rounds,
                [m - s for m, s in zip(mean, std, strict=True)],
                [m + s for m, s in zip(mean, std, strict=True)],
                alpha=0.15,
            )
        if summary["targets"].get("paper"):
            ax.axhline(
                summary["targets"]["paper"],
                color="grey",
                linestyle=":",
                label="paper's target",
            )
        ax.set(xlabel="round", ylabel="validation accuracy")
    for ax in axes[0]:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(
        f"{name} on {dataset} (mean over seeds {lines[next(iter(lines))]['seeds']})"
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_quotas(runs: list[list[dict[str, Any]]], path: Path) -> None:
    """Draw what each site sent per round, per line of the first seed (PNG).

    One panel per scheme (``proxy``, ``proxy-global``...), a stacked bar per
    round of each site's samples (``samples_by_site``: its rho share, or its
    quota and top-up under one global budget), so where the budget went shows.
    """
    first: dict[str, list[dict[str, Any]]] = {}
    for run in runs:
        first.setdefault(run[-1]["scheme"], run)
    fig, axes = plt.subplots(
        1, len(first), figsize=(5 * len(first), 3.8), squeeze=False, sharey=True
    )
    for ax, (scheme, run) in zip(axes[0], sorted(first.items()), strict=True):
        rounds = [r for r in run if r.get("samples_by_site")]
        sites = sorted({s for r in rounds for s in r["samples_by_site"]}, key=int)
        bottom = [0] * len(rounds)
        for site in sites:
            counts = [r["samples_by_site"].get(site, 0) for r in rounds]
            ax.bar([r["round"] for r in rounds], counts, bottom=bottom, label=site)
            bottom = [b + c for b, c in zip(bottom, counts, strict=True)]
        ax.set(title=f"{scheme} (seed {run[-1]['seed']})", xlabel="round")
        ax.grid(alpha=0.3, axis="y")
    axes[0][0].set(ylabel="samples sent")
    axes[0][-1].legend(title="site", fontsize=7, ncols=2)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_data_parallel(summary: dict[str, Any], path: Path) -> None:
    """Draw the data-parallel comparison to ``path`` (PNG).

    Accuracy, loss, gradient-norm gap and mean filter redundancy against
    iterations (mean over seeds), and the final type I and type II error rate
    of each class; one line per configuration.
    """
    lines = summary["lines"]
    colors = dict(zip(lines, plt.get_cmap("tab20").colors, strict=False))
    fig, axes = plt.subplots(2, 3, figsize=(17, 9))
    panels = [
        ("accuracy", "validation accuracy"),
        ("loss", "validation loss"),
        ("grad_norm_gap", "largest gap between workers' gradient norms"),
        ("filter_redundancy", "mean |cos| between conv filters"),
    ]
    for ax, (key, label) in zip(axes.flat, panels, strict=False):
        for name, line in lines.items():
            style = "-" if name.startswith("uniform") else "--"
            mean = [float("nan") if v is None else v for v in line[key][0]]
            ax.plot(line["iterations"], mean, style, color=colors[name], label=name)
        ax.set(xlabel="iterations", ylabel=label)
    for ax, key in zip(axes.flat[4:], ("type1_error", "type2_error"), strict=True):
        for name, line in lines.items():
            ax.plot(line[key], marker="o", color=colors[name], label=name)
        ax.set(
            xlabel="class",
            ylabel=f"final {key.replace('_', ' ')} rate",
            xticks=range(len(next(iter(lines.values()))[key])),
        )
    axes[0][0].axhline(summary["target"], color="grey", linestyle=":")
    for ax in axes.flat:
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    seeds = next(iter(lines.values()))["seeds"]
    fig.suptitle(
        f"biased sampling and reductions on {summary['dataset']} "
        f"({summary['mode']} mode, mean over seeds {seeds})"
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
