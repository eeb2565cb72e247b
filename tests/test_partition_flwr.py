"""The sites' shares of the pool by Flower Datasets partitioners (synthetic labels)."""

import sys

import numpy as np
import pytest

pytest.importorskip("flwr_datasets", reason="pip install -e '.[test]'")

from flwr_select.partition import (  # noqa: E402
    check_partitioner,
    partition_pool,
    site_partition,
)

NUM_CLASSES, SITES = 10, 5


def synthetic_pool(size=6_000, seed=0):
    """A shuffled pool of positions in a 10,000-sample training set, and its labels."""
    rng = np.random.default_rng(seed)
    pool = rng.permutation(10_000)[:size]
    return pool, rng.integers(0, NUM_CLASSES, size)


def shares(pool, labels, num_partitions=SITES, **kwargs):
    return [
        partition_pool(pool, labels, i, num_partitions, **kwargs)
        for i in range(num_partitions)
    ]


def label_counts(pool, labels, share):
    label_of = dict(zip(pool.tolist(), labels.tolist(), strict=True))
    return np.bincount([label_of[i] for i in share.tolist()], minlength=NUM_CLASSES)


def mean_top_label_share(pool, labels, parts):
    counts = [label_counts(pool, labels, part) for part in parts]
    return float(np.mean([c.max() / c.sum() for c in counts]))


@pytest.mark.parametrize(
    ("size", "num_partitions"), [(6_000, 5), (10, 3), (101, 7), (3, 3)]
)
def test_iid_shares_cover_the_pool_exactly_once_in_pool_order(size, num_partitions):
    pool, labels = synthetic_pool(size)
    parts = shares(pool, labels, num_partitions)
    # contiguous near-equal shares, as np.array_split (the old site_partition)
    np.testing.assert_array_equal(np.concatenate(parts), pool)
    from datasets import Dataset
    from flwr_datasets.partitioner import IidPartitioner

    flower = IidPartitioner(num_partitions)
    flower.dataset = Dataset.from_dict({"idx": pool, "label": labels})
    for i, part in enumerate(parts):
        np.testing.assert_array_equal(part, site_partition(pool, i, num_partitions))
        # Flower Datasets' IID partitioner gives exactly the same shares
        theirs = flower.load_partition(i).with_format("numpy")[:]["idx"]
        np.testing.assert_array_equal(part, theirs)
        assert part.dtype == pool.dtype
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1


@pytest.mark.parametrize("alpha", [0.1, 0.5, 1000.0])
def test_dirichlet_shares_cover_the_pool_exactly_once(alpha):
    pool, labels = synthetic_pool()
    parts = shares(pool, labels, partitioner="dirichlet", alpha=alpha, seed=1)
    everything = np.concatenate(parts)
    assert len(everything) == len(pool)
    assert sorted(everything.tolist()) == sorted(pool.tolist())
    assert min(len(p) for p in parts) >= 10  # Flower Datasets' min_partition_size


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_small_alpha_skews_the_labels_and_large_alpha_does_not(seed):
    pool, labels = synthetic_pool(seed=seed)
    skewed = shares(pool, labels, partitioner="dirichlet", alpha=0.1, seed=seed)
    even = shares(pool, labels, partitioner="dirichlet", alpha=1000.0, seed=seed)
    # uniform would be 1 / 10: a site's most common label is far above that
    assert mean_top_label_share(pool, labels, skewed) > 0.3
    assert mean_top_label_share(pool, labels, even) < 0.13
    for part in even:  # every site sees every class, in near-equal numbers
        counts = label_counts(pool, labels, part)
        assert counts.min() > 0.6 * counts.max()
    # the IID shares are near-uniform too
    assert mean_top_label_share(pool, labels, shares(pool, labels)) < 0.13


def test_dirichlet_shares_are_deterministic_per_seed():
    pool, labels = synthetic_pool()
    a = shares(pool, labels, partitioner="dirichlet", alpha=0.3, seed=7)
    b = shares(pool, labels, partitioner="dirichlet", alpha=0.3, seed=7)
    c = shares(pool, labels, partitioner="dirichlet", alpha=0.3, seed=8)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)
    assert any(
        len(x) != len(z) or not np.array_equal(x, z) for x, z in zip(a, c, strict=True)
    )
    # every site computes its share alone: asking for one share in a fresh call
    # gives what the others' calls imply
    lone = partition_pool(
        pool, labels, 3, SITES, partitioner="dirichlet", alpha=0.3, seed=7
    )
    np.testing.assert_array_equal(lone, a[3])


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        (
            {"partitioner": "shards"},
            ValueError,
            "unknown partitioner 'shards'; choose one of iid, dirichlet",
        ),
        (
            {"partitioner": "dirichlet", "alpha": 0.0},
            ValueError,
            "dirichlet-alpha must be > 0, got 0.0",
        ),
        (
            {"partition_id": 5},
            ValueError,
            r"partition-id must be in \[0, 5\), got 5",
        ),
        (
            {"partition_id": -1},
            ValueError,
            r"partition-id must be in \[0, 5\), got -1",
        ),
        (
            {"labels": np.zeros(3, dtype=np.int64)},
            ValueError,
            "pool and labels must align",
        ),
    ],
)
def test_bad_arguments_are_named(kwargs, error, message):
    pool, labels = synthetic_pool(100)
    arguments = {
        "pool": pool,
        "labels": labels,
        "partition_id": 0,
        "num_partitions": SITES,
        **kwargs,
    }
    with pytest.raises(error, match=message):
        partition_pool(**arguments)


def test_missing_flower_datasets_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "flwr_datasets", None)  # import raises
    with pytest.raises(ImportError, match=r"pip install 'flwr-select\[experiments\]'"):
        partition_pool(*synthetic_pool(100), 0, 2, partitioner="dirichlet")
    with pytest.raises(ImportError, match="flwr-datasets"):
        check_partitioner("dirichlet")
    # the default IID split needs no extra library
    assert len(partition_pool(*synthetic_pool(100), 0, 2)) == 50


def test_the_server_refuses_a_bad_partitioner_before_loading_anything():
    from simulations.runner import defaults, run

    config = {
        **defaults("mnist"),
        "data-dir": "/nonexistent",
        "partitioner": "pathological",
    }
    with pytest.raises(ValueError, match="unknown partitioner 'pathological'"):
        run(None, config)


def test_a_simulated_site_gets_its_dirichlet_share_fold_by_fold(mnist_dir):
    from flwr.app import ConfigRecord, Context, RecordDict

    from clients.site import load_site
    from flwr_select.data import load_mnist
    from flwr_select.partition import SiteShareConfig, paper_split
    from simulations.runner import defaults

    rounds, sites = 3, 3
    config = {
        **defaults("mnist"),
        "data-dir": str(mnist_dir),
        "validation-size": 1000,
        "initial-size": 1000,
        "pool-size": 6000,
        "num-server-rounds": rounds,
        "partitioner": "dirichlet",
        "dirichlet-alpha": 0.1,
        "num-classes": 10,
    }
    site_config = {**SiteShareConfig.from_config(config).to_config(), "num-classes": 10}
    _, labels = load_mnist(mnist_dir)
    delivered, top_shares = [], []
    for site in range(sites):
        context = Context(
            run_id=0,
            node_id=site + 1,
            node_config={"partition-id": site, "num-partitions": sites},
            state=RecordDict(),
            run_config={},
        )
        ids = []
        for r in range(1, rounds + 1):
            samples = load_site(
                context, ConfigRecord({**site_config, "server-round": r})
            )
            np.testing.assert_array_equal(samples.labels, labels[samples.ids])
            ids.append(samples.ids.numpy())
        ids = np.concatenate(ids)
        delivered.append(ids)
        counts = np.bincount(labels[ids].numpy(), minlength=10)
        top_shares.append(counts.max() / counts.sum())
    split = paper_split(60_000, seed=0, validation=1000, initial=1000, pool=6000)
    assert sorted(np.concatenate(delivered).tolist()) == sorted(split.pool.tolist())
    assert np.mean(top_shares) > 0.25  # non-IID (IID would be about 0.11)
