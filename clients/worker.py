"""The data-parallel worker: gradients of class-biased batches (Sharp 2020).

The handler answers ``train.gradient`` messages, so it can sit beside a user's
own ``@app.train()`` (and beside the sample-selection ``train.select``): build
this module's ``app``, or add the handler to an existing ClientApp with
:func:`add_gradient_handler`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp import ClientApp

from clients.site import (
    ModelBuilder,
    SiteLoader,
    cached_local_site,
    cached_training_set,
    model_from_config,
    received_model,
)
from flwr_select.data import SiteData
from flwr_select.parallel.batches import Sampling
from flwr_select.parallel.gradients import (
    ACTION,
    GRADIENT_KEY,
    DataParallelConfig,
    worker_gradient,
)
from flwr_select.partition import paper_split, site_partition
from flwr_select.selection.protocol import METRICS_KEY


@functools.lru_cache(maxsize=4)
def cached_worker_share(
    dataset: str,
    data_dir: str,
    seed: int,
    validation: int,
    pool: int | None,
    partition_id: int,
    num_partitions: int,
    num_classes: int,
) -> SiteData:
    """Return a simulated worker's share, built once per process (it never changes)."""
    images, labels = cached_training_set(dataset, data_dir)
    split = paper_split(
        len(images), seed=seed, validation=validation, initial=0, pool=pool
    )
    share = torch.from_numpy(site_partition(split.pool, partition_id, num_partitions))
    return SiteData(images[share], labels[share], num_classes, ids=share)


def load_worker_data(context: Context, config: ConfigRecord) -> SiteData:
    """Return the samples this worker draws its batches from.

    On an edge box (node config ``data-dir``): everything in that folder (see
    :func:`~flwr_select.data.load_local_site`). In a simulation: the worker's
    IID share (``partition-id`` of ``num-partitions``) of the training set
    without the server's ``validation-size`` held-out samples (and cut to
    ``pool-size`` if set); the bias is in how batches are drawn, not in the data.
    """
    num_classes = int(config["num-classes"])
    if "data-dir" in context.node_config:
        return cached_local_site(str(context.node_config["data-dir"]), num_classes)
    return cached_worker_share(
        str(config["dataset"]),
        str(config.get("data-dir", "")),
        int(config["seed"]),
        int(config["validation-size"]),
        int(config.get("pool-size", 0)) or None,
        int(context.node_config["partition-id"]),
        int(context.node_config["num-partitions"]),
        num_classes,
    )


def make_gradient_handler(
    load_data: SiteLoader = load_worker_data,
    model_fn: ModelBuilder = model_from_config,
) -> Callable[[Message, Context], Message]:
    """Return the ``train.gradient`` handler, reading data and models as given.

    Parameters
    ----------
    load_data : callable (default: :func:`load_worker_data`)
        ``(context, config) -> SiteData``: the samples batches are drawn from.
    model_fn : callable (default: :func:`~clients.site.model_from_config`)
        ``config -> nn.Module``: the architecture the received arrays belong to.
    """

    def compute_gradient(msg: Message, context: Context) -> Message:
        config, model = received_model(msg, model_fn)
        data = load_data(context, config)
        result = worker_gradient(
            model,
            data.images,
            data.labels,
            DataParallelConfig.from_config(config),
            Sampling.from_config(config),
            num_classes=data.num_classes,
            worker=int(config["worker-index"]),
            num_workers=int(config["num-workers"]),
            server_round=int(config["server-round"]),
            num_rounds=int(config["num-server-rounds"]),
        )
        gradient = ArrayRecord({GRADIENT_KEY: Array(result.gradient.numpy())})
        metrics = MetricRecord(
            {"loss": result.loss, "num-examples": result.num_examples}
        )
        content = RecordDict({GRADIENT_KEY: gradient, METRICS_KEY: metrics})
        return Message(content, reply_to=msg)

    return compute_gradient


def add_gradient_handler(
    app: ClientApp,
    load_data: SiteLoader = load_worker_data,
    model_fn: ModelBuilder = model_from_config,
) -> None:
    """Register the ``train.gradient`` handler on an existing ClientApp."""
    app.train(ACTION)(make_gradient_handler(load_data, model_fn))


app = ClientApp()
"""A ClientApp with only the worker's ``train.gradient`` handler."""
add_gradient_handler(app)
