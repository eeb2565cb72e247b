"""A site that replays ready uploads: the server's ingest without the sites' work.

``bench/deployment_load.py --replay`` submits the project's ServerApp with this
ClientApp: in round r it sends the r-th block of ``per-round`` samples of its
folder's ``data.npz`` (node config ``data-dir``) as a valid upload, encoded as
:func:`flwr_select.selection.wire.encode` encodes one (uint8 images, the
smallest unsigned labels and ids), with no model, no trial test and no ledger.
It imports NumPy and Flower only, not torch, so that a site's process costs what
Flower's own ClientApp process costs. The message and record names are the
protocol's (:mod:`flwr_select.selection.protocol`, which the benchmark checks
against these before it starts).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

ACTION, CONFIG_KEY = "select", "config"
UPLOAD_KEY, METRICS_KEY = "upload", "metrics"
UPLOAD_ARRAYS = ("images", "labels", "ids")

client_app = ClientApp()


def smallest_uint(values: np.ndarray) -> np.ndarray:
    """``values`` as the smallest unsigned dtype that holds them."""
    largest = int(values.max(initial=0))
    for dtype in (np.uint8, np.uint16, np.uint32, np.uint64):
        if largest <= np.iinfo(dtype).max:
            return values.astype(dtype)
    raise ValueError(f"{largest} does not fit in 64 bits")


@client_app.train(ACTION)
def replay(msg: Message, context: Context) -> Message:
    """Send this round's block of the folder's samples, whatever the model."""
    config = msg.content.config_records[CONFIG_KEY]
    server_round, per_round = int(config["server-round"]), int(config["max-count"])
    with np.load(Path(str(context.node_config["data-dir"])) / "data.npz") as data:
        block = slice((server_round - 1) * per_round, server_round * per_round)
        images, labels, ids = (data[name][block] for name in UPLOAD_ARRAYS)
    upload = ArrayRecord(
        {
            "images": Array(np.ascontiguousarray(images)),
            "labels": Array(smallest_uint(labels)),
            "ids": Array(smallest_uint(ids)),
        }
    )
    metrics = MetricRecord({"num-candidates": len(ids)})
    return Message(RecordDict({UPLOAD_KEY: upload, METRICS_KEY: metrics}), reply_to=msg)
