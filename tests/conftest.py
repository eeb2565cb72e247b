"""Shared test settings and the real MNIST folder (skipped when absent)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import settings

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
    """Let tests build Flower Messages outside a running app (Flower checks who sends).

    ``TaskIdentity`` is private Flower API; it is touched here and nowhere else.
    """
    from flwr.supercore.task_identity import TaskIdentity

    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    yield
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved


@pytest.fixture(scope="session")
def flower_simulation():
    """Run this project's ``flower-simulation`` command on an app; return the process.

    ``flower_simulation(app, *args)``: the real command of the test's environment,
    quiet about updates and Ray's accelerator variable, output captured.
    """
    command = str(Path(sys.executable).with_name("flower-simulation"))
    env = {
        **os.environ,
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
    }

    def run(app: str, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [command, "--app", app, *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )

    return run
