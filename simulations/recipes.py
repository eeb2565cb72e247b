"""Named recipes: the model and how the server trains it, as run-config values.

One place for them: the Flower apps take their data set's recipe as the
defaults of these keys (``simulations.runner.defaults``), and the paper's
experiments run under one by name (``python -m simulations.paper --recipe``).
"""

from __future__ import annotations

from typing import Any

PAPER_RECIPE: dict[str, Any] = {
    "model": "lenet5",
    "optimizer": "sgd",
    "lr": 0.01,
    "lr-schedule": "constant",
    "warmup": 0.0,
    "augment": "none",
    "max-shift": 2,
    "weight-decay": 0.0,
    "batch-size": 64,
    "initial-epochs": 10,
    "server-epochs": 2,
    "from-scratch": False,
}
"""The recipe before any was measured: LeNet-5 and plain SGD (the paper's model)."""

RECIPES: dict[str, dict[str, Any]] = {
    "paper": PAPER_RECIPE,
    "small-data": {
        **PAPER_RECIPE,
        "model": "lenet5-wide",
        "optimizer": "adam",
        "lr": 0.002,
        "lr-schedule": "cosine",
        "warmup": 0.3,
        "augment": "translate",
        "initial-epochs": 30,
        "server-epochs": 5,
    },
    "cifar10": {**PAPER_RECIPE, "model": "cifar-cnn", "initial-epochs": 20},
    "quick": {**PAPER_RECIPE, "lr": 0.05, "initial-epochs": 5, "server-epochs": 1},
}
"""Named training recipes: the run-config values of the model and its training.

``small-data``: chosen by measurement on MNIST (README, "The central trainer"),
the default of MNIST and Fashion-MNIST. ``paper``: the one before it.
``cifar10``: the paper's CNN, unmeasured here (CIFAR-10 cannot be had on these
machines). ``quick``: the paper runner's ``--short`` mode and the tests.
"""

DATASET_RECIPES = {
    "mnist": "small-data",
    "fashion-mnist": "small-data",
    "cifar10": "cifar10",
}
"""The recipe each data set's app and experiments use by default."""
