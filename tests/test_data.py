import codecs
import gzip
import pickle
import struct

import numpy as np
import pytest
import torch
from flwr.app import Context, RecordDict

from clients.site import load_ledger, save_ledger
from flwr_select.data import (
    DataFileError,
    SiteData,
    UnsafePickleError,
    load_cifar10,
    load_dataset,
    load_local_site,
    load_mnist,
    read_idx,
)
from tests.memory import LIMIT, peak_growth


def data_call_growth(call):
    """Run ``call`` (``data`` is flwr_select.data) in a Python of its own; return
    the error it raised and how far its peak memory grew past the imports."""
    return peak_growth("from flwr_select import data", call)


def write_idx(path, array, type_code=0x08, compress=False):
    header = bytes([0, 0, type_code, array.ndim]) + struct.pack(
        f">{array.ndim}I", *array.shape
    )
    raw = header + array.astype(array.dtype.newbyteorder(">")).tobytes()
    path.write_bytes(gzip.compress(raw) if compress else raw)
    return path


@pytest.mark.parametrize("compress", [False, True])
def test_read_idx_reads_uint8_and_big_endian_types(tmp_path, compress):
    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    ints = np.array([-5, 70_000, 3], dtype=np.int32)
    got = read_idx(write_idx(tmp_path / "a", images, 0x08, compress))
    np.testing.assert_array_equal(got, images)
    got = read_idx(write_idx(tmp_path / "b", ints, 0x0C, compress))
    assert got.tolist() == [-5, 70_000, 3] and got.dtype == np.int32


def test_read_idx_refuses_truncated_and_foreign_files(tmp_path):
    path = write_idx(tmp_path / "x", np.zeros((3, 2, 2), np.uint8))
    path.write_bytes(path.read_bytes()[:-1])
    with pytest.raises(ValueError, match=r"promises shape \(3, 2, 2\)"):
        read_idx(path)
    (tmp_path / "y").write_bytes(b"PK\x03\x04 a zip file")
    with pytest.raises(ValueError, match="not an IDX file"):
        read_idx(tmp_path / "y")


def idx_header(type_code, shape):
    return bytes([0, 0, type_code, len(shape)]) + struct.pack(f">{len(shape)}I", *shape)


def test_read_idx_reads_no_more_of_a_gzip_bomb_than_its_header_declares(tmp_path):
    # 16 declared bytes, then 256 MiB of zeros (about 250 kB compressed): the
    # old reader inflated it all before looking at the header
    bomb = tmp_path / "bomb.gz"
    with gzip.open(bomb, "wb", compresslevel=1) as f:
        f.write(idx_header(0x08, (16,)) + bytes(16))
        for _ in range(256):
            f.write(bytes(1 << 20))
    assert bomb.stat().st_size < 2_000_000
    message, growth = data_call_growth(f"data.read_idx({str(bomb)!r})")
    assert str(bomb) in message and "but more bytes follow" in message
    assert growth < LIMIT


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (
            idx_header(0x08, (2**31,)) + bytes(10),
            r"\(2147483656 bytes\) but the file holds 18",
        ),
        (b"\0\0\x08\x03" + bytes(4), "the IDX header of 3 dimensions is cut short"),
        (idx_header(0x0A, (2,)) + bytes(2), "not an IDX file"),
        (b"\0\0\x08\x00", "not an IDX file"),
        (b"\0\0", "not an IDX file"),
    ],
)
@pytest.mark.parametrize("compress", [False, True])
def test_read_idx_refuses_a_bad_header_naming_the_file(
    tmp_path, content, message, compress
):
    path = tmp_path / "bad"
    path.write_bytes(gzip.compress(content) if compress else content)
    if compress:  # a gzip stream has no size to compare: its data runs short
        message = message.replace("but the file holds 18", "but the data ends after 18")
    with pytest.raises(DataFileError, match=message) as refused:
        read_idx(path)
    assert str(path) in str(refused.value)


def test_read_idx_refuses_damaged_gzip_and_trailing_bytes(tmp_path):
    good = gzip.compress(idx_header(0x08, (4,)) + bytes([1, 2, 3, 4]))
    cases = {
        "cut": (good[:-12], "not a readable gzip file"),
        "crc": (good[:-8] + bytes(4) + good[-4:], "not a readable gzip file"),
        "longer": (
            gzip.compress(idx_header(0x08, (4,)) + bytes(5)),
            "more bytes follow",
        ),
        "raw-longer": (idx_header(0x08, (4,)) + bytes(5), "the file holds 13 bytes"),
        "shorter": (gzip.compress(idx_header(0x08, (4,)) + bytes(3)), "ends after 11"),
    }
    for name, (content, message) in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(DataFileError, match=message) as refused:
            read_idx(tmp_path / name)
        assert str(tmp_path / name) in str(refused.value)
    (tmp_path / "good").write_bytes(good)
    assert read_idx(tmp_path / "good").tolist() == [1, 2, 3, 4]


def test_load_mnist_reads_a_folder_of_idx_files(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (5, 28, 28), dtype=np.uint8)
    write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", images, compress=True)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.array([3, 1, 4, 1, 5], np.uint8))
    x, y = load_mnist(tmp_path, "test")
    assert x.dtype == torch.uint8 and torch.equal(x, torch.from_numpy(images))
    assert y.dtype == torch.int64 and y.tolist() == [3, 1, 4, 1, 5]
    with pytest.raises(
        FileNotFoundError, match="has neither train-images-idx3-ubyte.gz nor"
    ):
        load_mnist(tmp_path, "train")
    with pytest.raises(ValueError, match="split must be one of"):
        load_mnist(tmp_path, "validation")


def write_mnist_pair(folder, images, labels, image_type=0x08, label_type=0x08):
    folder.mkdir(exist_ok=True)
    write_idx(folder / "train-images-idx3-ubyte", images, image_type)
    write_idx(folder / "train-labels-idx1-ubyte", labels, label_type)


@pytest.mark.parametrize(
    ("images", "labels", "file", "message"),
    [
        (
            (np.zeros((2, 28, 28), np.uint8), 0x08),
            (np.array([3.7, 1.0], np.float32), 0x0D),
            "labels",
            "labels must be an integer IDX type .* got float32",
        ),
        (
            (np.zeros((2, 28, 28), np.int32), 0x0C),
            (np.array([3, 1], np.uint8), 0x08),
            "images",
            "images must be IDX type uint8 .* got int32",
        ),
        (
            (np.zeros((2, 784), np.uint8), 0x08),
            (np.array([3, 1], np.uint8), 0x08),
            "images",
            r"of shape \(n, H, W\), got uint8 of shape \(2, 784\)",
        ),
        (
            (np.zeros((2, 28, 28), np.uint8), 0x08),
            (np.array([[3, 1]], np.uint8), 0x08),
            "labels",
            r"got uint8 of shape \(1, 2\)",
        ),
        (
            (np.zeros((2, 28, 28), np.uint8), 0x08),
            (np.array([3, -1], np.int8), 0x09),
            "labels",
            "labels must be >= 0, got -1",
        ),
        (
            (np.zeros((3, 28, 28), np.uint8), 0x08),
            (np.array([3, 1], np.uint8), 0x08),
            "images",
            "holds 3 images but .*labels-idx1-ubyte holds 2 labels",
        ),
    ],
)
def test_load_mnist_refuses_what_is_not_uint8_images_and_integer_labels(
    tmp_path, images, labels, file, message
):
    write_mnist_pair(tmp_path, images[0], labels[0], images[1], labels[1])
    with pytest.raises(DataFileError, match=message) as refused:
        load_mnist(tmp_path, "train")
    assert str(refused.value).startswith(str(tmp_path / f"train-{file}-idx"))


def test_real_mnist(mnist_dir):
    x, y = load_mnist(mnist_dir, "train")
    xt, yt = load_mnist(mnist_dir, "test")
    assert x.shape == (60_000, 28, 28) and xt.shape == (10_000, 28, 28)
    assert y[:10].tolist() == [
        5,
        0,
        4,
        1,
        9,
        2,
        1,
        3,
        1,
        4,
    ]  # the well-known first labels
    assert torch.bincount(y).tolist()[:2] == [5923, 6742]
    assert int(x.max()) == 255 and int(x.min()) == 0


def write_cifar(folder, batches, n=3, seed=0):
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    written = {}
    for name in batches:
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, n).tolist()
        with (folder / name).open("wb") as f:
            pickle.dump(
                {b"batch_label": name.encode(), b"data": data, b"labels": labels},
                f,
                protocol=2,
            )
        written[name] = (data, labels)
    return written


def test_load_cifar10_reads_the_python_pickles(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    written = write_cifar(
        folder, [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    )
    x, y = load_cifar10(tmp_path, "train")  # the parent folder works too
    assert x.shape == (15, 3, 32, 32) and x.dtype == torch.uint8
    data, labels = written["data_batch_2"]
    # row layout: 1024 red, then 1024 green, then 1024 blue values, row-major
    assert (
        x[3, 0, 0, 0] == data[0, 0]
        and x[3, 1, 0, 0] == data[0, 1024]
        and x[3, 2, 31, 31] == data[0, 3071]
    )
    assert y[3:6].tolist() == labels
    xt, yt = load_cifar10(folder, "test")
    assert torch.equal(xt.reshape(3, -1), torch.from_numpy(written["test_batch"][0]))


def py2_batch(data, labels):
    """A batch as Python 2 and NumPy 1 pickled CIFAR-10: protocol 2, str as bytes."""

    def string(raw):  # SHORT_BINSTRING or BINSTRING: bytes under encoding="bytes"
        size = (
            b"U" + bytes([len(raw)])
            if len(raw) < 256
            else b"T" + struct.pack("<I", len(raw))
        )
        return size + raw

    def integer(value):
        return b"J" + struct.pack("<i", value)

    array = (
        b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\n"
        + integer(0)
        + b"\x85"
        + string(b"b")
        + b"\x87R("  # then BUILD's state
        + integer(1)
        + integer(data.shape[0])
        + integer(data.shape[1])
        + b"\x86"
        + b"cnumpy\ndtype\n"
        + string(b"u1")
        + integer(0)
        + integer(1)
        + b"\x87R("
        + integer(3)
        + string(b"|")
        + b"NNN"
        + integer(-1)
        + integer(-1)
        + integer(0)
        + b"tb\x89"
        + string(data.tobytes())
        + b"tb"
    )
    listed = b"](" + b"".join(integer(label) for label in labels) + b"e"
    return b"\x80\x02}(" + string(b"data") + array + string(b"labels") + listed + b"u."


def test_load_cifar10_reads_python_2_pickles_and_integer_label_arrays(tmp_path):
    data = np.random.default_rng(0).integers(0, 256, (3, 3072), dtype=np.uint8)
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    (folder / "test_batch").write_bytes(py2_batch(data, [7, 0, 9]))
    # the helper writes what NumPy itself reads as a batch
    plain = pickle.loads((folder / "test_batch").read_bytes(), encoding="bytes")
    assert np.array_equal(plain[b"data"], data) and plain[b"labels"] == [7, 0, 9]
    x, y = load_cifar10(folder, "test")
    assert torch.equal(x.reshape(3, -1), torch.from_numpy(data)) and y.tolist() == [
        7,
        0,
        9,
    ]
    with (folder / "test_batch").open("wb") as f:
        pickle.dump({b"data": data, b"labels": np.array([1, 2, 3])}, f, protocol=2)
    assert load_cifar10(folder, "test")[1].tolist() == [1, 2, 3]


class Hex:
    """Pickles as _codecs.encode(inner, "hex"): twice the bytes of inner."""

    def __init__(self, inner):
        self.inner = inner

    def __reduce__(self):
        return (codecs.encode, (self.inner, "hex"))


def test_load_cifar10_refuses_a_small_pickle_that_grows_memory(tmp_path):
    # 389 bytes that made the old allow-list's _codecs.encode build 1 GiB
    value = b"ab"
    for _ in range(28):
        value = Hex(value)
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    with (folder / "test_batch").open("wb") as f:
        pickle.dump({b"data": value, b"labels": []}, f, protocol=2)
    assert (folder / "test_batch").stat().st_size < 1000
    message, growth = data_call_growth(f"data.load_cifar10({str(folder)!r}, 'test')")
    assert message.startswith(f"UnsafePickleError: {folder / 'test_batch'}")
    assert "refusing _codecs.encode other than (str, 'latin1')" in message
    assert growth < LIMIT


class Reduce:
    """Pickles as func(*args), BUILD with state when given."""

    def __init__(self, func, args, state=None):
        self.func, self.args, self.state = func, args, state

    def __reduce__(self):
        return (
            (self.func, self.args)
            if self.state is None
            else (self.func, self.args, self.state)
        )


class Latin:
    """Pickles as _codecs.encode(text, "latin1"), a fresh bytes object each time."""

    def __init__(self, text):
        self.text = text

    def __reduce__(self):
        return (codecs.encode, (self.text, "latin1"))


RECONSTRUCT = np.ndarray.__reduce__(np.zeros(1))[0]
TEXT = "x" * 10_000  # one str in the pickle (memoized), encoded 20 times
HOSTILE_BATCHES = {
    "ndarray-call": (
        {b"data": Reduce(np.ndarray, ((10**5, 10**5), np.dtype("u1")))},
        "refusing to call numpy.ndarray",
    ),
    "huge-shape": (
        {
            b"data": Reduce(
                RECONSTRUCT,
                (np.ndarray, (0,), b"b"),
                (1, (10**6, 3072), np.dtype("u1"), False, bytes(10)),
            )
        },
        r"an ndarray of shape \(1000000, 3072\) and dtype uint8 does not fit its 10",
    ),
    "fortran": (
        {b"data": np.asfortranarray(np.zeros((2, 3072), np.uint8))},
        r"other than \(1, shape, dtype, False, bytes\)",
    ),
    "float-pixels": (
        {b"data": np.full((1, 3072), np.nan), b"labels": [0]},
        "refusing numpy.dtype other than an integer dtype",
    ),
    "object-array": (
        {b"data": np.array([1, "x"], dtype=object)},
        "refusing numpy.dtype other than an integer dtype",
    ),
    "big-endian": (
        {b"data": np.zeros(2, ">i4")},
        "refusing a changed dtype int32",
    ),
    "repeated-encode": (
        {b"data": [Latin(TEXT) for _ in range(20)]},
        "the pickle makes more bytes than it holds",
    ),
    "other-global": (
        {b"data": Reduce(getattr, (1, "real"))},
        "refusing to load __builtin__.getattr",
    ),
}


@pytest.mark.parametrize("case", HOSTILE_BATCHES)
def test_load_cifar10_refuses_a_hostile_pickle_naming_the_file(tmp_path, case):
    batch, message = HOSTILE_BATCHES[case]
    (tmp_path / "test_batch").write_bytes(pickle.dumps(batch, protocol=2))
    with pytest.raises(UnsafePickleError, match=message) as refused:
        load_cifar10(tmp_path, "test")
    assert str(refused.value).startswith(str(tmp_path / "test_batch"))


def test_load_cifar10_refuses_a_damaged_pickle_naming_the_file(tmp_path):
    whole = pickle.dumps({b"data": np.zeros((1, 3072), np.uint8), b"labels": [0]}, 2)
    huge_bytes = b"\x80\x04\x8e" + struct.pack("<Q", 2**40) + b"abc"  # BINBYTES8
    for name, content in {"cut": whole[: len(whole) // 2], "huge": huge_bytes}.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "test_batch").write_bytes(content)
        with pytest.raises(ValueError, match="is not a CIFAR-10 batch") as refused:
            load_cifar10(tmp_path / name, "test")
        assert str(refused.value).startswith(str(tmp_path / name / "test_batch"))


PIXELS = np.zeros((2, 3072), np.uint8)
BAD_BATCHES = {
    "list": ([PIXELS, [0, 1]], "a CIFAR-10 batch is a dict, got list of 2 items"),
    "str-keys": ({"data": PIXELS, "labels": [0, 1]}, "the batch has no key b'data'"),
    "no-labels": ({b"data": PIXELS}, "the batch has no key b'labels'"),
    "wide-ints": (
        {b"data": np.full((2, 3072), 300), b"labels": [0, 1]},
        r"b'data' must be a uint8 array of shape \(n, 3072\), got int64 array",
    ),
    "nested-list": ({b"data": [[300] * 3072], b"labels": [0]}, "got list of 1 items"),
    "flat": ({b"data": PIXELS.ravel(), b"labels": [0, 1]}, r"shape \(6144,\)"),
    "float-labels": (
        {b"data": PIXELS, b"labels": [0, 1.0]},
        "b'labels' must hold one int",
    ),
    "bool-labels": ({b"data": PIXELS, b"labels": [True, False]}, "b'labels' must hold"),
    "label-10": (
        {b"data": PIXELS, b"labels": [0, 10]},
        r"in \[0, 10\) per image \(2\)",
    ),
    "one-label": ({b"data": PIXELS, b"labels": [0]}, "got list of 1 items"),
    "2-d-labels": (
        {b"data": PIXELS, b"labels": np.array([[0, 1]])},
        r"got int64 array of shape \(1, 2\)",
    ),
}


@pytest.mark.parametrize("case", BAD_BATCHES)
def test_load_cifar10_refuses_a_batch_of_other_content_naming_file_and_key(
    tmp_path, case
):
    batch, message = BAD_BATCHES[case]
    (tmp_path / "test_batch").write_bytes(pickle.dumps(batch, protocol=2))
    with pytest.raises(DataFileError, match=message) as refused:
        load_cifar10(tmp_path, "test")
    assert str(refused.value).startswith(str(tmp_path / "test_batch"))


def test_load_cifar10_refuses_pickles_that_run_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("owned",))

    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    with (folder / "test_batch").open("wb") as f:
        pickle.dump({b"data": Evil(), b"labels": []}, f)
    with pytest.raises(pickle.UnpicklingError, match="refusing to load builtins.print"):
        load_cifar10(folder, "test")
    with pytest.raises(FileNotFoundError, match="no CIFAR-10 batch 'data_batch_1'"):
        load_cifar10(folder, "train")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"labels": torch.tensor([0, 10])},
            r"labels must lie in \[0, 10\), got values from 0 to 10",
        ),
        (
            {"labels": torch.tensor([0])},
            r"labels must be 1-D integers, one per image \(2\)",
        ),
        ({"labels": torch.tensor([0.0, 1.0])}, "labels must be 1-D integers"),
        (
            {"labels": torch.tensor([True, False])},
            r"labels must be 1-D integers, one per image \(2\), got bool",
        ),
        ({"ids": torch.tensor([True, False])}, "ids must be 1-D integers"),
        ({"ids": torch.tensor([4, 4])}, "ids must be unique"),
        ({"ids": torch.tensor([-1, 4])}, "ids must be >= 0, got -1"),
        ({"images": torch.zeros(2, 28, 28)}, "images must be uint8"),
        (
            {"images": np.zeros((2, 28, 28), np.float32)},
            r"images must be uint8 of .* got float32 of shape \(2, 28, 28\)",
        ),
        ({"labels": [0, 1]}, "labels must be a torch Tensor or a NumPy array"),
        ({"num_classes": 1}, "num_classes must be an integer >= 2"),
    ],
)
def test_site_data_refuses_bad_input(kwargs, message):
    args = {
        "images": torch.zeros(2, 28, 28, dtype=torch.uint8),
        "labels": torch.tensor([0, 1]),
        "num_classes": 10,
    }
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        SiteData(**args)


class ArrayDataset(torch.utils.data.Dataset):
    """A map-style dataset like torchvision's: NumPy HWC images (as PIL gives) and int labels."""

    def __init__(self, images, labels):
        self.images, self.labels = images, labels

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i], self.labels[i]


def test_site_data_from_a_map_style_dataset():
    rng = np.random.default_rng(0)
    hwc = rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    site = SiteData.from_dataset(ArrayDataset(hwc, [1, 2, 3, 4]), num_classes=10)
    assert site.images.shape == (4, 3, 32, 32)
    assert torch.equal(site.images[2, 1], torch.from_numpy(hwc[2, :, :, 1]))
    assert site.labels.tolist() == [1, 2, 3, 4] and site.ids.tolist() == [0, 1, 2, 3]
    chw = torch.from_numpy(hwc).permute(0, 3, 1, 2)
    assert torch.equal(
        SiteData.from_dataset(ArrayDataset(chw, [0] * 4), 10).images, chw
    )
    with pytest.raises(ValueError, match="dataset item 0 has a torch.float32 image"):
        SiteData.from_dataset(ArrayDataset(chw.float() / 255, [0] * 4), 10)


def test_subset_keeps_ids():
    site = SiteData(
        torch.zeros(5, 2, 2, dtype=torch.uint8),
        torch.arange(5),
        10,
        ids=torch.arange(10, 15),
    )
    part = site.subset(np.array([4, 0]))
    assert part.ids.tolist() == [14, 10] and part.labels.tolist() == [4, 0]


def test_an_edge_box_folder_is_read_as_npz_or_idx(tmp_path):
    images = np.random.default_rng(1).integers(0, 256, (4, 28, 28), dtype=np.uint8)
    npz = tmp_path / "npz"
    npz.mkdir()
    np.savez_compressed(  # as a site's operator may write it
        npz / "data.npz",
        images=images,
        labels=np.array([1, 2, 3, 4]),
        ids=np.array([9, 8, 7, 6]),
    )
    site = load_local_site(npz, 10)
    assert torch.equal(site.images, torch.from_numpy(images)) and site.ids.tolist() == [
        9,
        8,
        7,
        6,
    ]
    idx = tmp_path / "idx"
    idx.mkdir()
    write_idx(idx / "train-images-idx3-ubyte.gz", images, compress=True)
    write_idx(
        idx / "train-labels-idx1-ubyte.gz",
        np.array([0, 1, 0, 1], np.uint8),
        compress=True,
    )
    site = load_local_site(idx, 10)
    assert site.labels.tolist() == [0, 1, 0, 1] and site.ids.tolist() == [0, 1, 2, 3]


IMAGES = np.zeros((2, 28, 28), np.uint8)
BAD_SITE_FILES = {
    "bool-labels": (
        {"images": IMAGES, "labels": np.array([True, False])},
        r"array 'labels': dtype \|b1 is not allowed",
    ),
    "float-labels": (
        {"images": IMAGES, "labels": np.array([0.0, 1.0])},
        "array 'labels': dtype <f8 is not allowed",
    ),
    "bool-ids": (
        {"images": IMAGES, "labels": np.array([0, 1]), "ids": np.array([True, False])},
        r"array 'ids': dtype \|b1 is not allowed",
    ),
    "float-images": (
        {"images": IMAGES / 255, "labels": np.array([0, 1])},
        "array 'images': dtype <f8 is not allowed",
    ),
    "no-labels": ({"images": IMAGES}, r"lacks the arrays \['labels'\]"),
    "stray": (
        {"images": IMAGES, "labels": np.array([0, 1]), "x": IMAGES},
        "unexpected member 'x.npy'",
    ),
    "short-labels": (
        {"images": IMAGES, "labels": np.array([0])},
        r"labels must be 1-D integers, one per image \(2\)",
    ),
    "label-10": (
        {"images": IMAGES, "labels": np.array([0, 10])},
        r"labels must lie in \[0, 10\)",
    ),
    "flat-images": (
        {"images": IMAGES.ravel(), "labels": np.array([0, 1])},
        "images must be uint8 of shape",
    ),
    "huge-ids": (
        {
            "images": IMAGES,
            "labels": np.array([0, 1]),
            "ids": np.array([1, 2**63], np.uint64),
        },
        "ids must be >= 0",
    ),
}


@pytest.mark.parametrize("case", BAD_SITE_FILES)
def test_an_edge_box_data_npz_is_refused_naming_the_file_and_field(tmp_path, case):
    arrays, message = BAD_SITE_FILES[case]
    np.savez(tmp_path / "data.npz", **arrays)
    with pytest.raises(ValueError, match=message) as refused:
        load_local_site(tmp_path, 10)
    assert str(refused.value).startswith(str(tmp_path / "data.npz"))


def test_an_edge_box_data_npz_that_is_not_a_whole_zip_is_refused(tmp_path):
    np.savez(tmp_path / "whole.npz", images=IMAGES, labels=np.array([0, 1]))
    whole = (tmp_path / "whole.npz").read_bytes()
    for content in (b"not a zip at all", whole[: len(whole) // 2]):
        (tmp_path / "data.npz").write_bytes(content)
        with pytest.raises(ValueError, match="is not a readable .npz file") as refused:
            load_local_site(tmp_path, 10)
        assert str(refused.value).startswith(str(tmp_path / "data.npz"))


def test_an_edge_box_idx_folder_with_labels_out_of_range_names_the_folder(tmp_path):
    write_mnist_pair(tmp_path, IMAGES, np.array([0, 12], np.uint8))
    with pytest.raises(DataFileError, match=r"labels must lie in \[0, 10\)") as refused:
        load_local_site(tmp_path, 10)
    assert str(refused.value).startswith(str(tmp_path))


def edge_context(folder):
    return Context(
        run_id=1,
        node_id=1,
        node_config={"data-dir": str(folder)},
        state=RecordDict(),
        run_config={},
    )


def test_a_damaged_ledger_is_refused_naming_the_file(tmp_path):
    context = edge_context(tmp_path)
    ledger = load_ledger(context)  # none yet: an empty ledger
    ledger.record(np.array([4, 9]), server_round=2)
    save_ledger(context, ledger)
    again = load_ledger(context)
    assert again.ids.tolist() == [4, 9] and again.rounds.tolist() == [2, 2]
    path = tmp_path / "sent-ids.npz"
    cases = {
        "garbage": (
            lambda: path.write_bytes(b"\0" * 40),
            "is not a readable .npz file",
        ),
        "cut": (
            lambda: path.write_bytes(path.read_bytes()[:-30]),
            "is not a readable .npz file",
        ),
        "no-rounds": (
            lambda: np.savez(path, ids=np.array([1])),
            r"lacks the arrays \['rounds'\]",
        ),
        "float-rounds": (
            lambda: np.savez(path, ids=np.array([1]), rounds=np.array([1.5])),
            "array 'rounds': dtype <f8 is not allowed",
        ),
        "unequal": (
            lambda: np.savez(path, ids=np.array([1, 2]), rounds=np.array([1])),
            "a ledger needs one round and one top-up flag per id",
        ),
    }
    for damage, message in cases.values():
        save_ledger(context, ledger)
        damage()
        with pytest.raises(ValueError, match=message) as refused:
            load_ledger(context)
        assert f"the site's ledger {path} is damaged" in str(refused.value)
        assert "fix or delete it" in str(refused.value)


def test_the_data_folder_comes_from_the_config_then_the_environment_then_the_cache(
    tmp_path, monkeypatch
):
    from flwr_select.data import load_dataset, resolve_data_dir

    monkeypatch.setenv("FLWR_SELECT_DATA_DIR", str(tmp_path / "env"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert resolve_data_dir("mnist", tmp_path / "given") == tmp_path / "given"
    assert resolve_data_dir("mnist", "") == tmp_path / "env"
    monkeypatch.delenv("FLWR_SELECT_DATA_DIR")
    assert (
        resolve_data_dir("fashion-mnist")
        == tmp_path / "cache" / "flwr_select" / "fashion-mnist"
    )
    with pytest.raises(
        FileNotFoundError,
        match=r"mnist is not in .*empty.*Put train-images-idx3-ubyte.gz, .* there",
    ):
        load_dataset("mnist", tmp_path / "empty", "train")
    with pytest.raises(ValueError, match="unknown dataset 'svhn'"):
        load_dataset("svhn", tmp_path, "train")


def test_a_named_data_set_of_another_shape_or_more_classes_is_refused(tmp_path):
    # Prepare: MNIST-format files of 5x5 images, then of 28x28 with label 10
    write_idx(tmp_path / "t10k-images-idx3-ubyte", np.zeros((2, 5, 5), np.uint8))
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.array([0, 1], np.uint8))
    # Execute / Assert
    with pytest.raises(DataFileError, match=r"shape \(5, 5\), mnist's are \(28, 28\)"):
        load_dataset("mnist", tmp_path, "test")
    write_idx(tmp_path / "t10k-images-idx3-ubyte", np.zeros((2, 28, 28), np.uint8))
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.array([0, 10], np.uint8))
    with pytest.raises(DataFileError, match="labels go up to 10; mnist has 10 classes"):
        load_dataset("mnist", tmp_path, "test")


def test_site_data_takes_numpy_arrays_and_shares_their_memory():
    # Prepare: a site's arrays as NumPy holds them; ids read-only, as np.load mmaps
    images = np.arange(2 * 28 * 28, dtype=np.uint8).reshape(2, 28, 28)
    ids = np.array([7, 3])
    ids.setflags(write=False)
    # Execute
    site = SiteData(images, np.array([4, 9], np.int32), 10, ids)
    # Assert: tensors of the same values; the images are the same memory
    assert site.images.dtype == torch.uint8 and site.labels.tolist() == [4, 9]
    assert site.ids.tolist() == [7, 3] and site.labels.dtype == torch.int64
    images[0, 0, 0] = 200
    assert int(site.images[0, 0, 0]) == 200
