"""Runnable Flower apps and the papers' experiments.

Apps (``flower-simulation --app ...`` or ``flwr run .``): ``simulations.mnist``,
``simulations.fashion_mnist`` (sample selection, :mod:`simulations.runner`) and
``simulations.mnist_data_parallel`` (:mod:`simulations.data_parallel`). The
experiments: :mod:`simulations.paper` (Jiang et al.'s figures, one site),
:mod:`simulations.sites` (N sites through Flower) and :mod:`simulations.biased`
(Sharp's comparison), sharing :mod:`simulations.experiments`.
"""
