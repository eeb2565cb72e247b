"""Flower server strategies over the flwr_select engines, one per file.

- :mod:`strategies.sample_selection`: :class:`SampleSelection`, where a
  ``FedAvg(...)`` was: sites upload raw samples, the server trains on them.
- :mod:`strategies.legacy`: the same behind Flower's legacy ``Strategy`` API.
- :mod:`strategies.data_parallel`: :class:`BiasedDataParallel`, workers send
  gradients of class-biased batches, combined by a chosen reduction.
"""

from strategies.data_parallel import BiasedDataParallel
from strategies.legacy import LegacySampleSelection
from strategies.sample_selection import SampleSelection

__all__ = ["BiasedDataParallel", "LegacySampleSelection", "SampleSelection"]
