"""flwr_select: remote sites upload their most informative raw samples, not updates.

Laid out by paper, over what both share:

- :mod:`flwr_select.selection`: training sample selection (Jiang et al. 2017,
  *Training sample selection for deep learning of distributed data*): trial
  test, scores, policies under a budget, ledgers, the wire format of an upload,
  the training buffer and the checkpoint.
- :mod:`flwr_select.parallel`: biased-sampling data parallelism (Sharp 2020):
  batch class distributions, worker gradients, reductions and monitors.
- shared: data sets and readers (:mod:`.data`, :mod:`.partition`), models,
  the central trainer, evaluation, run-config fields (:mod:`.config`), the keys
  and bounds of every message (:mod:`.messages`) and files (:mod:`.files`,
  :mod:`.npy`).

Neither engine imports the other. The engines are torch/NumPy; five modules
use Flower's record types, for what travels in messages (an upload, a
request, a model's arrays): :mod:`.selection.wire`, :mod:`.selection.protocol`,
:mod:`.selection.site`, :mod:`.selection.server` and :mod:`.parallel.server`;
:mod:`.flower_private` holds the few private Flower names the apps need, in
one place. The names below are the public ones; the Flower strategies and
ClientApps are in the ``strategies`` and ``clients`` packages.
"""

from flwr_select.config import ConfigError
from flwr_select.data import SiteData, load_cifar10, load_mnist, read_idx
from flwr_select.evaluation import evaluate
from flwr_select.models import MODELS, CifarCNN, LeNet5, build_model
from flwr_select.parallel.batches import DISTRIBUTIONS, Sampling
from flwr_select.parallel.gradients import DataParallelConfig, worker_gradient
from flwr_select.parallel.reductions import REDUCTIONS, make_reduction
from flwr_select.selection.buffer import TrainingBuffer
from flwr_select.selection.checkpoint import CheckpointError
from flwr_select.selection.ledger import SentLedger
from flwr_select.selection.policies import (
    GROUPS,
    POLICIES,
    Budget,
    Candidates,
    make_policy,
    select,
)
from flwr_select.selection.protocol import SelectionConfig
from flwr_select.selection.scores import CONFIDENCE_METRICS, SCORES, score
from flwr_select.selection.trial import TrialResult, trial_test
from flwr_select.selection.wire import UploadError, decode, encode, pack, wire_bytes
from flwr_select.trainer import TrainConfig

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
    "CheckpointError",
    "CifarCNN",
    "ConfigError",
    "DataParallelConfig",
    "LeNet5",
    "Sampling",
    "SelectionConfig",
    "SentLedger",
    "SiteData",
    "TrainConfig",
    "TrainingBuffer",
    "TrialResult",
    "UploadError",
    "build_model",
    "decode",
    "encode",
    "evaluate",
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
