"""The server's checkpoint: all a run needs to resume after a crash, in one file.

After every round the server writes ``checkpoint.npz`` in its run folder: the
round, the central model, the whole training buffer (with the ledger of which
(site, id) pairs were ever accepted), every round's metrics and records, and the
settings the run was started with. It is one file written atomically (see
:mod:`flwr_select.files`), so a crash at any moment leaves either the previous
round's checkpoint or this one, never a mix.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from flwr_select.buffer import TrainingBuffer
from flwr_select.files import write_atomically

CHECKPOINT = "checkpoint.npz"
"""The checkpoint's file name in a run folder."""

Metrics = dict[int, dict[str, Any]]
"""Values per round number."""


@dataclass
class Checkpoint:
    """A run's state after its last complete round.

    Attributes
    ----------
    round : int
        The last complete round (0: the initial model, before any upload).
    model_state : dict of str to Tensor
        The central model's ``state_dict``.
    buffer : TrainingBuffer
        Every accepted sample, and the ledger of accepted (site, id) pairs.
    train_metrics : dict
        Each round's aggregation metrics (what the strategy returned).
    records : dict
        Each round's evaluation record.
    undelivered : dict
        Per site, the rounds whose upload the server did not keep.
    config : dict
        The settings the run was started with; a resumed run must match them.
    """

    round: int
    model_state: dict[str, Tensor]
    buffer: TrainingBuffer
    train_metrics: Metrics
    records: Metrics
    undelivered: dict[int, list[int]]
    config: dict[str, Any]

    def save(self, run_dir: str | Path) -> Path:
        """Write the checkpoint to ``run_dir/checkpoint.npz`` atomically."""
        path = Path(run_dir) / CHECKPOINT
        path.parent.mkdir(parents=True, exist_ok=True)
        state = {
            "round": self.round,
            "config": self.config,
            "train_metrics": self.train_metrics,
            "records": self.records,
            "undelivered": self.undelivered,
        }
        arrays = {
            "state": np.frombuffer(json.dumps(state).encode(), np.uint8),
            **{f"buffer/{k}": v for k, v in self.buffer.to_arrays().items()},
            **{
                f"model/{k}": v.detach().cpu().numpy()
                for k, v in self.model_state.items()
            },
        }
        write_atomically(path, lambda file: np.savez(file, **arrays))
        return path


def latest(
    run_dir: str | Path, *, device: torch.device | str | None = None
) -> Checkpoint | None:
    """Return the checkpoint in ``run_dir`` with its buffer on ``device``, or None."""
    path = Path(run_dir) / CHECKPOINT
    if not path.is_file():
        return None
    with np.load(path, allow_pickle=False) as data:
        state = json.loads(data["state"].tobytes())
        parts: dict[str, dict[str, np.ndarray]] = {"buffer": {}, "model": {}}
        for key in data.files:
            part, _, name = key.partition("/")
            if part in parts:
                parts[part][name] = data[key]
    return Checkpoint(
        round=state["round"],
        model_state={k: torch.from_numpy(v) for k, v in parts["model"].items()},
        buffer=TrainingBuffer.from_arrays(parts["buffer"], device=device),
        train_metrics=_by_round(state["train_metrics"]),
        records=_by_round(state["records"]),
        undelivered=_by_round(state["undelivered"]),
        config=state["config"],
    )


def _by_round(values: dict[str, Any]) -> dict[int, Any]:
    """JSON keys are strings: give the round (or site) numbers back as ints."""
    return {int(r): v for r, v in values.items()}
