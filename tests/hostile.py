"""Hostile replies, as an attacker at a site would build them, for the tests.

``ATTACKS`` are the named attacks found against earlier versions of the server;
``mutated`` is a hypothesis strategy over the raw bytes of every array of an
upload; ``fuzz`` runs it against a strategy. Run as a module, this measures the
peak memory a fuzz costs in a process of its own::

    python -m tests.hostile 300   # prints {"examples": ..., "growth_bytes": ...}
"""

from __future__ import annotations

import functools
import io
import json
import resource
import struct
import sys
from collections.abc import Callable

import numpy as np
import torch
import zstandard
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flwr_select.data import SiteData
from flwr_select.messages import (
    CONFIG_KEY,
    METRICS_KEY,
    MODEL_KEY,
)
from flwr_select.models import build_model
from flwr_select.selection.buffer import TrainingBuffer
from flwr_select.selection.protocol import (
    MESSAGE_TYPE,
    UPLOAD_KEY,
    SelectionConfig,
)
from flwr_select.selection.server import SiteReport
from flwr_select.selection.wire import ZSTD, encode
from flwr_select.trainer import TrainConfig
from strategies.sample_selection import SampleSelection

N, RHO, SENT = 100, 0.1, 10
"""A site offers N samples and may send floor(RHO * N) = SENT of them."""
SHAPE = (28, 28)


def make_strategy(**options) -> SampleSelection:
    """A small seeded strategy on the CPU that knows MNIST's sample shape."""
    torch.manual_seed(0)
    return SampleSelection(
        functools.partial(build_model, "lenet5"),
        10,
        selection=options.pop("selection", SelectionConfig(rho=RHO)),
        server_training=TrainConfig(epochs=1, batch_size=8),
        buffer=TrainingBuffer(10, device="cpu"),
        **{"sample_shape": SHAPE, **options},
    )


def reply(
    node: int, reply_content: RecordDict, message_type: str = MESSAGE_TYPE
) -> Message:
    """A reply from ``node``, as Flower hands it to the strategy."""
    request = Message(
        RecordDict({MODEL_KEY: ArrayRecord(), CONFIG_KEY: ConfigRecord()}),
        message_type=message_type,
        dst_node_id=node,
    )
    return Message(reply_content, reply_to=request)


def random_site(site: int, count: int = N) -> SiteData:
    """``count`` random 28x28 samples of ``site``, ids ``1000 * site + i``."""
    g = torch.Generator().manual_seed(site)
    images = torch.randint(0, 256, (count, *SHAPE), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 10, (count,), generator=g)
    return SiteData(images, labels, 10, torch.arange(count) + 1000 * site)


def good_upload(site: int, count: int = SENT, compress: bool = False) -> ArrayRecord:
    """A valid upload of ``count`` of :func:`random_site`'s samples."""
    return encode(random_site(site, count), compress=compress)


def content(upload: ArrayRecord, candidates: object = N, **extra) -> RecordDict:
    """A reply's content: the upload, the site's metrics, and any ``extra`` records."""
    return reported(upload, {"num-candidates": candidates}, **extra)


def reported(upload: ArrayRecord, metrics: dict, **extra) -> RecordDict:
    """A reply's content: the upload, the site's ``metrics`` and ``extra`` records."""
    return RecordDict({UPLOAD_KEY: upload, METRICS_KEY: MetricRecord(metrics), **extra})


def with_array(upload: ArrayRecord, name: str, array: Array) -> ArrayRecord:
    """``upload`` with its array ``name`` replaced."""
    return ArrayRecord({**dict(upload.items()), name: array})


def npy_header(shape: object, descr: object = "<u2", fortran: object = False) -> bytes:
    """A version 1.0 ``.npy`` header declaring whatever it is told to."""
    text = repr({"descr": descr, "fortran_order": fortran, "shape": shape})
    text = text.encode("latin1") + b"\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(text)) + text


def zstd_frame_header(content_size: int) -> bytes:
    """A single-segment zstd frame header with an 8-byte content-size field."""
    return b"\x28\xb5\x2f\xfd" + bytes([0b11100000]) + struct.pack("<Q", content_size)


def with_content_size(frame: bytes, content_size: int) -> bytes:
    """``frame`` (with a 4- or 8-byte content-size field) claiming another size."""
    descriptor = frame[4]
    width = {2: 4, 3: 8}[descriptor >> 6]
    start = 5 + (0 if descriptor & 0b100000 else 1)  # a window byte unless single
    assert descriptor & 0b11 == 0, "no dictionary id expected"
    field = content_size.to_bytes(width, "little")
    return frame[:start] + field + frame[start + width :]


@functools.cache
def gibibyte_frame() -> bytes:
    """34 KB of zstd that decompress to 1 GiB of zeros, with the size in its header."""
    compressor = zstandard.ZstdCompressor().compressobj(size=2**30)
    chunk = bytes(2**20)
    frame = b"".join(compressor.compress(chunk) for _ in range(1024))
    return frame + compressor.flush()


def _npz_bytes(values: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, values=values)
    return buffer.getvalue()


def attacks() -> dict[str, tuple[Callable[[ArrayRecord], RecordDict], str]]:
    """Each named attack: a function of a good upload giving the hostile content,
    and a pattern of the reason the server must give."""
    images = (SENT, *SHAPE)
    size = SENT * 784

    def array_attack(name: str, array: Array) -> Callable[[ArrayRecord], RecordDict]:
        return lambda upload: content(with_array(upload, name, array))

    def frame_attack(frame: bytes) -> Callable[[ArrayRecord], RecordDict]:
        """The upload with its images replaced by ``frame``, declared as 10 images."""
        return array_attack("images", Array("uint8", images, ZSTD, frame))

    return {
        "an npz where an npy belongs": (
            array_attack(
                "labels",
                Array("uint8", (SENT,), "numpy.ndarray", _npz_bytes(np.zeros(SENT))),
            ),
            "labels is not a readable array: not a .npy array",
        ),
        "an npy header declaring 2**61 elements over a 10-byte body": (
            array_attack(
                "ids",
                Array(
                    "uint16",
                    (SENT,),
                    "numpy.ndarray",
                    npy_header((2**61,)) + bytes(10),
                ),
            ),
            r"ids is not a readable array: the .npy body holds 10 bytes; shape "
            r"\(2305843009213693952,\)",
        ),
        "a 16-byte zstd frame claiming 2**50 bytes": (
            frame_attack(zstd_frame_header(2**50) + b"\1\0\0"),
            f"the frame declares {2**50} bytes, the shape needs {size}",
        ),
        "zstd images declared with a shape of 2**40 bytes": (
            array_attack(
                "images",
                Array("uint8", (2**40 // 784, *SHAPE), ZSTD, zstd_frame_header(2**40)),
            ),
            f"{2**40 // 784} samples exceed the budget of {SENT}",
        ),
        "a dimension beyond int64": (
            array_attack(
                "images",
                Array("uint8", (SENT, 2**64, 28), "numpy.ndarray", b""),
            ),
            r"images of shape \(18446744073709551616, 28\), expected \(28, 28\)",
        ),
        "34 KB declared as 10 images that decompress to 1 GiB": (
            frame_attack(gibibyte_frame()),
            f"the frame declares {2**30} bytes, the shape needs {size}",
        ),
        "a frame that lies about its content size": (
            frame_attack(with_content_size(gibibyte_frame(), size)),
            "compressed images do not decompress",
        ),
        "a frame without its content size": (
            frame_attack(
                zstandard.ZstdCompressor(write_content_size=False).compress(bytes(size))
            ),
            "the frame declares no content size",
        ),
        "junk after a zstd frame": (
            frame_attack(zstandard.ZstdCompressor().compress(bytes(size)) + b"junk"),
            "4 bytes follow the frame",
        ),
        "an extra ConfigRecord": (
            lambda upload: content(upload, note=ConfigRecord({"hello": "server"})),
            r"got 'metrics' \(MetricRecord\), 'note' \(ConfigRecord\)",
        ),
        "an unknown metric": (
            lambda upload: reported(upload, {"num-candidates": N, "bonus": 1}),
            "the metrics hold num-candidates and some of",
        ),
        "more suspect candidates than candidates": (
            lambda upload: reported(
                upload, {"num-candidates": N, "num-suspect": N + 1}
            ),
            rf"num-suspect must be an int in \[0, num-candidates = {N}\], got {N + 1}",
        ),
        "a suspect count that is not an int": (
            lambda upload: reported(upload, {"num-candidates": N, "num-suspect": -0.5}),
            r"num-suspect must be an int in .*, got -0.5",
        ),
        "the upload as a ConfigRecord": (
            lambda upload: RecordDict(
                {
                    UPLOAD_KEY: ConfigRecord({"images": b"x"}),
                    METRICS_KEY: MetricRecord({"num-candidates": N}),
                }
            ),
            r"got 'metrics' \(MetricRecord\), 'upload' \(ConfigRecord\)",
        ),
        "images of another shape": (
            lambda upload: content(
                encode(
                    SiteData(
                        torch.zeros(SENT, 5, 5, dtype=torch.uint8),
                        torch.zeros(SENT, dtype=torch.long),
                        10,
                    )
                )
            ),
            r"images of shape \(5, 5\), expected \(28, 28\)",
        ),
    }


HUGE = st.sampled_from([2**31, 2**32, 2**40, 2**61, 2**63, 2**64, 2**70, -1])


def _shapes(count: int) -> st.SearchStrategy:
    dims = st.one_of(st.integers(0, 40), st.just(count), HUGE, st.booleans())
    return st.one_of(
        st.lists(dims, max_size=5).map(tuple),
        st.just((count, *SHAPE)),
        st.just((count,)),
    )


@st.composite
def mutated(draw: st.DrawFn, upload: ArrayRecord) -> ArrayRecord:
    """One hostile change to the bytes or declarations of one array of ``upload``.

    Headers, dtypes, shapes, serializations, lengths and compressed frames are
    all drawn; most results are invalid, a few (a flipped pixel) are still fine.
    """
    arrays = dict(upload.items())
    name = draw(st.sampled_from(sorted(arrays)))
    array = arrays[name]
    dtype, shape, stype, data = array.dtype, tuple(array.shape), array.stype, array.data
    kind = draw(
        st.sampled_from(
            ["bytes", "insert", "cut", "header", "declared", "frame", "npz", "drop"]
        )
    )
    if kind == "bytes":  # overwrite a stretch anywhere, the .npy header included
        start = draw(st.integers(0, max(len(data) - 1, 0)))
        patch = draw(st.binary(min_size=1, max_size=16))
        data = data[:start] + patch + data[start + len(patch) :]
    elif kind == "insert":
        start = draw(st.integers(0, len(data)))
        data = data[:start] + draw(st.binary(min_size=1, max_size=64)) + data[start:]
    elif kind == "cut":
        data = data[: draw(st.integers(0, max(len(data) - 1, 0)))]
    elif kind == "header":  # a .npy header declaring anything over the same body
        body = data[128:] if data.startswith(b"\x93NUMPY") else data
        descr = draw(
            st.sampled_from(
                [
                    "|u1",
                    "<u2",
                    "<u4",
                    "<u8",
                    ">u2",
                    "<f4",
                    "<f8",
                    "|b1",
                    "|O",
                    "<i8",
                    "V8",
                    "<U3",
                    [("a", "<u1")],
                    7,
                ]
            )
        )
        header = npy_header(
            draw(_shapes(len(shape) and shape[0])),
            descr,
            draw(st.sampled_from([False, True, 0, None])),
        )
        data = header + body
    elif kind == "declared":  # what the Array says about itself
        dtype = draw(
            st.sampled_from(
                [
                    "uint8",
                    "uint16",
                    "uint64",
                    "float32",
                    "int64",
                    "bool",
                    "object",
                    "",
                    dtype,
                ]
            )
        )
        shape = draw(_shapes(len(shape) and shape[0]))
        stype = draw(st.sampled_from(["numpy.ndarray", ZSTD, "pickle", "", stype]))
    elif kind == "frame":  # a zstd frame that claims, hides or appends something
        raw = draw(st.sampled_from([bytes(SENT * 784), bytes(784), b"", bytes(2**20)]))
        frame = zstandard.ZstdCompressor(
            write_content_size=draw(st.booleans())
        ).compress(raw)
        choice = draw(st.sampled_from(["as is", "claim", "truncate", "append"]))
        if choice == "claim":
            frame = zstd_frame_header(draw(st.integers(0, 2**64 - 1)))
            frame += draw(st.binary(max_size=32))
        elif choice == "truncate":
            frame = frame[: draw(st.integers(0, max(len(frame) - 1, 0)))]
        elif choice == "append":
            frame += draw(st.binary(min_size=1, max_size=16))
        dtype, stype, data = "uint8", ZSTD, frame
        if draw(st.booleans()):
            shape = draw(_shapes(len(shape) and shape[0]))
    elif kind == "npz":
        data = _npz_bytes(np.frombuffer(data, np.uint8))
    else:
        del arrays[name]
        return ArrayRecord(arrays)
    arrays[name] = Array(dtype, shape, stype, data)
    return ArrayRecord(arrays)


def state_of(strategy: SampleSelection) -> tuple[dict, list[torch.Tensor]]:
    """Everything a rejected reply must leave as it was: buffer arrays and weights."""
    arrays = strategy.buffer.to_arrays()
    weights = [t.clone() for t in strategy.model.state_dict().values()]
    return arrays, weights


def unchanged(strategy: SampleSelection, before: tuple[dict, list]) -> bool:
    """True if the buffer arrays and the model weights are bit-identical to ``before``."""
    arrays, weights = state_of(strategy)
    return (
        arrays.keys() == before[0].keys()
        and all(np.array_equal(arrays[k], before[0][k]) for k in arrays)
        and all(torch.equal(a, b) for a, b in zip(weights, before[1], strict=True))
    )


def fuzz(
    strategy: SampleSelection,
    submit: Callable[[SampleSelection, ArrayRecord], dict],
    max_examples: int,
) -> int:
    """Submit ``max_examples`` mutated uploads; return how many were accepted.

    ``submit(strategy, record)`` hands one upload to the strategy, as its
    ``aggregate_train`` or ``aggregate_uploads`` would get it, and returns the
    round's metrics. A rejected upload must leave the strategy bit-identical.
    """
    accepted = 0
    bases = [good_upload(3), good_upload(3, compress=True)]

    @settings(
        max_examples=max_examples,
        derandomize=True,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(data=st.data())
    def one(data: st.DataObject) -> None:
        nonlocal accepted
        record = data.draw(mutated(data.draw(st.sampled_from(bases))))
        before = state_of(strategy)
        metrics = submit(strategy, record)
        assert metrics["sites-accepted"] + metrics["sites-rejected"] == 1
        if metrics["sites-rejected"]:
            assert unchanged(strategy, before)
        accepted += metrics["sites-accepted"]

    one()
    return accepted


def submit_upload(strategy: SampleSelection, record: ArrayRecord) -> dict:
    """Hand ``record`` to the strategy as site 3's upload of round 2."""
    return strategy.accept_uploads(2, [(3, lambda: (record, SiteReport(N)))])


def peak_rss_growth(max_examples: int) -> dict[str, int]:
    """Fuzz a warmed-up strategy; return the examples run and the peak RSS growth."""
    strategy = make_strategy()
    strategy.accept_uploads(1, [(1, lambda: (good_upload(1), SiteReport(N)))])
    for record in (good_upload(2), good_upload(2, compress=True)):
        submit_upload(strategy, record)  # warms every code path up (rejected twice)
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    accepted = fuzz(strategy, submit_upload, max_examples)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "examples": max_examples,
        "accepted": accepted,
        "growth_bytes": (peak - baseline) * 1024,
    }


if __name__ == "__main__":
    print(json.dumps(peak_rss_growth(int(sys.argv[1]))))
