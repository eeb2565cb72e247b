"""The server's checkpoint: all a run needs to resume after a crash, in one file.

After every round the server writes ``checkpoint.npz`` in its run folder: the
round, the central model, the whole training buffer (with the ledger of which
(site, id) pairs were ever accepted), every round's metrics and records, and the
settings the run was started with. It is one file written atomically (see
:mod:`flwr_select.files`), so a crash at any moment leaves either the previous
round's checkpoint or this one, never a mix.

Resuming trusts nothing in that file: :func:`latest` reads it strictly and checks
it whole (every member, every field, the buffer's invariants, and what the
resuming run expects) before returning anything, so a damaged file or another
run's is refused with a :class:`CheckpointError` that says what is wrong, rather
than crashing the next round.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from flwr_select.files import write_atomically
from flwr_select.npy import read_npz
from flwr_select.selection.buffer import NPZ_DTYPES, TrainingBuffer

CHECKPOINT = "checkpoint.npz"
"""The checkpoint's file name in a run folder."""
MEMBERS = {
    "state": (np.dtype(np.uint8),),
    **{f"buffer/{name}": dtypes for name, dtypes in NPZ_DTYPES.items()},
    "model/*": tuple(
        np.dtype(name)
        for name in ("float16", "float32", "float64", "uint8")
        + ("int8", "int16", "int32", "int64")
    ),
}
"""The arrays a checkpoint holds, with their dtypes, as :func:`read_npz` takes them."""
STATE_KEYS = {
    "round",
    "config",
    "train_metrics",
    "records",
    "undelivered",
    "undelivered_top_ups",
}
"""The fields of the JSON ``state`` array."""
ADDED_KEYS = {"undelivered_top_ups": {}}
"""Fields a checkpoint of an earlier release lacks, with the value it means."""
NUMBER = re.compile(r"0|[1-9][0-9]{0,19}")
"""A JSON key that is an int >= 0, as ``json.dumps`` writes it (2**64: 20 digits)."""

Metrics = dict[int, dict[str, Any]]
"""Values per round number."""


class CheckpointError(ValueError):
    """A checkpoint file that is damaged or was not written by the resuming run."""


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
    undelivered_top_ups : dict (default: none)
        Per site, the rounds whose top-up (only) the server did not keep.
    """

    round: int
    model_state: dict[str, Tensor]
    buffer: TrainingBuffer
    train_metrics: Metrics
    records: Metrics
    undelivered: dict[int, list[int]]
    config: dict[str, Any]
    undelivered_top_ups: dict[int, list[int]] = field(default_factory=dict)

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
            "undelivered_top_ups": self.undelivered_top_ups,
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
    run_dir: str | Path,
    *,
    device: torch.device | str | None = None,
    num_classes: int | None = None,
    sample_shape: tuple[int, ...] | None = None,
    model_state: dict[str, Tensor] | None = None,
) -> Checkpoint | None:
    """Return the checkpoint in ``run_dir`` with its buffer on ``device``, or None.

    The file is checked whole before anything is returned: each member of an
    allowed name and dtype (see :data:`MEMBERS`) and CRC, the ``state`` fields
    of :meth:`Checkpoint.save` and their types, and the buffer's invariants (see
    :meth:`TrainingBuffer.from_arrays`).

    Parameters
    ----------
    run_dir : str or Path
        The run folder.
    device : torch.device or str, optional
        Where the buffer's images and labels go (default: as
        :class:`TrainingBuffer`).
    num_classes : int, optional
        The buffer's number of classes must be this.
    sample_shape : tuple of int, optional
        The shape of one buffered image must be this (when it holds images).
    model_state : dict of str to Tensor, optional
        The resuming model's ``state_dict``: the stored model must have exactly
        its keys, and each the same shape and dtype.

    Returns
    -------
    Checkpoint or None
        None when ``run_dir`` holds no checkpoint.

    Raises
    ------
    CheckpointError
        Naming the file and what is wrong, if it is damaged or does not match
        the expectations.
    """
    path = (Path(run_dir) / CHECKPOINT).absolute()
    if not path.is_file():
        return None
    try:
        checkpoint = _read(path, device)
        _expect(checkpoint, num_classes, sample_shape, model_state)
    except ValueError as err:
        raise CheckpointError(
            f"{path} is corrupt or does not belong to this run: {err}"
        ) from err
    return checkpoint


def _read(path: Path, device: torch.device | str | None) -> Checkpoint:
    """Read and check the checkpoint at ``path``; raise ValueError if unsound."""
    arrays = read_npz(path, MEMBERS, required=["state"])
    state = _state(arrays.pop("state"))
    parts: dict[str, dict[str, np.ndarray]] = {"buffer": {}, "model": {}}
    for key, array in arrays.items():
        part, _, name = key.partition("/")
        parts[part][name] = array
    return Checkpoint(
        round=state["round"],
        model_state={k: torch.from_numpy(v) for k, v in parts["model"].items()},
        buffer=TrainingBuffer.from_arrays(parts["buffer"], device=device),
        train_metrics=_by_round(state["train_metrics"]),
        records=_by_round(state["records"]),
        undelivered=_by_round(state["undelivered"]),
        undelivered_top_ups=_by_round(state["undelivered_top_ups"]),
        config=state["config"],
    )


def _state(array: np.ndarray) -> dict[str, Any]:
    """Return the JSON ``state`` array's fields; raise ValueError unless sound."""
    if array.ndim != 1:
        raise ValueError(f"'state' has shape {array.shape}; expected 1-D bytes")
    try:
        state = json.loads(array.tobytes().decode())
    except (ValueError, RecursionError) as err:
        raise ValueError(f"'state' is not JSON: {err}") from None
    if isinstance(state, dict):
        state = {**ADDED_KEYS, **state}
    if not isinstance(state, dict) or state.keys() != STATE_KEYS:
        found = sorted(state) if isinstance(state, dict) else type(state).__name__
        raise ValueError(f"'state' holds {found}; expected {sorted(STATE_KEYS)}")
    last = state["round"]
    if type(last) is not int or last < 0:
        raise ValueError(
            f"'state' field 'round' is {_shown(last)}; expected an int >= 0"
        )
    if not isinstance(state["config"], dict):
        raise ValueError(
            f"'state' field 'config' is {_shown(state['config'])}; expected a dict"
        )
    for name in ("train_metrics", "records"):
        _check_keyed(
            state, name, range(last + 1), lambda v: isinstance(v, dict), "a dict"
        )
    for name in ("undelivered", "undelivered_top_ups"):
        _check_keyed(
            state,
            name,
            range(2**64),
            lambda v: (
                isinstance(v, list)
                and all(type(r) is int and 1 <= r <= last for r in v)
            ),
            f"a list of rounds (ints in [1, {last}])",
        )
    return state


def _check_keyed(
    state: dict[str, Any],
    field: str,
    keys: range,
    valid: Callable[[Any], bool],
    expected: str,
) -> None:
    """Raise ValueError unless ``state[field]`` maps ints in ``keys`` to valid values.

    JSON keys are strings: each must be an int as ``json.dumps`` writes it.
    """
    values = state[field]
    if not isinstance(values, dict):
        raise ValueError(
            f"'state' field {field!r} is {_shown(values)}; expected a dict"
        )
    for key, value in values.items():
        if not NUMBER.fullmatch(key) or int(key) not in keys:
            raise ValueError(
                f"'state' field {field!r} has the key {_shown(key)}; expected an "
                f"int in [{keys.start}, {keys.stop - 1}]"
            )
        if not valid(value):
            raise ValueError(
                f"'state' field {field!r} holds {_shown(value)} at {key!r}; "
                f"expected {expected}"
            )


def _expect(
    checkpoint: Checkpoint,
    num_classes: int | None,
    sample_shape: tuple[int, ...] | None,
    model_state: dict[str, Tensor] | None,
) -> None:
    """Raise ValueError unless ``checkpoint`` is what the resuming run expects."""
    buffer = checkpoint.buffer
    if num_classes is not None and buffer.num_classes != num_classes:
        raise ValueError(
            f"the buffer has {buffer.num_classes} classes; this run has {num_classes}"
        )
    shape = buffer.image_shape
    if sample_shape is not None and shape not in (None, tuple(sample_shape)):
        raise ValueError(
            f"the buffer's images are of shape {shape}; this run's are "
            f"{tuple(sample_shape)}"
        )
    if model_state is None:
        return
    stored = checkpoint.model_state
    missing = sorted(model_state.keys() - stored.keys())
    unexpected = sorted(stored.keys() - model_state.keys())
    if missing or unexpected:
        raise ValueError(
            f"the model's arrays are not this run's: missing {missing}, "
            f"unexpected {unexpected}"
        )
    for name, value in model_state.items():
        got = stored[name]
        if got.shape != value.shape or got.dtype != value.dtype:
            raise ValueError(
                f"model array 'model/{name}' is {got.dtype} of shape "
                f"{tuple(got.shape)}; this run's model has {value.dtype} of shape "
                f"{tuple(value.shape)}"
            )


def _shown(value: Any) -> str:
    """Return ``repr(value)``, cut to 80 characters to keep a message readable."""
    text = repr(value)
    return text if len(text) <= 80 else f"{text[:77]}..."


def _by_round(values: dict[str, Any]) -> dict[int, Any]:
    """JSON keys are strings: give the round (or site) numbers back as ints."""
    return {int(r): v for r, v in values.items()}
