import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from flwr_select.config import ConfigError
from flwr_select.noise import flip_labels
from flwr_select.partition import (
    PaperSplit,
    ShareConfig,
    SiteShareConfig,
    paper_split,
    round_fold,
    site_partition,
)


def test_paper_split_parts_are_disjoint_and_sized():
    # Execute: 60,000 samples, the paper's 5k + 5k, the rest to the sites
    split = paper_split(60_000, seed=0)
    # Assert
    assert isinstance(split, PaperSplit)
    sizes = (len(split.validation), len(split.initial), len(split.pool))
    assert sizes == (5_000, 5_000, 50_000)
    everything = np.concatenate([split.validation, split.initial, split.pool])
    assert sorted(everything.tolist()) == list(range(60_000))  # disjoint and complete
    assert everything.dtype.kind == "i"


def test_paper_split_pool_option_leaves_the_rest_unused():
    split = paper_split(20, seed=3, validation=5, initial=4, pool=6)
    assert (len(split.validation), len(split.initial), len(split.pool)) == (5, 4, 6)
    used = np.concatenate([split.validation, split.initial, split.pool])
    assert len(set(used.tolist())) == 15 and set(used.tolist()) <= set(range(20))
    # the smaller pool is a prefix of the full one: same seed, same shuffle
    full = paper_split(20, seed=3, validation=5, initial=4)
    assert len(full.pool) == 20 - 9 == 11
    np.testing.assert_array_equal(full.pool[:6], split.pool)
    np.testing.assert_array_equal(full.validation, split.validation)
    # the largest pool allowed is everything left
    assert len(paper_split(20, seed=3, validation=5, initial=4, pool=11).pool) == 11


@given(
    num_samples=st.integers(3, 200),
    validation=st.integers(0, 60),
    initial=st.integers(0, 60),
    seed=st.integers(0, 2**32),
)
def test_paper_split_properties(num_samples, validation, initial, seed):
    available = num_samples - validation - initial
    if available < 1:
        with pytest.raises(ValueError, match="leave no samples"):
            paper_split(num_samples, seed=seed, validation=validation, initial=initial)
        return
    split = paper_split(num_samples, seed=seed, validation=validation, initial=initial)
    again = paper_split(num_samples, seed=seed, validation=validation, initial=initial)
    parts = (split.validation, split.initial, split.pool)
    assert [len(p) for p in parts] == [validation, initial, available]
    assert sorted(np.concatenate(parts).tolist()) == list(range(num_samples))
    for a, b in zip(parts, (again.validation, again.initial, again.pool), strict=True):
        np.testing.assert_array_equal(a, b)


def test_paper_split_depends_on_the_seed():
    a = paper_split(1_000, seed=1, validation=100, initial=100)
    b = paper_split(1_000, seed=2, validation=100, initial=100)
    assert not np.array_equal(a.validation, b.validation)
    assert not np.array_equal(a.pool, b.pool)
    # but both are splits of the same 1,000 positions
    assert sorted(np.concatenate([b.validation, b.initial, b.pool]).tolist()) == list(
        range(1_000)
    )


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"num_samples": 10, "validation": 5, "initial": 5},
            "validation=5 and initial=5 leave no samples of 10 for the sites",
        ),
        (
            {"num_samples": 10_000},
            "validation=5000 and initial=5000 leave no samples of 10000",
        ),
        (
            {"num_samples": 10, "validation": -1, "initial": 2},
            "validation=-1 and initial=2 leave no samples of 10",
        ),
        (
            {"num_samples": 10, "validation": 2, "initial": -1},
            "validation=2 and initial=-1",
        ),
        (
            {"num_samples": 20, "validation": 5, "initial": 5, "pool": 0},
            r"pool must be in \[1, 10\], got 0",
        ),
        (
            {"num_samples": 20, "validation": 5, "initial": 5, "pool": 11},
            r"pool must be in \[1, 10\], got 11",
        ),
    ],
)
def test_paper_split_errors_name_the_bad_value(kwargs, message):
    with pytest.raises(ValueError, match=message):
        paper_split(seed=0, **kwargs)


def test_site_partition_splits_the_pool_near_equally():
    # 10 samples over 3 sites: 4, 3, 3, in pool order
    pool = np.array([9, 8, 7, 6, 5, 4, 3, 2, 1, 0]) * 10
    parts = [site_partition(pool, i, 3) for i in range(3)]
    assert [p.tolist() for p in parts] == [
        [90, 80, 70, 60],
        [50, 40, 30],
        [20, 10, 0],
    ]


@given(
    pool_size=st.integers(0, 120),
    num_partitions=st.integers(1, 20),
    seed=st.integers(0, 2**16),
)
def test_site_partitions_cover_the_pool_exactly_once(pool_size, num_partitions, seed):
    pool = np.random.default_rng(seed).permutation(1_000)[:pool_size]
    parts = [site_partition(pool, i, num_partitions) for i in range(num_partitions)]
    np.testing.assert_array_equal(np.concatenate(parts), pool)  # in order, once each
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1
    assert sum(sizes) == pool_size


@pytest.mark.parametrize(
    ("partition_id", "num_partitions", "message"),
    [
        (3, 3, r"partition-id must be in \[0, 3\), got 3"),
        (-1, 3, r"partition-id must be in \[0, 3\), got -1"),
        (0, 0, r"partition-id must be in \[0, 0\), got 0"),
    ],
)
def test_site_partition_errors_name_the_bad_value(
    partition_id, num_partitions, message
):
    with pytest.raises(ValueError, match=message):
        site_partition(np.arange(10), partition_id, num_partitions)


def test_round_fold_cuts_the_partition_in_rounds():
    # 7 samples over 3 rounds (1-based): 3, 2, 2
    partition = np.array([11, 12, 13, 14, 15, 16, 17])
    folds = [round_fold(partition, r, 3).tolist() for r in (1, 2, 3)]
    assert folds == [[11, 12, 13], [14, 15], [16, 17]]


@given(
    size=st.integers(0, 100),
    num_rounds=st.integers(1, 15),
)
def test_round_folds_cover_the_partition_exactly_once(size, num_rounds):
    partition = np.arange(500, 500 + size)
    folds = [round_fold(partition, r, num_rounds) for r in range(1, num_rounds + 1)]
    np.testing.assert_array_equal(np.concatenate(folds), partition)
    sizes = [len(f) for f in folds]
    assert max(sizes) - min(sizes) <= 1


def test_every_sample_reaches_exactly_one_site_in_exactly_one_round():
    # Prepare: the whole protocol, as the server and sites compute it
    split = paper_split(1_000, seed=7, validation=100, initial=150, pool=700)
    # Execute
    delivered = [
        round_fold(site_partition(split.pool, site, 4), r, 5)
        for site in range(4)
        for r in range(1, 6)
    ]
    # Assert
    everything = np.concatenate(delivered)
    assert len(everything) == 700
    assert sorted(everything.tolist()) == sorted(split.pool.tolist())
    held_out = np.concatenate([split.validation, split.initial])
    assert not np.isin(everything, held_out).any()
    # 700 / 4 sites = 175 each; 175 / 5 rounds = 35 each
    assert {len(d) for d in delivered} == {35}


@pytest.mark.parametrize(
    ("server_round", "num_rounds", "message"),
    [
        (0, 3, r"server-round must be in \[1, 3\], got 0"),
        (4, 3, r"server-round must be in \[1, 3\], got 4"),
        (1, 0, r"server-round must be in \[1, 0\], got 1"),
    ],
)
def test_round_fold_errors_name_the_bad_value(server_round, num_rounds, message):
    with pytest.raises(ValueError, match=message):
        round_fold(np.arange(10), server_round, num_rounds)


WORKER_SHARE = {
    "dataset": "mnist",
    "data-dir": "",
    "model": "lenet5",
    "validation-size": 1000,
    "pool-size": 0,
    "num-server-rounds": 4,
}
SITE_SHARE = {
    **WORKER_SHARE,
    "initial-size": 500,
    "partitioner": "dirichlet",
    "dirichlet-alpha": 0.2,
    "label-noise": 0.1,
    "label-noise-kind": "asymmetric",
    "label-noise-sites": "0,2",
    "easy-sites": "1",
    "easy-classes": "3,7",
}


def test_share_configs_read_back_what_they_write():
    # Prepare: what a server sends, among keys these classes do not know
    sent = {**SITE_SHARE, "server-round": 2, "num-classes": 10, "seed": 3}
    # Execute
    site, worker = SiteShareConfig.from_config(sent), ShareConfig.from_config(sent)
    # Assert: a site's keys are a worker's and eight more, each declared once
    assert site.to_config() == SITE_SHARE
    assert worker.to_config() == WORKER_SHARE
    assert SiteShareConfig.from_config(site.to_config()) == site
    assert isinstance(site, ShareConfig)
    assert type(site.dirichlet_alpha) is float
    # TOML writes 1 for 1.0: still a float
    assert SiteShareConfig.from_config({**SITE_SHARE, "dirichlet-alpha": 1}) == (
        SiteShareConfig.from_config({**SITE_SHARE, "dirichlet-alpha": 1.0})
    )


@pytest.mark.parametrize(
    ("key", "value", "allowed"),
    [
        ("pool-size", 2.5, "an integer"),
        ("validation-size", True, "an integer"),
        ("dataset", 1, "a string"),
        ("dirichlet-alpha", "0.5", "a finite number"),
    ],
)
def test_share_configs_convert_strictly_naming_the_key(key, value, allowed):
    with pytest.raises(ConfigError, match=f"{key} must be {allowed}"):
        SiteShareConfig.from_config({**SITE_SHARE, key: value})


@pytest.mark.parametrize(
    ("key", "value", "allowed"),
    [
        ("dataset", "emnist", "unknown dataset 'emnist'"),
        ("num-server-rounds", 0, "num-server-rounds must be >= 1"),
        ("dirichlet-alpha", 0.0, "dirichlet-alpha must be > 0"),
        ("initial-size", 0, "initial-size must be >= 1"),
    ],
)
def test_a_share_config_checks_its_values_naming_the_key(key, value, allowed):
    # the keys are declared here once, with the server's defaults and ranges
    assert ShareConfig.from_config({}) == ShareConfig()
    with pytest.raises(ConfigError, match=allowed):
        SiteShareConfig.from_config({**SITE_SHARE, key: value})


def test_a_share_config_cuts_the_split_the_server_cuts():
    # Prepare
    site = SiteShareConfig.from_config({**SITE_SHARE, "pool-size": 3000})
    worker = ShareConfig.from_config(WORKER_SHARE)
    # Execute / Assert: a site's split has the initial part; a worker's has none
    expected = paper_split(6000, seed=3, validation=1000, initial=500, pool=3000)
    split = site.split(6000, seed=3)
    for part in ("validation", "initial", "pool"):
        np.testing.assert_array_equal(getattr(split, part), getattr(expected, part))
    no_initial = paper_split(6000, seed=3, validation=1000, initial=0)
    np.testing.assert_array_equal(worker.split(6000, seed=3).pool, no_initial.pool)
    assert len(worker.split(6000, seed=3).initial) == 0


@pytest.mark.parametrize("kind", ["symmetric", "asymmetric"])
def test_label_noise_flips_a_seeded_share_of_the_pool_to_other_classes(kind):
    # Prepare: 1,000 samples, 10 classes, a pool of 600 of them
    labels = torch.arange(1000) % 10
    pool = np.random.default_rng(0).permutation(1000)[:600]
    # Execute
    noisy, flipped = flip_labels(labels, pool, 0.2, 3, 10, kind)
    # Assert: exactly 20 % of the pool changed, nothing outside it
    changed = np.flatnonzero((noisy != labels).numpy())
    assert sorted(changed) == sorted(flipped) and len(flipped) == 120
    assert set(flipped) <= set(pool)
    if kind == "asymmetric":  # one fixed wrong class per class
        assert torch.equal(noisy[flipped], (labels[flipped] + 1) % 10)
    else:  # any other class: more than one per class
        assert len(set(noisy[flipped].tolist())) == 10
    again, _ = flip_labels(labels, pool, 0.2, 3, 10, kind)
    assert torch.equal(again, noisy)  # seeded
    assert not torch.equal(flip_labels(labels, pool, 0.2, 4, 10, kind)[0], noisy)


def test_only_the_named_sites_hold_the_flipped_labels():
    labels = torch.arange(2000) % 10
    config = SiteShareConfig(
        validation_size=100, initial_size=100, label_noise=0.3, label_noise_sites="1,3"
    )

    def site(partition_id):
        return config.site_labels(
            labels, seed=0, partition_id=partition_id, num_classes=10
        )

    assert torch.equal(site(0), labels) and torch.equal(site(2), labels)
    assert torch.equal(site(1), site(3))  # the same flipped samples
    pool = config.split(2000, seed=0).pool
    assert int((site(1) != labels).sum()) == int(0.3 * len(pool))
    everywhere = SiteShareConfig(validation_size=100, initial_size=100, label_noise=0.3)
    assert torch.equal(
        everywhere.site_labels(labels, seed=0, partition_id=0, num_classes=10), site(1)
    )


@pytest.mark.parametrize("partitioner", ["iid", "dirichlet"])
def test_easy_sites_hold_the_easy_classes_and_the_others_the_rest(partitioner):
    # Prepare: 5 sites, 0 and 3 easy (digits 0 and 1 only)
    labels = np.arange(6000) % 10
    config = SiteShareConfig(
        validation_size=500,
        initial_size=500,
        partitioner=partitioner,
        easy_sites="0,3",
    )
    # Execute
    shares = [
        config.site_pool(labels, seed=1, partition_id=p, num_partitions=5)
        for p in range(5)
    ]
    # Assert: every pool sample at exactly one site; the easy ones hold half
    # each of the pool's 0s and 1s, the others none of them
    pool = config.split(6000, seed=1).pool
    assert sorted(np.concatenate(shares).tolist()) == sorted(pool.tolist())
    easy = np.isin(labels[pool], [0, 1]).sum()
    assert {len(shares[0]), len(shares[3])} <= {easy // 2, easy - easy // 2}
    assert set(labels[shares[0]]) == set(labels[shares[3]]) == {0, 1}
    assert all(not np.isin(labels[shares[p]], [0, 1]).any() for p in (1, 2, 4))
