"""What the site and the worker share: their data, the received model, the handler.

A handler built by :func:`make_handler` reads the server's config and model from
the message, loads the node's data and replies with what its ``answer`` returns;
:mod:`clients.site` and :mod:`clients.worker` each give it their own ``answer``,
and each registers it on a user's ClientApp with its own ``add_*_handler``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from flwr.app import ConfigRecord, Context, Message, RecordDict
from torch import nn

from flwr_select.data import SiteData, load_dataset, load_local_site, resolve_data_dir
from flwr_select.models import build_model
from flwr_select.selection.protocol import CONFIG_KEY, MODEL_KEY

SiteLoader = Callable[[Context, ConfigRecord], SiteData]
"""``(context, config) -> SiteData``: the samples a node offers or draws from."""
ModelBuilder = Callable[[], nn.Module]
"""``() -> nn.Module``: a fresh model of the architecture the arrays belong to,
as for the strategies. None where accepted: the built-in model the server's
config names (:func:`model_from_config`)."""
Handler = Callable[[Message, Context], Message]
"""A ClientApp's message handler."""
Answer = Callable[[nn.Module, SiteData, ConfigRecord, Context], RecordDict]
"""``(model, data, config, context) -> content``: a handler's reply, computed."""


@functools.lru_cache(maxsize=2)
def cached_training_set(
    dataset: str, data_dir: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return a data set's training images and labels, loaded once per process."""
    return load_dataset(dataset, resolve_data_dir(dataset, data_dir), "train")


@functools.lru_cache(maxsize=2)
def cached_local_site(data_dir: str, num_classes: int) -> SiteData:
    """Return everything in an edge box's data folder, loaded once per process."""
    return load_local_site(data_dir, num_classes)


def edge_box_data(context: Context, num_classes: int) -> SiteData | None:
    """Return everything in the folder of the node config's ``data-dir``, if any.

    An edge box has such a folder (see :func:`~flwr_select.data.load_local_site`);
    a simulated node has none (None): it computes its share of the data set.
    """
    folder = context.node_config.get("data-dir")
    return None if folder is None else cached_local_site(str(folder), num_classes)


def simulated_partition(context: Context) -> tuple[int, int]:
    """Return a simulated node's ``partition-id`` and ``num-partitions``."""
    node = context.node_config
    return int(node["partition-id"]), int(node["num-partitions"])


def model_from_config(config: ConfigRecord) -> nn.Module:
    """Build the built-in model named by the config's ``model`` key."""
    return build_model(str(config["model"]), num_classes=int(config["num-classes"]))


def received_model(
    msg: Message, model_fn: ModelBuilder | None
) -> tuple[ConfigRecord, nn.Module]:
    """Return the server's config and its model, built by ``model_fn`` and loaded.

    ``model_fn`` None: the built-in model the config names (``model`` key).
    """
    config = msg.content.config_records[CONFIG_KEY]
    model = model_from_config(config) if model_fn is None else model_fn()
    model.load_state_dict(msg.content.array_records[MODEL_KEY].to_torch_state_dict())
    return config, model


def make_handler(
    answer: Answer, load_data: SiteLoader, model_fn: ModelBuilder | None
) -> Handler:
    """Return a handler that replies with ``answer``'s content.

    Parameters
    ----------
    answer : callable
        ``(model, data, config, context) -> RecordDict``: the reply's content.
    load_data : callable
        ``(context, config) -> SiteData``: the node's samples.
    model_fn : callable or None
        ``() -> nn.Module``: the architecture the received arrays belong to;
        None: the built-in model the server's config names.
    """

    def handle(msg: Message, context: Context) -> Message:
        config, model = received_model(msg, model_fn)
        content = answer(model, load_data(context, config), config, context)
        return Message(content, reply_to=msg)

    return handle
