import re

import pytest
from flwr.app import ConfigRecord
from hypothesis import given
from hypothesis import strategies as st

from flwr_select.config import ConfigError
from flwr_select.selection.policies import (
    GROUPS,
    POLICIES,
    Budget,
    ClassBalanced,
    Group,
    Proxy,
    Stochastic,
    TrimmedProxy,
    Uniform,
)
from flwr_select.selection.protocol import SelectionConfig
from flwr_select.selection.scores import CONFIDENCE_METRICS

CUSTOM = SelectionConfig(
    rho=0.2,
    selection_policy="group",
    confidence="margin",
    max_count=30,
    max_bytes=40_000,
    compress=True,
    group="wrong-confident",
    temperature=0.5,
    seed=7,
)


def test_defaults():
    config = SelectionConfig()
    assert config.to_config() == {
        "rho": 0.05,
        "selection-policy": "proxy",
        "confidence": "cross-entropy",
        "max-count": 0,
        "max-bytes": 0,
        "compress": False,
        "group": "",
        "temperature": 1.0,
        "trim": 0.01,
        "seed": 0,
        "allocation": "per-site",
        "round-budget-bytes": 0,
    }


def test_to_config_uses_the_run_config_spellings():
    assert CUSTOM.to_config() == {
        "rho": 0.2,
        "selection-policy": "group",
        "confidence": "margin",
        "max-count": 30,
        "max-bytes": 40_000,
        "compress": True,
        "group": "wrong-confident",
        "temperature": 0.5,
        "trim": 0.01,
        "seed": 7,
        "allocation": "per-site",
        "round-budget-bytes": 0,
    }


def test_round_trip_through_a_flower_config_record():
    # Prepare: the server merges the values into the message's ConfigRecord
    record = ConfigRecord({**CUSTOM.to_config(), "server-round": 3, "num-classes": 10})
    # Execute
    back = SelectionConfig.from_config(record)
    # Assert
    assert back == CUSTOM
    assert SelectionConfig.from_config(SelectionConfig().to_config()) == (
        SelectionConfig()
    )


@given(
    rho=st.floats(0.001, 1.0),
    policy=st.sampled_from(sorted(POLICIES)),
    group=st.sampled_from(GROUPS),
    confidence=st.sampled_from(sorted(CONFIDENCE_METRICS)),
    max_count=st.integers(0, 10_000),
    max_bytes=st.integers(0, 10**9),
    compress=st.booleans(),
    temperature=st.floats(0.01, 100.0),
    seed=st.integers(0, 2**31),
)
def test_round_trip_is_exact(
    rho, policy, group, confidence, max_count, max_bytes, compress, temperature, seed
):
    config = SelectionConfig(
        rho=rho,
        selection_policy=policy,
        confidence=confidence,
        max_count=max_count,
        max_bytes=max_bytes,
        compress=compress,
        group=group,
        temperature=temperature,
        seed=seed,
    )
    assert SelectionConfig.from_config(config.to_config()) == config


def test_from_config_ignores_unknown_keys_and_keeps_defaults_for_missing_ones():
    config = SelectionConfig.from_config(
        {
            "selection-policy": "uniform",
            "max-count": 12,
            "server-round": 4,  # another key of the same record
            "lr": 0.1,
            "max_count": 99,  # the Python spelling is not a run-config name
        }
    )
    assert config == SelectionConfig(selection_policy="uniform", max_count=12)
    assert SelectionConfig.from_config({}) == SelectionConfig()


def test_from_config_converts_types():
    # Prepare: TOML writes 1 for 1.0; a bool may come as "true"/"false" in any case
    config = SelectionConfig.from_config(
        {"rho": 1, "temperature": 2, "max-count": 5, "compress": "TRUE", "seed": 3}
    )
    # Assert
    assert config.rho == 1.0 and type(config.rho) is float
    assert config.temperature == 2.0 and type(config.temperature) is float
    assert config.max_count == 5 and type(config.max_count) is int
    assert config.compress is True
    assert config.seed == 3 and type(config.seed) is int


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"compress": "ture"}, "compress must be true or false, got 'ture'"),
        ({"compress": 1}, "compress must be true or false, got 1"),
        ({"compress": "yes"}, "compress must be true or false, got 'yes'"),
        ({"rho": True}, "rho must be a finite number, got True"),
        ({"rho": "abc"}, "rho must be a finite number, got 'abc'"),
        ({"rho": float("nan")}, "rho must be a finite number, got nan"),
        ({"temperature": float("inf")}, "temperature must be a finite number"),
        ({"max-count": 2.5}, "max-count must be an integer, got 2.5"),
        ({"max-count": 5.0}, "max-count must be an integer, got 5.0"),
        ({"max-bytes": True}, "max-bytes must be an integer, got True"),
        ({"seed": "3"}, "seed must be an integer, got '3'"),
        ({"group": 1}, "group must be a string, got 1"),
    ],
)
def test_from_config_refuses_values_not_of_the_fields_type(config, message):
    with pytest.raises(ConfigError, match=re.escape(message)) as error:
        SelectionConfig.from_config(config)
    assert error.value.key == next(iter(config))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"rho": 0.0}, r"rho must be in \(0, 1\], got 0.0"),
        ({"rho": 1.01}, r"rho must be in \(0, 1\], got 1.01"),
        ({"rho": -0.5}, r"rho must be in \(0, 1\], got -0.5"),
        (
            {"selection_policy": "greedy"},
            "unknown selection-policy 'greedy'; choose one of class-balanced, group,",
        ),
        ({"selection_policy": "group"}, "unknown group ''; choose one of"),
        (
            {"selection_policy": "group", "group": "wrong"},
            "unknown group 'wrong'; choose one of wrong-unconfident,",
        ),
        # an option is checked whatever the policy, so a typo fails at once
        ({"group": "wrong"}, "unknown group 'wrong'; choose one of"),
        (
            {"selection_policy": "stochastic", "temperature": 0.0},
            "temperature must be > 0, got 0.0",
        ),
        ({"temperature": 0.0}, "temperature must be > 0, got 0.0"),
        ({"temperature": -1.0}, "temperature must be > 0, got -1.0"),
        (
            {"confidence": "accuracy"},
            "unknown confidence 'accuracy'; choose one of cross-entropy,",
        ),
        ({"max_count": -1}, r"max-count must be >= 0 \(0: no limit\), got -1"),
        ({"max_bytes": -5}, r"max-bytes must be >= 0 \(0: no limit\), got -5"),
        ({"seed": -1}, "seed must be >= 0, got -1"),
    ],
)
def test_bad_values_raise_at_construction(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        SelectionConfig(**kwargs)


def test_bad_values_from_a_run_config_raise_too():
    with pytest.raises(ValueError, match=r"rho must be in \(0, 1\], got 0.0"):
        SelectionConfig.from_config({"rho": 0})
    with pytest.raises(ValueError, match="unknown selection-policy 'best'"):
        SelectionConfig.from_config({"selection-policy": "best"})


@pytest.mark.parametrize(
    ("kwargs", "budget"),
    [
        ({}, Budget(rho=0.05, count=None, max_bytes=None)),  # 0 means no limit
        ({"rho": 1.0, "max_count": 30}, Budget(rho=1.0, count=30, max_bytes=None)),
        ({"max_bytes": 40_000}, Budget(rho=0.05, count=None, max_bytes=40_000)),
        (
            {"rho": 0.2, "max_count": 7, "max_bytes": 9},
            Budget(rho=0.2, count=7, max_bytes=9),
        ),
    ],
)
def test_budget(kwargs, budget):
    assert SelectionConfig(**kwargs).budget() == budget


def test_max_count_zero_does_not_limit_the_count():
    # rho = 1 of 500 samples: no count limit, so all 500; with max_count 30, 30
    assert SelectionConfig(rho=1.0).budget().sample_limit(500) == 500
    assert SelectionConfig(rho=1.0, max_count=30).budget().sample_limit(500) == 30
    # rho 0.05 of 500 = 25 is below a count of 30
    assert SelectionConfig(max_count=30).budget().sample_limit(500) == 25


@pytest.mark.parametrize(
    ("kwargs", "policy"),
    [
        ({}, Proxy()),
        ({"selection_policy": "uniform", "group": "wrong-confident"}, Uniform()),
        ({"selection_policy": "class-balanced"}, ClassBalanced()),
        (
            {"selection_policy": "group", "group": "correct-unconfident"},
            Group("correct-unconfident"),
        ),
        ({"selection_policy": "stochastic", "temperature": 0.25}, Stochastic(0.25)),
        ({"selection_policy": "trimmed-proxy", "trim": 0.2}, TrimmedProxy(trim=0.2)),
        # options of other policies are ignored
        ({"selection_policy": "proxy", "temperature": 0.5}, Proxy()),
    ],
)
def test_policy(kwargs, policy):
    got = SelectionConfig(**kwargs).policy()
    assert type(got) is type(policy)
    assert got == policy


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_every_policy_name_builds(name):
    config = SelectionConfig(selection_policy=name, group="wrong-unconfident")
    assert config.policy().name == name


def test_from_config_reads_boolean_strings_as_booleans():
    assert SelectionConfig.from_config({"compress": "false"}).compress is False
    assert SelectionConfig.from_config({"compress": "False"}).compress is False
    assert SelectionConfig.from_config({"compress": "true"}).compress is True
    assert SelectionConfig.from_config({"compress": True}).compress is True
