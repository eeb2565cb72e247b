"""Biased-sampling data parallelism on MNIST.

``flower-simulation --app simulations.mnist_data_parallel``; choose the reduction
and the batch distribution with the run-config keys ``reduction`` and
``sampling`` (and ``bias``, ``bias-schedule``...).
"""

from clients.worker import app as client_app
from simulations import data_parallel
from simulations.runner import make_server_app

DEFAULTS = data_parallel.defaults("mnist")
check_config = data_parallel.check_config
server_app = make_server_app(
    "mnist", data_parallel.run, data_parallel.defaults, name="mnist-data-parallel"
)

__all__ = ["DEFAULTS", "check_config", "client_app", "server_app"]
