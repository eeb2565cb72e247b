"""``flower-simulation`` runs any Flower app, found and configured as ``flwr run`` does.

The app here is a real one, written into a temporary folder: its ServerApp sends
one message to each node and writes the replies and its run config to the file
its ``out-file`` names; each ClientApp replies with its partition and the
``scale`` of its own run config, so the file shows what the nodes saw too.
"""

import ast
import importlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from flwr_select.selection.policies import POLICIES
from simulations import cli

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "tinyflowerapp"

PYPROJECT = f"""
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "{PACKAGE}"
version = "1.0.0"

[tool.flwr.app]
publisher = "flwr-select-tests"

[tool.flwr.app.components]
serverapp = "{PACKAGE}.server_app:app"
clientapp = "{PACKAGE}.client_app:app"

[tool.flwr.app.config]
num-server-rounds = 1
scale = 1.0
out-file = ""

[tool.flwr.app.config.model]
width = 8
"""

SERVER_APP = """
import json
import time
from pathlib import Path

from flwr.app import Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    deadline = time.monotonic() + 60  # the engine registers nodes after this starts
    while len(nodes := list(grid.get_node_ids())) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    messages = [Message(RecordDict(), dst_node_id=n, message_type="train") for n in nodes]
    replies = grid.send_and_receive(messages)
    Path(context.run_config["out-file"]).write_text(
        json.dumps(
            {
                "run_config": dict(context.run_config),
                "replies": [dict(reply.content["metrics"]) for reply in replies],
            }
        )
    )
"""

CLIENT_APP = """
from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    seen = {
        "partition-id": context.node_config["partition-id"],
        "scale": context.run_config["scale"],
    }
    return Message(RecordDict({"metrics": MetricRecord(seen)}), reply_to=msg)
"""


@pytest.fixture(scope="module")
def app_folder(tmp_path_factory) -> Path:
    """A Flower app folder: ``pyproject.toml`` and package ``tinyflowerapp``."""
    folder = tmp_path_factory.mktemp("app")
    (folder / "pyproject.toml").write_text(PYPROJECT)
    (folder / PACKAGE).mkdir()
    (folder / PACKAGE / "__init__.py").write_text("")
    (folder / PACKAGE / "server_app.py").write_text(textwrap.dedent(SERVER_APP))
    (folder / PACKAGE / "client_app.py").write_text(textwrap.dedent(CLIENT_APP))
    return folder


@pytest.fixture
def run_app(flower_simulation_command, tmp_path):
    """Run ``flower-simulation --app APP`` in ``cwd``; return what the ServerApp wrote."""
    command, env = flower_simulation_command

    def run(app: str, run_config: str, cwd: Path) -> dict:
        out_file = tmp_path / "seen.json"
        done = subprocess.run(
            [
                *command,
                "--app",
                app,
                "--run-config",
                f'{run_config} out-file="{out_file}"',
            ],
            cwd=cwd,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert done.returncode == 0, done.stderr[-3000:]
        return json.loads(out_file.read_text())

    return run


def test_an_app_folder_runs_its_defaults_under_the_overrides_on_every_node(
    app_folder, run_app, tmp_path
):
    # Execute: from elsewhere, the folder named
    seen = run_app(str(app_folder), "scale=2.5", cwd=tmp_path)

    # Assert: both nodes replied; the override beat the pyproject's default on the
    # ServerApp and on the nodes; the nested table became a dotted key
    replies = sorted(seen["replies"], key=lambda reply: reply["partition-id"])
    assert replies == [
        {"partition-id": 0, "scale": 2.5},
        {"partition-id": 1, "scale": 2.5},
    ]
    assert seen["run_config"] == {
        "num-server-rounds": 1,
        "scale": 2.5,
        "out-file": str(tmp_path / "seen.json"),
        "model.width": 8,
    }


def test_an_apps_package_named_in_the_app_folder_runs_that_app(app_folder, run_app):
    # Execute: the package is not importable; the current directory's pyproject
    # declares its components
    seen = run_app(PACKAGE, "model.width=16", cwd=app_folder)

    # Assert
    assert sorted(reply["partition-id"] for reply in seen["replies"]) == [0, 1]
    assert {reply["scale"] for reply in seen["replies"]} == {1.0}
    assert seen["run_config"]["model.width"] == 16


@pytest.fixture
def importable_app(app_folder, monkeypatch):
    """The app's package on ``sys.path``, forgotten again after the test."""
    monkeypatch.syspath_prepend(str(app_folder))
    yield app_folder
    for name in [name for name in sys.modules if name.split(".")[0] == PACKAGE]:
        del sys.modules[name]


@pytest.mark.parametrize("module", [PACKAGE, f"{PACKAGE}.client_app"])
def test_an_importable_module_of_an_app_finds_the_pyproject_above_it(
    importable_app, monkeypatch, tmp_path, module
):
    # Prepare: the current directory holds no app
    monkeypatch.chdir(tmp_path)

    # Execute
    app = cli.find_app(module)

    # Assert
    assert app.folder == importable_app.resolve()
    assert app.defaults == {
        "num-server-rounds": 1,
        "scale": 1.0,
        "out-file": "",
        "model.width": 8,
    }


@pytest.mark.parametrize(
    ("app", "run_config", "messages"),
    [
        (
            "{app_folder}",
            "scal=2",
            [
                "Key 'scal' is not present",
                "are: num-server-rounds, scale, out-file, model.width",
            ],
        ),
        (
            "flwr_select.config",  # a module of this project, but no app
            "",
            ["--app 'flwr_select.config' is not an app: it lacks server_app"],
        ),
        (
            "no_such_app_module",
            "",
            ["--app 'no_such_app_module' is not an app: cannot import it"],
        ),
    ],
)
def test_what_cannot_run_is_refused_before_the_engine_starts(
    app_folder, refusal, app, run_config, messages
):
    # Execute
    error = refusal(
        "--app", app.format(app_folder=app_folder), "--run-config", run_config
    )

    # Assert: argparse's refusal, naming what runs where it is the app that is refused
    assert all(message in error for message in messages), error
    if "is not an app" in error:
        assert (
            f"runs this project's app modules ({', '.join(cli.PROJECT_APPS)})" in error
        )
        assert (
            "a Flower app folder (its pyproject.toml has [tool.flwr.app.components])"
            in error
        )


def test_the_project_apps_named_in_refusals_are_the_modules_with_defaults():
    # Prepare: the modules of simulations/ that assign DEFAULTS at top level
    with_defaults = {
        f"simulations.{path.stem}"
        for path in (ROOT / "simulations").glob("*.py")
        if any(
            isinstance(node, ast.Assign)
            and any(
                getattr(target, "id", None) == "DEFAULTS" for target in node.targets
            )
            for node in ast.parse(path.read_text()).body
        )
    }

    # Assert
    assert set(cli.PROJECT_APPS) == with_defaults


def test_the_sites_experiment_refuses_a_bad_noisy_site_list_before_any_run(
    monkeypatch, capsys
):
    from simulations import sites

    monkeypatch.setattr(sites, "run_sites", lambda *_, **__: pytest.fail("it ran"))
    with pytest.raises(SystemExit) as exit:
        sites.main(["--label-noise", "0.3", "--noisy-sites", "0,x"])
    assert exit.value.code == 2
    assert "label-noise-sites must be" in capsys.readouterr().err


def refused_in_its_own_process(done: subprocess.CompletedProcess) -> str:
    """Return the one-line refusal of a real ``flower-simulation`` run.

    Asserts argparse's exit status 2, no traceback, and that no engine started.
    """
    assert done.returncode == 2, done.stderr[-3000:]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    assert "Starting" not in done.stdout + done.stderr
    refusal = done.stderr.split("flower-simulation: error: ")[-1]
    assert refusal.count("\n") == 1  # one line, ended
    return refusal.strip()


@pytest.mark.parametrize(
    ("flag", "value", "allowed"),
    [
        ("--num-supernodes", "1000000000", "<= 10000 (the most virtual sites"),
        ("--num-cpus", "-1.0", "a finite number > 0"),
        ("--num-cpus", "nan", "a finite number > 0"),
        ("--num-gpus", "-0.5", "a finite number >= 0"),
        ("--num-gpus", "inf", "a finite number >= 0"),
    ],
)
def test_a_flag_out_of_its_range_is_refused_naming_it(
    flower_simulation, flag, value, allowed
):
    # Execute: the installed command, in its own process
    done = flower_simulation("simulations.mnist", flag, value)
    # Assert: the flag, what is allowed and the value given
    refusal = refused_in_its_own_process(done)
    assert refusal.startswith(f"{flag} must be {allowed}"), refusal
    assert refusal.endswith(f", got {value}"), refusal


RAISING_AT_IMPORT = {
    "raising_app": 'raise RuntimeError("no GPU here\\nsecond line")',
    "exiting_app": "raise SystemExit(0)",
}
"""App modules whose import raises: an error, and an exit that claims success."""


@pytest.mark.parametrize(
    ("module", "raised"),
    [
        ("raising_app", "RuntimeError: no GPU here"),
        ("exiting_app", "SystemExit: 0"),
    ],
)
def test_an_app_that_raises_at_import_is_refused_naming_it_and_the_exception(
    flower_simulation, tmp_path, module, raised
):
    # Prepare: the module on the path, before the repository root
    (tmp_path / f"{module}.py").write_text(RAISING_AT_IMPORT[module] + "\n")
    path = os.pathsep.join([str(tmp_path), str(ROOT)])
    # Execute
    done = flower_simulation(module, env={"PYTHONPATH": path})
    # Assert: exit 2 and one line, not a traceback or a silent success
    assert refused_in_its_own_process(done) == (
        f"--app {module!r}: importing it raised {raised}; nothing ran"
    )


def test_a_flower_apps_component_that_raises_at_import_is_refused(
    flower_simulation, tmp_path
):
    # Prepare: a Flower app folder whose ServerApp module raises
    package = "brokenflowerapp"
    (tmp_path / "pyproject.toml").write_text(PYPROJECT.replace(PACKAGE, package))
    (tmp_path / package).mkdir()
    (tmp_path / package / "__init__.py").write_text("")
    (tmp_path / package / "server_app.py").write_text('raise KeyError("weights")\n')
    (tmp_path / package / "client_app.py").write_text(textwrap.dedent(CLIENT_APP))
    # Execute
    done = flower_simulation(str(tmp_path))
    # Assert
    assert refused_in_its_own_process(done) == (
        f"serverapp '{package}.server_app:app' of {tmp_path.resolve()}: "
        "importing it raised KeyError: 'weights'; nothing ran"
    )


@pytest.mark.parametrize(
    ("run_config", "refusal"),
    [
        (
            "num-server-rounds=9223372036854775808",  # 2**63: beyond int64
            "num-server-rounds must be >= 1 and <= 100000, got 9223372036854775808",
        ),
        (
            'label-noise=0.3 label-noise-sites="0,2"',
            "label-noise-sites must be partition ids in [0, 2), the sites there "
            "are (--num-supernodes 2), got '0,2'",
        ),
    ],
)
def test_a_run_config_the_sites_cannot_honour_is_refused_before_anything_starts(
    flower_simulation, run_config, refusal
):
    # Execute: two sites, the default
    done = flower_simulation("simulations.mnist", "--run-config", run_config)
    # Assert
    assert refused_in_its_own_process(done) == refusal


@pytest.mark.parametrize("app", cli.PROJECT_APPS)
def test_every_key_of_a_project_app_says_what_it_means(app):
    # Prepare
    module = importlib.import_module(app)
    # Execute: the help text, as --help shows it
    shown = cli.run_config_help(app)
    # Assert: every key with its default and a meaning from its dataclass
    lines = shown.splitlines()
    for key, default in module.DEFAULTS.items():
        at = lines.index(f"  {key} = {json.dumps(default)}")
        assert lines[at + 1].startswith("      "), f"{key} has no meaning"


def test_help_lists_the_apps_keys_and_what_names_they_take(flower_simulation):
    # Execute: the real command, as a newcomer types it
    done = flower_simulation("simulations.mnist", "--help")
    # Assert: the names a key takes are read from the code that checks them
    assert done.returncode == 0, done.stderr[-3000:]
    assert "run-config keys of simulations.mnist" in done.stdout
    assert "rho = 0.05\n      Fraction of a site's samples" in done.stdout
    policies = ", ".join(sorted(POLICIES))
    assert f"POLICIES ({policies})" in " ".join(done.stdout.split())
