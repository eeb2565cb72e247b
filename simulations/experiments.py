"""What both papers' in-process experiments share: the data, run files, summaries.

Each experiment (:mod:`simulations.paper`, :mod:`simulations.sites`,
:mod:`simulations.biased`) writes one JSON-lines file per run; a file that
exists is a finished run, so an interrupted experiment resumes where it stopped.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from flwr_select.data import DATASETS, SiteData, load_dataset, resolve_data_dir
from flwr_select.files import write_json_lines


class Data:
    """A data set's training and test tensors, loaded once per command."""

    def __init__(self, dataset: str, data_dir: str | Path | None) -> None:
        folder = resolve_data_dir(dataset, data_dir)
        self.folder = folder
        """Where the data was read (a worker process reads it again from here)."""
        self.images, self.labels = load_dataset(dataset, folder, "train")
        self.test_images, self.test_labels = load_dataset(dataset, folder, "test")
        self.dataset = dataset
        self.num_classes = DATASETS[dataset].num_classes

    def samples(
        self, positions: np.ndarray, labels: torch.Tensor | None = None
    ) -> SiteData:
        """Return the training samples at ``positions`` (ids = positions)."""
        idx = torch.from_numpy(positions)
        chosen = (self.labels if labels is None else labels)[idx]
        return SiteData(self.images[idx], chosen, self.num_classes, ids=idx)


def write_run(path: Path, meta: dict[str, Any], records: list[dict[str, Any]]) -> None:
    """Write one run's records, each with ``meta``, as JSON lines, atomically.

    A run whose file exists is complete: an interrupted write leaves only the
    temporary file, so a resumed experiment runs it again.
    """
    write_json_lines(path, ({**meta, **r} for r in records))


def mean_std(values: list[float]) -> list[float]:
    """Return ``[mean, standard deviation]`` of ``values`` (over seeds)."""
    return [float(np.mean(values)), float(np.std(values))]
