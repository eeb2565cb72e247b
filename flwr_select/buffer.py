"""The server's training buffer: every accepted upload, kept on the training device.

Images stay ``uint8`` (a quarter of float32's memory; the model standardizes
each batch), labels are int64, both on the device the server trains on (CUDA
when it has one). Which site sent what is kept beside them on the CPU, and a
(site, sample id) pair is accepted once only, ever, even after the buffer has
dropped that sample to respect its cap.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from flwr_select.data import SiteData
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
        self.images: Tensor | None = None
        self.labels = torch.zeros(0, dtype=torch.long, device=self.device)
        self.sites = np.zeros(0, dtype=np.uint64)
        self.ids = np.zeros(0, dtype=np.int64)
        self._accepted: dict[int, SentLedger] = {}

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def nbytes(self) -> int:
        """Bytes the buffer's images and labels take on the device."""
        images = 0 if self.images is None else self.images.nbytes
        return images + self.labels.nbytes

    @property
    def image_shape(self) -> tuple[int, ...] | None:
        """Shape of one image, fixed by the first accepted upload."""
        return None if self.images is None else tuple(self.images.shape[1:])

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
        images = fresh.images.to(self.device)
        self.images = (
            images if self.images is None else torch.cat([self.images, images])
        )
        self.labels = torch.cat([self.labels, fresh.labels.to(self.device)])
        self.sites = np.concatenate([self.sites, np.full(len(new), site, np.uint64)])
        self.ids = np.concatenate([self.ids, fresh.ids.numpy()])
        self._accepted.setdefault(site, SentLedger()).add(fresh.ids.numpy())
        if self.max_samples is not None and len(self) > self.max_samples:
            self._keep_newest(self.max_samples)
        return len(new)

    def _keep_newest(self, count: int) -> None:
        assert self.images is not None
        # clone: a view would keep the dropped samples' memory alive
        self.images, self.labels = (
            self.images[-count:].clone(),
            self.labels[-count:].clone(),
        )
        self.sites, self.ids = self.sites[-count:], self.ids[-count:]

    def save(self, path: str | Path) -> None:
        """Write the buffer to ``path`` (``.npz``) atomically: temp file, rename."""
        path = Path(path)
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
        tmp = path.with_name(path.name + ".tmp")
        with tmp.open("wb") as file:
            np.savez(file, **arrays)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)

    @classmethod
    def load(
        cls, path: str | Path, *, device: torch.device | str | None = None
    ) -> TrainingBuffer:
        """Read a buffer written by :meth:`save` onto ``device``."""
        with np.load(path, allow_pickle=False) as data:
            max_samples = int(data["max_samples"])
            buffer = cls(
                int(data["num_classes"]),
                device=device,
                max_samples=None if max_samples < 0 else max_samples,
            )
            if "images" in data:
                buffer.images = torch.from_numpy(data["images"]).to(buffer.device)
            buffer.labels = torch.from_numpy(data["labels"]).to(buffer.device)
            buffer.sites, buffer.ids = data["sites"], data["ids"]
            for i, site in enumerate(data["accepted_sites"].tolist()):
                buffer._accepted[int(site)] = SentLedger(data[f"accepted_{i}"])
        return buffer
