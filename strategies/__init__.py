"""Flower server strategies on flwr_select: sample selection, biased data parallel.

Empty until the Flower layer lands; see the project README for the plan.
"""
