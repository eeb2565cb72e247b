"""The server's training buffer: every accepted upload, kept on the training device.

Images stay ``uint8`` (a quarter of float32's memory; the model standardizes
each batch), labels are int64, both on the device the server trains on (CUDA
when it has one). Which site sent what is kept beside them on the CPU, and a
(site, sample id) pair is accepted once only, ever, even after the buffer has
dropped that sample to respect its cap.

What was accepted since the buffer was last saved is its journal
(:meth:`TrainingBuffer.unsaved`): the server's checkpoint writes it once, as an
append-only segment, so that a round's checkpoint costs what the round added,
not the whole buffer (:mod:`flwr_select.selection.checkpoint`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from flwr_select.data import SiteData
from flwr_select.files import write_atomically
from flwr_select.npy import read_npz
from flwr_select.selection.ledger import SentLedger

DTYPES = {
    "num_classes": np.dtype(np.int64),
    "max_samples": np.dtype(np.int64),
    "images": np.dtype(np.uint8),
    "labels": np.dtype(np.int64),
    "sites": np.dtype(np.uint64),
    "ids": np.dtype(np.int64),
    "accepted_sites": np.dtype(np.uint64),
    "accepted_*": np.dtype(np.int64),
}
"""The dtype of each array :meth:`TrainingBuffer.to_arrays` writes.

``accepted_*`` stands for ``accepted_0``, ``accepted_1``, ...: the ledger of the
first, second, ... site of ``accepted_sites``.
"""
NPZ_DTYPES = {name: (dtype,) for name, dtype in DTYPES.items()}
""":data:`DTYPES` as :func:`flwr_select.npy.read_npz` takes them."""
SEGMENT_ARRAYS = {"sites", "ids", "labels", "images"}
"""The arrays of a segment (:meth:`TrainingBuffer.unsaved`), of :data:`DTYPES`."""


def default_device() -> torch.device:
    """CUDA when there is a GPU, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


CAP_SLACK = 4
"""A capped buffer's storage holds ``max_samples // CAP_SLACK`` rows beyond the cap
(a quarter more memory), so that dropping the oldest samples costs nothing and the
kept ones are copied once per that many new ones."""


class TrainingBuffer:
    """Accepted samples, deduplicated by (site, sample id), optionally capped.

    Parameters
    ----------
    num_classes : int
        Labels must lie in ``[0, num_classes)``.
    device : torch.device or str, optional
        Where images and labels live (default: CUDA if available, else CPU).
    max_samples : int, optional
        Keep at most this many samples, dropping the oldest first; the storage
        holds a quarter more rows (:data:`CAP_SLACK`).

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
        # copies O(n) bytes in all, not O(n^2); rows [_start, _end) are used. A
        # capped buffer drops its oldest by moving _start, and its storage holds a
        # quarter more rows than the cap (CAP_SLACK), so the window is copied to
        # the front only once that many have come: O(1) copies per sample, not
        # O(buffer) per add.
        self._images: Tensor | None = None
        self._labels = torch.zeros(0, dtype=torch.long, device=self.device)
        self._start = self._end = 0
        self._sites = np.zeros(0, dtype=np.uint64)
        self._ids = np.zeros(0, dtype=np.int64)
        self._accepted: dict[int, SentLedger] = {}
        # (sites, ids) of each add since the last mark_saved(), in order
        self._journal: list[tuple[np.ndarray, np.ndarray]] = []

    def __len__(self) -> int:
        return self._end - self._start

    @property
    def images(self) -> Tensor | None:
        """The accepted images, uint8 (n, ...) on :attr:`device`; None before any."""
        return None if self._images is None else self._images[self._start : self._end]

    @property
    def labels(self) -> Tensor:
        """The accepted labels, int64 (n,) on :attr:`device`."""
        return self._labels[self._start : self._end]

    @property
    def sites(self) -> np.ndarray:
        """The site each accepted sample came from, uint64 (n,), on the CPU."""
        return self._sites[self._start : self._end]

    @property
    def ids(self) -> np.ndarray:
        """Each accepted sample's id at its site, int64 (n,), on the CPU."""
        return self._ids[self._start : self._end]

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
        fresh = samples if len(new) == len(samples) else samples.subset(new)
        sites, ids = np.full(len(new), site, np.uint64), fresh.ids.numpy().copy()
        self._append(fresh.images, fresh.labels, sites, ids)
        self._accepted.setdefault(site, SentLedger()).add(ids)
        self._journal.append((sites, ids))
        if self.max_samples is not None and len(self) > self.max_samples:
            self._keep_newest(self.max_samples)
        return len(new)

    def _append(
        self, images: Tensor, labels: Tensor, sites: np.ndarray, ids: np.ndarray
    ) -> None:
        live, count = len(self), len(labels)
        capacity = 0 if self._images is None else len(self._images)
        if self._end + count > capacity:
            capacity = max(live + count, 2 * capacity)
            if self.max_samples is not None:
                limit = self.max_samples + max(1, self.max_samples // CAP_SLACK)
                capacity = min(capacity, max(live + count, limit))
            self._move_to_new_storage(capacity, tuple(images.shape[1:]))
        assert self._images is not None
        end = self._end + count
        self._images[self._end : end] = images.to(self.device)
        self._labels[self._end : end] = labels.to(self.device)
        self._sites[self._end : end] = sites
        self._ids[self._end : end] = ids
        self._end = end

    def _move_to_new_storage(self, capacity: int, shape: tuple[int, ...]) -> None:
        """Copy the used rows to the front of new storage of ``capacity`` rows."""
        live = len(self)
        images = torch.empty((capacity, *shape), dtype=torch.uint8, device=self.device)
        labels = torch.empty(capacity, dtype=torch.long, device=self.device)
        sites = np.empty(capacity, np.uint64)
        ids = np.empty(capacity, np.int64)
        if self._images is not None:
            images[:live], labels[:live] = self.images, self.labels
        sites[:live], ids[:live] = self.sites, self.ids
        self._images, self._labels, self._sites, self._ids = images, labels, sites, ids
        self._start, self._end = 0, live

    def _keep_newest(self, count: int) -> None:
        # the dropped rows' storage is reused by the next adds (see __init__)
        self._start = self._end - count

    def unsaved(self) -> dict[str, np.ndarray]:
        """Return what was accepted since :meth:`mark_saved`, as a segment's arrays.

        ``sites`` and ``ids`` (uint64, int64) hold every (site, id) pair accepted
        since, in order, even those the cap has dropped already (the ledger must
        not forget them); ``labels`` and ``images`` the last ``len(labels)`` of
        them, those still in the buffer (``images`` absent when there are none).
        Concatenating every segment, oldest first, gives the buffer back: see
        :meth:`from_segments`.
        """
        sites = _joined([sites for sites, _ in self._journal], np.uint64)
        ids = _joined([ids for _, ids in self._journal], np.int64)
        held = min(len(ids), len(self))
        segment = {
            "sites": sites,
            "ids": ids,
            "labels": self.labels[len(self) - held :].cpu().numpy(),
        }
        if held:
            segment["images"] = self.images[len(self) - held :].cpu().numpy()
        return segment

    def mark_saved(self) -> None:
        """Forget the journal: what :meth:`unsaved` returned is on disk now."""
        self._journal = []

    def settings(self) -> dict[str, np.ndarray]:
        """Return ``num_classes`` and ``max_samples`` (-1: no cap) as 0-d arrays."""
        cap = -1 if self.max_samples is None else self.max_samples
        return {
            "num_classes": np.array(self.num_classes, np.int64),
            "max_samples": np.array(cap, np.int64),
        }

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Return everything the buffer holds as named NumPy arrays (to store it)."""
        sites = sorted(self._accepted)
        arrays = {
            **self.settings(),
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
        """Rebuild a buffer from :meth:`to_arrays` output onto ``device``.

        Raises
        ------
        ValueError
            Naming the array, unless ``arrays`` are exactly what :meth:`to_arrays`
            writes: the names and dtypes of :data:`DTYPES`, ``images`` of 3 or 4
            dimensions (absent only when empty), labels in ``[0, num_classes)``,
            one site and id (>= 0) per image, at most ``max_samples`` (-1: no
            cap) of them, and one sorted ledger per site holding all its ids.
        """
        buffer = cls._checked(arrays, device)
        # all of it is unsaved: first the ledger's ids the cap dropped, then the held
        for site, ledger in buffer._accepted.items():
            ids = ledger.to_array()
            dropped = ids[~np.isin(ids, buffer.ids[buffer.sites == site])]
            buffer._journal.append((np.full(len(dropped), site, np.uint64), dropped))
        buffer._journal.append((buffer.sites, buffer.ids))
        return buffer

    @classmethod
    def _checked(
        cls, arrays: Mapping[str, np.ndarray], device: torch.device | str | None
    ) -> TrainingBuffer:
        """Check ``arrays`` as :meth:`from_arrays` does; build them, journal empty."""
        _check(arrays)
        max_samples = int(arrays["max_samples"])
        buffer = cls(
            int(arrays["num_classes"]),
            device=device,
            max_samples=None if max_samples < 0 else max_samples,
        )
        if "images" in arrays:
            buffer._images = torch.from_numpy(arrays["images"]).to(buffer.device)
        buffer._labels = torch.from_numpy(arrays["labels"]).to(buffer.device)
        buffer._end = len(buffer._labels)
        buffer._sites, buffer._ids = arrays["sites"], arrays["ids"]
        for i, site in enumerate(arrays["accepted_sites"].tolist()):
            buffer._accepted[int(site)] = SentLedger(arrays[f"accepted_{i}"])
        return buffer

    @classmethod
    def from_segments(
        cls,
        settings: Mapping[str, np.ndarray],
        segments: Sequence[Mapping[str, np.ndarray]],
        *,
        device: torch.device | str | None = None,
    ) -> TrainingBuffer:
        """Rebuild a buffer from its :meth:`settings` and :meth:`unsaved` arrays.

        ``segments`` are what :meth:`unsaved` returned at each save, oldest
        first. The ledger is every segment's (site, id) pairs; the buffer the
        images they hold, the newest ``max_samples`` of them. The result is
        checked as :meth:`from_arrays` checks a whole buffer, and nothing of it
        is unsaved.

        Raises
        ------
        ValueError
            Naming the segment (by its index) and what is wrong, unless each is
            what :meth:`unsaved` returns and no pair comes twice.
        """
        pairs, held = [], []
        for index, segment in enumerate(segments):
            try:
                held.append(_held(segment))  # checks the arrays first
                pairs.append((segment["sites"], segment["ids"]))
            except ValueError as err:
                raise ValueError(f"segment {index}: {err}") from None
        sites = _joined([sites for sites, _ in pairs], np.uint64)
        ids = _joined([ids for _, ids in pairs], np.int64)
        order = np.lexsort((ids, sites))
        twice = np.flatnonzero(
            (np.diff(sites[order]) == 0) & (np.diff(ids[order]) == 0)
        )
        if len(twice):
            first = order[twice[0]]
            raise ValueError(
                f"the segments accept (site {sites[first]}, id {ids[first]}) twice"
            )
        with_images = [h[0] for h in held if len(h[0])]
        shapes = sorted({images.shape[1:] for images in with_images})
        if len(shapes) > 1:
            raise ValueError(f"the segments hold images of shapes {shapes}")
        cap = int(_array(settings, "max_samples", ndims=(0,)))
        newest = slice(-cap if cap > 0 else 0, None)
        images = _joined(with_images, np.uint8)[newest]
        labels, held_sites, held_ids = (
            _joined([h[i] for h in held], dtype)[newest]
            for i, dtype in ((1, np.int64), (2, np.uint64), (3, np.int64))
        )
        accepted = np.unique(sites)
        arrays = {
            **settings,
            "labels": labels,
            "sites": held_sites,
            "ids": held_ids,
            "accepted_sites": accepted,
            **{
                f"accepted_{i}": np.unique(ids[sites == site])
                for i, site in enumerate(accepted)
            },
        }
        if len(images):
            arrays["images"] = images
        return cls._checked(arrays, device)

    def save(self, path: str | Path) -> None:
        """Write the buffer to ``path`` (``.npz``) atomically: temp file, rename."""
        arrays = self.to_arrays()
        write_atomically(path, lambda file: np.savez(file, **arrays))

    @classmethod
    def load(
        cls, path: str | Path, *, device: torch.device | str | None = None
    ) -> TrainingBuffer:
        """Read a buffer written by :meth:`save` onto ``device``.

        Raises
        ------
        ValueError
            Naming the file and the first problem, if it is not exactly what
            :meth:`save` writes (see :meth:`from_arrays`).
        """
        arrays = read_npz(path, NPZ_DTYPES)
        try:
            return cls.from_arrays(arrays, device=device)
        except ValueError as err:
            raise ValueError(f"{path}: {err}") from err


def _check(arrays: Mapping[str, np.ndarray]) -> None:
    """Raise ValueError, naming the array, unless ``arrays`` are a whole buffer."""
    named = DTYPES.keys() - {"accepted_*"}
    missing = sorted(named - {"images"} - arrays.keys())
    if missing:
        raise ValueError(f"buffer arrays {missing} are missing")
    num_classes = int(_array(arrays, "num_classes", ndims=(0,)))
    max_samples = int(_array(arrays, "max_samples", ndims=(0,)))
    labels, sites, ids, accepted = (
        _array(arrays, name) for name in ("labels", "sites", "ids", "accepted_sites")
    )
    ledgers = [f"accepted_{i}" for i in range(len(accepted))]
    unknown = sorted(arrays.keys() - named - set(ledgers))
    if unknown:
        raise ValueError(f"unexpected buffer arrays {unknown}")
    missing = [name for name in ledgers if name not in arrays]
    if missing:
        raise ValueError(f"buffer arrays {missing} (ledgers) are missing")
    if num_classes < 2:
        raise ValueError(
            f"buffer array 'num_classes' is {num_classes}; expected an int >= 2"
        )
    if max_samples != -1 and max_samples < 1:
        raise ValueError(
            f"buffer array 'max_samples' is {max_samples}; expected -1 (no cap) or >= 1"
        )
    count = len(_array(arrays, "images", ndims=(3, 4))) if "images" in arrays else 0
    for name, values in (("labels", labels), ("sites", sites), ("ids", ids)):
        if len(values) != count:
            raise ValueError(
                f"buffer array {name!r} holds {len(values)} values; expected "
                f"{count}, one per image"
            )
    if max_samples != -1 and count > max_samples:
        raise ValueError(
            f"the buffer holds {count} samples, over its 'max_samples' {max_samples}"
        )
    outside = labels[(labels < 0) | (labels >= num_classes)]
    if len(outside):
        raise ValueError(
            f"buffer array 'labels' holds {outside[0]}, outside [0, {num_classes})"
        )
    if count and ids.min() < 0:
        raise ValueError(f"buffer array 'ids' holds {ids.min()}; expected ids >= 0")
    if np.any(accepted[1:] <= accepted[:-1]):
        raise ValueError(
            "buffer array 'accepted_sites' is not strictly increasing: expected "
            "each site once, sorted"
        )
    for name, site in zip(ledgers, accepted, strict=True):
        ledger = _array(arrays, name)
        if np.any(ledger[1:] <= ledger[:-1]) or (len(ledger) and ledger[0] < 0):
            raise ValueError(
                f"buffer array {name!r} is not a ledger: expected ids >= 0, "
                "strictly increasing"
            )
        held = ids[sites == site]
        absent = held[~np.isin(held, ledger)]
        if len(absent):
            raise ValueError(
                f"buffer sample (site {site}, id {absent[0]}) is missing from its "
                f"site's ledger {name!r}"
            )
    strays = sites[~np.isin(sites, accepted)]
    if len(strays):
        raise ValueError(
            f"buffer array 'sites' holds {strays[0]}, which has no ledger in "
            "'accepted_sites'"
        )


def _held(
    segment: Mapping[str, np.ndarray],
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Return a segment's held images, labels, sites and ids; raise ValueError."""
    unknown = sorted(segment.keys() - SEGMENT_ARRAYS)
    missing = sorted(SEGMENT_ARRAYS - {"images"} - segment.keys())
    if unknown or missing:
        raise ValueError(f"arrays {missing} are missing, {unknown} unexpected")
    sites, ids, labels = (_array(segment, n) for n in ("sites", "ids", "labels"))
    count = len(labels)
    if len(sites) != len(ids) or count > len(ids):
        raise ValueError(
            f"{len(sites)} sites, {len(ids)} ids and {count} labels: expected one "
            "site per id and at most as many labels"
        )
    images = segment.get("images")
    if images is None and count:
        raise ValueError(f"{count} labels but no images")
    if images is not None:
        images = _array(segment, "images", ndims=(3, 4))
        if len(images) != count:
            raise ValueError(f"{len(images)} images; expected {count}, one per label")
    else:
        images = np.zeros(0, np.uint8)
    return images, labels, sites[len(ids) - count :], ids[len(ids) - count :]


def _joined(parts: list[np.ndarray], dtype: type) -> np.ndarray:
    """Concatenate ``parts`` (an empty array of ``dtype`` when there are none)."""
    return np.concatenate(parts) if parts else np.zeros(0, dtype)


def _array(
    arrays: Mapping[str, np.ndarray], name: str, ndims: tuple[int, ...] = (1,)
) -> np.ndarray:
    """Return ``arrays[name]``; raise ValueError unless of its dtype and ndim."""
    array = arrays[name]
    dtype = DTYPES.get(name, DTYPES["accepted_*"])
    if array.dtype != dtype or array.ndim not in ndims:
        raise ValueError(
            f"buffer array {name!r} is {array.dtype} of shape {array.shape}; "
            f"expected {dtype} with {' or '.join(map(str, ndims))} dimension(s)"
        )
    return array
