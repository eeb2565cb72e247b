"""Flower ClientApps: the remote site and the data-parallel worker.

- :mod:`clients.site`: the ``train.select`` handler (trial test, select, upload
  raw samples), addable beside a user's own ``@app.train()``.
- :mod:`clients.legacy`: the same site as a legacy ``NumPyClient``.
- :mod:`clients.worker`: the ``train.gradient`` handler of the data-parallel
  baseline.
"""

from clients.legacy import SelectNumPyClient
from clients.site import add_select_handler, make_select_handler
from clients.worker import add_gradient_handler, make_gradient_handler

__all__ = [
    "SelectNumPyClient",
    "add_gradient_handler",
    "add_select_handler",
    "make_gradient_handler",
    "make_select_handler",
]
