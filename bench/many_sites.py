"""Many virtual sites: wall time per round and memory as a simulation grows.

Runs the project's own command, as a user would, for each ``--sites`` count::

    flower-simulation --app simulations.mnist --num-supernodes N
        --run-config 'num-server-rounds=3 model="lenet5" validation-size=1000
        initial-size=1000 initial-epochs=1 server-epochs=1 data-dir=... out-dir=...'

The pool is split among the N sites, so the samples trial-tested per round stay
the same and what grows is the number of sites (messages, ClientApp calls, uploads
to check). Printed per N: each round's wall time (``execution.jsonl``; round 1
includes Ray's start-up), the sites that replied (``rounds.jsonl``), the
ServerApp's peak memory, and the peak of the whole process tree's resident
memory (the command, Ray's processes, its workers), sampled every 0.5 s from
``/proc``. Sites share the one training set loaded per worker process: none
holds a copy of its own. Run from the repository root::

    python bench/many_sites.py --data-dir ../shared/data/mnist --sites 10 100 500
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from flwr_select.data import add_data_dir_option
from flwr_select.files import read_json_lines

# The process-tree walk is the loopback harness's (test code, not installed): python
# puts only bench/ on the path of a script.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.loopback import descendants  # noqa: E402

PAGE = os.sysconf("SC_PAGE_SIZE")


def tree_rss(root: int) -> int:
    """Bytes resident in ``root`` and every process below it, from ``/proc``."""
    total = 0
    for pid in [root, *(pid for pid, _ in descendants(root))]:
        try:
            total += int((Path("/proc") / str(pid) / "statm").read_text().split()[1])
        except (OSError, IndexError, ValueError):  # it exited meanwhile
            pass
    return total * PAGE


def run(sites: int, data_dir: Path, out_dir: Path) -> int:
    """Run the simulation with ``sites`` virtual sites; return the peak tree RSS."""
    config = (
        'num-server-rounds=3 model="lenet5" validation-size=1000 initial-size=1000 '
        f'initial-epochs=1 server-epochs=1 data-dir="{data_dir}" out-dir="{out_dir}"'
    )
    command = ["flower-simulation", "--app", "simulations.mnist"]
    command += ["--num-supernodes", str(sites), "--run-config", config]
    executable = Path(sys.executable).parent
    process = subprocess.Popen(
        [str(executable / command[0]), *command[1:]],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    peak = 0
    while process.poll() is None:
        peak = max(peak, tree_rss(process.pid))
        time.sleep(0.5)
    if process.returncode:
        raise SystemExit(f"flower-simulation with {sites} sites failed")
    return peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_data_dir_option(parser)
    parser.add_argument("--sites", type=int, nargs="+", default=[10, 100, 500])
    args = parser.parse_args()
    data_dir = Path(args.data_dir).resolve()
    print(
        f"{'sites':>6} {'round s (1, 2, 3)':>22} {'replied':>10} "
        f"{'ServerApp MB':>13} {'all processes MB':>17}"
    )
    for sites in args.sites:
        with tempfile.TemporaryDirectory() as tmp:
            peak = run(sites, data_dir, Path(tmp))
            rounds = read_json_lines(Path(tmp) / "rounds.jsonl")[1:]
            execution = read_json_lines(Path(tmp) / "execution.jsonl")[1:]
        seconds = ", ".join(f"{e['seconds']:.1f}" for e in execution)
        replied = min(r["sites_accepted"] + r["sites_rejected"] for r in rounds)
        server = max(e["server_peak_rss_bytes"] for e in execution) / 2**20
        print(
            f"{sites:>6} {seconds:>22} {replied:>5}/{sites:<4} {server:>13.0f} "
            f"{peak / 2**20:>17.0f}"
        )


if __name__ == "__main__":
    main()
