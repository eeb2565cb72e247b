"""Sample selection on MNIST: ``flower-simulation --app simulations.mnist``."""

from clients.site import app as client_app
from simulations.runner import check_config, defaults, make_server_app

DEFAULTS = defaults("mnist")
server_app = make_server_app("mnist")

__all__ = ["DEFAULTS", "check_config", "client_app", "server_app"]
