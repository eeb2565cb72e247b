"""flwr_select: remote sites upload their most informative raw samples, not updates.

The engine of the system of Jiang et al. (2017), *Training sample selection for
deep learning of distributed data*: trial test, scores, selection under a budget,
and the wire format of an upload. Also the biased-sampling data-parallel
baselines of Sharp (2020): batch distributions (:mod:`flwr_select.sampling`),
gradient reductions (:mod:`flwr_select.reductions`), the monitors
(:mod:`flwr_select.monitors`) and the worker and server steps
(:mod:`flwr_select.data_parallel`). Pure torch/NumPy; only
:mod:`flwr_select.wire` imports Flower (for its record types).
"""

from flwr_select.data import SiteData, load_cifar10, load_mnist, read_idx
from flwr_select.data_parallel import DataParallelConfig, worker_gradient
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
from flwr_select.reductions import REDUCTIONS, make_reduction
from flwr_select.sampling import DISTRIBUTIONS, Sampling
from flwr_select.scores import CONFIDENCE_METRICS, SCORES, score
from flwr_select.trial import TrialResult, trial_test
from flwr_select.wire import UploadError, decode, encode, pack, wire_bytes

__all__ = [
    "CONFIDENCE_METRICS",
    "DISTRIBUTIONS",
    "GROUPS",
    "MODELS",
    "POLICIES",
    "REDUCTIONS",
    "SCORES",
    "Budget",
    "Candidates",
    "CifarCNN",
    "DataParallelConfig",
    "LeNet5",
    "Sampling",
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
    "make_reduction",
    "pack",
    "read_idx",
    "score",
    "select",
    "trial_test",
    "wire_bytes",
    "worker_gradient",
]
