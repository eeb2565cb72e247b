"""The remote site: trial-test the received model, select, upload raw samples.

The handler answers ``train.select`` messages, so it can sit beside a user's own
``@app.train()``: build this module's ``app``, or add the handler to an existing
ClientApp with :func:`add_select_handler`. What the site has sent is kept in its
ledger (:class:`SiteLedger`): in the node's context state in a simulation, in a
file beside its data on an edge box, so that a restarted site sends nothing twice.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
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
from torch import nn

from flwr_select.data import (
    SiteData,
    load_dataset,
    load_local_site,
    resolve_data_dir,
)
from flwr_select.files import write_atomically
from flwr_select.models import build_model
from flwr_select.npy import read_npz
from flwr_select.partition import paper_split, partition_pool, round_fold
from flwr_select.selection.buffer import default_device
from flwr_select.selection.ledger import SiteLedger
from flwr_select.selection.policies import select
from flwr_select.selection.protocol import (
    ACTION,
    CONFIG_KEY,
    METRICS_KEY,
    MODEL_KEY,
    UNDELIVERED_KEY,
    UPLOAD_KEY,
    SelectionConfig,
)
from flwr_select.selection.trial import trial_test
from flwr_select.selection.wire import pack, wire_bytes

LEDGER_KEY = "flwr_select.sent-ids"
"""Key of the ArrayRecord in the node's context state that holds the ledger."""
LEDGER_FILE = "sent-ids.npz"
"""The ledger's file in an edge box's ``state-dir`` (default: its ``data-dir``)."""

SiteLoader = Callable[[Context, ConfigRecord], SiteData]
ModelBuilder = Callable[[ConfigRecord], nn.Module]


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


@functools.lru_cache(maxsize=4)
def _site_share(
    dataset: str,
    data_dir: str,
    seed: int,
    sizes: tuple[int, int, int | None],
    partitioner: str,
    alpha: float,
    partition_id: int,
    num_partitions: int,
    num_rounds: int,
) -> np.ndarray:
    images, labels = cached_training_set(dataset, data_dir)
    validation, initial, pool = sizes
    split = paper_split(
        len(images), seed=seed, validation=validation, initial=initial, pool=pool
    )
    share = partition_pool(
        split.pool,
        labels.numpy()[split.pool],
        partition_id,
        num_partitions,
        partitioner=partitioner,
        alpha=alpha,
        seed=seed,
        # at least one sample per round (and Flower Datasets' default of 10)
        min_partition_size=max(10, num_rounds),
    )
    share.setflags(write=False)
    return share


def load_site(context: Context, config: ConfigRecord) -> SiteData:
    """Return this round's samples of the site.

    On an edge box (node config ``data-dir``): everything in that folder (see
    :func:`~flwr_select.data.load_local_site`); the ledger keeps sent samples
    from being offered again. In a simulation: the site's share
    (``partition-id`` of ``num-partitions``) of the pool of the paper split of
    ``dataset``, by the run config's ``partitioner`` (``"iid"``, the default,
    or ``"dirichlet"`` with ``dirichlet-alpha``; see
    :func:`~flwr_select.partition.partition_pool`), and of that the fold of
    this ``server-round``. Ids are positions in the training set.
    """
    num_classes = int(config["num-classes"])
    if "data-dir" in context.node_config:
        return cached_local_site(str(context.node_config["data-dir"]), num_classes)
    images, labels = cached_training_set(
        str(config["dataset"]), str(config.get("data-dir", ""))
    )
    num_rounds = int(config["num-server-rounds"])
    partition = _site_share(
        str(config["dataset"]),
        str(config.get("data-dir", "")),
        int(config["seed"]),
        (
            int(config["validation-size"]),
            int(config["initial-size"]),
            int(config.get("pool-size", 0)) or None,
        ),
        str(config.get("partitioner", "iid")),
        float(config.get("dirichlet-alpha", 0.5)),
        int(context.node_config["partition-id"]),
        int(context.node_config["num-partitions"]),
        num_rounds,
    )
    fold = torch.from_numpy(
        round_fold(partition, int(config["server-round"]), num_rounds).copy()
    )
    return SiteData(images[fold], labels[fold], num_classes, ids=fold)


def model_from_config(config: ConfigRecord) -> nn.Module:
    """Build the built-in model named by the config's ``model`` key."""
    return build_model(str(config["model"]), num_classes=int(config["num-classes"]))


def received_model(
    msg: Message, model_fn: ModelBuilder
) -> tuple[ConfigRecord, nn.Module]:
    """Return the server's config and its model, built by ``model_fn`` and loaded."""
    config = msg.content.config_records[CONFIG_KEY]
    model = model_fn(config)
    model.load_state_dict(msg.content.array_records[MODEL_KEY].to_torch_state_dict())
    return config, model


def ledger_file(context: Context) -> Path | None:
    """Where an edge box keeps its ledger, so that it survives a restart.

    ``state-dir`` (else ``data-dir``) of the node config; None in a simulation,
    whose nodes keep it in their context state.
    """
    folder = context.node_config.get("state-dir", context.node_config.get("data-dir"))
    return None if folder is None else Path(str(folder)) / LEDGER_FILE


def load_ledger(context: Context) -> SiteLedger:
    """Return the site's ledger, from disk on an edge box, else the node's state.

    Raises
    ------
    ValueError
        If the ledger file is damaged: naming it, for the node's operator to fix
        or delete (it is read strictly, see :func:`flwr_select.npy.read_npz`).
    """
    path = ledger_file(context)
    if path is not None:
        if not path.is_file():
            return SiteLedger()
        arrays = {"ids": [np.dtype(np.int64)], "rounds": [np.dtype(np.int64)]}
        try:
            stored = read_npz(path, arrays, required=arrays)
            return SiteLedger(stored["ids"], stored["rounds"])
        except ValueError as err:  # NpyError included
            raise ValueError(
                f"the site's ledger {path} is damaged ({err}); fix or delete it "
                "(deleted, the site may send again what it sent before)"
            ) from None
    if LEDGER_KEY in context.state.array_records:
        stored = context.state.array_records[LEDGER_KEY]
        return SiteLedger(stored["ids"].numpy(), stored["rounds"].numpy())
    return SiteLedger()


def save_ledger(context: Context, ledger: SiteLedger) -> None:
    """Store the ledger where :func:`load_ledger` finds it (on disk: atomically)."""
    arrays = ledger.to_arrays()
    path = ledger_file(context)
    if path is None:
        context.state[LEDGER_KEY] = ArrayRecord(
            {name: Array(values) for name, values in arrays.items()}
        )
    else:
        write_atomically(path, lambda file: np.savez(file, **arrays))


def site_round(
    model: nn.Module,
    site: SiteData,
    selection: SelectionConfig,
    *,
    server_round: int,
    site_key: int,
    ledger: SiteLedger,
    undelivered: Sequence[int] = (),
) -> tuple[ArrayRecord, dict[str, int | float]]:
    """One site's round: trial test, selection, upload; ``ledger`` records the ids.

    ``undelivered`` are the rounds whose upload the server says it did not keep
    (see :class:`SiteLedger`).

    Returns the upload and the site's metrics: candidates, wrong predictions,
    samples and wrong samples sent, trial accuracy and upload bytes. Shared by the
    Message API handler and the legacy ``NumPyClient``.
    """
    trial = trial_test(model.to(default_device()), site)
    budget = selection.budget()
    chosen = select(
        trial,
        budget,
        selection.policy(),
        confidence=selection.confidence,
        seed=(selection.seed, server_round, site_key),
        sent=ledger.kept_by_server(server_round, undelivered),
    )
    upload = pack(site, chosen, max_bytes=budget.max_bytes, compress=selection.compress)
    sent_ids = upload["ids"].numpy().astype(np.int64)
    ledger.record(sent_ids, server_round)
    return upload, {
        "num-candidates": len(site),
        "num-wrong": int(trial.wrong.sum()),
        "num-selected": len(sent_ids),
        "num-selected-wrong": int(trial.wrong[np.isin(trial.ids, sent_ids)].sum()),
        "trial-accuracy": trial.accuracy,
        "upload-bytes": wire_bytes(upload),
    }


def make_select_handler(
    load_site: SiteLoader = load_site, model_fn: ModelBuilder = model_from_config
) -> Callable[[Message, Context], Message]:
    """Return the ``train.select`` handler, reading data and models as given.

    Parameters
    ----------
    load_site : callable (default: :func:`load_site`)
        ``(context, config) -> SiteData``: the samples this site offers this round.
    model_fn : callable (default: :func:`model_from_config`)
        ``config -> nn.Module``: the architecture the received arrays belong to.
    """

    def select_and_upload(msg: Message, context: Context) -> Message:
        config, model = received_model(msg, model_fn)
        ledger = load_ledger(context)
        upload, metrics = site_round(
            model,
            load_site(context, config),
            SelectionConfig.from_config(config),
            server_round=int(config["server-round"]),
            site_key=int(context.node_config.get("partition-id", context.node_id)),
            ledger=ledger,
            undelivered=list(config.get(UNDELIVERED_KEY, [])),
        )
        save_ledger(context, ledger)
        content = RecordDict({UPLOAD_KEY: upload, METRICS_KEY: MetricRecord(metrics)})
        return Message(content, reply_to=msg)

    return select_and_upload


def add_select_handler(
    app: ClientApp,
    load_site: SiteLoader = load_site,
    model_fn: ModelBuilder = model_from_config,
) -> None:
    """Register the ``train.select`` handler on an existing ClientApp."""
    app.train(ACTION)(make_select_handler(load_site, model_fn))


app = ClientApp()
"""A ClientApp with only the site's ``train.select`` handler."""
add_select_handler(app)
