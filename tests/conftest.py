"""Shared test settings and the real MNIST folder (skipped when absent)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import settings

from flwr_select import flower_private

# Derandomized: CI runs the same examples every time, so a failure is reproducible.
settings.register_profile("project", deadline=None, derandomize=True, max_examples=150)
settings.load_profile("project")

MNIST_DIR = Path(
    os.environ.get(
        "FLWR_SELECT_TEST_MNIST",
        Path(__file__).resolve().parents[1] / "../shared/data/mnist",
    )
)


@pytest.fixture(scope="session")
def mnist_dir() -> Path:
    if not (MNIST_DIR / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip(f"real MNIST not found at {MNIST_DIR} (set FLWR_SELECT_TEST_MNIST)")
    return MNIST_DIR


@pytest.fixture
def task_identity():
    """Let tests build Flower Messages outside a running app (Flower checks who sends)."""
    with flower_private.task_identity():
        yield


@pytest.fixture(scope="session")
def flower_simulation_command() -> tuple[list[str], dict[str, str]]:
    """The real ``flower-simulation`` of the test's environment and its environment.

    Quiet about updates and Ray's accelerator variable; the repository root is on
    the path, so test apps (``tests.crashing_site``) can be named with ``--app``.
    """
    root = Path(__file__).resolve().parents[1]
    env = {
        **os.environ,
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
        "PYTHONPATH": os.pathsep.join(
            filter(None, [str(root), os.environ.get("PYTHONPATH")])
        ),
    }
    return [str(Path(sys.executable).with_name("flower-simulation"))], env


@pytest.fixture(scope="session")
def flower_simulation(flower_simulation_command):
    """Run this project's ``flower-simulation`` command on an app; return the process.

    ``flower_simulation(app, *args, env={...})``: output captured; ``env`` adds
    environment variables.
    """
    command, base_env = flower_simulation_command

    def run(
        app: str, *args: str, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess:
        return subprocess.run(
            [*command, "--app", app, *args],
            env={**base_env, **(env or {})},
            capture_output=True,
            text=True,
            timeout=600,
        )

    return run


@pytest.fixture
def refusal(monkeypatch, capsys):
    """Run ``flower-simulation``'s ``main`` in this process; return its refusal.

    ``refusal(*argv)`` expects argparse's exit 2 and returns the error message
    (what follows ``flower-simulation: error: ``). An engine start fails the test:
    what is asserted is that the command refuses before any engine starts. One
    real-process refusal (``tests/test_simulation.py``) shows the same through the
    installed command.
    """
    from simulations import cli

    def no_engine(**_):
        raise AssertionError("the engine started")

    monkeypatch.setattr(cli, "_run_simulation", no_engine)

    def refuse(*argv: str) -> str:
        with pytest.raises(SystemExit) as exit:
            cli.main(list(argv))
        assert exit.value.code == 2
        return capsys.readouterr().err.split("flower-simulation: error: ")[-1]

    return refuse
