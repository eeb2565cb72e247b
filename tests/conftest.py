"""Shared test settings and the real MNIST folder (skipped when absent)."""

import os
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
