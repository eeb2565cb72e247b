r"""``flower-simulation``: run a Flower app on Flower's simulation engine.

Flower removed its own ``flower-simulation`` in 1.27; this command brings it back,
on the same engine ``flwr run`` uses for a local simulation (Ray-backed virtual
SuperNodes), with ``flwr run``'s ``--run-config`` syntax::

    flower-simulation --app simulations.mnist --num-supernodes 2 \\
        --run-config 'num-server-rounds=3 rho=0.05 out-dir="runs/demo"'
    flower-simulation --app path/to/quickstart-pytorch --run-config 'local-epochs=2'

``--app`` names one of:

* This project's app modules (:data:`PROJECT_APPS`, e.g. ``simulations.mnist``):
  a module that provides ``server_app``, ``client_app``, ``DEFAULTS`` (its run
  config) and ``check_config`` (which refuses a bad value, naming the key); bad
  values are refused before the engine starts. The number of nodes is known
  here: ``min-nodes``, unless given, becomes at most ``--num-supernodes``, and a
  larger one is refused.
* A Flower app folder (``.`` included): its ``pyproject.toml`` names the ServerApp
  and the ClientApp in ``[tool.flwr.app.components]`` and the run config's
  defaults in ``[tool.flwr.app.config]``; both are read as ``flwr run`` reads them
  (nested tables become dotted keys, the components are imported with the folder
  on ``sys.path``), and the ServerApp and every ClientApp see the defaults with
  ``--run-config`` laid over them.
* A Flower app's module or package (e.g. ``pytorchexample``): the app is that of
  the nearest ``pyproject.toml`` above the module's file, or else of the current
  directory's, whose components are in that module.

Unknown ``--run-config`` keys are refused before the engine starts, naming the
allowed ones (under ``flwr run`` the SuperLink refuses them when the run starts).
So are ``--num-supernodes`` outside [1, :data:`MAX_SUPERNODES`], a ``--num-cpus``
that is not a finite number > 0, a ``--num-gpus`` that is not a finite number
>= 0, and an app whose import raises (or exits): argparse's exit status 2, with
one line naming the flag or the app and what is allowed or what was raised.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import re
import shlex
import sys
import textwrap
import typing
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from click import ClickException
from flwr.app import Context, RecordDict, UserConfig
from flwr.clientapp import ClientApp
from flwr.common import EventType
from flwr.serverapp import ServerApp

from flwr_select.config import ConfigError, check, key_meanings
from flwr_select.flower_private import (
    Run,
    _run_simulation,
    flatten_dict,
    fuse_dicts,
    get_project_config,
    load_app,
    parse_config_args,
    simulation_run,
)
from flwr_select.partition import SiteShareConfig

PROJECT_APPS = (
    "simulations.mnist",
    "simulations.fashion_mnist",
    "simulations.mnist_data_parallel",
)
"""This project's app modules (``tests/test_cli_apps.py`` keeps the list whole)."""

COMPONENTS = ("serverapp", "clientapp")
"""The ``[tool.flwr.app.components]`` a Flower app needs here."""

PROJECT_APP_ATTRIBUTES = ("server_app", "client_app", "DEFAULTS", "check_config")
"""What a module provides to run as one of this project's apps."""

MAX_SUPERNODES = 10_000
"""The most virtual sites ``--num-supernodes`` starts.

Each is a node of Flower's engine on this one machine, with its share of the
data and its messages every round; 10,000 is far beyond what a machine runs in
reasonable time (``bench/many_sites.py``), and a mistyped count (a billion)
would otherwise start registering nodes instead of being refused.
"""

APPS_RUN = (
    f"this project's app modules ({', '.join(PROJECT_APPS)}), a Flower app folder "
    "(its pyproject.toml has [tool.flwr.app.components]) or a module of one"
)
"""The apps ``flower-simulation`` runs, as ``--app``'s help and a refusal say."""


class AppRefused(Exception):
    """An ``--app`` or ``--run-config`` refused before the engine starts; says why."""


@dataclass(frozen=True)
class FlowerApp:
    """A Flower app as ``flwr run`` finds it: its folder and its ``[tool.flwr.app]``."""

    folder: Path
    """Where its ``pyproject.toml`` is; its components are imported from here."""
    components: dict[str, str]
    """``serverapp`` and ``clientapp``, each a ``"module:attribute"`` reference."""
    defaults: UserConfig
    """``[tool.flwr.app.config]``, nested tables flattened to dotted keys."""

    def has_components_in(self, module_name: str) -> bool:
        """Whether its ServerApp or ClientApp is in module ``module_name`` or below."""
        return any(
            f"{self.components[kind].partition(':')[0]}.".startswith(f"{module_name}.")
            for kind in COMPONENTS
        )


@dataclass(frozen=True)
class Simulation:
    """What ``_run_simulation`` is given to run one app."""

    server_app: ServerApp
    client_app: ClientApp
    server_app_context: Context
    """The ServerApp's context; its ``run_config`` is the checked run config."""
    app_dir: str = ""
    """A Flower app's folder: each node fuses ``run``'s overrides over the defaults
    of its ``pyproject.toml``. Empty for this project's apps, whose nodes are sent
    their settings by the ServerApp."""
    run: Run | None = None
    """A Flower app's run, carrying the overrides; None lets the engine make one."""


def main(argv: list[str] | None = None) -> None:
    """Parse the command line and run the app's simulation.

    ``--help`` with an ``--app`` also lists that app's run-config keys
    (:func:`run_config_help`).
    """
    first = argparse.ArgumentParser(add_help=False)
    first.add_argument("--app")
    named = first.parse_known_args(argv)[0].app
    parser = argparse.ArgumentParser(
        prog="flower-simulation",
        description=__doc__.splitlines()[0],
        epilog=None if named is None else run_config_help(named),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--app",
        required=True,
        help=f"the app to run: {APPS_RUN}; e.g. simulations.mnist or .",
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

    for flag, value, ok, allowed in (
        ("--num-supernodes", args.num_supernodes, args.num_supernodes >= 1, ">= 1"),
        (
            "--num-supernodes",
            args.num_supernodes,
            args.num_supernodes <= MAX_SUPERNODES,
            f"<= {MAX_SUPERNODES} (the most virtual sites this command starts)",
        ),
        (
            "--num-cpus",
            args.num_cpus,
            math.isfinite(args.num_cpus) and args.num_cpus > 0,
            "a finite number > 0 (CPUs per ClientApp)",
        ),
        (
            "--num-gpus",
            args.num_gpus,
            math.isfinite(args.num_gpus) and args.num_gpus >= 0,
            "a finite number >= 0 (the share of a GPU per ClientApp)",
        ),
    ):
        if not ok:
            parser.error(f"{flag} must be {allowed}, got {value}")
    try:
        simulation = prepare_simulation(args.app, args.run_config, args.num_supernodes)
    except AppRefused as err:
        parser.error(str(err))
    # The engine behind `flwr run` and the deprecated `run_simulation`: the only
    # entry that hands a run config to the ServerApp without packaging the app.
    _run_simulation(
        num_supernodes=args.num_supernodes,
        exit_event=EventType.PYTHON_API_RUN_SIMULATION_LEAVE,
        client_app=simulation.client_app,
        server_app=simulation.server_app,
        backend_config={
            "client_resources": {"num_cpus": args.num_cpus, "num_gpus": args.num_gpus}
        },
        server_app_context=simulation.server_app_context,
        app_dir=simulation.app_dir,
        is_app=bool(simulation.app_dir),
        run=simulation.run,
        verbose_logging=args.verbose,
    )


def run_config_help(app_name: str) -> str:
    """Return the run-config keys of the app ``--app app_name`` names, for ``--help``.

    Each key with its default; for this project's apps also what it means, from
    the dataclasses its ``check_config`` returns
    (:func:`~flwr_select.config.key_meanings`). An app that cannot be found
    says why instead.
    """
    try:
        app = find_app(app_name)
    except AppRefused as err:
        return f"--app {app_name!r}: {err}"
    if isinstance(app, FlowerApp):
        defaults, meanings = app.defaults, {}
    else:
        defaults, meanings = app.DEFAULTS, app_key_meanings(app)
    lines = [f"run-config keys of {app_name} (--run-config 'key=value ...'):"]
    for key, default in defaults.items():
        lines.append(f"  {key} = {json.dumps(default)}")
        if key in meanings:
            lines += textwrap.wrap(
                meanings[key], 78, initial_indent=" " * 6, subsequent_indent=" " * 6
            )
    return "\n".join(lines)


def app_key_meanings(app: ModuleType) -> dict[str, str]:
    """Return what each run-config key of one of this project's apps means.

    From the dataclasses its ``check_config`` returns (its annotation names
    them; :func:`~flwr_select.config.key_meanings`): for ``--help`` and the
    docs' run-config reference.
    """
    returned = typing.get_type_hints(app.check_config)["return"]
    return key_meanings(typing.get_args(returned))


def prepare_simulation(app_name: str, run_config: str, num_nodes: int) -> Simulation:
    """Find the app ``--app`` names and check its run config, before any engine.

    Raises
    ------
    AppRefused
        Where ``app_name`` is no app this command runs, or ``run_config`` is bad.
    """
    app = find_app(app_name)
    if isinstance(app, FlowerApp):
        overrides, config = read_run_config(app_name, app.defaults, run_config)
        return flower_app_simulation(app, overrides, config)
    overrides, config = read_run_config(app_name, app.DEFAULTS, run_config)
    return project_app_simulation(app, overrides, config, num_nodes)


def find_app(name: str) -> ModuleType | FlowerApp:
    """Find the app ``--app name`` names: this project's app module or a Flower app.

    A folder holding a ``pyproject.toml`` is a Flower app's. A module that
    provides :data:`PROJECT_APP_ATTRIBUTES` is one of this project's apps. Any
    other name, a module importable or not, is a Flower app's module where the
    nearest ``pyproject.toml`` above the module's file, or else the current
    directory's, declares components in it.

    Raises
    ------
    AppRefused
        Naming what was looked at and the apps this command runs.
    """
    if (Path(name) / "pyproject.toml").is_file():
        return read_flower_app(Path(name))
    reasons = [f"folder {name} has no pyproject.toml"] if Path(name).is_dir() else []
    try:
        module = importlib.import_module(name)
    except (ImportError, ValueError, TypeError) as err:  # no such module, or broken
        module = None
        reasons.append(f"cannot import it ({err})")
    except (Exception, SystemExit) as err:  # the app's own code failed, or exited
        raise AppRefused(f"--app {name!r}: {raised_on_import(err)}") from err
    else:
        if all(hasattr(module, attribute) for attribute in PROJECT_APP_ATTRIBUTES):
            return module
        reasons.append(f"it lacks {', '.join(PROJECT_APP_ATTRIBUTES)}")
    for folder in app_folders_of(module):
        try:
            app = read_flower_app(folder)
        except AppRefused as err:
            reasons.append(str(err))
            continue
        if app.has_components_in(name):
            return app
        elsewhere = ", ".join(app.components[kind] for kind in COMPONENTS)
        reasons.append(f"the components of {folder}'s app are elsewhere ({elsewhere})")
    raise AppRefused(
        f"--app {name!r} is not an app: {'; '.join(reasons)}. "
        f"flower-simulation runs {APPS_RUN}"
    )


def raised_on_import(err: BaseException) -> str:
    """Say, on one line, that importing an app raised ``err`` and nothing ran.

    A ``SystemExit`` is said too: even ``SystemExit(0)`` at import means the app
    ran nothing, which must not pass for a run that succeeded.
    """
    lines = str(err).strip().splitlines()
    raised = f"{type(err).__name__}: {lines[0]}" if lines else repr(err)
    return f"importing it raised {raised}; nothing ran"


def app_folders_of(module: ModuleType | None) -> list[Path]:
    """Folders whose ``pyproject.toml`` may declare ``module``'s Flower app.

    The nearest above the module's file (where it has one), then the current
    directory, as ``flwr run .`` would take it; each once.
    """
    module_file = getattr(module, "__file__", None)
    above = Path(module_file).resolve().parents if module_file else ()
    folders = [folder for folder in above if (folder / "pyproject.toml").is_file()][:1]
    if (Path.cwd() / "pyproject.toml").is_file():
        folders.append(Path.cwd().resolve())
    return list(dict.fromkeys(folders))


def read_flower_app(folder: Path) -> FlowerApp:
    """Read the Flower app of ``folder``'s ``pyproject.toml`` as ``flwr run`` does.

    Raises
    ------
    AppRefused
        Where Flower refuses the file, or it declares no ServerApp and ClientApp.
    """
    try:
        project = get_project_config(folder)
    except (FileNotFoundError, ValueError) as err:  # a TOMLDecodeError is one
        raise AppRefused(f"{folder / 'pyproject.toml'}: {err}") from err
    app = project["tool"]["flwr"]["app"]
    missing = [kind for kind in COMPONENTS if kind not in app["components"]]
    if missing:  # an AgentApp bundle: Flower's simulation engine runs none
        raise AppRefused(
            f"{folder / 'pyproject.toml'}: no {' and no '.join(missing)} in "
            "[tool.flwr.app.components]"
        )
    return FlowerApp(
        folder=folder.resolve(),
        components=app["components"],
        defaults=flatten_dict(app.get("config")),
    )


def read_run_config(
    app_name: str, defaults: UserConfig, run_config: str
) -> tuple[UserConfig, UserConfig]:
    """Return the overrides of ``--run-config`` and the run config they make.

    Raises
    ------
    AppRefused
        For a word that is not ``key=value``, a value Flower cannot read, or a key
        ``defaults`` lacks; the message names the keys there are.
    """
    try:
        # Flower's parser drops a word without "=" silently: refuse it here
        for word in shlex.split(run_config):
            if not re.fullmatch(r"[^=\s]+=.+", word, re.DOTALL):
                raise ValueError(f"--run-config: {word!r} is not key=value")
        overrides = parse_config_args([run_config])
        return overrides, fuse_dicts(defaults, overrides)
    except (ValueError, ClickException) as err:
        keys = ", ".join(defaults) or "(none)"
        raise AppRefused(f"{err}; the keys of {app_name} are: {keys}") from err


def project_app_simulation(
    module: ModuleType, overrides: UserConfig, config: UserConfig, num_nodes: int
) -> Simulation:
    """Prepare one of this project's apps to run with ``config``, once checked.

    Raises
    ------
    AppRefused
        Where its ``check_config`` refuses a value, ``min-nodes`` exceeds the
        ``num_nodes`` there will be, or ``label-noise-sites`` or ``easy-sites``
        names a site that none of them is.
    """
    if "min-nodes" not in overrides:  # a round must not wait for absent nodes
        config["min-nodes"] = min(config["min-nodes"], num_nodes)
    try:
        module.check_config(config)
        check(
            "min-nodes",
            config["min-nodes"],
            config["min-nodes"] <= num_nodes,
            f"<= --num-supernodes ({num_nodes})",
        )
        if "label-noise-sites" in config:  # an app whose sites share the pool
            SiteShareConfig.from_config(config).check_sites(
                num_nodes, f"--num-supernodes {num_nodes}"
            )
    except ConfigError as err:
        raise AppRefused(str(err)) from err
    return Simulation(
        server_app=module.server_app,
        client_app=module.client_app,
        server_app_context=Context(
            run_id=0, node_id=0, node_config={}, state=RecordDict(), run_config=config
        ),
    )


def flower_app_simulation(
    app: FlowerApp, overrides: UserConfig, config: UserConfig
) -> Simulation:
    """Prepare a Flower app: its components loaded, ``config`` for the ServerApp.

    The nodes see the same run config: each fuses the run's ``overrides`` over
    the folder's defaults.
    """
    server_app = load_component(app, "serverapp", ServerApp)
    client_app = load_component(app, "clientapp", ClientApp)
    run = simulation_run(overrides)
    return Simulation(
        server_app=server_app,
        client_app=client_app,
        server_app_context=Context(
            run_id=run.run_id,
            node_id=0,
            node_config={},
            state=RecordDict(),
            run_config=config,
        ),
        app_dir=str(app.folder),
        run=run,
    )


def load_component(app: FlowerApp, kind: str, expected: type) -> Any:
    """Import ``app``'s ``kind`` component as Flower does, the app folder on sys.path.

    The folder stays on ``sys.path``, so the engine's Ray workers find the app's
    modules too.

    Raises
    ------
    AppRefused
        Where the reference is malformed, names a module or attribute that is not
        there, or an object that is not an ``expected``; or where importing the
        component raises (a module it imports is missing, its code fails) or
        exits, naming what it raised.
    """
    reference = app.components[kind]
    module_name = reference.partition(":")[0]
    try:
        component = load_app(reference, AppRefused, app.folder)
    except AppRefused as err:
        raise AppRefused(f"{kind} of {app.folder}: {err}".rstrip()) from err
    except ModuleNotFoundError as err:
        if f"{module_name}.".startswith(f"{err.name}."):
            raise AppRefused(
                f"{kind} {reference!r}: no module {err.name!r} in {app.folder}"
            ) from err
        raise AppRefused(  # a module the app imports, its dependency missing
            f"{kind} {reference!r} of {app.folder}: {raised_on_import(err)}"
        ) from err
    except (Exception, SystemExit) as err:  # the app's own code failed, or exited
        raise AppRefused(
            f"{kind} {reference!r} of {app.folder}: {raised_on_import(err)}"
        ) from err
    if not isinstance(component, expected):
        raise AppRefused(
            f"{kind} {reference!r} is a {type(component).__name__}, "
            f"not a {expected.__name__}"
        )
    return component


if __name__ == "__main__":
    sys.exit(main())
