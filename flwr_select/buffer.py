"""The server's training buffer: every accepted upload, kept on the training device.

Images stay ``uint8`` (a quarter of float32's memory; the model standardizes
each batch), labels are int64, both on the device the server trains on (CUDA
when it has one). Which site sent what is kept beside them on the CPU, and a
(site, sample id) pair is accepted once only, ever, even after the buffer has
dropped that sample to respect its cap.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from flwr_select.data import SiteData
from flwr_select.files import write_atomically
from flwr_select.policies import SentLedger


def default_device() -> torch.device:
    """CUDA when there is a GPU, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class TrainingBuffer:
    """Accepted samples, deduplicated by (site, sample id), optionally capped.

    Parameters
    ----------
    num_classes : int
        Labels must lie in ``[0, num_classes)``.
    device : torch.device or str, optional
        Where images and labels live (default: CUDA if available, else CPU).
    max_samples : int, optional
        Keep at most this many samples, dropping the oldest first.

    Examples
    --------
    >>> buffer = TrainingBuffer(10, device="cpu")
    >>> site = SiteData(torch.zeros(3, 28, 28, dtype=torch.uint8),
    ...                 torch.tensor([1, 2, 3]), 10)
    >>> buffer.add(7, site), buffer.add(7, site), len(buffer)
    (3, 0, 3)
    """

    def __init__(
        self,
        num_classes: int,
        *,
        device: torch.device | str | None = None,
        max_samples: int | None = None,
    ) -> None:
        if max_samples is not None and max_samples < 1:
            raise ValueError(f"max_samples must be >= 1, got {max_samples}")
        self.num_classes = num_classes
        self.device = torch.device(device) if device is not None else default_device()
        self.max_samples = max_samples
        # Storage grows by doubling, so that adding n samples one upload at a time
        # copies O(n) bytes in all, not O(n^2); the first len(self) rows are used.
        self._images: Tensor | None = None
        self._labels = torch.zeros(0, dtype=torch.long, device=self.device)
        self._size = 0
        self.sites = np.zeros(0, dtype=np.uint64)
        self.ids = np.zeros(0, dtype=np.int64)
        self._accepted: dict[int, SentLedger] = {}

    def __len__(self) -> int:
        return self._size

    @property
    def images(self) -> Tensor | None:
        """The accepted images, uint8 (n, ...) on :attr:`device`; None before any."""
        return None if self._images is None else self._images[: self._size]

    @property
    def labels(self) -> Tensor:
        """The accepted labels, int64 (n,) on :attr:`device`."""
        return self._labels[: self._size]

    @property
    def nbytes(self) -> int:
        """Bytes the buffer's images and labels take on the device."""
        images = 0 if self.images is None else self.images.nbytes
        return images + self.labels.nbytes

    @property
    def image_shape(self) -> tuple[int, ...] | None:
        """Shape of one image, fixed by the first accepted upload."""
        return None if self._images is None else tuple(self._images.shape[1:])

    def seen(self, site: int, ids: np.ndarray) -> np.ndarray:
        """Return a bool mask, True where ``site`` already delivered that id."""
        ledger = self._accepted.get(site)
        return np.zeros(len(ids), bool) if ledger is None else ledger.contains(ids)

    def add(self, site: int, samples: SiteData) -> int:
        """Append the samples ``site`` has not delivered before; return how many.

        Raises ``ValueError`` (adding nothing) if the images' shape differs from
        the buffer's or the classes differ.
        """
        if samples.num_classes != self.num_classes:
            raise ValueError(
                f"samples have {samples.num_classes} classes, the buffer "
                f"{self.num_classes}"
            )
        if not 0 <= site < 2**64:
            raise ValueError(f"site must be an unsigned 64-bit integer, got {site}")
        shape = tuple(samples.images.shape[1:])
        if self.image_shape is not None and shape != self.image_shape:
            raise ValueError(
                f"images of shape {shape}; the buffer holds {self.image_shape}"
            )
        new = np.flatnonzero(~self.seen(site, samples.ids.numpy()))
        if len(new) == 0:
            return 0
        fresh = samples.subset(new)
        self._append(fresh.images, fresh.labels)
        self.sites = np.concatenate([self.sites, np.full(len(new), site, np.uint64)])
        self.ids = np.concatenate([self.ids, fresh.ids.numpy()])
        self._accepted.setdefault(site, SentLedger()).add(fresh.ids.numpy())
        if self.max_samples is not None and len(self) > self.max_samples:
            self._keep_newest(self.max_samples)
        return len(new)

    def _append(self, images: Tensor, labels: Tensor) -> None:
        size, count = self._size, len(labels)
        capacity = 0 if self._images is None else len(self._images)
        if size + count > capacity:
            capacity = max(size + count, 2 * capacity)
            if self.max_samples is not None:
                capacity = min(capacity, max(size + count, self.max_samples))
            grown = torch.empty(
                (capacity, *images.shape[1:]), dtype=torch.uint8, device=self.device
            )
            grown_labels = torch.empty(capacity, dtype=torch.long, device=self.device)
            if self._images is not None:
                grown[:size] = self._images[:size]
                grown_labels[:size] = self._labels[:size]
            self._images, self._labels = grown, grown_labels
        assert self._images is not None
        self._images[size : size + count] = images.to(self.device)
        self._labels[size : size + count] = labels.to(self.device)
        self._size = size + count

    def _keep_newest(self, count: int) -> None:
        assert self.images is not None
        # clone: a view would keep the dropped samples' memory alive
        self._images, self._labels = (
            self.images[-count:].clone(),
            self.labels[-count:].clone(),
        )
        self._size = count
        self.sites, self.ids = self.sites[-count:], self.ids[-count:]

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Return everything the buffer holds as named NumPy arrays (to store it)."""
        sites = sorted(self._accepted)
        arrays = {
            "num_classes": np.array(self.num_classes),
            "max_samples": np.array(
                -1 if self.max_samples is None else self.max_samples
            ),
            "labels": self.labels.cpu().numpy(),
            "sites": self.sites,
            "ids": self.ids,
            "accepted_sites": np.array(sites, dtype=np.uint64),
            **{
                f"accepted_{i}": self._accepted[s].to_array()
                for i, s in enumerate(sites)
            },
        }
        if self.images is not None:
            arrays["images"] = self.images.cpu().numpy()
        return arrays

    @classmethod
    def from_arrays(
        cls,
        arrays: Mapping[str, np.ndarray],
        *,
        device: torch.device | str | None = None,
    ) -> TrainingBuffer:
        """Rebuild a buffer from :meth:`to_arrays` output onto ``device``."""
        max_samples = int(arrays["max_samples"])
        buffer = cls(
            int(arrays["num_classes"]),
            device=device,
            max_samples=None if max_samples < 0 else max_samples,
        )
        if "images" in arrays:
            buffer._images = torch.from_numpy(arrays["images"]).to(buffer.device)
        buffer._labels = torch.from_numpy(arrays["labels"]).to(buffer.device)
        buffer._size = len(buffer._labels)
        buffer.sites, buffer.ids = arrays["sites"], arrays["ids"]
        for i, site in enumerate(arrays["accepted_sites"].tolist()):
            buffer._accepted[int(site)] = SentLedger(arrays[f"accepted_{i}"])
        return buffer

    def save(self, path: str | Path) -> None:
        """Write the buffer to ``path`` (``.npz``) atomically: temp file, rename."""
        arrays = self.to_arrays()
        write_atomically(path, lambda file: np.savez(file, **arrays))

    @classmethod
    def load(
        cls, path: str | Path, *, device: torch.device | str | None = None
    ) -> TrainingBuffer:
        """Read a buffer written by :meth:`save` onto ``device``."""
        with np.load(path, allow_pickle=False) as data:
            return cls.from_arrays(data, device=device)
