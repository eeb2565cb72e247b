"""The remote site: trial-test the received model, select, upload raw samples.

The handler answers ``train.select`` messages, so it can sit beside a user's own
``@app.train()``: build this module's ``app``, or add the handler to an existing
ClientApp with :func:`add_select_handler`. What the site has sent is kept in its
ledger (:class:`SiteLedger`): in the node's context state in a simulation, in a
file beside its data on an edge box, so that a restarted site sends nothing twice.

The server is someone else's: each message is read strictly before anything is
built (:func:`read_config`: :class:`SiteRequest` and the selection, errors naming
the key; then the model's arrays, see :mod:`clients.common`), and what the
site sends is bounded by its ledger whatever it is asked: no round earlier than
its latest, one top-up a round after the round's upload, and no more bytes in a
round than the node config's ``max-bytes`` (see
:mod:`flwr_select.selection.site`). A refused message raises, so Flower sends
the server an error reply, and leaves the ledger as it was.
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from torch import nn

from clients.common import (
    Handler,
    ModelBuilder,
    SiteLoader,
    cached_training_set,
    edge_box_data,
    make_handler,
    simulated_partition,
)
from flwr_select.data import SiteData
from flwr_select.files import write_atomically
from flwr_select.messages import METRICS_KEY
from flwr_select.models import Transform
from flwr_select.npy import read_npz
from flwr_select.partition import SiteShareConfig, round_fold
from flwr_select.selection.ledger import SiteLedger
from flwr_select.selection.protocol import (
    ACTION,
    NODE_MAX_BYTES_KEY,
    SUMMARY_ACTION,
    UPLOAD_KEY,
    SelectionConfig,
    SiteRequest,
)
from flwr_select.selection.site import (
    check_request,
    site_round,
    site_summary,
    site_trial,
)
from flwr_select.selection.trial import TrialResult

LEDGER_KEY = "flwr_select.sent-ids"
"""Key of the ArrayRecord in the node's context state that holds the ledger."""
LEDGER_FILE = "sent-ids.npz"
"""The ledger's file in an edge box's ``state-dir`` (default: its ``data-dir``)."""
LEDGER_ARRAYS = {
    "ids": [np.dtype(np.int64)],
    "rounds": [np.dtype(np.int64)],
    "top-ups": [np.dtype(bool)],
    "answered-rounds": [np.dtype(np.int64)],
    "answered-bytes": [np.dtype(np.int64)],
    "answered-top-ups": [np.dtype(bool)],
}
"""The arrays of a ledger's file and their dtypes (see :meth:`SiteLedger.to_arrays`)."""
TRIAL_KEY = "flwr_select.round-trial"
"""Key of the ArrayRecord in the node's context state that holds a global round's
trial test (phase 1's), which phase 2 and the top-up reuse instead of re-running."""


@functools.lru_cache(maxsize=4)
def _site_share(
    share: SiteShareConfig, seed: int, partition_id: int, num_partitions: int
) -> np.ndarray:
    _, labels = cached_training_set(share.dataset, share.data_dir)
    partition = share.site_pool(
        labels.numpy(),
        seed=seed,
        partition_id=partition_id,
        num_partitions=num_partitions,
    )
    partition.setflags(write=False)
    return partition


def load_site(context: Context, config: ConfigRecord) -> SiteData:
    """Return this round's samples of the site.

    On an edge box (node config ``data-dir``): everything in that folder (see
    :func:`~flwr_select.data.load_local_site`); the ledger keeps sent samples
    from being offered again. In a simulation: the site's share
    (``partition-id`` of ``num-partitions``) of the pool of the paper split
    that the config's :class:`~flwr_select.partition.SiteShareConfig`
    describes, by its ``partitioner`` (``"iid"`` or ``"dirichlet"`` with
    ``dirichlet-alpha``; see :func:`~flwr_select.partition.partition_pool`),
    and of that the fold of this ``server-round``, its labels flipped where the
    run asks for label noise (``label-noise``). Ids are positions in the
    training set.
    """
    request = SiteRequest.from_config(config)
    num_classes = request.num_classes
    local = edge_box_data(context, num_classes)
    if local is not None:
        return local
    share = SiteShareConfig.from_config(config)
    images, _ = cached_training_set(share.dataset, share.data_dir)
    seed = SelectionConfig.from_config(config).seed
    partition_id, num_partitions = simulated_partition(context)
    partition = _site_share(share, seed, partition_id, num_partitions)
    labels = _site_labels(share, seed, partition_id, num_classes)
    fold = round_fold(partition, request.server_round, share.num_server_rounds)
    ids = torch.from_numpy(fold.copy())
    return SiteData(images[ids], labels[ids], num_classes, ids=ids)


@functools.lru_cache(maxsize=4)
def _site_labels(
    share: SiteShareConfig, seed: int, partition_id: int, num_classes: int
) -> torch.Tensor:
    """Return the training set's labels as a simulated site holds them (with noise)."""
    _, labels = cached_training_set(share.dataset, share.data_dir)
    return share.site_labels(
        labels, seed=seed, partition_id=partition_id, num_classes=num_classes
    )


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
        try:
            stored = read_npz(path, LEDGER_ARRAYS, required=("ids", "rounds"))
            return ledger_of(stored)
        except ValueError as err:  # NpyError included
            raise ValueError(
                f"the site's ledger {path} is damaged ({err}); fix or delete it "
                "(deleted, the site may send again what it sent before)"
            ) from None
    if LEDGER_KEY in context.state.array_records:
        stored = context.state.array_records[LEDGER_KEY]
        return ledger_of({name: array.numpy() for name, array in stored.items()})
    return SiteLedger()


def ledger_of(stored: dict[str, np.ndarray]) -> SiteLedger:
    """Return the ledger of its stored arrays (:meth:`SiteLedger.to_arrays`).

    ``ids`` and ``rounds`` are required; the arrays a ledger stored before
    top-ups, or before answers were kept, lacks are empty.
    """
    return SiteLedger(
        stored["ids"],
        stored["rounds"],
        stored.get("top-ups"),
        stored.get("answered-rounds", ()),
        stored.get("answered-bytes", ()),
        stored.get("answered-top-ups", ()),
    )


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


def trial_key(model: nn.Module, server_round: int) -> np.ndarray:
    """Return what identifies a trial test: the round and a digest of the model."""
    digest = hashlib.sha256(str(server_round).encode())
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return np.frombuffer(digest.digest(), np.uint8)


def keep_trial(
    context: Context, model: nn.Module, server_round: int, trial: TrialResult
) -> None:
    """Keep phase 1's trial test in the node's state for the round's later phases."""
    arrays = {
        "key": trial_key(model, server_round),
        "ids": trial.ids,
        "labels": trial.labels,
        "predictions": trial.predictions,
        **{f"confidence/{k}": v for k, v in trial.confidence.items()},
    }
    context.state[TRIAL_KEY] = ArrayRecord(
        {k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()}
    )


def kept_trial(
    context: Context, model: nn.Module, server_round: int, site: SiteData
) -> TrialResult | None:
    """Return the trial test phase 1 kept, if it is this model's of these samples.

    None (the phase trial-tests again) when there is none, or it belongs to
    another round or model, or the site's samples or labels changed since.
    """
    stored = context.state.array_records.get(TRIAL_KEY)
    if stored is None:
        return None
    arrays = {k: v.numpy() for k, v in stored.items()}
    same = (
        np.array_equal(arrays.pop("key"), trial_key(model, server_round))
        and np.array_equal(arrays["ids"], site.ids.numpy())
        and np.array_equal(arrays["labels"], site.labels.numpy())
    )
    if not same:
        return None
    prefix = "confidence/"
    return TrialResult(
        arrays["ids"],
        arrays["labels"],
        arrays["predictions"],
        {k[len(prefix) :]: v for k, v in arrays.items() if k.startswith(prefix)},
    )


def node_max_bytes(context: Context) -> int:
    """Return the node's own cap on a round's bytes (node config ``max-bytes``).

    0 (the default) for none. An edge box behind a thin link declares it; the
    site never sends more in a round, its upload and top-up together, whatever
    it is asked, and in a round with one global budget the server allocates
    within it.

    Raises
    ------
    ValueError
        If the value is not an int >= 0, naming the node-config key.
    """
    cap = context.node_config.get(NODE_MAX_BYTES_KEY, 0)
    if type(cap) is not int or cap < 0:
        raise ValueError(
            f"node config {NODE_MAX_BYTES_KEY} must be an int >= 0 (0: no cap), "
            f"got {cap!r}"
        )
    return cap


def site_key_of(context: Context) -> int:
    """Return the key that seeds this site's choices: its partition id, or node id."""
    return int(context.node_config.get("partition-id", context.node_id))


def make_select_handler(
    load_site: SiteLoader = load_site,
    model_fn: ModelBuilder | None = None,
    transform: Transform = None,
) -> Handler:
    """Return the ``train.select`` handler: :func:`select_and_upload`.

    Parameters
    ----------
    load_site : SiteLoader (default: :func:`load_site`)
        ``(context, config) -> SiteData``: the samples this site offers this
        round. ``config`` is the ConfigRecord the server sent: the selection,
        ``server-round``, the strategy's ``site_config`` and whatever Flower's
        ``start(train_config=...)`` held.
    model_fn : callable, optional
        ``() -> nn.Module``, the same as the strategy's: the architecture the
        received arrays belong to. Default: the built-in model the server's
        config names.
    transform : str or callable, optional
        How raw samples become model input, the same as the strategy's (see
        :func:`flwr_select.models.model_input`). Default: as stored.
    """
    answer = functools.partial(select_and_upload, transform=transform)
    return make_handler(answer, load_site, model_fn, read_config)


def read_config(config: ConfigRecord) -> None:
    """Read every key the site acts on, strictly, before anything is built.

    Its :class:`SiteRequest` and its :class:`SelectionConfig`; the handlers
    read them again from the same config where they act on them.

    Raises
    ------
    flwr_select.config.ConfigError
        Naming the first key whose value is missing or not allowed.
    """
    SiteRequest.from_config(config)
    SelectionConfig.from_config(config)


def select_and_upload(
    model: nn.Module,
    site: SiteData,
    config: ConfigRecord,
    context: Context,
    *,
    transform: Transform = None,
) -> RecordDict:
    """Answer a ``train.select`` message: one ``site_round``, the ledger kept.

    In a global round (a ``quota``) the trial test of phase 1 is reused when it
    is this model's (:func:`kept_trial`). A request the site must not answer
    (see :func:`~flwr_select.selection.site.check_request`, and the node's
    round budget) raises before the ledger is saved: it stays as it was.
    """
    request = SiteRequest.from_config(config)
    ledger = load_ledger(context)
    server_round = request.server_round
    upload, metrics = site_round(
        model,
        site,
        SelectionConfig.from_config(config),
        server_round=server_round,
        site_key=site_key_of(context),
        ledger=ledger,
        undelivered=request.undelivered_rounds,
        undelivered_top_ups=request.undelivered_top_ups,
        transform=transform,
        quota=request.quota,
        top_up=request.top_up,
        node_max_bytes=node_max_bytes(context),
        trial=(
            None
            if request.quota is None
            else kept_trial(context, model, server_round, site)
        ),
    )
    save_ledger(context, ledger)
    return RecordDict({UPLOAD_KEY: upload, METRICS_KEY: MetricRecord(metrics)})


def make_summary_handler(
    load_site: SiteLoader = load_site,
    model_fn: ModelBuilder | None = None,
    transform: Transform = None,
) -> Handler:
    """Return the ``query.select_summary`` handler: :func:`summarise_candidates`.

    The arguments are :func:`make_select_handler`'s, and must be the same.
    """
    answer = functools.partial(summarise_candidates, transform=transform)
    return make_handler(answer, load_site, model_fn, read_config)


def summarise_candidates(
    model: nn.Module,
    site: SiteData,
    config: ConfigRecord,
    context: Context,
    *,
    transform: Transform = None,
) -> RecordDict:
    """Answer phase 1 of a round with one global budget: one ``site_summary``.

    Its trial test is kept (:func:`keep_trial`) for the round's later phases.
    A round earlier than the latest the site answered is refused first.
    """
    request = SiteRequest.from_config(config)
    ledger = load_ledger(context)  # read, not changed: nothing is sent yet
    check_request(ledger, request.server_round, top_up=False)
    trial = site_trial(model, site, transform)
    keep_trial(context, model, request.server_round, trial)
    metrics = site_summary(
        model,
        site,
        SelectionConfig.from_config(config),
        server_round=request.server_round,
        site_key=site_key_of(context),
        ledger=ledger,
        undelivered=request.undelivered_rounds,
        undelivered_top_ups=request.undelivered_top_ups,
        transform=transform,
        node_max_bytes=node_max_bytes(context),
        trial=trial,
    )
    return RecordDict({METRICS_KEY: MetricRecord(metrics)})


def add_select_handler(
    app: ClientApp,
    load_site: SiteLoader = load_site,
    model_fn: ModelBuilder | None = None,
    transform: Transform = None,
) -> None:
    """Register the ``train.select`` and ``query.select_summary`` handlers.

    They answer beside the app's other handlers (a user's own ``@app.train()``);
    ``load_site``, ``model_fn`` and ``transform`` are :func:`make_select_handler`'s.
    """
    app.train(ACTION)(make_select_handler(load_site, model_fn, transform))
    app.query(SUMMARY_ACTION)(make_summary_handler(load_site, model_fn, transform))


app = ClientApp()
"""A ClientApp with only the site's ``train.select`` handler."""
add_select_handler(app)
