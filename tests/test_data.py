import gzip
import pickle
import struct

import numpy as np
import pytest
import torch

from flwr_select.data import SiteData, load_cifar10, load_mnist, read_idx


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
            "labels must be a 1-D integer tensor of length 2",
        ),
        ({"labels": torch.tensor([0.0, 1.0])}, "labels must be a 1-D integer tensor"),
        ({"ids": torch.tensor([4, 4])}, "ids must be unique"),
        ({"ids": torch.tensor([-1, 4])}, "ids must be >= 0, got -1"),
        ({"images": torch.zeros(2, 28, 28)}, "images must be uint8"),
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
    from flwr_select.data import load_local_site

    images = np.random.default_rng(1).integers(0, 256, (4, 28, 28), dtype=np.uint8)
    npz = tmp_path / "npz"
    npz.mkdir()
    np.savez(
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
