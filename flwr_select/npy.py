"""Strict, bounded readers of NumPy's ``.npy`` and ``.npz`` formats.

Everything this project reads back as arrays (a site's upload, a checkpoint, a
site's ``data.npz`` and ledger) may be hostile or damaged, and NumPy's own
``np.load`` trusts a file's header: it allocates whatever shape the header
declares before reading a byte of data, accepts a zip where one array was
expected, and parses headers of any length. These readers accept exactly the
format: a version 1 or 2 header of at most :data:`MAX_HEADER_BYTES` holding a
plain dtype, a C-order shape of non-negative ints and a body of exactly the size
that shape declares. Nothing is allocated before the body is known to be there:
a ``.npy`` held in memory becomes a read-only view of its own bytes, and a member
of a ``.npz`` is read incrementally up to the size its header declared.

A ``.npz`` is a zip, and a zip can be a bomb: a member whose bytes are shared
with other members, or compressed with a method that inflates a chunk whole
(bzip2, lzma), turns a small file into gigabytes. So :func:`read_npz` accepts
members laid out one after the other, as ``np.savez`` writes them, and only the
compression the caller names: by default none (``np.savez``'s stored members,
each exactly as long as the array it holds, so an array costs the bytes the
file really has); deflate (``np.savez_compressed``) where a caller asks for it,
inflated at most a chunk at a time, so that memory stays bounded by the size
the header declares.
"""

from __future__ import annotations

import ast
import itertools
import math
import re
import struct
import warnings
import zipfile
from collections.abc import Callable, Collection, Mapping
from pathlib import Path
from typing import BinaryIO

import numpy as np

MAGIC = b"\x93NUMPY"
MAX_HEADER_BYTES = 10_000
"""The longest header accepted (NumPy's own limit for untrusted files)."""
CHUNK = 1 << 20
"""Bytes a member's body is read (and inflated) at a time."""
LENGTH_FORMATS = {1: "<H", 2: "<I"}
"""How long the header-length field is, per major version."""
CANONICAL_HEADER = re.compile(
    rb"\{'descr': '([<>|][a-z][0-9]{1,2})', 'fortran_order': False, "
    rb"'shape': \((|D,|D(?:, D)+)\), \} *\n".replace(
        b"D",
        rb"(?:0|[1-9][0-9]{0,18})",  # a dimension: an int < 10**19, as Python
    )
)
"""A header exactly as ``np.save`` writes it (a plain dtype, C order)."""
STORED = frozenset({zipfile.ZIP_STORED})
"""The zip compression ``np.savez`` writes: none (the default of :func:`read_npz`)."""
STORED_OR_DEFLATED = frozenset({zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED})
"""What ``np.savez`` or ``np.savez_compressed`` writes; the most :func:`read_npz` takes.

zipfile inflates a deflate member no further than each read asks; bzip2 and lzma
members it decompresses a whole chunk at a time, however large that becomes.
"""
COMPRESSION_NAMES = {
    zipfile.ZIP_STORED: "stored",
    zipfile.ZIP_DEFLATED: "deflate",
    zipfile.ZIP_BZIP2: "bzip2",
    zipfile.ZIP_LZMA: "lzma",
}
"""What the messages call each zip compression method."""
LOCAL_HEADER_BYTES = 30
"""The fixed part of a zip member's local header, which precedes its bytes."""


class NpyError(ValueError):
    """Bytes that are not exactly one ``.npy`` array of an allowed kind."""


def parse_header(read: Callable[[int], bytes]) -> tuple[np.dtype, tuple[int, ...], int]:
    """Read and check a ``.npy`` header; return its dtype, shape and body size.

    ``read(n)`` returns the next (at most) ``n`` bytes of the file. At most
    ``12 + MAX_HEADER_BYTES`` bytes are read, whatever the file says.

    Raises
    ------
    NpyError
        If the header is not a version 1 or 2 ``.npy`` header of a plain,
        C-order array.
    """
    prefix = read(len(MAGIC) + 2)
    if len(prefix) != len(MAGIC) + 2 or not prefix.startswith(MAGIC):
        raise NpyError(f"not a .npy array (starts with {prefix[:8]!r})")
    major, minor = prefix[-2], prefix[-1]
    if major not in LENGTH_FORMATS or minor != 0:
        raise NpyError(f".npy version {major}.{minor} is not accepted (1.0 or 2.0)")
    length_format = LENGTH_FORMATS[major]
    length_bytes = read(struct.calcsize(length_format))
    if len(length_bytes) != struct.calcsize(length_format):
        raise NpyError("the .npy header is cut short")
    (length,) = struct.unpack(length_format, length_bytes)
    if length > MAX_HEADER_BYTES:
        raise NpyError(f"a .npy header of {length} bytes is too long")
    text = read(length)
    if len(text) != length:
        raise NpyError("the .npy header is cut short")
    header = _canonical_header(text) or _literal_header(text)
    if not isinstance(header, dict) or set(header) != {
        "descr",
        "fortran_order",
        "shape",
    }:
        raise NpyError("the .npy header is not a dict of descr, fortran_order, shape")
    descr, fortran, shape = header["descr"], header["fortran_order"], header["shape"]
    if fortran is not False:
        raise NpyError("the .npy array is not in C order")
    if not isinstance(shape, tuple) or not all(
        type(d) is int and d >= 0 for d in shape
    ):
        raise NpyError(f"the .npy shape {shape!r} is not a tuple of ints >= 0")
    if not isinstance(descr, str):
        raise NpyError(f"the .npy dtype {descr!r} is not a plain dtype")
    try:
        dtype = np.dtype(descr)
    except Exception:
        raise NpyError(f"the .npy dtype {descr!r} is not a dtype") from None
    return dtype, shape, math.prod(shape) * dtype.itemsize


def _canonical_header(text: bytes) -> dict[str, object] | None:
    """Return the fields of a header as NumPy writes it, without parsing Python.

    Every upload has three ``.npy`` headers; matching NumPy's own layout is
    about 20x faster than :func:`ast.literal_eval`, which reads any other.
    """
    match = CANONICAL_HEADER.fullmatch(text)
    if match is None:
        return None
    descr, shape = match.groups()
    return {
        "descr": descr.decode("ascii"),
        "fortran_order": False,
        "shape": tuple(int(d) for d in shape.split(b",") if d.strip()),
    }


def _literal_header(text: bytes) -> object:
    """Return a header read as a Python literal; raise NpyError if it is none."""
    try:
        with warnings.catch_warnings():  # a hostile header may hold bad escapes
            warnings.simplefilter("ignore")
            return ast.literal_eval(text.decode("latin1"))
    except Exception:  # literal_eval raises many kinds on malformed input
        raise NpyError("the .npy header is not a Python literal") from None


def _check_dtype(dtype: np.dtype, allowed: Collection[np.dtype]) -> None:
    if dtype not in allowed:
        names = ", ".join(sorted(str(np.dtype(d)) for d in allowed))
        raise NpyError(f"dtype {dtype.str} is not allowed (allowed: {names})")


def header_of(data: bytes) -> tuple[np.dtype, tuple[int, ...], int, int]:
    """Return the dtype, shape, body size and body offset a ``.npy`` declares.

    Only the header is read and checked (see :func:`parse_header`); the body is
    checked by :func:`array_from_bytes`.
    """
    view = memoryview(data)
    position = 0

    def read(count: int) -> bytes:
        nonlocal position
        chunk = view[position : position + count].tobytes()
        position += len(chunk)
        return chunk

    dtype, shape, size = parse_header(read)
    return dtype, shape, size, position


def array_from_bytes(data: bytes, allowed: Collection[np.dtype]) -> np.ndarray:
    """Return the array a ``.npy`` byte string holds, as a read-only view of it.

    Parameters
    ----------
    data : bytes
        One whole ``.npy`` file: a header and exactly the body it declares.
    allowed : collection of np.dtype
        The dtypes accepted (byte order included: ``>u2`` is not ``uint16`` on a
        little-endian machine).

    Raises
    ------
    NpyError
        Naming the first problem; nothing is allocated before it is found.
    """
    dtype, shape, size, offset = header_of(data)
    _check_dtype(dtype, allowed)
    if len(data) - offset != size:
        raise NpyError(
            f"the .npy body holds {len(data) - offset} bytes; shape {shape} of "
            f"{dtype} needs {size}"
        )
    return np.frombuffer(data, dtype, offset=offset).reshape(shape)


def read_npz(
    path: str | Path | BinaryIO,
    allowed: Mapping[str, Collection[np.dtype]],
    *,
    required: Collection[str] = (),
    name: str | None = None,
    compressions: Collection[int] = STORED,
) -> dict[str, np.ndarray]:
    """Read a ``.npz`` file (``np.savez``) strictly; return its arrays by name.

    Parameters
    ----------
    path : str, Path or binary file
        The file, or its bytes already read (``io.BytesIO``).
    allowed : mapping of str to collection of np.dtype
        Every array name the file may hold, with its accepted dtypes. A name
        ending in ``*`` stands for any name with that prefix.
    required : collection of str (default: ())
        Names the file must hold.
    name : str, optional
        What the messages call the file (default: ``path``).
    compressions : collection of int (default: :data:`STORED`)
        The zip compression methods a member may use, a subset of
        :data:`STORED_OR_DEFLATED`: pass that to read ``np.savez_compressed``
        files too.

    Raises
    ------
    NpyError
        Naming the file and the first problem: not a zip, members that share
        bytes, a member compressed otherwise than ``compressions`` allows, an
        unknown or missing array, a member that is not exactly one ``.npy`` of an
        allowed dtype, a body shorter or longer than its header declares, a bad
        CRC. Memory is bounded by the sizes the validated headers declare and,
        with stored members only, by twice the file's size.
    ValueError
        If ``compressions`` names a method beyond :data:`STORED_OR_DEFLATED`.
    """
    if not set(compressions) <= STORED_OR_DEFLATED:
        raise ValueError(
            f"compressions {sorted(compressions)} are not all in "
            f"{sorted(STORED_OR_DEFLATED)}: others inflate without a bound"
        )
    source = Path(path) if isinstance(path, str | Path) else path
    path = name or source
    arrays: dict[str, np.ndarray] = {}
    try:
        with zipfile.ZipFile(source) as archive:
            if archive.comment or any(m.comment for m in archive.infolist()):
                # np.savez writes none; a damaged length can hide members in one
                raise NpyError("the zip holds comments, which np.savez never writes")
            _check_apart(archive.infolist())
            for member in archive.infolist():
                _check_compression(member, compressions)
                array = member.filename.removesuffix(".npy")
                dtypes = _allowed_for(array, allowed)
                if not member.filename.endswith(".npy") or dtypes is None:
                    raise NpyError(f"unexpected member {member.filename!r}")
                if array in arrays:
                    raise NpyError(f"member {member.filename!r} appears twice")
                with archive.open(member) as file:
                    try:
                        arrays[array] = _read_member(file, member.file_size, dtypes)
                    except NpyError as err:
                        raise NpyError(f"array {array!r}: {err}") from None
    except NpyError as err:
        raise NpyError(f"{path}: {err}") from None
    except (
        zipfile.BadZipFile,
        zipfile.LargeZipFile,
        EOFError,
        OSError,
        NotImplementedError,  # zipfile: an unknown compression method or version
        RuntimeError,  # zipfile: an encrypted member
    ) as err:
        raise NpyError(f"{path} is not a readable .npz file: {err!r}") from None
    missing = sorted(set(required) - arrays.keys())
    if missing:
        raise NpyError(f"{path} lacks the arrays {missing}")
    return arrays


def _check_apart(members: list[zipfile.ZipInfo]) -> None:
    """Raise NpyError unless each member's bytes end before the next one's header.

    Members that share bytes would let a file be read as many times its size
    (one large body listed under many names); members laid out one after the
    other, as ``np.savez`` writes them, hold at most the file's bytes together
    (the last one's beyond its start: at most twice the file).
    """
    ordered = sorted(members, key=lambda member: member.header_offset)
    for member, following in itertools.pairwise(ordered):
        end = member.header_offset + LOCAL_HEADER_BYTES + member.compress_size
        if end > following.header_offset:
            raise NpyError(
                f"members {member.filename!r} and {following.filename!r} share "
                "bytes, which np.savez never writes"
            )


def _check_compression(member: zipfile.ZipInfo, compressions: Collection[int]) -> None:
    """Raise NpyError unless ``member`` is compressed as ``compressions`` allow.

    A stored member must also take exactly the bytes it holds: its body is then
    bytes the file really has.
    """
    method = member.compress_type
    if method not in compressions:
        allowed = " or ".join(COMPRESSION_NAMES[m] for m in sorted(compressions))
        raise NpyError(
            f"member {member.filename!r} is compressed with "
            f"{COMPRESSION_NAMES.get(method, f'method {method}')}; only {allowed} "
            "members are accepted"
        )
    if method == zipfile.ZIP_STORED and member.compress_size != member.file_size:
        raise NpyError(
            f"member {member.filename!r} is stored in {member.compress_size} bytes "
            f"but says it holds {member.file_size}"
        )


def _allowed_for(
    name: str, allowed: Mapping[str, Collection[np.dtype]]
) -> Collection[np.dtype] | None:
    if name in allowed:
        return allowed[name]
    for pattern, dtypes in allowed.items():
        if pattern.endswith("*") and name.startswith(pattern[:-1]):
            return dtypes
    return None


def _read_member(
    file: zipfile.ZipExtFile, file_size: int, allowed: Collection[np.dtype]
) -> np.ndarray:
    """Read one member whose zip entry says it holds ``file_size`` bytes."""
    dtype, shape, size = parse_header(file.read)
    _check_dtype(dtype, allowed)
    header = file.tell()
    if file_size != header + size:
        raise NpyError(
            f"the zip says {file_size} bytes; shape {shape} of {dtype} needs "
            f"{header + size}"
        )
    body = bytearray()  # grows with the bytes that really arrive, up to size
    while len(body) < size and (chunk := file.read(min(CHUNK, size - len(body)))):
        body += chunk
    if len(body) != size or file.read(1):
        raise NpyError("the body does not match its header")
    return np.frombuffer(body, dtype).reshape(shape)
