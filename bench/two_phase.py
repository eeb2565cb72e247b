"""What one global budget costs a round: two-phase rounds against per-site ones.

Runs the project's own command, as a user would, once per allocation and
alternating (per-site, global, global, per-site, ...) so that a drift in the
machine's load falls on both::

    flower-simulation --app simulations.mnist --num-supernodes 5
        --run-config 'num-server-rounds=6 allocation="per-site"|"global" ...'

on a small run (1,000 initial samples, a 10,000-sample pool, one server epoch)
where the server's training is short, so what phase 1 adds (one more message
to every site, the model sent twice, the quotas) weighs as much as it can
(the sibling ``flower_overhead.py``'s run config, with 5 sites and 6 rounds).
``--recipe`` names the model and training (``simulations.recipes``): the
default, ``paper`` (LeNet-5), has the shortest rounds and so is the worst case;
``small-data`` is the apps' default, whose larger model takes longer to
trial-test and evaluate.
A round's wall time is the ``seconds`` of ``out-dir/execution.jsonl``; round 1
holds Ray's and the sites' start-up, so the median of rounds 2 on is each run's
figure. Printed: both medians and their ratio per pair, the median ratio
(target <= 1.2x), phase 1's bytes as a share of the uploads' (target <= 5%),
and what the server sent (``bytes_sent``: the model once per site and phase)
under global allocation against per-site.

Run from the repository root (about 2 minutes a pair on 2 idle cores)::

    python bench/two_phase.py --data-dir ../shared/data/mnist

``--data-dir`` defaults to the environment variable FLWR_SELECT_DATA_DIR;
``--server-epochs`` trains longer, as a real run's recipe does.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

from flower_overhead import RUN_CONFIG, run_simulation  # the sibling's command

from flwr_select.data import add_data_dir_option
from flwr_select.files import read_json_lines
from simulations.recipes import RECIPES

SITES, ROUNDS = 5, 6


def run_once(
    allocation: str, data_dir: Path, out_dir: Path, server_epochs: int, recipe: str
) -> tuple[float, float, int]:
    """Run one simulation; return round seconds, phase-1 share and bytes sent.

    The seconds are the median of rounds 2 on; the share is of the uploads' bytes.
    """
    out_dir.mkdir(parents=True)
    run_simulation(
        data_dir,
        out_dir,
        timeout=3600,
        sites=SITES,
        allocation=allocation,
        **{
            **RECIPES[recipe],
            "num-server-rounds": ROUNDS,
            "initial-epochs": RUN_CONFIG["initial-epochs"],
            "server-epochs": server_epochs,
        },
    )
    seconds = [r["seconds"] for r in read_json_lines(out_dir / "execution.jsonl")]
    rounds = read_json_lines(out_dir / "rounds.jsonl")[1:]
    summary = sum(r.get("summary_bytes", 0) for r in rounds)
    uploads = sum(r["bytes_received"] for r in rounds)
    sent = sum(r["bytes_sent"] for r in rounds)
    return statistics.median(seconds[2:]), summary / uploads, sent


def main() -> None:
    """Run ``--pairs`` pairs of simulations; print the round-time ratios."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_data_dir_option(parser)
    parser.add_argument("--pairs", type=int, default=2)
    parser.add_argument("--server-epochs", type=int, default=1)
    parser.add_argument("--recipe", choices=sorted(RECIPES), default="paper")
    args = parser.parse_args()
    print(
        f"flower-simulation, {SITES} sites, {ROUNDS} rounds, recipe {args.recipe}, "
        f"server-epochs {args.server_epochs}; median round seconds (rounds 2-{ROUNDS})"
    )
    ratios = []
    with tempfile.TemporaryDirectory() as tmp:
        for pair in range(args.pairs):
            order = ("per-site", "global") if pair % 2 == 0 else ("global", "per-site")
            measured = {
                allocation: run_once(
                    allocation,
                    args.data_dir,
                    Path(tmp) / f"{pair}-{allocation}",
                    args.server_epochs,
                    args.recipe,
                )
                for allocation in order
            }
            (per_site, _, down), (two_phase, share, global_down) = (
                measured["per-site"],
                measured["global"],
            )
            ratios.append(two_phase / per_site)
            print(
                f"pair {pair + 1}: per-site {per_site:.2f} s, global {two_phase:.2f} s"
                f" ({ratios[-1]:.2f}x); phase 1 bytes {100 * share:.2f}% of uploads;"
                f" sent {global_down / down:.2f}x per-site's ({global_down:,} bytes)"
            )
    print(f"median ratio global / per-site: {statistics.median(ratios):.2f}x")


if __name__ == "__main__":
    main()
