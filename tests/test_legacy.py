"""The legacy-API adapter: a real legacy Flower simulation, and malformed FitRes."""

import functools
import math

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, Context, RecordDict
from flwr.client import ClientApp
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters
from flwr.server import ServerApp, ServerConfig
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.simulation import run_simulation

from clients.legacy import SelectNumPyClient
from clients.site import LEDGER_KEY
from flwr_select.config import ConfigError
from flwr_select.data import SiteData
from flwr_select.models import build_model
from flwr_select.selection.buffer import TrainingBuffer
from flwr_select.selection.protocol import SelectionConfig
from flwr_select.selection.wire import wire_bytes
from strategies.legacy import LegacySampleSelection, site_key
from strategies.sample_selection import SampleSelection

NUM_CLASSES, SITE_SIZE, RHO = 10, 200, 0.2
lenet = functools.partial(build_model, "lenet5", seed=0)


def synthetic_site(partition: int, n: int = SITE_SIZE) -> SiteData:
    """Noise with a bright 5x5 square whose position encodes the class; ids distinct per site."""
    rng = np.random.default_rng(partition)
    labels = rng.integers(0, NUM_CLASSES, n)
    images = rng.integers(0, 40, (n, 28, 28), dtype=np.uint8)
    for image, label in zip(images, labels, strict=True):
        row, col = 3 + 12 * (label // 5), 1 + 5 * (label % 5)
        image[row : row + 5, col : col + 5] = rng.integers(200, 256, (5, 5))
    ids = torch.arange(n) + 10_000 * partition
    return SiteData(
        torch.from_numpy(images), torch.from_numpy(labels), NUM_CLASSES, ids
    )


def client_fn(context):
    partition = int(context.node_config["partition-id"])
    return SelectNumPyClient(
        synthetic_site(partition), lenet, site_key=partition, context=context
    ).to_client()


def make_strategy():
    return SampleSelection(
        lenet,
        NUM_CLASSES,
        selection=SelectionConfig(rho=RHO),
        buffer=TrainingBuffer(NUM_CLASSES, device="cpu"),
        sample_shape=(28, 28),
    )


def test_a_legacy_simulation_buffers_each_sites_budget_once_and_trains(monkeypatch):
    # Prepare
    monkeypatch.setenv("FLWR_DISABLE_UPDATE_CHECK", "1")
    monkeypatch.setenv("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    strategy = make_strategy()
    initial = {k: v.clone() for k, v in strategy.model.state_dict().items()}
    # Execute
    run_simulation(
        server_app=ServerApp(
            config=ServerConfig(num_rounds=2), strategy=LegacySampleSelection(strategy)
        ),
        client_app=ClientApp(client_fn=client_fn),
        num_supernodes=2,
        backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0}},
    )
    # Assert
    budget = 2 * math.floor(RHO * SITE_SIZE)
    model = wire_bytes(ArrayRecord(lenet().state_dict()))
    assert sorted(strategy.rounds) == [1, 2]
    for metrics in strategy.rounds.values():
        assert metrics["samples-received"] == budget
        # one copy of the model a client, and a config of under 4 KB
        assert 2 * model < metrics["bytes-sent"] < 2 * (model + 4096)
        assert (metrics["sites-accepted"], metrics["sites-rejected"]) == (2, 0)
        assert metrics["sites-failed"] == 0
    buffer = strategy.buffer
    assert len(buffer) == 2 * budget
    assert len(set(buffer.sites.tolist())) == 2
    pairs = set(zip(buffer.sites.tolist(), buffer.ids.tolist(), strict=True))
    assert len(pairs) == len(buffer)  # no (site, id) twice, across both rounds
    # labels in the buffer are the sites' own labels for those ids
    for site in set(buffer.sites.tolist()):
        mine = buffer.sites == site
        partition = int(buffer.ids[mine][0]) // 10_000
        data = synthetic_site(partition)
        assert torch.equal(
            buffer.labels[torch.from_numpy(mine)].cpu(),
            data.labels[buffer.ids[mine] - 10_000 * partition],
        )
    final = strategy.model.state_dict()
    assert any(not torch.equal(initial[k], final[k].cpu()) for k in initial)


def fit_res(arrays, candidates):
    metrics = {} if candidates is None else {"num-candidates": candidates}
    return FitRes(
        Status(Code.OK, ""), ndarrays_to_parameters(arrays), len(arrays), metrics
    )


LIMIT = math.floor(RHO * SITE_SIZE)
SITE = synthetic_site(0)
SENT = [
    SITE.images.numpy(),
    SITE.labels.numpy().astype(np.uint8),
    SITE.ids.numpy().astype(np.uint16),
]


def head(count, start=LIMIT):
    """An upload of ``count`` samples from ``start`` on (the first LIMIT are sent first)."""
    return [a[start : start + count] for a in SENT]


MALFORMED = {
    "float images": (
        [head(LIMIT)[0].astype(np.float32), *head(LIMIT)[1:]],
        SITE_SIZE,
        "uint8",
    ),
    "over budget": (head(LIMIT + 1), SITE_SIZE, "exceed the budget"),
    "two arrays": (head(LIMIT)[:2], SITE_SIZE, "3 numpy.ndarray tensors"),
    "no num-candidates": (head(LIMIT), None, "num-candidates"),
    "already sent": (head(LIMIT, start=0), SITE_SIZE, "already accepted"),
}


@pytest.mark.parametrize("case", MALFORMED)
def test_a_malformed_fitres_is_rejected_and_leaves_buffer_and_model_unchanged(
    case, caplog
):
    # Prepare: round 1 buffers a good upload of the first LIMIT samples
    legacy, client = LegacySampleSelection(make_strategy()), GridClientProxy(7, None, 0)
    params, _ = legacy.aggregate_fit(
        1, [(client, fit_res(head(LIMIT, 0), SITE_SIZE))], []
    )
    assert params is not None
    buffer = legacy.server.buffer
    before = (len(buffer), buffer.ids.copy(), buffer.sites.copy())
    weights = {k: v.clone() for k, v in legacy.server.model.state_dict().items()}
    arrays, candidates, reason = MALFORMED[case]
    # Execute
    params, metrics = legacy.aggregate_fit(
        2, [(client, fit_res(arrays, candidates))], [RuntimeError("a client crashed")]
    )
    # Assert
    assert params is None
    assert (
        metrics["sites-accepted"],
        metrics["sites-rejected"],
        metrics["sites-failed"],
    ) == (0, 1, 1)
    assert legacy.server.rounds[2] == metrics
    assert reason in caplog.text and "rejected the upload of node 7" in caplog.text
    assert len(buffer) == before[0]
    np.testing.assert_array_equal(buffer.ids, before[1])
    np.testing.assert_array_equal(buffer.sites, before[2])
    state = legacy.server.model.state_dict()
    assert all(torch.equal(weights[k], state[k]) for k in weights)


def test_site_keys_are_node_ids_or_stable_hashes():
    assert site_key("18446744073709551615") == 2**64 - 1
    assert site_key("site-a") == site_key("site-a") != site_key("site-b")
    assert 0 <= site_key("-3") < 2**64


def test_compressed_uploads_are_refused_up_front():
    strategy = SampleSelection(
        lenet, NUM_CLASSES, selection=SelectionConfig(rho=RHO, compress=True)
    )
    with pytest.raises(ValueError, match="compress"):
        LegacySampleSelection(strategy)


def legacy_site():
    return SelectNumPyClient(
        synthetic_site(0), lenet, context=Context(0, 0, {}, RecordDict(), {})
    )


@pytest.mark.parametrize(
    ("change", "key"),
    [
        (lambda config, arrays: config.update({"server-round": "3"}), "server-round"),
        (lambda config, arrays: config.update({"server-round": 2.9}), "server-round"),
        (lambda config, arrays: config.pop("server-round"), "server-round"),
        (lambda config, arrays: config.update({"num-classes": 10**7}), "num-classes"),
        (lambda config, arrays: arrays.pop(), "parameters"),
        (
            lambda config, arrays: arrays.__setitem__(0, arrays[0].astype(np.float64)),
            "parameters['standardize.mean']",
        ),
    ],
)
def test_a_legacy_site_reads_the_servers_message_strictly(change, key):
    # Prepare: what the legacy strategy sends, with one thing changed
    config = {**SelectionConfig(rho=RHO).to_config(), "server-round": 1}
    config["num-classes"] = NUM_CLASSES
    arrays = [t.numpy() for t in lenet().state_dict().values()]
    change(config, arrays)
    site = legacy_site()
    # Execute / Assert: refused naming the key, nothing recorded as sent
    with pytest.raises(ConfigError) as error:
        site.fit(arrays, config)
    assert error.value.key == key
    assert LEDGER_KEY not in site.context.state.array_records
