"""Downloads into the user cache, from mirrors served on 127.0.0.1 (never farther)."""

import hashlib
import socket
import threading
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from http.server import (
    BaseHTTPRequestHandler,
    SimpleHTTPRequestHandler,
    ThreadingHTTPServer,
)

import pytest

from flwr_select import download
from flwr_select.data import load_dataset, resolve_data_dir
from flwr_select.download import (
    DOWNLOADS,
    MIRROR_ENV,
    ChecksumMismatchError,
    Download,
    MirrorsUnreachableError,
    RemoteFile,
    download_missing,
)

MNIST = DOWNLOADS["mnist"].files
FIRST = MNIST[0]  # downloaded first: a refusal there leaves nothing behind


@dataclass
class Mirror:
    """A local mirror's base URL and the paths it was asked for."""

    url: str
    requests: list[str] = field(default_factory=list)


@contextmanager
def serving(folder):
    """Serve ``folder`` over HTTP on 127.0.0.1 (port 0) in a thread."""
    mirror = Mirror("")

    class Handler(SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(folder), **kwargs)

        def do_GET(self):
            mirror.requests.append(self.path)
            super().do_GET()

        def log_message(self, format, *args):
            pass

    with listening(Handler, mirror):
        yield mirror


@contextmanager
def listening(handler, mirror, stop=None):
    """Serve ``handler`` on 127.0.0.1 (port 0) in a thread; set ``mirror.url``.

    On leaving, ``stop`` (an Event its handlers watch) is set before the
    server shuts down.
    """
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    mirror.url = f"http://127.0.0.1:{server.server_address[1]}/"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield
    finally:
        if stop is not None:
            stop.set()
        server.shutdown()
        server.server_close()
        thread.join()


def closed_port_url():
    """A base URL on 127.0.0.1 where nothing listens: the connection is refused."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"http://127.0.0.1:{port}/"


@pytest.fixture
def serve():
    """``serve(folder)`` starts a mirror of ``folder`` for the test's duration."""
    with ExitStack() as stack:
        yield lambda folder: stack.enter_context(serving(folder))


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """MNIST's user cache folder (absent), under a fresh $XDG_CACHE_HOME.

    The mirror is a closed local port unless a test names others, so that no
    test reaches the real mirrors.
    """
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))
    monkeypatch.delenv("FLWR_SELECT_DATA_DIR", raising=False)
    monkeypatch.setenv(MIRROR_ENV, closed_port_url())
    return tmp_path / "xdg-cache" / "flwr_select" / "mnist"


def test_an_empty_cache_is_filled_from_a_mirror_once(
    mnist_dir, cache, serve, monkeypatch, capsys
):
    # Prepare
    mirror = serve(mnist_dir)
    monkeypatch.setenv(MIRROR_ENV, mirror.url)
    # Execute
    images, labels = load_dataset("mnist", resolve_data_dir("mnist"), "train")
    # Assert: each file fetched once, byte-identical, no temporary file left
    assert images.shape == (60000, 28, 28) and labels.shape == (60000,)
    assert sorted(mirror.requests) == sorted(f"/{file.name}" for file in MNIST)
    assert sorted(path.name for path in cache.iterdir()) == sorted(
        f.name for f in MNIST
    )
    for file in MNIST:
        assert (cache / file.name).read_bytes() == (mnist_dir / file.name).read_bytes()
    # Assert: a few progress lines per file, ending at 100%
    progress = capsys.readouterr().err.splitlines()
    for file in MNIST:
        lines = [line for line in progress if f"{mirror.url}{file.name}" in line]
        assert 2 <= len(lines) <= 5 and lines[-1].endswith(": 100%")
    # Execute / Assert: loading again, either split, asks the mirror for nothing
    test_images, _ = load_dataset("mnist", resolve_data_dir("mnist"), "test")
    load_dataset("mnist", resolve_data_dir("mnist"), "train")
    assert test_images.shape == (10000, 28, 28)
    assert len(mirror.requests) == len(MNIST)


@pytest.mark.parametrize("damage", ["one byte flipped", "one byte more"])
def test_a_corrupted_copy_is_refused_and_nothing_stays_in_the_cache(
    damage, mnist_dir, cache, serve, tmp_path, monkeypatch
):
    # Prepare: one mirror serves a damaged first file, the other does not have it
    data = bytearray((mnist_dir / FIRST.name).read_bytes())
    if damage == "one byte flipped":
        data[len(data) // 2] ^= 0xFF
        received = f"SHA-256 {hashlib.sha256(data).hexdigest()} ({len(data)} bytes)"
    else:
        data.append(0)
        received = f"more than {FIRST.size} bytes"
    (tmp_path / "damaged").mkdir()
    (tmp_path / "damaged" / FIRST.name).write_bytes(data)
    (tmp_path / "empty").mkdir()
    damaged, empty = serve(tmp_path / "damaged"), serve(tmp_path / "empty")
    monkeypatch.setenv(MIRROR_ENV, f"{damaged.url} {empty.url}")
    # Execute
    with pytest.raises(ChecksumMismatchError) as refused:
        load_dataset("mnist", resolve_data_dir("mnist"), "train")
    # Assert
    message = str(refused.value)
    assert f"refusing {FIRST.name}: its SHA-256 is {FIRST.sha256}" in message
    assert f"{damaged.url}{FIRST.name} sent {received}" in message
    assert f"{empty.url}{FIRST.name} failed: HTTP 404" in message
    assert f"mirrors tried: {damaged.url} {empty.url}" in message
    assert damaged.requests == [f"/{FIRST.name}"]  # the next files not asked for
    assert list(cache.iterdir()) == []  # neither the file nor a temporary one


def test_an_interrupted_download_leaves_no_file(mnist_dir, cache, serve, monkeypatch):
    # Prepare: Ctrl-C arrives once the first bytes are written
    monkeypatch.setenv(MIRROR_ENV, serve(mnist_dir).url)
    show = download._Progress.show

    def interrupt(progress, received):
        show(progress, received)
        if received:
            raise KeyboardInterrupt

    monkeypatch.setattr(download._Progress, "show", interrupt)
    # Execute / Assert
    with pytest.raises(KeyboardInterrupt):
        load_dataset("mnist", resolve_data_dir("mnist"), "train")
    assert list(cache.iterdir()) == []


@pytest.mark.parametrize(
    ("first_mirror", "reason"),
    [("a closed port", "Connection refused"), ("a folder without it", "HTTP 404")],
)
def test_a_mirror_down_or_without_the_file_is_passed_over(
    first_mirror, reason, mnist_dir, cache, serve, tmp_path, monkeypatch, capsys
):
    # Prepare: the cache lacks only the test labels
    missing = "t10k-labels-idx1-ubyte.gz"
    cache.mkdir(parents=True)
    for file in MNIST:
        if file.name != missing:
            (cache / file.name).symlink_to(mnist_dir / file.name)
    (tmp_path / "empty").mkdir()
    if first_mirror == "a closed port":
        bad = closed_port_url()
    else:
        bad = serve(tmp_path / "empty").url
    good = serve(mnist_dir)
    monkeypatch.setenv(MIRROR_ENV, f"{bad} {good.url}")
    # Execute
    images, labels = load_dataset("mnist", resolve_data_dir("mnist"), "test")
    # Assert
    assert images.shape == (10000, 28, 28) and labels.shape == (10000,)
    assert good.requests == [f"/{missing}"]
    assert (cache / missing).read_bytes() == (mnist_dir / missing).read_bytes()
    failures = [
        line
        for line in capsys.readouterr().err.splitlines()
        if line.startswith(f"{bad}{missing} failed: ")
    ]
    assert len(failures) == 1 and reason in failures[0]


def test_offline_with_nothing_cached_the_error_says_which_folder_to_fill(
    cache, monkeypatch
):
    # Prepare: no mirror answers
    down = [closed_port_url(), closed_port_url()]
    monkeypatch.setenv(MIRROR_ENV, " ".join(down))
    # Execute
    with pytest.raises(FileNotFoundError) as missing:
        load_dataset("mnist", resolve_data_dir("mnist"), "train")
    # Assert: the folder, the files, and what each mirror did
    message = str(missing.value)
    assert f"mnist is not in {cache} (no mirror delivered {FIRST.name}: " in message
    assert (
        "Put train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, "
        "t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz there" in message
    )
    for url in down:
        assert f"{url}{FIRST.name} failed: " in message
    assert not cache.exists()  # no empty folder made either


def test_only_the_cache_is_downloaded_into_and_not_cifar10(
    cache, serve, tmp_path, monkeypatch
):
    # Prepare: a mirror that records anything asked of it
    (tmp_path / "empty").mkdir()
    mirror = serve(tmp_path / "empty")
    monkeypatch.setenv(MIRROR_ENV, mirror.url)
    # Execute / Assert: a folder named by the config, then by the environment
    with pytest.raises(FileNotFoundError, match="Put train-images-idx3-ubyte.gz"):
        load_dataset("mnist", resolve_data_dir("mnist", tmp_path / "named"), "train")
    monkeypatch.setenv("FLWR_SELECT_DATA_DIR", str(tmp_path / "env"))
    with pytest.raises(FileNotFoundError, match="Put train-images-idx3-ubyte.gz"):
        load_dataset("mnist", resolve_data_dir("mnist"), "train")
    # Execute / Assert: CIFAR-10's cache stays as it is
    monkeypatch.delenv("FLWR_SELECT_DATA_DIR")
    with pytest.raises(FileNotFoundError, match="Put cifar-10-batches-py/"):
        load_dataset("cifar10", resolve_data_dir("cifar10"), "train")
    assert mirror.requests == []


DRIP_INTERVAL_S = 0.05
"""A dripping mirror sends one byte this often: far within the per-read timeout."""


@contextmanager
def dripping(where):
    """Serve every GET with one byte every DRIP_INTERVAL_S, in the headers or body.

    Each read of the client's gets a byte long before ``download.TIMEOUT_S``, so
    only a deadline on the whole file ends the download.
    """
    mirror, stop = Mirror(""), threading.Event()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            mirror.requests.append(self.path)
            if where == "headers":
                self.wfile.write(b"HTTP/1.1 200 OK\r\nX-Drip: ")
            else:
                self.send_response(200)
                self.send_header("Content-Length", "4096")
                self.end_headers()
            try:
                while not stop.is_set():
                    self.wfile.write(b"a")
                    time.sleep(DRIP_INTERVAL_S)
            except OSError:  # the client shut its socket
                pass

        def log_message(self, format, *args):
            pass

    with listening(Handler, mirror, stop):
        yield mirror


TINY = RemoteFile("tiny.bin", 4096, hashlib.sha256(bytes(range(256)) * 16).hexdigest())
"""A made-up data set's one file: 4 kB, which a dripping mirror never finishes."""


@pytest.fixture
def one_second_deadline(monkeypatch, tmp_path):
    """Data set ``tiny`` (TINY) downloadable, with a deadline of 1 s for any file.

    The per-read timeout stays as it is: a download that ends at once shows the
    deadline at work. Returns a folder serving the right file.
    """
    monkeypatch.setitem(DOWNLOADS, "tiny", Download((), (TINY,)))
    monkeypatch.setattr(download, "DEADLINE_ALLOWANCE_S", 1.0)
    monkeypatch.setattr(download, "DEADLINE_MIN_BYTES_PER_S", 1e12)
    assert download.TIMEOUT_S >= 30
    good = tmp_path / "good"
    good.mkdir()
    (good / TINY.name).write_bytes(bytes(range(256)) * 16)
    return good


@pytest.mark.parametrize("where", ["headers", "body"])
def test_a_mirror_dripping_bytes_is_dropped_at_the_deadline_for_the_next(
    where, one_second_deadline, serve, tmp_path, monkeypatch, capsys
):
    # Prepare: a mirror that drips, then one that has the file
    with dripping(where) as drip:
        good = serve(one_second_deadline)
        monkeypatch.setenv(MIRROR_ENV, f"{drip.url} {good.url}")
        folder = tmp_path / "cache"
        started = time.monotonic()
        # Execute
        written = download_missing("tiny", folder)
        elapsed = time.monotonic() - started
    # Assert: the next mirror's file, well before one read timeout, nothing else
    assert written == [folder / TINY.name]
    assert (folder / TINY.name).read_bytes() == bytes(range(256)) * 16
    assert sorted(path.name for path in folder.iterdir()) == [TINY.name]  # no .part
    assert drip.requests == good.requests == [f"/{TINY.name}"]
    assert elapsed < 10
    failures = [
        line
        for line in capsys.readouterr().err.splitlines()
        if line.startswith(f"{drip.url}{TINY.name} failed: ")
    ]
    assert failures == [
        f"{drip.url}{TINY.name} failed: no whole file within the deadline of 1 s"
    ]


def test_with_only_a_dripping_mirror_the_download_fails_and_leaves_no_part_file(
    one_second_deadline, tmp_path, monkeypatch
):
    # Prepare: the body drips, so the temporary file exists when the deadline hits
    folder = tmp_path / "cache"
    with dripping("body") as drip:
        monkeypatch.setenv(MIRROR_ENV, drip.url)
        # Execute
        with pytest.raises(MirrorsUnreachableError) as failed:
            download_missing("tiny", folder)
    # Assert
    assert (
        f"no mirror delivered {TINY.name}: {drip.url}{TINY.name} failed: "
        "no whole file within the deadline of 1 s" in str(failed.value)
    )
    assert list(folder.iterdir()) == []


def test_the_deadline_is_generous_for_the_largest_file_and_finite():
    # Prepare
    largest = max(f.size for d in DOWNLOADS.values() for f in d.files)
    # Execute
    seconds = download.deadline_s(largest)
    # Assert: 26 MB at well under broadband speed, yet not forever
    assert 10 * 60 <= seconds <= 60 * 60
    assert download.deadline_s(0) == download.DEADLINE_ALLOWANCE_S
