"""What a ServerApp forwards to its sites and workers, and how they read it back.

The forwarded keys are one dataclass's (:class:`SiteShareConfig`,
:class:`ShareConfig`): the server sends its ``to_config()`` of the checked
settings, the node reads it with ``from_config``.
"""

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, RecordDict

from clients.site import load_site
from clients.worker import load_worker_data
from flwr_select.partition import (
    ShareConfig,
    SiteShareConfig,
    paper_split,
    round_fold,
    site_partition,
)
from simulations import data_parallel, runner

SITE_KEYS = {
    "dataset",
    "data-dir",
    "model",
    "seed",
    "validation-size",
    "initial-size",
    "pool-size",
    "num-server-rounds",
    "partitioner",
    "dirichlet-alpha",
    "label-noise",
    "label-noise-kind",
    "label-noise-sites",
    "easy-sites",
    "easy-classes",
}
"""The keys sites are sent: a checkpoint's settings hold them (the label-noise three
since issue 15, the easy-site two since issue 16; an older checkpoint is refused on
resume, naming them)."""
WORKER_KEYS = {
    "dataset",
    "data-dir",
    "model",
    "seed",
    "validation-size",
    "pool-size",
    "num-server-rounds",
}
"""The keys workers were sent before the dataclass."""


class Stop(Exception):
    """Raised by a stand-in strategy once it has seen its arguments."""


def strategy_arguments(monkeypatch, module, name):
    """Replace ``module.name`` (the strategy class) by one that records and stops."""
    seen = {}

    def record(*args, **kwargs):
        seen.update(kwargs)
        raise Stop

    monkeypatch.setattr(module, name, record)
    return seen


def simulated_node(partition_id, num_partitions):
    return Context(
        run_id=0,
        node_id=partition_id + 1,
        node_config={"partition-id": partition_id, "num-partitions": num_partitions},
        state=RecordDict(),
        run_config={},
    )


def test_the_default_site_and_worker_keys_and_values_are_those_sent_before():
    # Prepare: the checked defaults of both apps
    server, selection = runner.check_config(runner.defaults("mnist"))
    settings = {**server.to_config(), **selection.to_config()}
    dp_server, _, sampling = data_parallel.check_config(data_parallel.defaults("mnist"))
    dp_settings = {**dp_server.to_config(), **sampling.to_config()}
    # Execute
    sites = SiteShareConfig.from_config(settings).to_config()
    workers = ShareConfig.from_config(dp_settings).to_config()
    # Assert: same names, same values, so a checkpoint's settings still match;
    # the seed comes with the selection's and the sampling's own config
    assert sites == {key: settings[key] for key in SITE_KEYS - {"seed"}}
    assert workers == {key: dp_settings[key] for key in WORKER_KEYS - {"seed"}}
    assert selection.to_config()["seed"] == settings["seed"]
    assert sampling.to_config()["seed"] == dp_settings["seed"]


def test_the_sites_get_the_checked_settings_share_config_and_read_it_back(
    mnist_dir, tmp_path, monkeypatch
):
    # Prepare
    config = {
        **runner.defaults("mnist"),
        "data-dir": str(mnist_dir),
        "out-dir": str(tmp_path),
        "validation-size": 1000,
        "initial-size": 1000,
        "pool-size": 600,
        "num-server-rounds": 3,
        "seed": 7,
        "dirichlet-alpha": 2,  # an int where a float belongs, as TOML may write it
    }
    seen = strategy_arguments(monkeypatch, runner, "SampleSelection")
    # Execute
    with pytest.raises(Stop):
        runner.run(None, config)
    # Assert: exactly the dataclass's to_config() of the checked settings
    server, selection = runner.check_config(config)
    settings = {**server.to_config(), **selection.to_config()}
    expected = SiteShareConfig.from_config(settings)
    assert seen["site_config"] == expected.to_config()
    assert seen["site_config"] == {key: settings[key] for key in SITE_KEYS - {"seed"}}
    assert type(seen["site_config"]["dirichlet-alpha"]) is float
    # Assert: a site reads the same back from its message, and finds its fold
    received = ConfigRecord(
        {
            **seen["site_config"],
            **selection.to_config(),
            "server-round": 2,
            "num-classes": 10,
        }
    )
    assert SiteShareConfig.from_config(received) == expected
    samples = load_site(simulated_node(1, 2), received)
    split = paper_split(60_000, seed=7, validation=1000, initial=1000, pool=600)
    fold = round_fold(site_partition(split.pool, 1, 2), 2, 3)
    np.testing.assert_array_equal(samples.ids.numpy(), fold)


def test_the_workers_get_the_checked_settings_share_config_and_read_it_back(
    mnist_dir, tmp_path, monkeypatch
):
    # Prepare
    config = {
        **data_parallel.defaults("mnist"),
        "data-dir": str(mnist_dir),
        "out-dir": str(tmp_path),
        "validation-size": 1000,
        "pool-size": 600,
        "num-server-rounds": 3,
        "seed": 7,
    }
    seen = strategy_arguments(monkeypatch, data_parallel, "BiasedDataParallel")
    # Execute
    with pytest.raises(Stop):
        data_parallel.run(None, config)
    # Assert: the dataclass's to_config() of the checked settings, and num-classes
    server, _, sampling = data_parallel.check_config(config)
    settings = {**server.to_config(), **sampling.to_config()}
    expected = ShareConfig.from_config(settings)
    assert seen["worker_config"] == {**expected.to_config(), "num-classes": 10}
    assert set(seen["worker_config"]) == {*WORKER_KEYS - {"seed"}, "num-classes"}
    # Assert: a worker reads the same back and finds its share
    received = ConfigRecord(
        {
            **seen["worker_config"],
            **sampling.to_config(),
            "server-round": 1,
            "worker-index": 0,
            "num-workers": 2,
        }
    )
    assert ShareConfig.from_config(received) == expected
    # the share follows the worker index the server gave, not the node's partition
    samples = load_worker_data(simulated_node(1, 2), received)
    split = paper_split(60_000, seed=7, validation=1000, initial=0, pool=600)
    np.testing.assert_array_equal(samples.ids.numpy(), site_partition(split.pool, 0, 2))
