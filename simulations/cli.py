r"""``flower-simulation``: run one of this project's apps on Flower's simulation engine.

Flower removed its own ``flower-simulation`` in 1.27; this command brings it back
for the apps here, on the same engine ``flwr run`` uses for a local simulation
(Ray-backed virtual SuperNodes), with ``flwr run``'s ``--run-config`` syntax::

    flower-simulation --app simulations.mnist --num-supernodes 2 \\
        --run-config 'num-server-rounds=3 rho=0.05 out-dir="runs/demo"'

An app module provides ``server_app``, ``client_app``, ``DEFAULTS`` (its run
config) and ``check_config`` (which refuses a bad value, naming the key); unknown
keys and bad values are refused before the engine starts. The number of nodes
is known here: ``min-nodes``, unless given, becomes at most ``--num-supernodes``,
and a larger one is refused.
"""

from __future__ import annotations

import argparse
import importlib
import re
import shlex
import sys

from click import ClickException
from flwr.app import Context, RecordDict
from flwr.common import EventType

from flwr_select.config import ConfigError, check
from flwr_select.flower_private import _run_simulation, fuse_dicts, parse_config_args


def main(argv: list[str] | None = None) -> None:
    """Parse the command line and run the app's simulation."""
    parser = argparse.ArgumentParser(
        prog="flower-simulation", description=__doc__.splitlines()[0]
    )
    parser.add_argument(
        "--app", required=True, help="app module, e.g. simulations.mnist"
    )
    parser.add_argument(
        "--num-supernodes", type=int, default=2, help="virtual sites (default: 2)"
    )
    parser.add_argument(
        "--run-config", default="", help="overrides, 'key=value ...' as for flwr run"
    )
    parser.add_argument(
        "--num-cpus", type=float, default=1.0, help="CPUs per ClientApp (default: 1)"
    )
    parser.add_argument(
        "--num-gpus",
        type=float,
        default=0.0,
        help="GPU share per ClientApp (default: 0)",
    )
    parser.add_argument("--verbose", action="store_true", help="Flower's debug logs")
    args = parser.parse_args(argv)

    if args.num_supernodes < 1:
        parser.error(f"--num-supernodes must be >= 1, got {args.num_supernodes}")
    module = importlib.import_module(args.app)
    try:
        # Flower's parser drops a word without "=" silently: refuse it here
        for word in shlex.split(args.run_config):
            if not re.fullmatch(r"[^=\s]+=.+", word, re.DOTALL):
                raise ValueError(f"--run-config: {word!r} is not key=value")
        overrides = parse_config_args([args.run_config])
        config = fuse_dicts(module.DEFAULTS, overrides)
    except (ValueError, ClickException) as err:
        parser.error(f"{err}; the keys of {args.app} are: {', '.join(module.DEFAULTS)}")
    if "min-nodes" not in overrides:  # a round must not wait for absent nodes
        config["min-nodes"] = min(config["min-nodes"], args.num_supernodes)
    try:
        module.check_config(config)
        check(
            "min-nodes",
            config["min-nodes"],
            config["min-nodes"] <= args.num_supernodes,
            f"<= --num-supernodes ({args.num_supernodes})",
        )
    except ConfigError as err:
        parser.error(str(err))
    # The engine behind `flwr run` and the deprecated `run_simulation`: the only
    # entry that hands a run config to the ServerApp without packaging the app.
    _run_simulation(
        num_supernodes=args.num_supernodes,
        exit_event=EventType.PYTHON_API_RUN_SIMULATION_LEAVE,
        client_app=module.client_app,
        server_app=module.server_app,
        backend_config={
            "client_resources": {"num_cpus": args.num_cpus, "num_gpus": args.num_gpus}
        },
        server_app_context=Context(
            run_id=0, node_id=0, node_config={}, state=RecordDict(), run_config=config
        ),
        verbose_logging=args.verbose,
    )


if __name__ == "__main__":
    sys.exit(main())
