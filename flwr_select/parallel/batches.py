"""Class-biased batch sampling for data-parallel workers (Sharp 2020).

Conventional data parallelism gives every worker batches drawn uniformly from its
data, so each batch mirrors the class frequencies of the data. A biased
distribution instead draws a share ``bias`` of every batch from classes the
worker favours, so the workers see different class mixes and the server's
reduction combines gradients that disagree. Every draw is a pure function of
``(seed, worker, step)``: the same config and data give the same batches.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from flwr_select.config import RunConfigFields, check, check_name

DISTRIBUTIONS = ("uniform", "favoured", "dirichlet")
"""``uniform``: batches mirror the data; ``favoured``: a share ``bias`` of each
batch comes from the worker's favoured classes; ``dirichlet``: the batch's class
mix is drawn once per worker from Dirichlet(``alpha``), blended in with ``bias``."""
SCHEDULES = ("constant", "linear-decay", "linear-growth")
"""How the bias changes over ``total_steps``: kept, decayed to 0, grown from 0."""


@dataclass(frozen=True)
class WorkerStep:
    """Whose batch, and when: a worker of ``num_workers`` at a step of ``total_steps``.

    Steps count from 0 over the whole run (all rounds' local steps), so the
    bias schedule and the draws' seeds follow the run, not the round.
    """

    worker: int
    num_workers: int
    step: int
    total_steps: int


@dataclass(frozen=True)
class Sampling(RunConfigFields):
    """A worker's batch distribution over classes; validated when built.

    The class mix of a batch at a given step is
    ``(1 - b) * frequencies + b * target``, where ``frequencies`` are the class
    frequencies of the worker's data (what uniform sampling gives), ``target``
    the worker's biased mix and ``b`` the scheduled bias.

    Parameters
    ----------
    sampling : str (default: "uniform")
        A name from :data:`DISTRIBUTIONS`.
    bias : float (default: 0.5)
        Share of each batch drawn from the biased mix, in [0, 1]; 0 is uniform.
    favoured_classes : int (default: 0)
        Classes each worker favours under ``favoured``. 0: the classes ``c``
        with ``c % num_workers == worker``, so together the workers cover every
        class once; k > 0: the k classes starting at ``worker * k`` (mod the
        number of classes).
    alpha : float (default: 0.5)
        Concentration of the ``dirichlet`` mix (smaller: more skewed).
    bias_schedule : str (default: "constant")
        A name from :data:`SCHEDULES`.
    seed : int (default: 0)
        Seeds the draws; >= 0.

    Raises
    ------
    flwr_select.config.ConfigError
        If a value is not allowed, naming the run-config key.
    """

    sampling: str = "uniform"
    bias: float = 0.5
    favoured_classes: int = 0
    alpha: float = 0.5
    bias_schedule: str = "constant"
    seed: int = 0

    def __post_init__(self) -> None:
        check_name("sampling", self.sampling, DISTRIBUTIONS)
        check_name("bias-schedule", self.bias_schedule, SCHEDULES)
        check("bias", self.bias, 0.0 <= self.bias <= 1.0, "in [0, 1]")
        check(
            "favoured-classes",
            self.favoured_classes,
            self.favoured_classes >= 0,
            ">= 0",
        )
        check("alpha", self.alpha, self.alpha > 0, "> 0")
        check("seed", self.seed, self.seed >= 0, ">= 0")

    def bias_at(self, step: int, total_steps: int) -> float:
        """Return the scheduled bias at ``step`` of ``total_steps`` (0-based)."""
        if self.sampling == "uniform":
            return 0.0
        progress = min(step / max(total_steps - 1, 1), 1.0)
        if self.bias_schedule == "linear-decay":
            return self.bias * (1.0 - progress)
        if self.bias_schedule == "linear-growth":
            return self.bias * progress
        return self.bias

    def favoured(self, worker: int, num_workers: int, num_classes: int) -> np.ndarray:
        """Return the classes ``worker`` favours under ``favoured`` (sorted)."""
        if self.favoured_classes == 0:
            return np.arange(worker % num_workers, num_classes, num_workers)
        start = worker * self.favoured_classes
        count = min(self.favoured_classes, num_classes)
        return np.sort((start + np.arange(count)) % num_classes)

    def target(self, worker: int, num_workers: int, num_classes: int) -> np.ndarray:
        """Return the worker's biased class mix (sums to 1)."""
        if self.sampling == "dirichlet":
            rng = np.random.default_rng([self.seed, worker, 0xD1])
            return rng.dirichlet(np.full(num_classes, self.alpha))
        mix = np.zeros(num_classes)
        classes = self.favoured(worker, num_workers, num_classes)
        if len(classes) == 0:  # more workers than classes: this one favours none
            return np.full(num_classes, 1.0 / num_classes)
        mix[classes] = 1.0 / len(classes)
        return mix

    def class_mix(
        self, labels: np.ndarray, num_classes: int, at: WorkerStep
    ) -> np.ndarray:
        """Return the probability of each class in the batch of ``at``.

        Classes the worker has no sample of get probability 0 (the rest is
        renormalised; with none of its target classes at full bias, the data's
        own frequencies), so a batch can always be filled.
        """
        counts = np.bincount(labels, minlength=num_classes)[:num_classes]
        if counts.sum() == 0:
            raise ValueError("the worker has no samples to draw a batch from")
        bias = self.bias_at(at.step, at.total_steps)
        mix = (1.0 - bias) * counts / counts.sum()
        mix = mix + bias * self.target(at.worker, at.num_workers, num_classes)
        mix[counts == 0] = 0.0
        if mix.sum() == 0:  # all bias, and none of the target classes here
            mix = counts.astype(np.float64)
        return mix / mix.sum()

    def draw(
        self, labels: np.ndarray, batch_size: int, num_classes: int, at: WorkerStep
    ) -> np.ndarray:
        """Return the positions (into ``labels``) of the batch of ``at``.

        Class counts are drawn from :meth:`class_mix` (multinomial), then samples
        uniformly within each class, without replacement while a class has
        enough samples. Deterministic in ``(seed, worker, step)``.
        """
        labels = np.asarray(labels, dtype=np.int64)
        if batch_size < 1:
            raise ValueError(f"batch-size must be >= 1, got {batch_size}")
        rng = np.random.default_rng([self.seed, at.worker, at.step])
        if self.bias_at(at.step, at.total_steps) == 0.0:
            return rng.choice(len(labels), batch_size, replace=batch_size > len(labels))
        mix = self.class_mix(labels, num_classes, at)
        counts = rng.multinomial(batch_size, mix)
        chosen = []
        for cls in np.flatnonzero(counts):
            members = np.flatnonzero(labels == cls)
            chosen.append(
                rng.choice(members, counts[cls], replace=counts[cls] > len(members))
            )
        return rng.permutation(np.concatenate(chosen))
