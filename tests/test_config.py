"""Every run-config key is checked before anything starts; an error names the key."""

import dataclasses

import numpy as np
import pytest
import torch
from flwr.app import Context, RecordDict

from flwr_select.config import ConfigError, RunConfigFields, check, check_name, convert
from flwr_select.data import SiteData
from flwr_select.partition import MAX_SERVER_ROUNDS, ShareConfig, SiteShareConfig
from flwr_select.selection.wire import encode, wire_bytes
from simulations import data_parallel, fashion_mnist, mnist, mnist_data_parallel
from simulations.runner import check_config, defaults


@dataclasses.dataclass(frozen=True)
class Example(RunConfigFields):
    """Annotations are types here (no ``from __future__ import annotations``)."""

    flag: bool = False
    max_count: int = 0
    rate: float = 0.5
    name: str = "a"

    def __post_init__(self):
        check("max-count", self.max_count, self.max_count >= 0, ">= 0")
        check_name("name", self.name, ("a", "b"))


def test_from_config_reads_run_config_spellings_by_annotation():
    # Prepare: TOML writes 1 for 1.0; other keys of the same config are ignored
    config = {"flag": "TRUE", "max-count": 3, "rate": 1, "name": "b", "lr": "x"}
    # Execute
    example = Example.from_config(config)
    # Assert
    assert example == Example(flag=True, max_count=3, rate=1.0, name="b")
    assert type(example.rate) is float
    assert example.to_config() == {
        "flag": True,
        "max-count": 3,
        "rate": 1.0,
        "name": "b",
    }
    assert Example.from_config({}) == Example()


@pytest.mark.parametrize(
    ("kind", "value", "expected"),
    [
        ("bool", True, True),
        ("bool", False, False),
        ("bool", "true", True),
        ("bool", "False", False),
        ("bool", "TRUE", True),
        ("int", 7, 7),
        ("int", -2, -2),
        ("float", 1, 1.0),
        ("float", 0.25, 0.25),
        ("str", "", ""),
        ("str", "true", "true"),
    ],
)
def test_convert_keeps_plain_values_of_the_type(kind, value, expected):
    got = convert("key", kind, value)
    assert got == expected and type(got) is type(expected)


@pytest.mark.parametrize(
    ("kind", "value", "allowed"),
    [
        ("bool", "ture", "true or false"),
        ("bool", "yes", "true or false"),
        ("bool", " true", "true or false"),
        ("bool", 1, "true or false"),
        ("bool", 0, "true or false"),
        ("int", 2.5, "an integer"),
        ("int", 2.0, "an integer"),
        ("int", True, "an integer"),
        ("int", "2", "an integer"),
        ("float", True, "a finite number"),
        ("float", "abc", "a finite number"),
        ("float", "0.5", "a finite number"),
        ("float", float("nan"), "a finite number"),
        ("float", float("inf"), "a finite number"),
        ("str", 1, "a string"),
        ("str", False, "a string"),
    ],
)
def test_convert_refuses_anything_else_naming_the_key(kind, value, allowed):
    with pytest.raises(ConfigError) as error:
        convert("some-key", kind, value)
    assert str(error.value) == f"some-key must be {allowed}, got {value!r}"
    assert (error.value.key, error.value.allowed) == ("some-key", allowed)


def test_a_field_of_another_type_is_a_programming_error():
    @dataclasses.dataclass(frozen=True)
    class Optional(RunConfigFields):
        steps: int | None = None

    with pytest.raises(TypeError, match="steps must be bool, int, float or str"):
        Optional.from_config({"steps": 3})


def test_range_and_name_checks_use_the_run_config_spelling():
    with pytest.raises(ConfigError, match="^max-count must be >= 0, got -1$"):
        Example.from_config({"max-count": -1})
    with pytest.raises(ConfigError, match="^unknown name 'c'; choose one of a, b$"):
        Example(name="c")
    # a ConfigError is a ValueError, so existing handlers still catch it
    assert issubclass(ConfigError, ValueError)


MNIST = defaults("mnist")
EMPTY = {
    compress: wire_bytes(
        encode(
            SiteData(
                torch.zeros((0, 28, 28), dtype=torch.uint8),
                torch.zeros(0, dtype=torch.long),
                10,
            ),
            compress=compress,
        )
    )
    for compress in (False, True)
}
"""The wire size of an empty MNIST upload, plain and compressed."""

SELECTION_BAD = [
    ("num-server-rounds", 0, ">= 1"),
    ("num-server-rounds", -1, ">= 1"),
    ("num-server-rounds", 100_001, ">= 1 and <= 100000"),
    ("num-server-rounds", 2**63, ">= 1 and <= 100000"),  # beyond int64
    ("num-server-rounds", 2.7, "an integer"),
    ("rho", 0, "in (0, 1]"),
    ("rho", 1.5, "in (0, 1]"),
    ("rho", True, "a finite number"),
    ("rho", "abc", "a finite number"),
    ("selection-policy", "greedy", "choose one of class-balanced, group,"),
    ("confidence", "accuracy", "choose one of cross-entropy, entropy,"),
    ("max-count", -1, ">= 0 (0: no limit)"),
    ("max-count", 2.5, "an integer"),
    ("max-bytes", -1, ">= 0 (0: no limit)"),
    ("max-bytes", 100, f"0 (no limit) or >= {EMPTY[False]}"),
    ("max-bytes", EMPTY[False] - 1, f"0 (no limit) or >= {EMPTY[False]}"),
    ("compress", "ture", "true or false"),
    ("compress", 1, "true or false"),
    ("group", "wrong", "choose one of wrong-unconfident, wrong-confident,"),
    ("trim", 0.0, "in (0, 1)"),
    ("trim", 1.0, "in (0, 1)"),
    ("temperature", 0, "> 0"),
    ("temperature", -0.5, "> 0"),
    ("seed", -1, ">= 0"),
    ("seed", 1.5, "an integer"),
    ("allocation", "everywhere", "choose one of per-site, global"),
    ("round-budget-bytes", -1, ">= 0 (0: the per-site sum)"),
    ("round-budget-bytes", 1.5, "an integer"),
    ("dataset", "emnist", "choose one of mnist, fashion-mnist, cifar10"),
    ("model", "resnet", "choose one of lenet5, lenet5-wide, cifar-cnn"),
    ("data-dir", 3, "a string"),
    ("out-dir", 5, "a string"),
    ("validation-size", 0, ">= 1"),
    ("initial-size", 0, ">= 1"),
    ("pool-size", -1, ">= 0 (0: the rest)"),
    ("partitioner", "shards", "choose one of iid, dirichlet"),
    ("dirichlet-alpha", 0, "> 0"),
    ("dirichlet-alpha", -1.0, "> 0"),
    ("label-noise", 1.0, "in [0, 1)"),
    ("label-noise", -0.1, "in [0, 1)"),
    ("label-noise-kind", "pairs", "symmetric, asymmetric"),
    ("label-noise-sites", "first", "partition ids >= 0"),
    ("label-noise-sites", "0,-1", "partition ids >= 0"),
    ("label-noise-sites", "1,1", "each once"),
    ("label-noise-sites", "", "partition ids >= 0"),
    ("easy-sites", "0,x", '"" (none) or partition ids >= 0'),
    ("easy-classes", "10", "classes in [0, 10)"),
    ("easy-classes", "1,1", "each once"),
    ("initial-epochs", 0, ">= 1"),
    ("server-epochs", 0, ">= 1"),
    ("batch-size", 0, ">= 1"),
    ("lr-schedule", "step", "choose one of constant, cosine"),
    ("warmup", 1.0, "in [0, 1)"),
    ("augment", "flip", "choose one of none, translate"),
    ("max-shift", 0, ">= 1"),
    ("weight-decay", -0.1, ">= 0"),
    ("optimizer", "rmsprop", "choose one of adam, sgd"),
    ("lr", 0, "> 0"),
    ("lr", -0.1, "> 0"),
    ("from-scratch", "no", "true or false"),
    ("max-upload-bytes", 0, ">= 1"),
    ("max-upload-bytes", -5, ">= 1"),
    ("max-upload-bytes", EMPTY[False] - 1, f">= {EMPTY[False]}"),
    ("max-site-samples", 0, "an int >= 1"),
    ("round-timeout", 0, "> 0"),
    ("round-timeout", -1.0, "> 0"),
    ("fraction-train", 1.5, "in (0, 1]"),
    ("fraction-train", 0, "in (0, 1]"),
    ("min-nodes", 0, ">= 1"),
    ("min-nodes", -1, ">= 1"),
]
"""A bad value of every key of the sample-selection app, and what is allowed."""


def assert_names(error: ConfigError, key: str, allowed: str) -> None:
    message = str(error)
    assert error.key == key
    assert message.startswith((f"{key} must be ", f"unknown {key} ")), message
    assert allowed in message, message


def test_every_key_of_the_sample_selection_app_has_a_bad_value_below():
    assert {key for key, _, _ in SELECTION_BAD} == set(MNIST)


@pytest.mark.parametrize(("key", "value", "allowed"), SELECTION_BAD)
def test_the_sample_selection_app_refuses_a_bad_value(key, value, allowed):
    with pytest.raises(ConfigError) as error:
        check_config({**MNIST, key: value})
    assert_names(error.value, key, allowed)


def test_the_defaults_pass_and_come_back_typed():
    for app in (mnist, fashion_mnist):
        server, selection = app.check_config(app.DEFAULTS)
        assert {**server.to_config(), **selection.to_config()} == app.DEFAULTS
    assert check_config({**MNIST, "rho": 1, "compress": "true"})[1].rho == 1.0


def test_max_bytes_may_be_the_size_of_an_empty_upload_compressed_or_not():
    # Prepare: a compressed empty upload is smaller than a plain one
    plain, compressed = EMPTY[False], EMPTY[True]
    assert compressed < plain
    # Execute / Assert
    assert check_config({**MNIST, "max-bytes": plain})[1].max_bytes == plain
    check_config({**MNIST, "max-bytes": compressed, "compress": True})
    with pytest.raises(ConfigError, match=f"or >= {compressed}, the size of an empty"):
        check_config({**MNIST, "max-bytes": compressed - 1, "compress": True})
    with pytest.raises(ConfigError, match=f"or >= {plain}, the size of an empty"):
        check_config({**MNIST, "max-bytes": compressed})


DATA_PARALLEL = data_parallel.defaults("mnist")
DATA_PARALLEL_BAD = [
    ("num-server-rounds", 0, ">= 1"),
    ("num-server-rounds", 2**63, ">= 1 and <= 100000"),
    ("num-server-rounds", 2.7, "an integer"),
    ("dataset", "emnist", "choose one of mnist,"),
    ("model", "resnet", "choose one of lenet5,"),
    ("data-dir", False, "a string"),
    ("out-dir", 5, "a string"),
    ("validation-size", 0, ">= 1"),
    ("pool-size", -1, ">= 0"),
    ("optimizer", "rmsprop", "choose one of adam, sgd"),
    ("lr", 0, "> 0"),
    ("momentum", -0.1, ">= 0"),
    ("eval-every", 0, ">= 1"),
    ("target-accuracy", 1.5, "in [0, 1]"),
    ("fraction-train", 1.5, "in (0, 1]"),
    ("min-nodes", 0, ">= 1"),
    ("reduction", "avg", "choose one of mean, median,"),
    ("trim", 0.5, "in [0, 0.5)"),
    ("clip-norm", -1, ">= 0"),
    ("batch-size", 0, ">= 1"),
    ("batch-size", 2.5, "an integer"),
    ("local-steps", 0, ">= 1"),
    ("local-lr", 0, "> 0"),
    ("sampling", "biased", "choose one of uniform, favoured, dirichlet"),
    ("bias", 1.5, "in [0, 1]"),
    ("bias", "high", "a finite number"),
    ("favoured-classes", -1, ">= 0"),
    ("favoured-classes", "2", "an integer"),
    ("alpha", 0, "> 0"),
    ("bias-schedule", "cosine", "choose one of constant, linear-decay,"),
    ("seed", -1, ">= 0"),
]
"""A bad value of every key of the data-parallel app, and what is allowed."""


def test_every_key_of_the_data_parallel_app_has_a_bad_value_below():
    assert {key for key, _, _ in DATA_PARALLEL_BAD} == set(DATA_PARALLEL)


@pytest.mark.parametrize(("key", "value", "allowed"), DATA_PARALLEL_BAD)
def test_the_data_parallel_app_refuses_a_bad_value(key, value, allowed):
    with pytest.raises(ConfigError) as error:
        data_parallel.check_config({**DATA_PARALLEL, key: value})
    assert_names(error.value, key, allowed)


def test_the_data_parallel_defaults_pass():
    server, dp_config, sampling = mnist_data_parallel.check_config(DATA_PARALLEL)
    settings = {**server.to_config(), **dp_config.to_config(), **sampling.to_config()}
    assert settings == DATA_PARALLEL


@pytest.mark.parametrize(
    ("app", "key", "value"),
    [
        (mnist, "num-server-rounds", 0),
        (mnist, "num-server-rounds", 2**63),
        (mnist_data_parallel, "num-server-rounds", 10**30),
        (mnist, "fraction-train", 1.5),
        (mnist, "compress", "ture"),
        (mnist, "max-bytes", 100),
        (fashion_mnist, "initial-epochs", 0),
        (mnist_data_parallel, "eval-every", 0),
        (mnist_data_parallel, "reduction", "avg"),
    ],
)
def test_the_server_app_refuses_a_bad_value_before_loading_anything(app, key, value):
    # Prepare: a data folder that does not exist would fail the run once loaded
    context = Context(
        run_id=0,
        node_id=0,
        node_config={},
        state=RecordDict(),
        run_config={**app.DEFAULTS, "data-dir": "/nonexistent", key: value},
    )
    # Execute / Assert: no grid is needed, as nothing gets that far
    with pytest.raises(ConfigError) as error:
        app.server_app(None, context)
    assert error.value.key == key


@pytest.mark.parametrize(
    ("defaults_fn", "check_fn", "sent_to_nodes"),
    [
        (defaults, check_config, SiteShareConfig),
        (data_parallel.defaults, data_parallel.check_config, ShareConfig),
    ],
)
def test_every_key_of_an_app_is_declared_in_one_dataclass_field_only(
    defaults_fn, check_fn, sent_to_nodes
):
    # Execute: the typed settings an app's check returns, and what nodes get
    parts = check_fn(defaults_fn("mnist"))
    # Assert: each run-config key is one field of one class, and together they
    # are exactly the app's keys (so the pyproject table and the CLI's unknown-key
    # check follow from them)
    owners: dict[str, set[str]] = {}
    for part_type in (*map(type, parts), sent_to_nodes):
        for cls in part_type.__mro__:
            for name in getattr(cls, "__annotations__", {}):
                owners.setdefault(name.replace("_", "-"), set()).add(cls.__qualname__)
    keys = [key for part in parts for key in part.to_config()]
    assert len(keys) == len(set(keys)) and set(keys) == set(defaults_fn("mnist"))
    assert all(len(classes) == 1 for key, classes in owners.items() if key in keys)


def test_num_server_rounds_may_be_its_documented_maximum_and_no_more():
    # Execute: the bound itself passes, on both apps
    server, _ = check_config({**MNIST, "num-server-rounds": MAX_SERVER_ROUNDS})
    data_parallel.check_config({**DATA_PARALLEL, "num-server-rounds": 100_000})
    # Assert
    assert server.num_server_rounds == MAX_SERVER_ROUNDS == 100_000
    with pytest.raises(
        ConfigError, match="^num-server-rounds must be >= 1 and <= 100000, got 100001$"
    ):
        ShareConfig(num_server_rounds=MAX_SERVER_ROUNDS + 1)


@pytest.mark.parametrize(
    ("key", "value"),
    [("label-noise-sites", "0,2"), ("label-noise-sites", "7"), ("easy-sites", "2")],
)
def test_a_site_id_that_no_site_has_is_refused_naming_the_sites_there_are(key, value):
    # Prepare: two sites, one id beyond them
    share = SiteShareConfig.from_config({"label-noise": 0.3, key: value})
    # Execute
    with pytest.raises(ConfigError) as error:
        share.check_sites(2, "--num-supernodes 2")
    # Assert
    assert_names(error.value, key, "partition ids in [0, 2), the sites there are")
    assert str(error.value).endswith(f"(--num-supernodes 2), got {value!r}")


@pytest.mark.parametrize(
    "config",
    [
        {"label-noise-sites": "all"},
        {"label-noise-sites": "0,1"},
        {"easy-sites": "1"},
        {"easy-sites": ""},
    ],
)
def test_site_ids_the_sites_have_pass(config):
    # Prepare
    share = SiteShareConfig.from_config(config)
    # Execute / Assert: no refusal
    share.check_sites(2, "--num-supernodes 2")


def test_a_simulated_site_refuses_a_noisy_site_id_beyond_the_partitions():
    # Prepare: a run started without the command's check (flwr run), 2 sites
    share = SiteShareConfig(
        validation_size=10, initial_size=10, label_noise=0.3, label_noise_sites="2"
    )
    labels = np.arange(100) % 10
    # Execute / Assert: the site's share is refused, naming the key and the count
    with pytest.raises(ConfigError) as error:
        share.site_pool(labels, seed=0, partition_id=0, num_partitions=2)
    assert_names(error.value, "label-noise-sites", "partition ids in [0, 2)")
    assert "(num-partitions 2)" in str(error.value)
    # Assert: with three sites, id 2 is one of them
    assert len(share.site_pool(labels, seed=0, partition_id=2, num_partitions=3)) > 0


def test_a_global_budget_that_buys_no_sample_is_refused_before_start():
    # Prepare: one MNIST sample costs 784 pixels, a label and an id on the wire
    one = 28 * 28 + 1 + 8
    config = {**MNIST, "allocation": "global"}
    # Execute / Assert: a byte short of one sample is refused, naming the key
    with pytest.raises(ConfigError) as error:
        check_config({**config, "round-budget-bytes": one - 1})
    assert_names(error.value, "round-budget-bytes", f">= {one}, the wire cost of one")
    assert check_config({**config, "round-budget-bytes": one})[1].round_budget_bytes
    assert check_config({**config, "round-budget-bytes": 0})  # the per-site sum
