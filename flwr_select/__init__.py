"""flwr_select: remote sites upload their most informative raw samples, not updates.

The engine of the system of Jiang et al. (2017), *Training sample selection for
deep learning of distributed data*: trial test, scores, selection under a budget,
and the wire format of an upload. Pure torch/NumPy; only :mod:`flwr_select.wire`
imports Flower (for its record types).
"""

from flwr_select.data import SiteData, load_cifar10, load_mnist, read_idx
from flwr_select.models import MODELS, CifarCNN, LeNet5, build_model
from flwr_select.policies import (
    GROUPS,
    POLICIES,
    Budget,
    Candidates,
    SentLedger,
    make_policy,
    select,
)
from flwr_select.scores import CONFIDENCE_METRICS, SCORES, score
from flwr_select.trial import TrialResult, trial_test
from flwr_select.wire import UploadError, decode, encode, pack, wire_bytes

__all__ = [
    "CONFIDENCE_METRICS",
    "GROUPS",
    "MODELS",
    "POLICIES",
    "SCORES",
    "Budget",
    "Candidates",
    "CifarCNN",
    "LeNet5",
    "SentLedger",
    "SiteData",
    "TrialResult",
    "UploadError",
    "build_model",
    "decode",
    "encode",
    "load_cifar10",
    "load_mnist",
    "make_policy",
    "pack",
    "read_idx",
    "score",
    "select",
    "trial_test",
    "wire_bytes",
]
