"""Fetch MNIST and Fashion-MNIST into the user cache on a machine that lacks them.

Only the cache folder is ever filled: a folder the user names is theirs. Each
file is checked against its known SHA-256 before it takes its name, so bytes
that changed on the way (or on a mirror) are never read as data. A file is
streamed into a temporary file beside its target, synced and renamed over it:
an exception, a wrong checksum or a killed process leaves the whole file or no
file, never half of one, and processes that download at once (a server and its
simulated sites) each end with the same whole file, without locks. A mirror
that cannot be reached, answers with an HTTP error, sends other bytes or does
not send the whole file before its deadline (:func:`deadline_s`: a mirror that
drips a byte every few seconds never trips the per-read timeout) is passed over
for the next one, its temporary file removed. CIFAR-10 is not downloaded.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import socket
import sys
import threading
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Self

MIRROR_ENV = "FLWR_SELECT_DATA_MIRROR"
"""Environment variable replacing the mirrors: base URLs, separated by spaces."""

TIMEOUT_S = 30.0
"""Seconds to wait for a mirror to connect, and for each read from it."""

DEADLINE_ALLOWANCE_S = 120.0
"""Seconds every file may take besides its size's share (:func:`deadline_s`)."""

DEADLINE_MIN_BYTES_PER_S = 20_000
"""The slowest average rate a whole file may come at (:func:`deadline_s`).

20 kB/s, a slow line: Fashion-MNIST's largest file (26.4 MB) may take 24 minutes,
MNIST's (9.9 MB) 10.
"""

CHUNK_BYTES = 1 << 16
"""Bytes read from a mirror at a time."""


@dataclass(frozen=True)
class RemoteFile:
    """A file a mirror serves, known by its size and SHA-256 before it arrives."""

    name: str
    size: int
    sha256: str


@dataclass(frozen=True)
class Download:
    """Where a data set's files are served (base URLs) and what they must be."""

    mirrors: tuple[str, ...]
    files: tuple[RemoteFile, ...]


DOWNLOADS = {
    "mnist": Download(
        (
            "https://ossci-datasets.s3.amazonaws.com/mnist/",
            "http://yann.lecun.com/exdb/mnist/",
        ),
        (
            RemoteFile(
                "t10k-images-idx3-ubyte.gz",
                1648877,
                "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
            ),
            RemoteFile(
                "t10k-labels-idx1-ubyte.gz",
                4542,
                "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
            ),
            RemoteFile(
                "train-images-idx3-ubyte.gz",
                9912422,
                "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
            ),
            RemoteFile(
                "train-labels-idx1-ubyte.gz",
                28881,
                "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
            ),
        ),
    ),
    "fashion-mnist": Download(
        ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
        (
            RemoteFile(
                "t10k-images-idx3-ubyte.gz",
                4422102,
                "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073",
            ),
            RemoteFile(
                "t10k-labels-idx1-ubyte.gz",
                5148,
                "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5",
            ),
            RemoteFile(
                "train-images-idx3-ubyte.gz",
                26421880,
                "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84",
            ),
            RemoteFile(
                "train-labels-idx1-ubyte.gz",
                29515,
                "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845",
            ),
        ),
    ),
}
"""The data sets that are downloaded, by name; the files are the original gzips."""


class MirrorsUnreachableError(FileNotFoundError):
    """No mirror delivered a file (none answered, or each with an HTTP error).

    A :class:`FileNotFoundError`, so :func:`flwr_select.data.load_dataset`
    answers it as it answers a missing file: with the folder to fill and the
    files to put there.
    """


class ChecksumMismatchError(ValueError):
    """A file that a mirror sent with another SHA-256 than the known one."""


class _MirrorFailed(Exception):
    """A mirror that did not deliver; its message is the reason."""


def mirrors(download: Download) -> list[str]:
    """Return the base URLs to try, in order: $FLWR_SELECT_DATA_MIRROR's if set."""
    return os.environ.get(MIRROR_ENV, "").split() or list(download.mirrors)


def download_missing(dataset: str, folder: str | Path) -> list[Path]:
    """Download the files of ``dataset`` that ``folder`` lacks; return those written.

    A file counts as there when it is, gzipped or not (as the readers take it).
    A data set that is not in :data:`DOWNLOADS` (CIFAR-10) is left alone: its
    reader then says what to put where.

    Raises
    ------
    MirrorsUnreachableError
        No mirror delivered a missing file; naming each mirror's reason.
    ChecksumMismatchError
        A mirror sent a missing file with another SHA-256, and no other mirror
        sent the right one; naming the file, both SHA-256s and each mirror.
    """
    download = DOWNLOADS.get(dataset)
    if download is None:
        return []
    folder = Path(folder)
    missing = [
        remote
        for remote in download.files
        if not any(
            (folder / name).is_file()
            for name in (remote.name, remote.name.removesuffix(".gz"))
        )
    ]
    bases = mirrors(download)
    return [_download(remote, bases, folder / remote.name) for remote in missing]


def _download(remote: RemoteFile, bases: list[str], target: Path) -> Path:
    """Write ``remote`` to ``target`` from the first of ``bases`` that sends it."""
    outcomes, mismatched = [], False
    for base in bases:
        url = f"{base.rstrip('/')}/{remote.name}"
        try:
            mismatch = _fetch(url, remote, target)
        except _MirrorFailed as failure:
            outcomes.append(f"{url} failed: {failure}")
            print(outcomes[-1], file=sys.stderr, flush=True)
            continue
        if mismatch is None:
            return target
        outcomes.append(f"{url} sent {mismatch}")
        print(outcomes[-1], file=sys.stderr, flush=True)
        mismatched = True
    tried = f"mirrors tried: {' '.join(bases)}; ${MIRROR_ENV} replaces them"
    if mismatched:
        raise ChecksumMismatchError(
            f"refusing {remote.name}: its SHA-256 is {remote.sha256} "
            f"({remote.size} bytes), but {'; '.join(outcomes)} ({tried})"
        )
    raise MirrorsUnreachableError(
        f"no mirror delivered {remote.name}: {'; '.join(outcomes)} ({tried})"
    )


def deadline_s(size: int) -> float:
    """Return the seconds a mirror has to send a whole file of ``size`` bytes.

    :data:`DEADLINE_ALLOWANCE_S` plus the time ``size`` takes at
    :data:`DEADLINE_MIN_BYTES_PER_S`: generous for any working mirror, and
    finite for one that drips bytes just fast enough to beat :data:`TIMEOUT_S`
    on every read (which would otherwise hold the download forever). Both are
    read when a download starts, so they can be changed (a test lowers them).
    """
    return DEADLINE_ALLOWANCE_S + size / DEADLINE_MIN_BYTES_PER_S


def _fetch(url: str, remote: RemoteFile, target: Path) -> str | None:
    """Stream ``url`` to ``target`` if it is ``remote``, else say what came instead.

    Returns None once ``target`` holds the file; otherwise the SHA-256 and size
    received, or that there were more than ``remote.size`` bytes (reading stops
    there: a mirror cannot fill the disk). Nothing takes ``target``'s name
    unless its SHA-256 is ``remote.sha256``.

    Raises
    ------
    _MirrorFailed
        Where the mirror cannot be reached, answers with an HTTP error, breaks
        off, or has not sent the whole file by its :func:`deadline_s`.
    """
    with _Deadline(deadline_s(remote.size)) as deadline:
        try:
            return _stream(url, remote, target, deadline)
        except _MirrorFailed:
            deadline.check()  # a read cut short by the deadline says so
            raise


def _stream(
    url: str, remote: RemoteFile, target: Path, deadline: _Deadline
) -> str | None:
    """Do :func:`_fetch`'s work over connections that ``deadline`` watches."""
    opener = urllib.request.build_opener(
        _WatchedHTTPHandler(deadline), _WatchedHTTPSHandler(deadline)
    )
    try:
        response = opener.open(url, timeout=TIMEOUT_S)
    except (OSError, http.client.HTTPException) as err:
        raise _MirrorFailed(_reason(err)) from err
    with response:
        target.parent.mkdir(parents=True, exist_ok=True)
        temporary = target.with_name(f".{target.name}.{uuid.uuid4().hex}.part")
        # Mode 0o666 less the umask, as for any file the user writes.
        descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        try:
            with os.fdopen(descriptor, "wb") as file:
                size, sha256 = _copy(response, file, remote.size, url)
                if sha256 != remote.sha256:  # cut short by the deadline, perhaps
                    deadline.check()
                if size > remote.size:
                    return f"more than {remote.size} bytes"
                if sha256 != remote.sha256:
                    return f"SHA-256 {sha256} ({size} bytes)"
                file.flush()
                os.fsync(file.fileno())
            os.replace(temporary, target)
        finally:
            temporary.unlink(missing_ok=True)
    _fsync_folder(target.parent)
    return None


def _copy(response: BinaryIO, file: BinaryIO, size: int, url: str) -> tuple[int, str]:
    """Copy up to ``size + 1`` bytes; return how many came and their SHA-256.

    The one byte more tells a file longer than ``size`` without reading it all.
    """
    digest, copied = hashlib.sha256(), 0
    progress = _Progress(url, size)
    try:
        while copied <= size:
            try:
                chunk = response.read(min(CHUNK_BYTES, size + 1 - copied))
            except (OSError, http.client.HTTPException) as err:
                raise _MirrorFailed(_reason(err)) from err
            if not chunk:
                break
            file.write(chunk)
            digest.update(chunk)
            copied += len(chunk)
            progress.show(copied)
    finally:
        progress.end()
    return copied, digest.hexdigest()


class _Deadline:
    """Shuts a download's sockets once its seconds are up, which ends any read.

    A blocked read, of the headers as of the body, returns or raises as soon as
    its socket is shut; :meth:`check` then tells that apart from a mirror that
    broke off by itself. Sockets are watched from the moment they connect (TLS
    handshakes included) by :class:`_WatchedHTTPHandler` and
    :class:`_WatchedHTTPSHandler`.
    """

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.expired = threading.Event()
        self._sockets: list[socket.socket] = []
        self._timer = threading.Timer(seconds, self._expire)
        self._timer.daemon = True

    def __enter__(self) -> Self:
        self._timer.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._timer.cancel()

    def watch(self, sock: socket.socket) -> socket.socket:
        """Shut ``sock`` at the deadline (at once if it has passed); return it."""
        self._sockets.append(sock)
        if self.expired.is_set():
            _shut(sock)
        return sock

    def check(self) -> None:
        """Raise :class:`_MirrorFailed` if the deadline has passed."""
        if self.expired.is_set():
            raise _MirrorFailed(
                f"no whole file within the deadline of {self.seconds:.3g} s"
            )

    def _expire(self) -> None:
        self.expired.set()
        for sock in self._sockets:
            _shut(sock)


def _shut(sock: socket.socket) -> None:
    """Shut ``sock`` both ways, so that a read blocked on it ends; closed is fine."""
    with suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)


class _Watching(urllib.request.AbstractHTTPHandler):
    """Opens connections whose sockets a :class:`_Deadline` watches."""

    def __init__(self, deadline: _Deadline) -> None:
        super().__init__()
        self.deadline = deadline

    def do_open(
        self, http_class: Callable[..., Any], req: urllib.request.Request, **args: Any
    ) -> http.client.HTTPResponse:
        """Open ``req`` as urllib does, each new socket watched by the deadline."""

        def connection(*conn_args: Any, **conn_kwargs: Any) -> Any:
            made = http_class(*conn_args, **conn_kwargs)
            # connect() opens its socket through this attribute, which exists to
            # be replaced; TLS and a proxy tunnel are set up over that socket.
            create = made._create_connection
            made._create_connection = lambda *a, **k: self.deadline.watch(
                create(*a, **k)
            )
            return made

        return super().do_open(connection, req, **args)


class _WatchedHTTPHandler(_Watching, urllib.request.HTTPHandler):
    """urllib's HTTP handler, its sockets shut at the download's deadline."""


class _WatchedHTTPSHandler(_Watching, urllib.request.HTTPSHandler):
    """urllib's HTTPS handler, its sockets shut at the download's deadline."""


def _fsync_folder(folder: Path) -> None:
    """Sync ``folder`` so that a rename into it survives a crash."""
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _reason(err: BaseException) -> str:
    """Say why a mirror did not deliver, briefly."""
    if isinstance(err, urllib.error.HTTPError):
        return f"HTTP {err.code} {err.reason}"
    if isinstance(err, urllib.error.URLError):
        return str(err.reason)
    return str(err) or type(err).__name__


class _Progress:
    """One download's progress on stderr, in percent, without flooding it.

    On a terminal one line is rewritten at each percent; elsewhere (a log
    file, a pipe) a line is written at 0, 25, 50, 75 and 100%.
    """

    def __init__(self, url: str, size: int) -> None:
        amount = f"{size / 1e6:.1f} MB" if size >= 100_000 else f"{size / 1e3:.1f} kB"
        self.label = f"downloading {url} ({amount})"
        self.size = size
        self.on_terminal = sys.stderr.isatty()
        self.steps = 100 if self.on_terminal else 4
        self.shown = -1
        self.show(0)

    def show(self, received: int) -> None:
        """Report ``received`` bytes if that is a new step."""
        step = min(received, self.size) * self.steps // max(self.size, 1)
        if step == self.shown:
            return
        self.shown = step
        line = f"{self.label}: {step * 100 // self.steps}%"
        sys.stderr.write(f"\r{line}" if self.on_terminal else f"{line}\n")
        sys.stderr.flush()

    def end(self) -> None:
        """End the rewritten line on a terminal, complete or not."""
        if self.on_terminal:
            sys.stderr.write("\n")
            sys.stderr.flush()
