"""Uploads on the wire: selected raw samples as a Flower ``ArrayRecord``, and back.

An upload is three arrays, each in the smallest type that holds it: ``images``
(``uint8`` in the site's shape), ``labels`` (the smallest unsigned type that holds
the classes) and ``ids`` (the smallest unsigned type that holds the largest id),
plus optional ``scores`` (float32). Per sample that is the raw pixels, one label
byte and, for MNIST-sized ids, two id bytes: every other byte is a fixed
per-upload cost. With ``compress=True`` the image block is compressed with
Zstandard; it stays an ``Array`` whose ``dtype`` and ``shape`` describe the
decompressed images and whose ``stype`` is :data:`ZSTD`.

Flower's record types are the wire format: besides this module, only the server
cores (:mod:`flwr_select.selection.server`, :mod:`flwr_select.parallel.server`),
which take uploads as records, and :mod:`flwr_select.flower_private` import Flower.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import zstandard
from flwr.app import Array, ArrayRecord, RecordDict

from flwr_select.data import SiteData
from flwr_select.flower_private import (
    ArrayChunk,
    add_header_to_object_body,
    get_all_nested_objects,
    no_object_id_recompute,
)
from flwr_select.npy import NpyError, array_from_bytes

IMAGES, LABELS, IDS, SCORES = "images", "labels", "ids", "scores"
ZSTD = "zstd"
"""``stype`` of a Zstandard-compressed image block."""
ZSTD_LEVEL = 3
"""Zstandard level: about 0.21x raw on MNIST at over 100 MB/s on one core."""


class UploadError(ValueError):
    """An upload that cannot be decoded; the message names the problem."""


def smallest_uint(max_value: int) -> np.dtype:
    """Return the smallest unsigned integer dtype that holds ``max_value``.

    Examples
    --------
    >>> smallest_uint(9), smallest_uint(60_000), smallest_uint(70_000)
    (dtype('uint8'), dtype('uint16'), dtype('uint32'))
    """
    for dtype in (np.uint8, np.uint16, np.uint32, np.uint64):
        if max_value <= np.iinfo(dtype).max:
            return np.dtype(dtype)
    raise ValueError(f"{max_value} does not fit in 64 bits")


def encode(
    samples: SiteData, *, scores: np.ndarray | None = None, compress: bool = False
) -> ArrayRecord:
    """Return the upload of ``samples`` as an ``ArrayRecord``.

    Parameters
    ----------
    samples : SiteData
        The selected samples (may be empty).
    scores : np.ndarray, optional
        One score per sample, sent as float32 (for the server's records).
    compress : bool (default: False)
        Compress the image block with Zstandard (lossless).
    """
    images, ids = samples.images.contiguous().numpy(), samples.ids.numpy()
    label_dtype = smallest_uint(samples.num_classes - 1)
    arrays = {
        IMAGES: _compressed(images) if compress else Array(images),
        LABELS: Array(samples.labels.numpy().astype(label_dtype)),
        IDS: Array(ids.astype(smallest_uint(int(ids.max(initial=0))))),
    }
    if scores is not None:
        if len(scores) != len(samples):
            raise ValueError(
                f"scores has {len(scores)} entries for {len(samples)} samples"
            )
        arrays[SCORES] = Array(np.asarray(scores, dtype=np.float32))
    return ArrayRecord(arrays)


def _compressed(images: np.ndarray) -> Array:
    data = zstandard.ZstdCompressor(level=ZSTD_LEVEL).compress(images.tobytes())
    return Array(
        dtype=str(images.dtype), shape=tuple(images.shape), stype=ZSTD, data=data
    )


def decode(
    record: ArrayRecord,
    num_classes: int,
    *,
    sample_shape: tuple[int, ...],
    max_samples: int | None = None,
    max_bytes: int | None = None,
) -> tuple[SiteData, np.ndarray | None]:
    """Return the samples of an upload and its scores (``None`` if not sent).

    Everything an upload declares is checked before anything is built from it,
    cheapest first: the array names (exactly ``images``, ``labels``, ``ids`` and
    optionally ``scores``), each array's declared serialization, dtype and shape
    (``(n, *sample_shape)`` uint8 images, one label, id and score per image), the
    count ``n`` against ``max_samples`` and the decoded size against
    ``max_bytes``; only then the bytes: each ``.npy`` must be exactly its
    declared array (:func:`flwr_select.npy.array_from_bytes`), and last a
    compressed image block must be exactly one Zstandard frame that declares the
    content size the shape needs (see :func:`_decompressed`); since labels and
    ids are never compressed, every declared image is backed by at least two
    bytes on the wire. Then the values: labels in ``[0, num_classes)``, unique
    ids, finite scores. Decoding holds at most twice the declared (and
    checked) image bytes, never more.

    Parameters
    ----------
    record : ArrayRecord
        The upload, as it arrived.
    num_classes : int
        Labels must lie in ``[0, num_classes)``.
    sample_shape : tuple of int
        The shape of one image, known before any upload arrives (never taken
        from one).
    max_samples : int, optional
        At most this many images.
    max_bytes : int, optional
        At most this many bytes of decoded images.

    Raises
    ------
    UploadError
        Naming the first problem found.
    """
    keys = set(record.keys())
    if not {IMAGES, LABELS, IDS} <= keys <= {IMAGES, LABELS, IDS, SCORES}:
        raise UploadError(
            f"an upload holds arrays {sorted({IMAGES, LABELS, IDS})} and optionally "
            f"{SCORES!r}; got {sorted(keys)}"
        )
    arrays = {name: record[name] for name in keys}
    for name, array in arrays.items():
        _check_metadata(name, array)
    count = _declared_count(arrays[IMAGES], sample_shape, max_samples, max_bytes)
    for name in keys - {IMAGES}:
        if tuple(arrays[name].shape) != (count,):
            raise UploadError(
                f"{name} has shape {tuple(arrays[name].shape)}, expected one per "
                f"image ({count},)"
            )
    labels, ids = _numpy(arrays[LABELS], LABELS), _numpy(arrays[IDS], IDS)
    scores = None if SCORES not in keys else _numpy(arrays[SCORES], SCORES)
    if scores is not None and not np.isfinite(scores).all():
        raise UploadError("scores must be finite float32 values")
    # last: the one block that may be compressed, now that count is backed by bytes
    images = _images(arrays[IMAGES])
    try:
        samples = SiteData(
            torch.from_numpy(images.copy()),
            torch.from_numpy(labels.astype(np.int64)),
            num_classes,
            torch.from_numpy(ids.astype(np.int64)),
        )
    except ValueError as err:
        raise UploadError(str(err)) from None
    return samples, scores


UNSIGNED = tuple(np.dtype(t) for t in (np.uint8, np.uint16, np.uint32, np.uint64))
ALLOWED_DTYPES = {
    IMAGES: (np.dtype(np.uint8),),
    LABELS: UNSIGNED,
    IDS: UNSIGNED,
    SCORES: (np.dtype(np.float32),),
}
"""The dtypes each array of an upload may have (native byte order)."""


def _check_metadata(name: str, array: object) -> None:
    """Refuse an array whose declared dtype, shape or serialization is not allowed."""
    if not isinstance(array, Array) or not isinstance(array.data, bytes):
        raise UploadError(f"{name} is not a Flower Array of bytes")
    stypes = ("numpy.ndarray", ZSTD) if name == IMAGES else ("numpy.ndarray",)
    if array.stype not in stypes:
        raise UploadError(
            f"{name} has serialization {array.stype!r}, expected one of {stypes}"
        )
    allowed = [str(d) for d in ALLOWED_DTYPES[name]]
    if array.dtype not in allowed:
        raise UploadError(
            f"{name} has dtype {array.dtype!r}, expected one of {allowed}"
        )
    shape = array.shape
    if not isinstance(shape, tuple | list) or not all(
        type(d) is int and d >= 0 for d in shape
    ):
        raise UploadError(f"{name} declares shape {shape!r}, not a tuple of ints >= 0")


def _declared_count(
    images: Array,
    sample_shape: tuple[int, ...],
    max_samples: int | None,
    max_bytes: int | None,
) -> int:
    """Return the number of images declared, once it is known to be in bounds."""
    shape = tuple(images.shape)
    if len(shape) != 1 + len(sample_shape) or shape[1:] != tuple(sample_shape):
        raise UploadError(
            f"images of shape {shape[1:]}, expected {tuple(sample_shape)}"
            f" (declared {shape})"
        )
    count = shape[0]
    if max_samples is not None and count > max_samples:
        raise UploadError(f"{count} samples exceed the budget of {max_samples}")
    size = count * math.prod(sample_shape)
    if max_bytes is not None and size > max_bytes:
        raise UploadError(
            f"{count} images of {tuple(sample_shape)} are {size} bytes decoded, over "
            f"the cap of {max_bytes}"
        )
    return count


def _numpy(array: Array, name: str) -> np.ndarray:
    """Return a ``.npy`` array exactly as declared (dtype and shape)."""
    try:
        values = array_from_bytes(array.data, ALLOWED_DTYPES[name])
    except NpyError as err:
        raise UploadError(f"{name} is not a readable array: {err}") from None
    if values.shape != tuple(array.shape) or str(values.dtype) != array.dtype:
        raise UploadError(
            f"{name}: its data is {values.dtype} {values.shape}, declared "
            f"{array.dtype} {tuple(array.shape)}"
        )
    return values


def _images(array: Array) -> np.ndarray:
    if array.stype != ZSTD:
        return _numpy(array, IMAGES)
    shape = tuple(array.shape)
    raw = _decompressed(array.data, math.prod(shape))
    return np.frombuffer(raw, np.uint8).reshape(shape)


def _decompressed(frame: bytes, size: int) -> bytes:
    """Return the ``size`` bytes one Zstandard frame holds, or raise ``UploadError``.

    The frame header must declare exactly ``size`` bytes of content: the
    decoder then refuses to produce more (python-zstandard's one-shot
    ``decompress`` would instead allocate whatever the header says and ignore
    ``max_output_size``), and its window is bounded by that size too. The frame
    must be complete, and nothing may follow it.
    """
    try:
        params = zstandard.get_frame_parameters(frame)
    except zstandard.ZstdError as err:
        raise UploadError(f"compressed images: not a zstd frame: {err}") from None
    if params.content_size != size:
        declared = (
            "no content size"
            if params.content_size == zstandard.CONTENTSIZE_UNKNOWN
            else f"{params.content_size} bytes"
        )
        raise UploadError(
            f"compressed images: the frame declares {declared}, the shape needs {size}"
        )
    if params.dict_id:
        raise UploadError("compressed images: the frame needs a dictionary")
    stream = zstandard.ZstdDecompressor().decompressobj()
    try:
        raw = stream.decompress(frame)
    except zstandard.ZstdError as err:
        raise UploadError(f"compressed images do not decompress: {err}") from None
    if not stream.eof or len(raw) != size:
        raise UploadError(
            f"compressed images: the frame is incomplete ({len(raw)} of {size} bytes)"
        )
    if stream.unused_data:
        raise UploadError(
            f"compressed images: {len(stream.unused_data)} bytes follow the frame"
        )
    return raw


def wire_bytes(record: ArrayRecord | RecordDict) -> int:
    """Return the bytes Flower sends for ``record``: every object it is deflated to.

    Flower splits a record into content-addressed objects (the record, each array,
    each chunk of at most 5 MiB) and sends each distinct one once; this is the sum
    of their sizes. Transport framing (gRPC, TLS) is not included. An upload is
    an ``ArrayRecord``; a message's whole content (the model and its config, on
    the way down) is a ``RecordDict``.
    """
    with no_object_id_recompute():  # else each chunk is hashed again per parent
        objects = get_all_nested_objects(record).values()
        return sum(_deflated_size(obj) for obj in objects)


def _deflated_size(obj: object) -> int:
    """Return ``len(obj.deflate())``; a chunk's without copying its bytes."""
    if not isinstance(obj, ArrayChunk):
        return len(obj.deflate())  # type: ignore[attr-defined]
    size = len(obj.data)
    header = len(add_header_to_object_body(b"", obj))  # its length field: "0"
    return header - 1 + len(str(size)) + size


def pack(
    site: SiteData,
    positions: np.ndarray,
    *,
    max_bytes: int | None = None,
    scores: np.ndarray | None = None,
    compress: bool = False,
) -> ArrayRecord:
    """Encode the longest head of ``positions`` whose upload fits ``max_bytes``.

    Parameters
    ----------
    site : SiteData
        The site's samples.
    positions : np.ndarray
        Positions into ``site``, best first (from
        :func:`flwr_select.selection.policies.select`).
    max_bytes : int, optional
        Cap on :func:`wire_bytes` of the result; the head is found by bisection on
        exact encoded sizes, so compression buys more samples under the same cap.
    scores : np.ndarray, optional
        One score per sample of ``site``; the selected ones are sent.
    compress : bool (default: False)
        Compress the image block.

    Raises
    ------
    ValueError
        If ``max_bytes`` is below the size of an empty upload.
    """

    def head(count: int) -> ArrayRecord:
        chosen = positions[:count]
        return encode(
            site.subset(chosen),
            scores=None if scores is None else np.asarray(scores)[chosen],
            compress=compress,
        )

    record = head(len(positions))
    if max_bytes is None or wire_bytes(record) <= max_bytes:
        return record
    best = head(0)
    if wire_bytes(best) > max_bytes:
        raise ValueError(
            f"max_bytes={max_bytes} is below the {wire_bytes(best)} bytes of an "
            "empty upload"
        )
    fits, too_many = 0, len(positions)
    while too_many - fits > 1:
        middle = (fits + too_many) // 2
        candidate = head(middle)
        if wire_bytes(candidate) <= max_bytes:
            fits, best = middle, candidate
        else:
            too_many = middle
    return best
