"""Runnable Flower apps (``simulations.mnist`` and friends) and the paper's experiments.

Empty until the Flower layer lands; see the project README for the plan.
"""
