"""Sample selection on Fashion-MNIST (``--app simulations.fashion_mnist``)."""

from clients.site import app as client_app
from simulations.runner import check_config, defaults, make_server_app

DEFAULTS = defaults("fashion-mnist")
server_app = make_server_app("fashion-mnist")

__all__ = ["DEFAULTS", "check_config", "client_app", "server_app"]
