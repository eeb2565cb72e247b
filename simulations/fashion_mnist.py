"""Sample selection on Fashion-MNIST (``--app simulations.fashion_mnist``)."""

from clients.site import app as client_app
from simulations.runner import defaults, make_server_app

DEFAULTS = defaults("fashion-mnist")
server_app = make_server_app("fashion-mnist")

__all__ = ["DEFAULTS", "client_app", "server_app"]
