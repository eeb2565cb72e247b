"""The data-parallel worker: gradients of class-biased batches (Sharp 2020).

The handler answers ``train.gradient`` messages, so it can sit beside a user's
own ``@app.train()`` (and beside the sample-selection ``train.select``): build
this module's ``app``, or add the handler to an existing ClientApp with
:func:`add_gradient_handler`.

The handler reads the server's message as the site's does (see
:mod:`clients.common`): the round, the workers and the classes strictly
(:class:`WorkerRequest`), the model's arrays against the architecture before
the model is built.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from torch import nn

from clients import common
from flwr_select.config import RunConfigFields, check
from flwr_select.data import SiteData
from flwr_select.messages import (
    MAX_ROUND,
    METRICS_KEY,
    ROUND_KEY,
    check_num_classes,
)
from flwr_select.parallel.batches import Sampling
from flwr_select.parallel.gradients import (
    ACTION,
    GRADIENT_KEY,
    DataParallelConfig,
    worker_gradient,
)
from flwr_select.partition import ShareConfig, site_partition

MAX_WORKERS = 100_000
"""The most workers a node takes a share of: far above any federation, and few
enough that splitting the pool into that many shares stays small."""


@dataclass(frozen=True)
class WorkerRequest(RunConfigFields):
    """What a ``train.gradient`` message asks of a worker, read strictly.

    Every field is a required config key (``server-round``...), an int:
    ``server_round`` and ``num_server_rounds`` in [1,
    :data:`~flwr_select.messages.MAX_ROUND`], ``num_workers`` in [1,
    :data:`MAX_WORKERS`], ``worker_index`` in [0, num-workers) and
    ``num_classes`` in [2, :data:`~flwr_select.messages.MAX_NUM_CLASSES`].

    Raises
    ------
    flwr_select.config.ConfigError
        If a key is missing, or its value is not an int or out of range.
    """

    server_round: int
    num_server_rounds: int
    worker_index: int
    num_workers: int
    num_classes: int

    def __post_init__(self) -> None:
        for key, value in (
            (ROUND_KEY, self.server_round),
            ("num-server-rounds", self.num_server_rounds),
        ):
            check(key, value, 1 <= value <= MAX_ROUND, f"in [1, {MAX_ROUND}]")
        workers = self.num_workers
        check(
            "num-workers",
            workers,
            1 <= workers <= MAX_WORKERS,
            f"in [1, {MAX_WORKERS}]",
        )
        check(
            "worker-index",
            self.worker_index,
            0 <= self.worker_index < workers,
            f"in [0, {workers}) (num-workers)",
        )
        check_num_classes(self.num_classes)


@functools.lru_cache(maxsize=4)
def cached_worker_share(
    share: ShareConfig, seed: int, worker: int, num_workers: int, num_classes: int
) -> SiteData:
    """Return a simulated worker's share, built once per process (it never changes)."""
    images, labels = common.cached_training_set(share.dataset, share.data_dir)
    pool = share.split(len(images), seed=seed).pool
    ids = torch.from_numpy(site_partition(pool, worker, num_workers))
    return SiteData(images[ids], labels[ids], num_classes, ids=ids)


def load_worker_data(context: Context, config: ConfigRecord) -> SiteData:
    """Return the samples this worker draws its batches from.

    On an edge box (node config ``data-dir``): everything in that folder (see
    :func:`~flwr_select.data.load_local_site`). In a simulation: share
    ``worker-index`` of ``num-workers`` (the server's numbering, not the node's
    ``partition-id``) of the training set without the server's
    ``validation-size`` held-out samples (and cut to ``pool-size`` if set), as
    the config's :class:`~flwr_select.partition.ShareConfig` describes. Workers
    are interchangeable: whichever node the engine makes worker ``i`` (its node
    ids are new every run), worker ``i`` holds the same samples, so a seeded run
    gives the same gradients. The bias is in how batches are drawn, not in the
    data.
    """
    request = WorkerRequest.from_config(config)
    local = common.edge_box_data(context, request.num_classes)
    if local is not None:
        return local
    share, seed = ShareConfig.from_config(config), Sampling.from_config(config).seed
    return cached_worker_share(
        share, seed, request.worker_index, request.num_workers, request.num_classes
    )


def make_gradient_handler(
    load_data: common.SiteLoader = load_worker_data,
    model_fn: common.ModelBuilder | None = None,
) -> common.Handler:
    """Return the ``train.gradient`` handler: :func:`gradient_reply`.

    Parameters
    ----------
    load_data : SiteLoader (default: :func:`load_worker_data`)
        The samples the worker draws its batches from.
    model_fn : callable, optional
        ``() -> nn.Module``, as the strategy's: the architecture the received
        arrays belong to. Default: the built-in model the server's config names.
    """
    return common.make_handler(gradient_reply, load_data, model_fn, read_config)


def read_config(config: ConfigRecord) -> None:
    """Read every key a worker acts on, strictly, before anything is built.

    Raises
    ------
    flwr_select.config.ConfigError
        Naming the first key whose value is missing or not allowed.
    """
    WorkerRequest.from_config(config)
    DataParallelConfig.from_config(config)
    Sampling.from_config(config)


def gradient_reply(
    model: nn.Module, data: SiteData, config: ConfigRecord, context: Context
) -> RecordDict:
    """Answer a ``train.gradient`` message: the gradient of the worker's batches."""
    request = WorkerRequest.from_config(config)
    result = worker_gradient(
        model,
        data.images,
        data.labels,
        DataParallelConfig.from_config(config),
        Sampling.from_config(config),
        num_classes=data.num_classes,
        worker=request.worker_index,
        num_workers=request.num_workers,
        server_round=request.server_round,
        num_rounds=request.num_server_rounds,
    )
    gradient = ArrayRecord({GRADIENT_KEY: Array(result.gradient.numpy())})
    metrics = MetricRecord({"loss": result.loss, "num-examples": result.num_examples})
    return RecordDict({GRADIENT_KEY: gradient, METRICS_KEY: metrics})


def add_gradient_handler(
    app: ClientApp,
    load_data: common.SiteLoader = load_worker_data,
    model_fn: common.ModelBuilder | None = None,
) -> None:
    """Register the ``train.gradient`` handler on an existing ClientApp.

    It answers beside the app's other handlers; ``load_data`` and ``model_fn``
    are :func:`make_gradient_handler`'s.
    """
    app.train(ACTION)(make_gradient_handler(load_data, model_fn))


app = ClientApp()
"""A ClientApp with only the worker's ``train.gradient`` handler."""
add_gradient_handler(app)
