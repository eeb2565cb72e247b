"""A site reads the server's messages as strictly as the server reads its uploads.

Each hostile message goes to the real handler as a real Flower ``Message`` and
is refused with an error naming the key, before the site loads its data, and
with its ledger as it was; what the site sends in a round stays within its own
``max-bytes`` however often it is asked.
"""

import functools
import io

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from clients.common import received_model
from clients.site import add_select_handler, load_ledger
from clients.worker import add_gradient_handler
from flwr_select.config import ConfigError
from flwr_select.data import SiteData
from flwr_select.messages import (
    CONFIG_KEY,
    MAX_NUM_CLASSES,
    METRICS_KEY,
    MODEL_KEY,
)
from flwr_select.models import build_model
from flwr_select.parallel.batches import Sampling
from flwr_select.parallel.gradients import GRADIENT_KEY, DataParallelConfig
from flwr_select.selection.protocol import (
    UPLOAD_KEY,
    SelectionConfig,
)
from flwr_select.selection.wire import wire_bytes
from tests.memory import LIMIT, peak_growth

SELECT, SUMMARY = "train.select", "query.select_summary"
SAMPLE_BYTES = 28 * 28 + 1 + 8
"""What one MNIST sample adds to an upload: pixels, label and id."""


class Samples:
    """A site of 64 random MNIST-shaped samples that counts how often it is loaded."""

    def __init__(self) -> None:
        self.loads = 0

    def __call__(self, _context, _config) -> SiteData:
        self.loads += 1
        g = torch.Generator().manual_seed(0)
        images = torch.randint(0, 256, (64, 28, 28), dtype=torch.uint8, generator=g)
        return SiteData(images, torch.arange(64) % 10, 10, ids=torch.arange(64))


def lenet5_arrays(**changes: Array | None) -> ArrayRecord:
    """LeNet-5's arrays, with ``changes`` (None: an array left out)."""
    arrays = ArrayRecord(build_model("lenet5", seed=0).state_dict())
    for name, array in changes.items():
        if array is None:
            del arrays[name]
        else:
            arrays[name] = array
    return arrays


def message(
    message_type: str,
    config: dict,
    arrays: ArrayRecord | None = None,
    *,
    without: str | None = None,
) -> Message:
    """A server's message: the selection, round 2 and LeNet-5, changed by ``config``."""
    values = {
        **SelectionConfig(rho=0.25, allocation="global").to_config(),
        "server-round": 2,
        "num-classes": 10,
        "model": "lenet5",
        **config,
    }
    values.pop(without, None)
    content = RecordDict(
        {
            MODEL_KEY: lenet5_arrays() if arrays is None else arrays,
            CONFIG_KEY: ConfigRecord(values),
        }
    )
    return Message(content, message_type=message_type, dst_node_id=1)


def node(node_config: dict | None = None) -> Context:
    """A node's context: a fresh one each call, as after a restart."""
    return Context(
        run_id=1,
        node_id=1,
        node_config=node_config or {},
        state=RecordDict(),
        run_config={},
    )


def site_app(model_fn=None) -> tuple[ClientApp, Samples]:
    app, samples = ClientApp(), Samples()
    add_select_handler(app, load_site=samples, model_fn=model_fn)
    return app, samples


def ledger_arrays(context: Context) -> dict[str, list]:
    return {k: v.tolist() for k, v in load_ledger(context).to_arrays().items()}


HOSTILE_CONFIGS = {
    "num-classes 10**7": ("num-classes", {"num-classes": 10**7}, "got 10000000"),
    "num-classes str": ("num-classes", {"num-classes": "10"}, "an integer"),
    "unknown model": ("model", {"model": "resnet152"}, "unknown model 'resnet152'"),
    "round str": ("server-round", {"server-round": "3"}, "an integer, got '3'"),
    "round float": ("server-round", {"server-round": 2.9}, "an integer, got 2.9"),
    "round bytes": ("server-round", {"server-round": b"\x03"}, "an integer"),
    "round 0": ("server-round", {"server-round": 0}, "got 0"),
    "round missing": ("server-round", {}, "server-round is missing"),
    "quota float": ("quota", {"quota": 2.7}, "an integer, got 2.7"),
    "quota str": ("quota", {"quota": "5"}, "an integer, got '5'"),
    "quota bool": ("quota", {"quota": True}, "an integer, got True"),
    "quota 0": ("quota", {"quota": 0}, ">= 1, got 0"),
    "top-up str": ("top-up", {"quota": 4, "top-up": "false"}, "got 'false'"),
    "top-up no quota": ("top-up", {"top-up": True}, "without a quota"),
    "undelivered str": ("undelivered-rounds", {"undelivered-rounds": ["1"]}, "'1'"),
    "undelivered int": ("undelivered-rounds", {"undelivered-rounds": 1}, "a list"),
    "undelivered now": ("undelivered-rounds", {"undelivered-rounds": [2]}, "got 2"),
    "top-ups future": ("undelivered-top-ups", {"undelivered-top-ups": [7]}, "got 7"),
    "rho str": ("rho", {"rho": "0.5"}, "a finite number"),
}


@pytest.mark.parametrize("message_type", [SELECT, SUMMARY])
@pytest.mark.parametrize(
    ("key", "config", "says"), HOSTILE_CONFIGS.values(), ids=HOSTILE_CONFIGS
)
def test_a_hostile_config_value_is_refused_naming_its_key(
    task_identity, message_type, key, config, says
):
    # Prepare: a site that answered round 1
    app, samples = site_app()
    context = node()
    app(message(SELECT, {"server-round": 1}), context)
    before, loads = ledger_arrays(context), samples.loads
    hostile = message(message_type, config, without=None if config else key)
    # Execute
    with pytest.raises(ConfigError) as refused:
        app(hostile, context)
    # Assert: the key named, the data never loaded, the ledger as it was
    assert refused.value.key == key
    assert key in str(refused.value) and says in str(refused.value)
    assert samples.loads == loads
    assert ledger_arrays(context) == before


def npy(values: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, values)
    return buffer.getvalue()


HEAD, CONV = "classifier.5.weight", "features.0.weight"
HOSTILE_ARRAYS = {
    "wrong shape": (HEAD, {HEAD: Array(np.zeros((11, 84), np.float32))}),
    "wrong dtype": (CONV, {CONV: Array(np.zeros((6, 1, 5, 5), np.float64))}),
    "missing": ("", {"classifier.5.bias": None}),
    "extra": ("", {"backdoor": Array(np.zeros(3, np.float32))}),
    "bytes unlike declared": (
        CONV,
        {
            CONV: Array(
                dtype="float32",
                shape=(6, 1, 5, 5),
                stype="numpy.ndarray",
                data=npy(np.zeros((7, 1, 5, 5), np.float32)),
            )
        },
    ),
    "bytes cut short": (
        CONV,
        {
            CONV: Array(
                dtype="float32",
                shape=(6, 1, 5, 5),
                stype="numpy.ndarray",
                data=npy(np.zeros((6, 1, 5, 5), np.float32))[:-4],
            )
        },
    ),
    "other stype": (
        CONV,
        {CONV: Array(dtype="float32", shape=(6, 1, 5, 5), stype="pickle", data=b"")},
    ),
}


@pytest.mark.parametrize(
    "model_fn", [None, functools.partial(build_model, "lenet5")], ids=["config", "own"]
)
@pytest.mark.parametrize(
    ("array", "changes"), HOSTILE_ARRAYS.values(), ids=HOSTILE_ARRAYS
)
def test_received_arrays_unlike_the_model_are_refused_naming_the_array(
    task_identity, model_fn, array, changes
):
    # Prepare: the built-in model the config names, or the user's own
    app, samples = site_app(model_fn)
    context = node()
    hostile = message(SELECT, {}, lenet5_arrays(**changes))
    # Execute
    with pytest.raises(ConfigError) as refused:
        app(hostile, context)
    # Assert: the array (or, by name, the record) is named; nothing loaded or sent
    key = f"arrays[{array!r}]" if array else "arrays"
    assert refused.value.key == key and str(refused.value).startswith(key)
    assert samples.loads == 0 and len(load_ledger(context).answered_rounds) == 0


def test_arrays_as_the_model_has_them_are_loaded_bit_for_bit(task_identity):
    # Prepare: the server's arrays, of another seed than the site would build
    sent = ArrayRecord(build_model("lenet5", seed=7).state_dict())
    config = message(SELECT, {}).content[CONFIG_KEY]
    # Execute
    model = received_model(config, sent, None)
    # Assert
    state = model.state_dict()
    assert state.keys() == sent.keys()
    assert all(np.array_equal(state[k].numpy(), a.numpy()) for k, a in sent.items())


def test_one_top_up_a_round_and_the_round_within_the_nodes_max_bytes(
    task_identity, tmp_path
):
    # Prepare: an edge box (its ledger on disk) with a round budget of about 24
    # samples, which sent 8 in round 2's upload
    cap = 24 * SAMPLE_BYTES + 1400
    box = {"max-bytes": cap, "state-dir": str(tmp_path)}
    app, _ = site_app()
    upload = app(message(SELECT, {"quota": 8}), node(box))
    top_up = message(SELECT, {"quota": 64, "top-up": True})
    # Execute: three top-ups, each for every sample, the box restarted before each
    answers = []
    for _ in range(3):
        try:
            answers.append(app(top_up, node(box)))
        except ConfigError as refused:
            answers.append(refused)
    # Assert: only the first is answered; the round sent less than the cap and
    # far from all 64 samples, the ledger's count the same as the replies'
    first, *others = answers
    assert isinstance(first, Message)
    for refused in others:
        assert refused.key == "top-up" and "had its top-up" in str(refused)
    replies = [upload, first]
    sent = sum(wire_bytes(r.content[UPLOAD_KEY]) for r in replies)
    ledger = load_ledger(node(box))
    assert ledger.bytes_sent_in(2) == sent <= cap
    counts = [r.content.metric_records[METRICS_KEY]["num-selected"] for r in replies]
    assert counts[0] == 8 and 8 < sum(counts) <= 24
    assert len(ledger.ids) == sum(counts)


def test_a_top_up_before_the_upload_or_past_the_budget_is_refused(task_identity):
    # Prepare: a box whose budget holds about 20 samples in a round
    box = {"max-bytes": 20 * SAMPLE_BYTES + 1400}
    app, _ = site_app()
    context = node(box)
    top_up = message(SELECT, {"quota": 4, "top-up": True})
    # Execute / Assert: a top-up with no upload in the round
    with pytest.raises(ConfigError, match="^top-up must be false before round 2's"):
        app(top_up, context)
    assert ledger_arrays(context) == ledger_arrays(node())
    # an upload that spends the budget, then a top-up and the upload again
    app(message(SELECT, {"quota": 64}), context)
    spent = ledger_arrays(context)
    for again in (top_up, message(SELECT, {"quota": 64})):
        with pytest.raises(ValueError, match="^node config max-bytes: server-round 2"):
            app(again, context)
        assert ledger_arrays(context) == spent
    assert load_ledger(context).bytes_sent_in(2) <= box["max-bytes"]


def test_an_earlier_round_is_refused_and_the_same_round_answered_again(task_identity):
    # Prepare: a site that answered round 3
    app, _ = site_app()
    context = node()
    app(message(SELECT, {"server-round": 3}), context)
    answered = ledger_arrays(context)
    # Execute / Assert: round 2 is refused, in either phase, the ledger unchanged
    for message_type in (SELECT, SUMMARY):
        with pytest.raises(ConfigError, match="^server-round must be >= 3") as refused:
            app(message(message_type, {"server-round": 2}), context)
        assert refused.value.key == "server-round"
        assert ledger_arrays(context) == answered
    # round 3 again (a resumed server redoes it): answered
    again = app(message(SELECT, {"server-round": 3}), context)
    assert again.content.metric_records[METRICS_KEY]["num-selected"] == 16


WORKER_CONFIGS = {
    "index float": ("worker-index", {"worker-index": 1.0}),
    "index past workers": ("worker-index", {"worker-index": 2}),
    "workers str": ("num-workers", {"num-workers": "2"}),
    "rounds missing": ("num-server-rounds", {"num-server-rounds": None}),
    "num-classes 10**7": ("num-classes", {"num-classes": 10**7}),
    "round bool": ("server-round", {"server-round": True}),
}


@pytest.mark.parametrize(("key", "config"), WORKER_CONFIGS.values(), ids=WORKER_CONFIGS)
def test_the_worker_reads_its_message_as_strictly(task_identity, key, config):
    # Prepare: the data-parallel worker, which shares the site's model check
    app, samples = ClientApp(), Samples()
    add_gradient_handler(app, samples)
    honest = {
        **DataParallelConfig(batch_size=8).to_config(),
        **Sampling().to_config(),
        "server-round": 1,
        "num-server-rounds": 2,
        "num-workers": 2,
        "worker-index": 1,
    }
    absent = next((k for k, v in config.items() if v is None), None)
    hostile = {**honest, **{k: v for k, v in config.items() if v is not None}}
    wrong_head = lenet5_arrays(**{HEAD: Array(np.zeros((11, 84), np.float32))})
    # Execute
    answered = app(message("train.gradient", honest), node())
    with pytest.raises(ConfigError) as refused:
        app(message("train.gradient", hostile, without=absent), node())
    with pytest.raises(ConfigError) as unlike:
        app(message("train.gradient", honest, wrong_head), node())
    # Assert
    assert GRADIENT_KEY in answered.content.array_records
    assert refused.value.key == key and str(refused.value).startswith(key)
    assert unlike.value.key == f"arrays[{HEAD!r}]"
    assert samples.loads == 1


MEASURED = """
import resource
import torch
from flwr.app import Context, RecordDict
from flwr_select import flower_private
from tests.test_site_guard import message, node, site_app
identity = flower_private.task_identity()
identity.__enter__()
app, samples = site_app()
app(message("train.select", {{"server-round": 1}}), node())  # every import warmed
hostile = message("train.select", {changes}, {arrays})
# A regression must fail the test, not exhaust the shared machine: the address
# space may grow by 1 GiB past what the warm-up took.
with open("/proc/self/status") as status:
    used = next(int(line.split()[1]) for line in status if line.startswith("VmSize:"))
hard = resource.getrlimit(resource.RLIMIT_AS)[1]
resource.setrlimit(resource.RLIMIT_AS, (used * 1024 + 2**30, hard))
"""


def test_num_classes_of_ten_million_costs_the_site_no_memory():
    # Prepare: LeNet-5's arrays, the config asking for 10**7 classes (3.4 GB)
    setup = MEASURED.format(changes='{"num-classes": 10**7}', arrays="None")
    # Execute
    raised, growth = peak_growth(setup, "app(hostile, node())")
    # Assert
    assert raised.startswith("ConfigError: num-classes must be in [2, 100000]"), raised
    assert growth < LIMIT, growth


def test_arrays_unlike_the_configured_model_are_refused_before_it_is_built():
    # Prepare: the CIFAR network at the most classes a site takes, 77 MB of
    # output layer if built, sent with the arrays of a 10-class one
    setup = (
        "from flwr.app import ArrayRecord\n"
        "from flwr_select.models import build_model\n"
        "arrays = ArrayRecord(build_model('cifar-cnn').state_dict())\n"
        + MEASURED.format(
            changes=f'{{"model": "cifar-cnn", "num-classes": {MAX_NUM_CLASSES}}}',
            arrays="arrays",
        )
    )
    # Execute
    raised, growth = peak_growth(setup, "app(hostile, node())")
    # Assert
    head = "arrays['classifier.5.weight']"
    assert raised.startswith(f"ConfigError: {head} must be float32 of shape"), raised
    assert growth < LIMIT, growth
