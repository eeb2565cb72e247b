"""Flower ClientApps: the remote site (trial test, select, upload) and the worker.

Empty until the Flower layer lands; see the project README for the plan.
"""
