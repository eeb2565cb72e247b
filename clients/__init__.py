"""Flower ClientApps: the remote site and the data-parallel worker.

- :mod:`clients.site`: the ``train.select`` handler (trial test, select, upload
  raw samples), addable beside a user's own ``@app.train()``.
- :mod:`clients.legacy`: the same site as a legacy ``NumPyClient``.
- :mod:`clients.worker`: the ``train.gradient`` handler of the data-parallel
  baseline.
"""
