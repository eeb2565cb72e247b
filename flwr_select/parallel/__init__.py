"""Biased-sampling data parallelism (Sharp 2020): the workers' and the server's engine.

Workers draw class-biased batches (:mod:`.batches`) and compute gradients on them
(:mod:`.gradients`); the server combines them with a reduction
(:mod:`.reductions`) and watches the run (:mod:`.monitors`). Nothing here
imports :mod:`flwr_select.selection`.
"""
