"""The server's checkpoint: all a run needs to resume after a crash.

After every round the server writes, in its run folder, the samples the round
accepted as one new append-only segment, ``segments/<index>.npz``, and then
``checkpoint.npz``, a small manifest: the round, the central model, every
round's metrics and records, the settings the run was started with, and the
size and sha256 of each segment written so far. So a round's checkpoint costs
what the round added and the model, not the whole buffer. Both files are
written atomically (see :mod:`flwr_select.files`), the segment first: a crash at
any moment leaves the previous round's manifest, which does not list a segment
written after it (that round is redone and its segment written again), or this
round's, never a mix. Resuming reads every listed segment, oldest first, and
rebuilds the buffer and its ledger exactly (:meth:`TrainingBuffer.from_segments`).
A checkpoint of the release before segments, with the whole buffer in the
manifest, still resumes; its next save writes the buffer as the first segment.

Resuming trusts nothing in these files: :func:`latest` reads them strictly and
checks them whole (every member, every field, each segment's size and digest,
the buffer's invariants, and what the resuming run expects) before returning
anything, so a damaged file or another run's is refused with a
:class:`CheckpointError` that says what is wrong, rather than crashing the next
round. Nor may reading them hang or exhaust memory, whoever wrote the folder:

- each file must be a regular file, opened without following a symbolic link
  and without waiting for a FIFO's writer (:func:`_open_regular`): a link to
  ``/dev/zero`` would read forever, a FIFO block forever;
- its zip members must be stored, as ``np.savez`` writes them, and laid out one
  after the other (see :func:`flwr_select.npy.read_npz`): a compressed or
  overlapping member could inflate a small file into gigabytes;
- reads are bounded: a segment's by the size the manifest lists (no more than
  that and one byte is read), the manifest's by :data:`STATE_ALLOWANCE` beyond
  the resuming model's bytes;
- the model must be finite: resumed, a NaN weight would make every honest
  upload after it look like the site's fault.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import re
import stat
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
from torch import Tensor

from flwr_select.files import write_atomically
from flwr_select.npy import read_npz
from flwr_select.selection.allocation import PROBATION_LEVELS
from flwr_select.selection.buffer import NPZ_DTYPES, SEGMENT_ARRAYS, TrainingBuffer

CHECKPOINT = "checkpoint.npz"
"""The checkpoint's (the manifest's) file name in a run folder."""
SEGMENTS = "segments"
"""The folder of a run folder that holds the buffer's segments."""
SEGMENT_DTYPES = {name: NPZ_DTYPES[name] for name in SEGMENT_ARRAYS}
"""The arrays a segment holds, with their dtypes, as :func:`read_npz` takes them."""
BUFFER_SETTINGS = {"num_classes", "max_samples"}
"""The buffer's arrays in a manifest that lists segments."""
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
    "segments",
    "probation",
}
"""The fields of the JSON ``state`` array (``segments``: absent before segments)."""
ADDED_KEYS = {"undelivered_top_ups": {}, "segments": None, "probation": {}}
"""Fields a checkpoint of an earlier release lacks, with the value it means.

``segments`` None: the release before segments, whose manifest holds the whole
buffer (the arrays of :meth:`TrainingBuffer.to_arrays`).
"""
STATE_ALLOWANCE = 256 * 2**20
"""Bytes ``checkpoint.npz`` may hold beyond the resuming model's arrays.

The JSON state grows by a few hundred bytes a round, and a checkpoint of the
release before segments also holds the whole buffer (60,000 MNIST images take
47 MB, 50,000 CIFAR-10 images 154 MB). A larger file is refused unread: what
reading it allocates is bounded by this and the model's own bytes.
"""
UNNAMED_MODEL_BYTES = 2**30
"""The model's share of the manifest's bound when :func:`latest` is given none."""
FILE_KINDS = {
    stat.S_IFDIR: "a folder",
    stat.S_IFIFO: "a FIFO",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFSOCK: "a socket",
}
"""What a message calls each kind of file that is not a regular file."""
NUMBER = re.compile(r"0|[1-9][0-9]{0,19}")
SHA256 = re.compile(r"[0-9a-f]{64}")
"""A JSON key that is an int >= 0, as ``json.dumps`` writes it (2**64: 20 digits)."""

Metrics = dict[int, dict[str, Any]]
"""Values per round number."""


class CheckpointError(ValueError):
    """A checkpoint file that is damaged or was not written by the resuming run."""


@dataclass(frozen=True)
class Segment:
    """What the manifest knows of one segment file: its size and sha256 digest."""

    bytes: int
    sha256: str


def segment_path(run_dir: str | Path, index: int) -> Path:
    """Return the file of the ``index``-th segment (0: the first) of ``run_dir``."""
    return Path(run_dir) / SEGMENTS / f"{index:06d}.npz"


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
    segments : list of Segment (default: none)
        The buffer's segments on disk, oldest first (what :meth:`save` wrote
        before, or :func:`latest` read).
    probation : dict (default: none)
        Per site held on probation, its level
        (:class:`~flwr_select.selection.allocation.Probation`).
    """

    round: int
    model_state: dict[str, Tensor]
    buffer: TrainingBuffer
    train_metrics: Metrics
    records: Metrics
    undelivered: dict[int, list[int]]
    config: dict[str, Any]
    undelivered_top_ups: dict[int, list[int]] = field(default_factory=dict)
    segments: list[Segment] = field(default_factory=list)
    probation: dict[int, int] = field(default_factory=dict)

    def save(self, run_dir: str | Path) -> Path:
        """Write what the buffer accepted since it was last saved, then the manifest.

        The new samples (:meth:`TrainingBuffer.unsaved`) go to the next segment
        file, when there are any, and :attr:`segments` lists it once the
        manifest that lists it is on disk; ``run_dir`` must be the folder the
        earlier segments went to. Returns the manifest's path.
        """
        run_dir = Path(run_dir)
        segments = list(self.segments)
        new = self.buffer.unsaved()
        if len(new["ids"]):
            segments.append(_write_segment(segment_path(run_dir, len(segments)), new))
        state = {
            "round": self.round,
            "config": self.config,
            "train_metrics": self.train_metrics,
            "records": self.records,
            "undelivered": self.undelivered,
            "undelivered_top_ups": self.undelivered_top_ups,
            "segments": [vars(segment) for segment in segments],
            "probation": self.probation,
        }
        arrays = {
            "state": np.frombuffer(json.dumps(state).encode(), np.uint8),
            **{f"buffer/{k}": v for k, v in self.buffer.settings().items()},
            **{
                f"model/{k}": v.detach().cpu().numpy()
                for k, v in self.model_state.items()
            },
        }
        path = run_dir / CHECKPOINT
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(path, lambda file: np.savez(file, **arrays))
        self.segments = segments
        self.buffer.mark_saved()
        return path


def _write_segment(path: Path, arrays: dict[str, np.ndarray]) -> Segment:
    """Write ``arrays`` to ``path`` atomically; return its size and digest."""
    data = io.BytesIO()
    np.savez(data, **arrays)
    content = data.getbuffer()
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(path, lambda file: file.write(content))
    return Segment(len(content), hashlib.sha256(content).hexdigest())


def latest(
    run_dir: str | Path,
    *,
    device: torch.device | str | None = None,
    num_classes: int | None = None,
    sample_shape: tuple[int, ...] | None = None,
    model_state: dict[str, Tensor] | None = None,
) -> Checkpoint | None:
    """Return the checkpoint in ``run_dir`` with its buffer on ``device``, or None.

    The file is checked whole before anything is returned: a regular file no
    larger than the model's bytes and :data:`STATE_ALLOWANCE`, each member
    stored, of an allowed name and dtype (see :data:`MEMBERS`) and CRC, the
    ``state`` fields of :meth:`Checkpoint.save` and their types, a finite model,
    and the buffer's invariants (see :meth:`TrainingBuffer.from_arrays`), its
    segments read as regular files no larger than the manifest lists.

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
        its keys, and each the same shape and dtype. Its bytes bound the
        manifest's size (without it: :data:`UNNAMED_MODEL_BYTES`).

    Returns
    -------
    Checkpoint or None
        None when ``run_dir`` holds no checkpoint.

    Raises
    ------
    CheckpointError
        Naming the file and what is wrong, if it is damaged, not a regular file,
        too large for this run, or does not match the expectations; also if it
        cannot be read, or needs more memory than there is.
    """
    path = (Path(run_dir) / CHECKPOINT).absolute()
    if not os.path.lexists(path):
        return None
    model_bytes = (
        UNNAMED_MODEL_BYTES
        if model_state is None
        else sum(value.numel() * value.element_size() for value in model_state.values())
    )
    try:
        file, size = _open_regular(path)
        with file:
            if size > model_bytes + STATE_ALLOWANCE:
                raise ValueError(
                    f"it holds {size} bytes, more than this run's model "
                    f"({model_bytes} bytes) and its state ({STATE_ALLOWANCE} bytes) "
                    "can take"
                )
            checkpoint = _read(path, file, device)
        _expect(checkpoint, num_classes, sample_shape, model_state)
    except (ValueError, OSError, MemoryError) as err:
        raise CheckpointError(
            f"{path} is corrupt or does not belong to this run: {err}"
        ) from err
    return checkpoint


def _open_regular(path: Path) -> tuple[BinaryIO, int]:
    """Open ``path`` for reading; return it and its size, unless it is no regular file.

    ``O_NOFOLLOW`` refuses a symbolic link (to ``/dev/zero``, say, which would
    read forever) and ``O_NONBLOCK`` keeps a FIFO from blocking the open until a
    writer comes; the kind is then checked on the file opened, so it cannot be
    swapped in between. (On a regular file, ``O_NONBLOCK`` changes nothing.)

    Raises
    ------
    ValueError
        Naming ``path`` and its kind, if it is not a regular file.
    OSError
        If it cannot be opened.
    """
    try:
        descriptor = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise ValueError(f"{path} is a symbolic link, not a regular file") from None
        raise
    try:
        info = os.fstat(descriptor)
        if not stat.S_ISREG(info.st_mode):
            kind = FILE_KINDS.get(stat.S_IFMT(info.st_mode), "of an unknown kind")
            raise ValueError(f"{path} is {kind}, not a regular file")
    except BaseException:
        os.close(descriptor)
        raise
    return os.fdopen(descriptor, "rb"), info.st_size


def _read(path: Path, file: BinaryIO, device: torch.device | str | None) -> Checkpoint:
    """Read and check the manifest ``file`` at ``path``; raise ValueError if unsound."""
    arrays = read_npz(file, MEMBERS, required=["state"], name=str(path))
    state = _state(arrays.pop("state"))
    parts: dict[str, dict[str, np.ndarray]] = {"buffer": {}, "model": {}}
    for key, array in arrays.items():
        part, _, name = key.partition("/")
        parts[part][name] = array
    _check_finite(parts["model"])
    segments = state["segments"]
    if segments is None:
        buffer = TrainingBuffer.from_arrays(parts["buffer"], device=device)
    elif parts["buffer"].keys() != BUFFER_SETTINGS:
        raise ValueError(
            f"the manifest holds the buffer arrays {sorted(parts['buffer'])}; "
            f"one that lists segments holds {sorted(BUFFER_SETTINGS)}"
        )
    else:
        buffer = TrainingBuffer.from_segments(
            parts["buffer"],
            [_read_segment(path.parent, i, s) for i, s in enumerate(segments)],
            device=device,
        )
    return Checkpoint(
        round=state["round"],
        model_state={k: torch.from_numpy(v) for k, v in parts["model"].items()},
        buffer=buffer,
        train_metrics=_by_round(state["train_metrics"]),
        records=_by_round(state["records"]),
        undelivered=_by_round(state["undelivered"]),
        undelivered_top_ups=_by_round(state["undelivered_top_ups"]),
        config=state["config"],
        segments=[] if segments is None else segments,
        probation=_by_round(state["probation"]),
    )


def _read_segment(run_dir: Path, index: int, segment: Segment) -> dict[str, np.ndarray]:
    """Read the ``index``-th segment; raise ValueError unless it is ``segment``."""
    path = segment_path(run_dir, index)
    try:  # its size first: no more than the manifest lists (and a byte) is read
        file, size = _open_regular(path)
        with file:
            data = file.read(segment.bytes + 1) if size == segment.bytes else b""
    except OSError as err:
        raise ValueError(f"segment {path} cannot be read: {err}") from None
    if (
        size != segment.bytes
        or len(data) != segment.bytes
        or hashlib.sha256(data).hexdigest() != segment.sha256
    ):
        raise ValueError(
            f"segment {path} holds {size} bytes that are not the segment the "
            f"manifest lists ({segment.bytes} bytes, sha256 {segment.sha256[:12]}...): "
            "damaged, cut short or replaced"
        )
    return read_npz(io.BytesIO(data), SEGMENT_DTYPES, name=str(path))


def _check_finite(model: dict[str, np.ndarray]) -> None:
    """Raise ValueError if a float array of the model holds NaN or inf.

    No sound round ends with such a model, and resumed, it would have every
    honest upload after it rejected as the site's fault.
    """
    for name, array in model.items():
        if array.dtype.kind == "f" and not np.isfinite(array).all():
            count = np.count_nonzero(~np.isfinite(array))
            raise ValueError(
                f"model array 'model/{name}' holds {count} NaN or infinite values; "
                "a model that resumes must be finite"
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
    state["segments"] = _segments(state["segments"])
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
    _check_keyed(
        state,
        "probation",
        range(2**64),
        lambda v: type(v) is int and 0 <= v < PROBATION_LEVELS,
        f"a level (an int in [0, {PROBATION_LEVELS}))",
    )
    return state


def _segments(listed: Any) -> list[Segment] | None:
    """Return the manifest's segments; raise ValueError unless each is sound."""
    if listed is None:
        return None
    if not isinstance(listed, list):
        raise ValueError(
            f"'state' field 'segments' is {_shown(listed)}; expected a list"
        )
    for index, entry in enumerate(listed):
        if (
            not isinstance(entry, dict)
            or entry.keys() != {"bytes", "sha256"}
            or type(entry["bytes"]) is not int
            or entry["bytes"] < 0
            or not isinstance(entry["sha256"], str)
            or not SHA256.fullmatch(entry["sha256"])
        ):
            raise ValueError(
                f"'state' field 'segments' holds {_shown(entry)} at {index}; expected "
                "{'bytes': an int >= 0, 'sha256': 64 hex digits}"
            )
    return [Segment(**entry) for entry in listed]


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
