"""A site's data and the readers that produce it, tensor-native throughout.

Images stay ``uint8`` from disk to the wire (they are what a site uploads);
models standardize them per batch. The readers take a folder the user names and
never assume where data lives.
"""

from __future__ import annotations

import argparse
import gzip
import math
import os
import pickle
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import torch
from torch import Tensor

from flwr_select.download import download_missing
from flwr_select.npy import CHUNK, STORED_OR_DEFLATED, read_npz

DATA_DIR_ENV = "FLWR_SELECT_DATA_DIR"
"""Environment variable naming the data folder when a command line does not."""


def add_data_dir_option(parser: argparse.ArgumentParser) -> None:
    """Add ``--data-dir``, required unless $FLWR_SELECT_DATA_DIR is set."""
    default = os.environ.get(DATA_DIR_ENV)
    parser.add_argument(
        "--data-dir",
        default=default,
        required=default is None,
        help=f"folder with the MNIST-format IDX files (default: ${DATA_DIR_ENV})",
    )


IDX_DTYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
"""IDX type codes (the MNIST file format) and the dtypes they store."""


class DataFileError(ValueError):
    """A data file that is not exactly its format; the message names the file."""


class UnsafePickleError(DataFileError, pickle.UnpicklingError):
    """A CIFAR-10 batch pickle that asks for more than a batch needs, or is damaged."""


def as_tensor(name: str, values: object) -> Tensor:
    """Return a tensor or NumPy array as a tensor; refuse anything else, naming it.

    A NumPy array becomes a tensor on its memory (a copy only when NumPy's is
    read-only or not contiguous, which a tensor cannot share).
    """
    if isinstance(values, Tensor):
        return values
    if isinstance(values, np.ndarray):
        if not values.flags.writeable or not values.flags.c_contiguous:
            values = np.array(values, order="C")
        return torch.from_numpy(values)
    raise ValueError(
        f"{name} must be a torch Tensor or a NumPy array, got {type(values).__name__}"
    )


def dtype_name(values: Tensor) -> str:
    """Return a tensor's dtype as NumPy names it (``uint8``, not ``torch.uint8``)."""
    return str(values.dtype).removeprefix("torch.")


@dataclass(frozen=True)
class SiteData:
    """Labelled raw samples held by one site (or sent in one upload), with stable ids.

    Each array may be a tensor or a NumPy array (kept as a tensor, sharing its
    memory where NumPy allows).

    Parameters
    ----------
    images : Tensor or np.ndarray
        ``uint8``, ``(n, H, W)`` or ``(n, C, H, W)``.
    labels : Tensor or np.ndarray
        Integer class indices in ``[0, num_classes)``; stored as int64.
    num_classes : int
        Number of classes of the task (the model's output width).
    ids : Tensor or np.ndarray, optional
        Unique non-negative integer ids that stay with each sample across rounds
        (the server deduplicates by them). Default: ``0 .. n-1``.

    Raises
    ------
    ValueError
        Naming the array, what it must be and what it is.

    Examples
    --------
    >>> site = SiteData(np.zeros((3, 28, 28), np.uint8), np.array([0, 1, 2]), 10)
    >>> len(site), site.ids.tolist(), site.images.dtype
    (3, [0, 1, 2], torch.uint8)
    >>> SiteData(np.zeros((3, 28, 28), np.float32), np.array([0, 1, 2]), 10)
    ... # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: images must be uint8 of shape ..., got float32 of shape (3, 28, 28)
    """

    images: Tensor
    labels: Tensor
    num_classes: int
    ids: Tensor = field(default=None)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        for name in ("images", "labels", "ids"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, as_tensor(name, value))
        n = len(self.images)
        if self.images.dtype != torch.uint8 or self.images.ndim not in (3, 4):
            raise ValueError(
                f"images must be uint8 of shape (n, H, W) or (n, C, H, W), got "
                f"{dtype_name(self.images)} of shape {tuple(self.images.shape)}"
            )
        if int(self.num_classes) != self.num_classes or self.num_classes < 2:
            raise ValueError(
                f"num_classes must be an integer >= 2, got {self.num_classes}"
            )
        ids = torch.arange(n) if self.ids is None else self.ids
        for name, values in (("labels", self.labels), ("ids", ids)):
            if (
                values.shape != (n,)
                or values.dtype == torch.bool
                or values.is_floating_point()
                or values.is_complex()
            ):
                raise ValueError(
                    f"{name} must be 1-D integers, one per image ({n}), got "
                    f"{dtype_name(values)} of shape {tuple(values.shape)}"
                )
        if n:
            lo, hi = int(self.labels.min()), int(self.labels.max())
            if lo < 0 or hi >= self.num_classes:
                raise ValueError(
                    f"labels must lie in [0, {self.num_classes}), got values from "
                    f"{lo} to {hi}"
                )
            if int(ids.min()) < 0:
                raise ValueError(f"ids must be >= 0, got {int(ids.min())}")
        if len(torch.unique(ids)) != n:
            raise ValueError("ids must be unique within a site; found duplicates")
        object.__setattr__(self, "labels", self.labels.long())
        object.__setattr__(self, "ids", ids.long())

    def __len__(self) -> int:
        return len(self.images)

    def subset(self, positions: Tensor | np.ndarray) -> SiteData:
        """Return the samples at ``positions`` (ids kept), e.g. a fold or an upload."""
        positions = torch.from_numpy(
            np.array(positions, dtype=np.int64)
        )  # a copy: no negative strides
        return SiteData(
            self.images[positions],
            self.labels[positions],
            self.num_classes,
            self.ids[positions],
        )

    @classmethod
    def from_dataset(
        cls, dataset: Any, num_classes: int, ids: Tensor | None = None
    ) -> SiteData:
        """Read every item of a map-style dataset (a torchvision one included).

        Items are ``(image, label)``. A tensor image is taken as ``(H, W)`` or
        ``(C, H, W)``; anything else (a PIL image, a NumPy array) goes through
        ``np.asarray`` and a 3-D result is taken as ``(H, W, C)``, as PIL and
        torchvision lay them out. Images must be ``uint8``: sites upload raw
        samples, so leave ``ToTensor``/``Normalize`` transforms off the dataset.
        """
        images, labels = [], []
        for i in range(len(dataset)):
            image, label = dataset[i]
            images.append(_as_uint8_image(image, i))
            labels.append(int(label))
        if not images:
            raise ValueError("the site has no samples (dataset is empty)")
        return cls(torch.stack(images), torch.tensor(labels), num_classes, ids)


def _as_uint8_image(image: Any, index: int) -> Tensor:
    if isinstance(image, Tensor):
        tensor = image
    else:
        tensor = torch.from_numpy(np.array(image))
        if tensor.ndim == 3:
            tensor = tensor.permute(2, 0, 1)
    if tensor.dtype != torch.uint8:
        raise ValueError(
            f"dataset item {index} has a {tensor.dtype} image; sites upload raw "
            "samples, so the dataset must yield uint8 images (drop ToTensor/Normalize)"
        )
    return tensor


def read_idx(path: str | Path) -> np.ndarray:
    """Read one IDX file (the MNIST format), gzip-compressed or raw.

    Compression is recognised by the file's magic bytes, not its name. The
    header is read and checked first, then exactly the body it declares, as it
    arrives: memory never exceeds the declared size (a gzip bomb costs no more),
    and a body shorter or longer than declared is refused.

    Parameters
    ----------
    path : str or Path
        The file.

    Returns
    -------
    np.ndarray
        The file's array, its dtype in native byte order.

    Raises
    ------
    DataFileError
        Naming the file and the problem: not IDX, not gzip, a damaged stream,
        a body that does not match the header.
    """
    path = Path(path)
    with path.open("rb") as raw:
        compressed = raw.read(2) == b"\x1f\x8b"
        raw.seek(0)
        try:
            if compressed:
                with gzip.GzipFile(fileobj=raw) as file:
                    return _read_idx_stream(file.read, path, None)
            return _read_idx_stream(raw.read, path, os.fstat(raw.fileno()).st_size)
        except (gzip.BadGzipFile, EOFError, zlib.error) as err:
            raise DataFileError(f"{path} is not a readable gzip file: {err}") from None


def _read_idx_stream(
    read: Callable[[int], bytes], path: Path, file_size: int | None
) -> np.ndarray:
    """Read an IDX header, then its body; ``file_size`` is known for raw files."""
    magic = read(4)
    if (
        len(magic) != 4
        or magic[:2] != b"\0\0"
        or magic[2] not in IDX_DTYPES
        or not magic[3]
    ):
        raise DataFileError(f"{path} is not an IDX file (bad magic number {magic!r})")
    dtype, ndim = IDX_DTYPES[magic[2]], magic[3]
    dims = read(4 * ndim)
    if len(dims) != 4 * ndim:
        raise DataFileError(f"{path}: the IDX header of {ndim} dimensions is cut short")
    shape = struct.unpack(f">{ndim}I", dims)
    header, size = 4 + 4 * ndim, math.prod(shape) * dtype.itemsize
    promise = f"{path}: the header promises shape {shape} ({header + size} bytes)"
    if file_size is not None and file_size != header + size:
        raise DataFileError(f"{promise} but the file holds {file_size} bytes")
    body = bytearray()  # grows with the bytes that really arrive, up to size
    while len(body) < size and (chunk := read(min(CHUNK, size - len(body)))):
        body += chunk
    if len(body) != size:
        raise DataFileError(
            f"{promise} but the data ends after {header + len(body)} bytes"
        )
    if read(1):
        raise DataFileError(f"{promise} but more bytes follow")
    array = np.frombuffer(body, dtype).reshape(shape)
    return array.astype(dtype.newbyteorder("="), copy=False)


MNIST_FILES = {"train": "train", "test": "t10k"}


def load_mnist(data_dir: str | Path, split: str = "train") -> tuple[Tensor, Tensor]:
    """Load an MNIST-format data set (MNIST, Fashion-MNIST) from its IDX files.

    Parameters
    ----------
    data_dir : str or Path
        Folder with ``train-images-idx3-ubyte[.gz]``, ``train-labels-idx1-ubyte[.gz]``
        and the ``t10k-`` pair.
    split : str (default: "train")
        ``"train"`` or ``"test"``.

    Returns
    -------
    tuple of Tensor
        ``uint8`` images ``(n, 28, 28)`` and int64 labels ``(n,)``.

    Raises
    ------
    DataFileError
        Naming the file: images not IDX type uint8 ``(n, H, W)``, labels not an
        integer IDX type ``(n,)`` of values >= 0, or not one label per image.
    """
    if split not in MNIST_FILES:
        raise ValueError(f"split must be one of {sorted(MNIST_FILES)}, got {split!r}")
    images_path = _find(data_dir, f"{MNIST_FILES[split]}-images-idx3-ubyte")
    labels_path = _find(data_dir, f"{MNIST_FILES[split]}-labels-idx1-ubyte")
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.dtype != np.uint8 or images.ndim != 3:
        raise DataFileError(
            f"{images_path}: images must be IDX type uint8 (0x08) of shape "
            f"(n, H, W), got {images.dtype} of shape {images.shape}"
        )
    if labels.dtype.kind not in "iu" or labels.ndim != 1:
        raise DataFileError(
            f"{labels_path}: labels must be an integer IDX type (uint8, int8, int16 "
            f"or int32) of shape (n,), got {labels.dtype} of shape {labels.shape}"
        )
    if len(labels) and labels.min() < 0:
        raise DataFileError(f"{labels_path}: labels must be >= 0, got {labels.min()}")
    if len(images) != len(labels):
        raise DataFileError(
            f"{images_path} holds {len(images)} images but {labels_path} holds "
            f"{len(labels)} labels"
        )
    return torch.from_numpy(images), torch.from_numpy(labels.astype(np.int64))


def _find(data_dir: str | Path, stem: str) -> Path:
    for name in (f"{stem}.gz", stem):
        if (path := Path(data_dir) / name).is_file():
            return path
    raise FileNotFoundError(f"{data_dir} has neither {stem}.gz nor {stem}")


CIFAR10_BATCHES = {
    "train": [f"data_batch_{i}" for i in range(1, 6)],
    "test": ["test_batch"],
}


PICKLED_DTYPES = {
    "u1": np.dtype("u1"),
    "i1": np.dtype("i1"),
    "u2": np.dtype("<u2"),
    "i2": np.dtype("<i2"),
    "u4": np.dtype("<u4"),
    "i4": np.dtype("<i4"),
    "u8": np.dtype("<u8"),
    "i8": np.dtype("<i8"),
}
"""The dtypes a CIFAR-10 pickle may name (pixels and labels), as NumPy pickles them."""
RECONSTRUCT = {
    ("numpy.core.multiarray", "_reconstruct"),  # NumPy 1 (and Python 2)
    ("numpy._core.multiarray", "_reconstruct"),  # NumPy 2
}


def _text(value: Any) -> Any:
    """Read a pickled name as text: Python 2 pickles give it as bytes."""
    return value.decode("latin1") if type(value) is bytes else value


def _ndarray(*args: Any) -> NoReturn:
    """Stand in for ``numpy.ndarray``, which a batch only passes to _reconstruct."""
    raise pickle.UnpicklingError("refusing to call numpy.ndarray from a data file")


class _PickledDtype:
    """Stand in for ``numpy.dtype(descr, False, True)``: a plain integer dtype only."""

    def __init__(self, descr: Any, align: Any, copy: Any) -> None:
        descr = _text(descr)
        if type(descr) is not str or descr not in PICKLED_DTYPES:
            raise pickle.UnpicklingError(
                "refusing numpy.dtype other than an integer dtype from a data file"
            )
        if align != 0 or copy != 1:
            raise pickle.UnpicklingError(f"refusing numpy.dtype({descr!r}) of options")
        self.dtype = PICKLED_DTYPES[descr]

    def __setstate__(self, state: Any) -> None:
        """Accept only the state NumPy pickles for this dtype (it changes nothing)."""
        plain = (3, self.dtype.str[0], None, None, None, -1, -1, 0)
        if type(state) is not tuple or tuple(map(_text, state)) != plain:
            raise pickle.UnpicklingError(f"refusing a changed dtype {self.dtype}")


class _PickledArray:
    """Stand in for an ndarray: its state becomes a view of bytes from the file."""

    array: np.ndarray | None = None

    def __setstate__(self, state: Any) -> None:
        """Build the array from ``(1, shape, dtype, False, data)``."""
        if type(state) is not tuple or len(state) != 5:
            raise pickle.UnpicklingError("refusing an ndarray state of another form")
        version, shape, dtype, fortran, data = state
        if (
            version != 1
            or type(shape) is not tuple
            or not all(type(d) is int and d >= 0 for d in shape)
            or type(dtype) is not _PickledDtype
            or fortran is not False
            or type(data) is not bytes
        ):
            raise pickle.UnpicklingError(
                "refusing an ndarray state other than (1, shape, dtype, False, bytes)"
            )
        if math.prod(shape) * dtype.dtype.itemsize != len(data):
            raise pickle.UnpicklingError(
                f"an ndarray of shape {shape} and dtype {dtype.dtype} does not fit "
                f"its {len(data)} bytes"
            )
        self.array = np.frombuffer(data, dtype.dtype).reshape(shape)


def _reconstruct(cls: Any, shape: Any, typecode: Any) -> _PickledArray:
    """Stand in for NumPy's ``_reconstruct(ndarray, (0,), b"b")``."""
    if cls is not _ndarray or shape != (0,) or typecode != b"b":
        raise pickle.UnpicklingError(
            "refusing an ndarray reconstruction of another form"
        )
    return _PickledArray()


class _CifarUnpickler(pickle.Unpickler):
    """Unpickle a CIFAR-10 batch: builtins and plain integer arrays, nothing else.

    A pickle calls whatever it names, so each name a batch uses is a stand-in
    that accepts only the call a batch makes: ``_codecs.encode(str, "latin1")``
    (how Python 3 writes bytes in protocol 2), ``_reconstruct(ndarray, (0,),
    b"b")`` and ``dtype(descr, False, True)``. An array is a view of bytes read
    from the file, and ``encode`` may make no more bytes in all than the file
    holds, so memory stays linear in the file's size.
    """

    def __init__(self, file: Any, budget: int) -> None:
        super().__init__(file, encoding="bytes")
        self.budget = budget

    def find_class(self, module: str, name: str) -> Any:
        """Return the stand-in for ``module.name``; refuse any other name."""
        if (module, name) == ("_codecs", "encode"):
            return self._encode
        if (module, name) in RECONSTRUCT:
            return _reconstruct
        if (module, name) == ("numpy", "ndarray"):
            return _ndarray
        if (module, name) == ("numpy", "dtype"):
            return _PickledDtype
        raise pickle.UnpicklingError(
            f"refusing to load {module}.{name} from a data file"
        )

    def _encode(self, text: Any, encoding: Any) -> bytes:
        if type(text) is not str or encoding != "latin1":
            raise pickle.UnpicklingError(
                "refusing _codecs.encode other than (str, 'latin1') from a data file"
            )
        if len(text) > self.budget:
            raise pickle.UnpicklingError("the pickle makes more bytes than it holds")
        self.budget -= len(text)
        return text.encode("latin1")


def load_cifar10(data_dir: str | Path, split: str = "train") -> tuple[Tensor, Tensor]:
    """Load CIFAR-10 from the ``cifar-10-batches-py`` pickles.

    Each batch must be a dict with ``b"data"``, a uint8 array ``(n, 3072)``,
    and ``b"labels"``, one int in ``[0, 10)`` per image (a list or an integer
    array); other keys are ignored. See :class:`_CifarUnpickler` for what a
    batch may ask of the unpickler.

    Parameters
    ----------
    data_dir : str or Path
        The ``cifar-10-batches-py`` folder, or a folder that contains it.
    split : str (default: "train")
        ``"train"`` (``data_batch_1`` to ``_5``) or ``"test"`` (``test_batch``).

    Returns
    -------
    tuple of Tensor
        ``uint8`` images ``(n, 3, 32, 32)`` and int64 labels ``(n,)``.

    Raises
    ------
    UnsafePickleError
        A batch that is not a pickle of builtins and plain integer arrays.
    DataFileError
        A batch that is not a dict of that data and those labels.
    """
    if split not in CIFAR10_BATCHES:
        raise ValueError(
            f"split must be one of {sorted(CIFAR10_BATCHES)}, got {split!r}"
        )
    folder = Path(data_dir)
    if (folder / "cifar-10-batches-py").is_dir():
        folder = folder / "cifar-10-batches-py"
    images, labels = [], []
    for name in CIFAR10_BATCHES[split]:
        path = folder / name
        if not path.is_file():
            raise FileNotFoundError(f"{folder} has no CIFAR-10 batch {name!r}")
        with path.open("rb") as file:
            try:
                batch = _CifarUnpickler(file, os.fstat(file.fileno()).st_size).load()
            except Exception as err:  # the unpickler raises many kinds on bad input
                raise UnsafePickleError(
                    f"{path} is not a CIFAR-10 batch: {type(err).__name__}: {err}"
                ) from None
        data, batch_labels = _cifar_batch(batch, path)
        images.append(data.reshape(-1, 3, 32, 32))
        labels.append(batch_labels)
    return torch.from_numpy(np.concatenate(images)), torch.from_numpy(
        np.concatenate(labels)
    )


def _cifar_batch(batch: Any, path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Return a batch's data and int64 labels, or say which key is wrong."""
    if type(batch) is not dict:
        raise DataFileError(f"{path}: a CIFAR-10 batch is a dict, got {_kind(batch)}")
    for key in (b"data", b"labels"):
        if key not in batch:
            raise DataFileError(f"{path}: the batch has no key {key!r}")
    data = batch[b"data"]
    if (
        type(data) is not _PickledArray
        or data.array is None
        or data.array.dtype != np.uint8
        or data.array.shape[1:] != (3 * 32 * 32,)
    ):
        raise DataFileError(
            f"{path}: b'data' must be a uint8 array of shape (n, 3072), got "
            f"{_kind(data)}"
        )
    labels = batch[b"labels"]
    values = labels
    if type(labels) is _PickledArray and labels.array is not None:
        values = labels.array.tolist()
    if (
        type(values) is not list
        or len(values) != len(data.array)
        or not all(type(label) is int and 0 <= label < 10 for label in values)
    ):
        raise DataFileError(
            f"{path}: b'labels' must hold one int in [0, 10) per image "
            f"({len(data.array)}), got {_kind(labels)}"
        )
    return data.array, np.array(values, dtype=np.int64)


def _kind(value: Any) -> str:
    """Describe an unpickled value for an error message."""
    if type(value) is _PickledArray and value.array is not None:
        return f"{value.array.dtype} array of shape {value.array.shape}"
    if type(value) in (list, dict):
        return f"{type(value).__name__} of {len(value)} items"
    return type(value).__name__


@dataclass(frozen=True)
class DatasetInfo:
    """A data set known by name: how to read it and what it needs."""

    loader: Callable[[str | Path, str], tuple[Tensor, Tensor]]
    num_classes: int
    sample_shape: tuple[int, ...]
    model: str
    files: str


MNIST_FORMAT_FILES = (
    "train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, "
    "t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz"
)
DATASETS = {
    "mnist": DatasetInfo(load_mnist, 10, (28, 28), "lenet5", MNIST_FORMAT_FILES),
    "fashion-mnist": DatasetInfo(
        load_mnist, 10, (28, 28), "lenet5", MNIST_FORMAT_FILES
    ),
    "cifar10": DatasetInfo(
        load_cifar10,
        10,
        (3, 32, 32),
        "cifar-cnn",
        "cifar-10-batches-py/ (data_batch_1..5, test_batch)",
    ),
}
"""Data sets by the name a run config uses (``dataset = "mnist"``)."""


def resolve_data_dir(dataset: str, data_dir: str | Path | None = None) -> Path:
    """Return where ``dataset`` lives, the first that is set of three places.

    ``data_dir``, else $FLWR_SELECT_DATA_DIR, else the user cache
    (:func:`cache_dir`), which :func:`load_dataset` fills when it lacks files.
    """
    if data_dir:
        return Path(data_dir).expanduser()
    if os.environ.get(DATA_DIR_ENV):
        return Path(os.environ[DATA_DIR_ENV]).expanduser()
    return cache_dir(dataset)


def cache_dir(dataset: str) -> Path:
    """Return ``$XDG_CACHE_HOME`` (or ``~/.cache``) ``/flwr_select/<dataset>``."""
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "flwr_select" / dataset


def load_dataset(
    dataset: str, data_dir: str | Path, split: str
) -> tuple[Tensor, Tensor]:
    """Load ``split`` of a named data set, or say which files to put where.

    The images must be of the data set's :attr:`DatasetInfo.sample_shape` (the
    shape the server holds uploads to) and the labels in its classes. When
    ``data_dir`` is the user cache (:func:`cache_dir`), files it lacks are first
    downloaded (:func:`flwr_select.download.download_missing`); a folder the
    user names is only read.
    """
    if dataset not in DATASETS:
        raise ValueError(
            f"unknown dataset {dataset!r}; choose one of {sorted(DATASETS)}"
        )
    info = DATASETS[dataset]
    try:
        if Path(data_dir).resolve() == cache_dir(dataset).resolve():
            download_missing(dataset, data_dir)
        images, labels = info.loader(data_dir, split)
    except FileNotFoundError as err:
        raise FileNotFoundError(
            f"{dataset} is not in {data_dir} ({err}). Put {info.files} there, or name "
            f"another folder with the run config key data-dir or ${DATA_DIR_ENV}."
        ) from None
    if tuple(images.shape[1:]) != info.sample_shape:
        raise DataFileError(
            f"{data_dir}: {split} images are of shape {tuple(images.shape[1:])}, "
            f"{dataset}'s are {info.sample_shape}"
        )
    if len(labels) and int(labels.max()) >= info.num_classes:
        raise DataFileError(
            f"{data_dir}: {split} labels go up to {int(labels.max())}; {dataset} "
            f"has {info.num_classes} classes"
        )
    return images, labels


INTEGERS = [
    np.dtype(t)
    for t in (np.int8, np.int16, np.int32, np.int64)
    + (np.uint8, np.uint16, np.uint32, np.uint64)
]
"""The integer dtypes (native byte order) a site's ``data.npz`` may store."""


def load_local_site(folder: str | Path, num_classes: int) -> SiteData:
    """Read an edge box's own labelled data from a folder, ids by position.

    The folder holds one of: ``data.npz`` with ``images`` (uint8) and ``labels``
    (and optionally ``ids``), both of an integer dtype, read strictly by
    :func:`flwr_select.npy.read_npz`; MNIST-format IDX files (the ``train``
    pair); or CIFAR-10 ``data_batch_*`` pickles.

    Raises
    ------
    ValueError
        Naming the file (or folder) and the field that is not as described, or
        (via :class:`SiteData`) not labels in ``[0, num_classes)`` and unique ids.
    """
    folder = Path(folder)
    path = folder / "data.npz"
    if path.is_file():
        arrays = read_npz(
            path,
            {"images": [np.dtype(np.uint8)], "labels": INTEGERS, "ids": INTEGERS},
            required=("images", "labels"),
            compressions=STORED_OR_DEFLATED,  # np.savez_compressed too
        )
        images = torch.from_numpy(arrays["images"])
        labels = torch.from_numpy(arrays["labels"].astype(np.int64))
        ids = arrays.get("ids")
        ids = None if ids is None else torch.from_numpy(ids.astype(np.int64))
    else:
        path = folder
        loader = load_cifar10 if any(folder.glob("**/data_batch_1")) else load_mnist
        images, labels = loader(folder, "train")
        ids = None
    try:
        return SiteData(images, labels, num_classes, ids)
    except ValueError as err:
        raise DataFileError(f"{path}: {err}") from None
