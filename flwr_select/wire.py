"""Uploads on the wire: selected raw samples as a Flower ``ArrayRecord``, and back.

An upload is three arrays, each in the smallest type that holds it: ``images``
(``uint8`` in the site's shape), ``labels`` (the smallest unsigned type that holds
the classes) and ``ids`` (the smallest unsigned type that holds the largest id),
plus optional ``scores`` (float32). Per sample that is the raw pixels, one label
byte and, for MNIST-sized ids, two id bytes: every other byte is a fixed
per-upload cost. With ``compress=True`` the image block is compressed with
Zstandard; it stays an ``Array`` whose ``dtype`` and ``shape`` describe the
decompressed images and whose ``stype`` is :data:`ZSTD`.

This is the only module of the core that imports Flower.
"""

from __future__ import annotations

import numpy as np
import torch
import zstandard
from flwr.app import Array, ArrayRecord
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

from flwr_select.data import SiteData

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
    record: ArrayRecord, num_classes: int, *, max_samples: int | None = None
) -> tuple[SiteData, np.ndarray | None]:
    """Return the samples of an upload and its scores (``None`` if not sent).

    Every array is checked before anything is built from it: the names present,
    the number of images declared (at most ``max_samples``, checked before any
    decompression), dtypes, shapes, one entry per image, labels in
    ``[0, num_classes)``, unique ids and finite scores. A compressed block may
    not expand beyond the size its shape declares.

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
    declared = record[IMAGES].shape
    if max_samples is not None and declared and int(declared[0]) > max_samples:
        raise UploadError(f"{declared[0]} samples exceed the budget of {max_samples}")
    images = _images(record[IMAGES])
    labels, ids = _unsigned(record, LABELS), _unsigned(record, IDS)
    scores = None
    if SCORES in keys:
        scores = _numpy(record[SCORES], SCORES)
        if scores.dtype != np.float32 or not np.isfinite(scores).all():
            raise UploadError("scores must be finite float32 values")
    for name, values in ((LABELS, labels), (IDS, ids), (SCORES, scores)):
        if values is not None and values.shape != (len(images),):
            raise UploadError(
                f"{name} has shape {values.shape}, expected one per image "
                f"({len(images)},)"
            )
    try:
        samples = SiteData(
            torch.from_numpy(images),
            torch.from_numpy(labels.astype(np.int64)),
            num_classes,
            torch.from_numpy(ids.astype(np.int64)),
        )
    except ValueError as err:
        raise UploadError(str(err)) from None
    return samples, scores


def _numpy(array: Array, name: str) -> np.ndarray:
    if array.stype != "numpy.ndarray":
        raise UploadError(
            f"{name} has serialization {array.stype!r}, expected numpy.ndarray"
        )
    try:
        values = array.numpy()
    except (ValueError, TypeError, EOFError) as err:
        raise UploadError(f"{name} is not a readable array: {err}") from None
    if values.shape != tuple(array.shape) or str(values.dtype) != array.dtype:
        raise UploadError(
            f"{name}: its data does not match its declared dtype and shape"
        )
    return values


def _unsigned(record: ArrayRecord, name: str) -> np.ndarray:
    values = _numpy(record[name], name)
    if values.dtype.kind != "u":
        raise UploadError(
            f"{name} must be an unsigned integer type, got {values.dtype}"
        )
    return values


def _images(array: Array) -> np.ndarray:
    if array.stype != ZSTD:
        images = _numpy(array, IMAGES)
    else:
        if array.dtype != "uint8" or not all(int(d) >= 0 for d in array.shape):
            raise UploadError(
                f"compressed images must declare uint8 and a shape, got {array.dtype}"
            )
        size = int(np.prod(array.shape, dtype=np.int64))
        try:
            raw = zstandard.ZstdDecompressor().decompress(
                array.data, max_output_size=size
            )
        except zstandard.ZstdError as err:
            raise UploadError(f"compressed images do not decompress: {err}") from None
        if len(raw) != size:
            raise UploadError(
                f"compressed images hold {len(raw)} bytes; shape {array.shape} "
                f"needs {size}"
            )
        # bytearray: a writable buffer, as torch.from_numpy expects
        images = np.frombuffer(bytearray(raw), np.uint8).reshape(array.shape)
    if images.dtype != np.uint8 or images.ndim not in (3, 4):
        raise UploadError(
            "images must be uint8 (n, H, W) or (n, C, H, W), got "
            f"{images.dtype} {images.shape}"
        )
    return images


def wire_bytes(record: ArrayRecord) -> int:
    """Return the bytes Flower sends for ``record``: every object it is deflated to.

    Flower splits a record into content-addressed objects (the record, each array,
    each chunk of at most 5 MiB) and sends each distinct one once; this is the sum
    of their sizes. Transport framing (gRPC, TLS) is not included.
    """
    return sum(len(obj.deflate()) for obj in get_all_nested_objects(record).values())


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
        Positions into ``site``, best first (from :func:`flwr_select.policies.select`).
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
