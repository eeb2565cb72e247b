"""Sample selection on MNIST: ``flower-simulation --app simulations.mnist``."""

from clients.site import app as client_app
from simulations.runner import defaults, make_server_app

DEFAULTS = defaults("mnist")
server_app = make_server_app("mnist")

__all__ = ["DEFAULTS", "client_app", "server_app"]
