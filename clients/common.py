"""What the site and the worker share: their data, the received model, the handler.

A handler built by :func:`make_handler` reads the server's config and model from
the message, loads the node's data and replies with what its ``answer`` returns;
:mod:`clients.site` and :mod:`clients.worker` each give it their own ``answer``,
and each registers it on a user's ClientApp with its own ``add_*_handler``.

The server is someone else's, so its message is read as strictly as the server
reads an upload: first every config key the handler acts on (its ``read_config``,
a :class:`~flwr_select.config.ConfigError` naming the key), then the model's
arrays against the architecture (:func:`received_model`: names, shapes and
dtypes, on torch's ``meta`` device for a built-in model, before a byte of the
real model is allocated). Only then are the node's data loaded.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.common.constant import SType
from torch import nn

from flwr_select.config import ConfigError, check_name, required
from flwr_select.data import SiteData, load_dataset, load_local_site, resolve_data_dir
from flwr_select.messages import (
    CONFIG_KEY,
    MODEL_KEY,
    MODEL_NAME_KEY,
    NUM_CLASSES_KEY,
    check_num_classes,
)
from flwr_select.models import MODELS, build_model
from flwr_select.npy import NpyError, array_from_bytes

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
ConfigReader = Callable[[ConfigRecord], object]
"""``(config) -> anything``: reads every key a handler acts on, strictly; raises
:class:`~flwr_select.config.ConfigError` naming the first key not allowed."""


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


def model_from_config(config: ConfigRecord, *, device: str = "cpu") -> nn.Module:
    """Build the built-in model named by the config's ``model`` and ``num-classes``.

    Both are read strictly (a name of :data:`~flwr_select.models.MODELS`, an int
    in [2, :data:`~flwr_select.messages.MAX_NUM_CLASSES`]). On the
    ``"meta"`` device the model has shapes and dtypes but no memory: what the
    received arrays are checked against before the real one is built.

    Raises
    ------
    flwr_select.config.ConfigError
        Naming ``model`` or ``num-classes``.
    """
    name = required(config, MODEL_NAME_KEY, "str")
    check_name(MODEL_NAME_KEY, name, sorted(MODELS))
    num_classes = required(config, NUM_CLASSES_KEY, "int")
    check_num_classes(num_classes)
    with torch.device(device):
        return build_model(name, num_classes=num_classes)


def message_records(msg: Message) -> tuple[ConfigRecord, ArrayRecord]:
    """Return the server's config and the model's arrays, the records it must hold.

    Raises
    ------
    ValueError
        Naming the record (``config`` or ``arrays``) the message lacks.
    """
    content = msg.content
    for key, records in (
        (CONFIG_KEY, content.config_records),
        (MODEL_KEY, content.array_records),
    ):
        if key not in records:
            raise ValueError(f"the server's message has no {key!r} record")
    return content.config_records[CONFIG_KEY], content.array_records[MODEL_KEY]


def received_model(
    config: ConfigRecord, arrays: ArrayRecord, model_fn: ModelBuilder | None
) -> nn.Module:
    """Return the server's model: ``arrays`` checked, then loaded into a fresh model.

    The architecture is ``model_fn()``'s, or (``model_fn`` None) the built-in
    model the config names (:func:`model_from_config`), first on the ``meta``
    device: every received array must have a parameter's or buffer's name,
    shape and dtype, and each must be there, before the real model is built.
    A config that names a huge model costs nothing unless the arrays of one
    came with it.

    Raises
    ------
    flwr_select.config.ConfigError
        Naming ``model``, ``num-classes``, or the array (``arrays['name']``)
        that is missing, unexpected or not as the architecture has it.
    """
    if model_fn is None:
        expected = model_from_config(config, device="meta").state_dict()
        name, num_classes = config[MODEL_NAME_KEY], config[NUM_CLASSES_KEY]
        check_arrays(arrays, expected, f"model {name!r} with num-classes {num_classes}")
        model = model_from_config(config)
    else:
        model = model_fn()
        check_arrays(arrays, model.state_dict(), "model_fn's model")
    state = model.state_dict()
    model.load_state_dict(
        {name: tensor_of(name, arrays[name], like) for name, like in state.items()}
    )
    return model


def check_arrays(
    arrays: ArrayRecord, expected: Mapping[str, torch.Tensor], architecture: str
) -> None:
    """Refuse arrays that are not exactly the architecture's, by what they declare.

    Every name of ``expected`` and no other, each a NumPy array of its dtype
    and shape. Only what the arrays declare is read; :func:`tensor_of` then
    checks that each array's bytes hold that dtype and shape.

    Raises
    ------
    flwr_select.config.ConfigError
        Naming the array, or the names missing and unexpected (a few of each).
    """
    missing = [name for name in expected if name not in arrays]
    unexpected = [name for name in arrays if name not in expected]
    if missing or unexpected:
        raise ConfigError(
            MODEL_KEY,
            f"missing {missing[:3]}, unexpected {unexpected[:3]}",
            f"the arrays of {architecture}, by name",
        )
    for name, tensor in expected.items():
        array, want = arrays[name], _declared(tensor)
        got = (array.stype, str(array.dtype), tuple(array.shape))
        if got != want:
            raise ConfigError(
                f"{MODEL_KEY}[{name!r}]",
                _describe(got),
                f"{_describe(want)}, as in {architecture}",
            )


def tensor_of(name: str, array: Array, like: torch.Tensor) -> torch.Tensor:
    """Return a received array's values as a tensor of ``like``'s dtype and shape.

    Its ``.npy`` bytes must hold exactly that dtype and shape
    (:func:`flwr_select.npy.array_from_bytes`: nothing is allocated before the
    body is known to be there), whatever the array declares; the tensor is a
    copy, as a model's own.

    Raises
    ------
    flwr_select.config.ConfigError
        Naming the array.
    """
    key, (_, dtype, shape) = f"{MODEL_KEY}[{name!r}]", _declared(like)
    try:
        values = array_from_bytes(array.data, [np.dtype(dtype)])
    except NpyError as err:
        raise ConfigError(key, "bytes", f"a .npy of {dtype} ({err})") from None
    if values.shape != shape:
        raise ConfigError(key, f"bytes of shape {values.shape}", f"of shape {shape}")
    return torch.from_numpy(values.copy())


def _declared(tensor: torch.Tensor) -> tuple[str, str, tuple[int, ...]]:
    """Return what an Array of ``tensor`` declares: stype, NumPy dtype, shape."""
    dtype = torch.empty(0, dtype=tensor.dtype).numpy().dtype
    return (SType.NUMPY, str(dtype), tuple(tensor.shape))


def _describe(declared: tuple[object, ...]) -> str:
    stype, dtype, shape = declared
    kind = "" if stype == SType.NUMPY else f" ({stype})"
    return f"{dtype} of shape {shape}{kind}"


def make_handler(
    answer: Answer,
    load_data: SiteLoader,
    model_fn: ModelBuilder | None,
    read_config: ConfigReader,
) -> Handler:
    """Return a handler that replies with ``answer``'s content.

    In this order, so that a refused message costs the node nothing: the
    config (``read_config``), the model (:func:`received_model`), the data,
    the answer. Whatever is refused raises, naming the key; Flower then sends
    the server an error reply.

    Parameters
    ----------
    answer : callable
        ``(model, data, config, context) -> RecordDict``: the reply's content.
    load_data : callable
        ``(context, config) -> SiteData``: the node's samples.
    model_fn : callable or None
        ``() -> nn.Module``: the architecture the received arrays belong to;
        None: the built-in model the server's config names.
    read_config : callable
        ``(config) -> anything``: reads, strictly, every key ``answer`` and
        the default ``load_data`` act on.
    """

    def handle(msg: Message, context: Context) -> Message:
        config, arrays = message_records(msg)
        read_config(config)
        model = received_model(config, arrays, model_fn)
        content = answer(model, load_data(context, config), config, context)
        return Message(content, reply_to=msg)

    return handle
