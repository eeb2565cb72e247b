"""A site's data and the readers that produce it, tensor-native throughout.

Images stay ``uint8`` from disk to the wire (they are what a site uploads);
models standardize them per batch. The readers take a folder the user names and
never assume where data lives.
"""

from __future__ import annotations

import argparse
import gzip
import os
import pickle
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

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


@dataclass(frozen=True)
class SiteData:
    """Labelled raw samples held by one site (or sent in one upload), with stable ids.

    Parameters
    ----------
    images : Tensor
        ``uint8``, ``(n, H, W)`` or ``(n, C, H, W)``.
    labels : Tensor
        Integer class indices in ``[0, num_classes)``; stored as int64.
    num_classes : int
        Number of classes of the task (the model's output width).
    ids : Tensor, optional
        Unique non-negative integer ids that stay with each sample across rounds
        (the server deduplicates by them). Default: ``0 .. n-1``.

    Examples
    --------
    >>> site = SiteData(torch.zeros(3, 28, 28, dtype=torch.uint8),
    ...                 torch.tensor([0, 1, 2]), num_classes=10)
    >>> len(site), site.ids.tolist()
    (3, [0, 1, 2])
    """

    images: Tensor
    labels: Tensor
    num_classes: int
    ids: Tensor = field(default=None)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        n = len(self.images)
        if self.images.dtype != torch.uint8 or self.images.ndim not in (3, 4):
            raise ValueError(
                f"images must be uint8 of shape (n, H, W) or (n, C, H, W), got "
                f"{self.images.dtype} of shape {tuple(self.images.shape)}"
            )
        if int(self.num_classes) != self.num_classes or self.num_classes < 2:
            raise ValueError(
                f"num_classes must be an integer >= 2, got {self.num_classes}"
            )
        ids = torch.arange(n) if self.ids is None else self.ids
        for name, values in (("labels", self.labels), ("ids", ids)):
            if (
                values.shape != (n,)
                or values.is_floating_point()
                or values.is_complex()
            ):
                raise ValueError(
                    f"{name} must be a 1-D integer tensor of length {n} (one per "
                    f"image), got {values.dtype} of shape {tuple(values.shape)}"
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
    result has the file's dtype in native byte order.
    """
    raw = Path(path).read_bytes()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    if len(raw) < 4 or raw[:2] != b"\0\0" or raw[2] not in IDX_DTYPES:
        raise ValueError(f"{path} is not an IDX file (bad magic number {raw[:4]!r})")
    dtype, ndim = IDX_DTYPES[raw[2]], raw[3]
    header = 4 + 4 * ndim
    shape = tuple(int(d) for d in np.frombuffer(raw, ">u4", count=ndim, offset=4))
    expected = header + int(np.prod(shape)) * dtype.itemsize
    if len(raw) != expected:
        raise ValueError(
            f"{path}: the header promises shape {shape} ({expected} bytes) but the "
            f"file holds {len(raw)} bytes"
        )
    return (
        np.frombuffer(raw, dtype, offset=header)
        .reshape(shape)
        .astype(dtype.newbyteorder("="))
    )


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
    """
    if split not in MNIST_FILES:
        raise ValueError(f"split must be one of {sorted(MNIST_FILES)}, got {split!r}")
    images = read_idx(_find(data_dir, f"{MNIST_FILES[split]}-images-idx3-ubyte"))
    labels = read_idx(_find(data_dir, f"{MNIST_FILES[split]}-labels-idx1-ubyte"))
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise ValueError(
            f"{data_dir}: {split} images {images.shape} and labels {labels.shape} "
            "do not form a data set"
        )
    return torch.from_numpy(images.copy()), torch.from_numpy(labels.astype(np.int64))


def _find(data_dir: str | Path, stem: str) -> Path:
    for name in (f"{stem}.gz", stem):
        if (path := Path(data_dir) / name).is_file():
            return path
    raise FileNotFoundError(f"{data_dir} has neither {stem}.gz nor {stem}")


CIFAR10_BATCHES = {
    "train": [f"data_batch_{i}" for i in range(1, 6)],
    "test": ["test_batch"],
}


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickles NumPy arrays and builtins only: a pickle can run any code it names."""

    ALLOWED = {
        ("_codecs", "encode"),  # how protocol-2 pickles written by Python 3 store bytes
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(
                f"refusing to load {module}.{name} from a data file"
            )
        return super().find_class(module, name)


def load_cifar10(data_dir: str | Path, split: str = "train") -> tuple[Tensor, Tensor]:
    """Load CIFAR-10 from the ``cifar-10-batches-py`` pickles.

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
            batch = _NumpyOnlyUnpickler(file, encoding="bytes").load()
        data = np.asarray(batch[b"data"], dtype=np.uint8)
        if data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
            raise ValueError(f"{path}: data has shape {data.shape}, expected (n, 3072)")
        images.append(data.reshape(-1, 3, 32, 32))
        labels.append(np.asarray(batch[b"labels"], dtype=np.int64))
    return torch.from_numpy(np.concatenate(images)), torch.from_numpy(
        np.concatenate(labels)
    )


@dataclass(frozen=True)
class DatasetInfo:
    """A data set known by name: how to read it and what it needs."""

    loader: Callable[[str | Path, str], tuple[Tensor, Tensor]]
    num_classes: int
    model: str
    files: str


MNIST_FORMAT_FILES = (
    "train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, "
    "t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz"
)
DATASETS = {
    "mnist": DatasetInfo(load_mnist, 10, "lenet5", MNIST_FORMAT_FILES),
    "fashion-mnist": DatasetInfo(load_mnist, 10, "lenet5", MNIST_FORMAT_FILES),
    "cifar10": DatasetInfo(
        load_cifar10,
        10,
        "cifar-cnn",
        "cifar-10-batches-py/ (data_batch_1..5, test_batch)",
    ),
}
"""Data sets by the name a run config uses (``dataset = "mnist"``)."""


def resolve_data_dir(dataset: str, data_dir: str | Path | None = None) -> Path:
    """Return where ``dataset`` lives, the first that is set of three places.

    ``data_dir``, else $FLWR_SELECT_DATA_DIR, else the user cache:
    ``$XDG_CACHE_HOME`` (or ``~/.cache``) ``/flwr_select/<dataset>``.
    """
    if data_dir:
        return Path(data_dir).expanduser()
    if os.environ.get(DATA_DIR_ENV):
        return Path(os.environ[DATA_DIR_ENV]).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "flwr_select" / dataset


def load_dataset(
    dataset: str, data_dir: str | Path, split: str
) -> tuple[Tensor, Tensor]:
    """Load ``split`` of a named data set, or say which files to put where."""
    if dataset not in DATASETS:
        raise ValueError(
            f"unknown dataset {dataset!r}; choose one of {sorted(DATASETS)}"
        )
    info = DATASETS[dataset]
    try:
        return info.loader(data_dir, split)
    except FileNotFoundError as err:
        raise FileNotFoundError(
            f"{dataset} is not in {data_dir} ({err}). Put {info.files} there, or name "
            f"another folder with the run config key data-dir or ${DATA_DIR_ENV}."
        ) from None


def load_local_site(folder: str | Path, num_classes: int) -> SiteData:
    """Read an edge box's own labelled data from a folder, ids by position.

    The folder holds one of: ``data.npz`` with ``images`` (uint8) and ``labels``
    (and optionally ``ids``); MNIST-format IDX files (the ``train`` pair); or
    CIFAR-10 ``data_batch_*`` pickles.
    """
    folder = Path(folder)
    if (folder / "data.npz").is_file():
        with np.load(folder / "data.npz", allow_pickle=False) as data:
            ids = torch.from_numpy(data["ids"]) if "ids" in data else None
            return SiteData(
                torch.from_numpy(data["images"]),
                torch.from_numpy(data["labels"]),
                num_classes,
                ids,
            )
    loader = load_cifar10 if any(folder.glob("**/data_batch_1")) else load_mnist
    images, labels = loader(folder, "train")
    return SiteData(images, labels, num_classes)
