"""What every message between a Flower server and a node here shares, both engines.

The keys of the server's request (its model's ArrayRecord, its ConfigRecord, the
round, the classes, the built-in model's name) and of a node's reply (its
MetricRecord), and the bounds a node holds the server's values to: the
sample-selection site (:mod:`flwr_select.selection.protocol`) and the
data-parallel worker (``clients.worker``) read their messages with these, so
neither engine imports the other.
"""

from __future__ import annotations

from flwr_select.config import check

MODEL_KEY, CONFIG_KEY = "arrays", "config"
"""Keys of the server's message: the model's ArrayRecord and the ConfigRecord."""
METRICS_KEY = "metrics"
"""Key of a node's reply: its MetricRecord."""
ROUND_KEY, NUM_CLASSES_KEY, MODEL_NAME_KEY = "server-round", "num-classes", "model"
"""Config keys of every message: the round, the classes, the built-in model's name."""
MAX_NUM_CLASSES = 100_000
"""The most classes a node takes a model of. Far above the data sets here (10)
and ImageNet-21k (21,841), and low enough that what a node sizes by the class
count (a model's output layer, per-class counts) stays small whatever a
message says."""
MAX_ROUND = 2**63 - 1
"""The latest round a node answers: a ledger stores rounds as int64."""


def check_num_classes(num_classes: int) -> None:
    """Raise ``ConfigError`` naming ``num-classes`` unless it is in [2, MAX]."""
    allowed = f"in [2, {MAX_NUM_CLASSES}]"
    check(NUM_CLASSES_KEY, num_classes, 2 <= num_classes <= MAX_NUM_CLASSES, allowed)
