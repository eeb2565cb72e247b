"""The data-parallel server without Flower: check each gradient, reduce, step.

:class:`DataParallelServer` is the parameter server of Sharp's baseline: each
round it checks every worker's gradient without trusting a byte
(:meth:`~DataParallelServer.check_gradient`), reduces the valid ones with the
configured reduction and takes one optimizer step. The Flower strategy
(``strategies.data_parallel``) adds messages and node sampling on top; the
in-process experiment (``simulations.biased``) drives it directly. Messages go
to the ``flwr.parallel`` logger, under Flower's own.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping

import numpy as np
import torch
from flwr.app import ArrayRecord
from torch import nn

from flwr_select.npy import NpyError, array_from_bytes
from flwr_select.parallel.batches import Sampling
from flwr_select.parallel.gradients import (
    GRADIENT_KEY,
    DataParallelConfig,
    WorkerGradient,
    apply_gradient,
    combine,
    num_parameters,
)
from flwr_select.parallel.monitors import grad_norm_gap
from flwr_select.trainer import TrainConfig

logger = logging.getLogger("flwr.parallel")


class GradientError(ValueError):
    """A worker's reply is not a usable gradient; the message says why."""


class DataParallelServer:
    """Synchronous data-parallel SGD: one reduced gradient, one step, per round.

    Parameters
    ----------
    model_fn : callable
        Returns a fresh model (the architecture the arrays belong to).
    config : DataParallelConfig (default: DataParallelConfig())
        The reduction and the workers' batches.
    sampling : Sampling (default: Sampling())
        The workers' batch distribution over classes.
    optimizer : TrainConfig (default: TrainConfig(lr=0.01))
        The server's optimizer (its ``optimizer``, ``lr``, ``momentum``,
        ``weight_decay``); the state persists across rounds.
    """

    def __init__(
        self,
        model_fn: Callable[[], nn.Module],
        *,
        config: DataParallelConfig | None = None,
        sampling: Sampling | None = None,
        optimizer: TrainConfig | None = None,
    ) -> None:
        self.config = config or DataParallelConfig()
        self.sampling = sampling or Sampling()
        self.model = model_fn()
        self.optimizer = (optimizer or TrainConfig()).make_optimizer(self.model)
        self.rounds: dict[int, dict[str, float | int | list[float]]] = {}
        """Metrics of every round (what :meth:`step` returned, with the counts)."""

    def check_gradient(
        self, record: ArrayRecord, metrics: Mapping[str, object]
    ) -> WorkerGradient:
        """Return a worker's gradient, or raise ``GradientError`` saying why.

        ``record`` holds exactly the one flat float32 gradient of the model's
        size (a ``.npy`` of exactly that, read without trusting its header:
        :func:`~flwr_select.npy.array_from_bytes`), finite; ``metrics`` exactly
        ``loss`` (a finite float >= 0) and ``num-examples`` (an int >= 1).
        """
        if list(record) != [GRADIENT_KEY]:
            raise GradientError(f"the gradient record holds {list(record)}")
        array = record[GRADIENT_KEY]
        expected = (num_parameters(self.model),)
        if (array.stype, array.dtype, tuple(array.shape)) != (
            "numpy.ndarray",
            "float32",
            expected,
        ):
            raise GradientError(
                f"gradient of dtype {array.dtype} and shape {array.shape} "
                f"({array.stype!r}), expected float32 of shape {expected}"
            )
        try:
            values = array_from_bytes(array.data, [np.dtype(np.float32)])
        except NpyError as err:
            raise GradientError(
                f"the gradient is not a readable array: {err}"
            ) from None
        if values.shape != expected:
            raise GradientError(f"the gradient's data has shape {values.shape}")
        gradient = torch.from_numpy(values.copy())
        if not gradient.isfinite().all():
            raise GradientError("the gradient holds NaN or inf")
        if set(metrics) != {"loss", "num-examples"}:
            raise GradientError(
                f"the metrics hold loss and num-examples; got {sorted(metrics)}"
            )
        loss, examples = metrics["loss"], metrics["num-examples"]
        if type(loss) is not float or not np.isfinite(loss) or loss < 0:
            raise GradientError(f"loss must be a finite float >= 0, got {loss!r}")
        if type(examples) is not int or examples < 1:
            raise GradientError(f"num-examples must be an int >= 1, got {examples!r}")
        return WorkerGradient(gradient, loss, examples)

    def step(
        self, server_round: int, updates: list[WorkerGradient]
    ) -> dict[str, float | int | list[float]]:
        """Reduce ``updates`` and take one optimizer step; return the metrics.

        With no update the model is unchanged and the metrics say so
        (``workers-accepted`` is 0, no ``train-loss``).
        """
        metrics: dict[str, float | int | list[float]] = {
            "workers-accepted": len(updates)
        }
        if not updates:
            logger.warning(
                "round %s: no valid gradient; the model is unchanged", server_round
            )
            return metrics
        reduced, grads = combine(self.config, updates)
        apply_gradient(self.model, self.optimizer, reduced)
        metrics.update(
            {
                "train-loss": float(np.mean([u.loss for u in updates])),
                "grad-norm-gap": grad_norm_gap(grads),
                "grad-norms": grads.norm(dim=1).tolist(),
                "update-norm": float(reduced.norm()),
            }
        )
        return metrics
