import functools

import numpy as np
import pytest
import torch
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Error,
    Message,
    MetricRecord,
    RecordDict,
)

from clients.site import make_select_handler
from flwr_select.buffer import TrainingBuffer
from flwr_select.data import SiteData
from flwr_select.models import build_model
from flwr_select.protocol import (
    CONFIG_KEY,
    MESSAGE_TYPE,
    METRICS_KEY,
    MODEL_KEY,
    UPLOAD_KEY,
    SelectionConfig,
)
from flwr_select.trainer import TrainConfig
from flwr_select.wire import encode, wire_bytes
from strategies.sample_selection import SampleSelection

N, RHO = 100, 0.1  # each site offers 100 samples and may send floor(0.1 * 100) = 10


def site_data(site: int) -> SiteData:
    g = torch.Generator().manual_seed(site)
    images = torch.randint(0, 256, (N, 28, 28), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 10, (N,), generator=g)
    return SiteData(images, labels, 10, ids=torch.arange(N) + 1000 * site)


def make_strategy() -> SampleSelection:
    torch.manual_seed(0)
    return SampleSelection(
        functools.partial(build_model, "lenet5"),
        10,
        selection=SelectionConfig(rho=RHO),
        train_config=TrainConfig(epochs=1, batch_size=8),
        buffer=TrainingBuffer(10, device="cpu"),
    )


def request(strategy: SampleSelection, node: int, server_round: int = 1) -> Message:
    config = ConfigRecord(
        {
            **strategy.selection.to_config(),
            "server-round": server_round,
            "num-classes": 10,
            "model": "lenet5",
        }
    )
    arrays = ArrayRecord(strategy.model.state_dict())
    return Message(
        RecordDict({MODEL_KEY: arrays, CONFIG_KEY: config}),
        message_type=MESSAGE_TYPE,
        dst_node_id=node,
    )


def site_reply(
    strategy: SampleSelection, node: int, context: Context | None = None
) -> Message:
    """A real reply: the site's own handler answers a real request."""
    handler = make_select_handler(load_site=lambda ctx, cfg: site_data(node))
    context = context or Context(
        run_id=1, node_id=node, node_config={}, state=RecordDict(), run_config={}
    )
    return handler(request(strategy, node), context)


def forged_reply(
    strategy: SampleSelection, node: int, upload: ArrayRecord, candidates=N
) -> Message:
    metrics = MetricRecord({"num-candidates": candidates})
    return Message(
        RecordDict({UPLOAD_KEY: upload, METRICS_KEY: metrics}),
        reply_to=request(strategy, node),
    )


def weights(strategy):
    return [t.clone() for t in strategy.model.state_dict().values()]


def test_uploads_are_buffered_and_the_model_is_trained(task_identity):
    # Prepare
    strategy = make_strategy()
    before = weights(strategy)
    replies = [site_reply(strategy, node) for node in (1, 2)]
    sizes = [wire_bytes(r.content.array_records[UPLOAD_KEY]) for r in replies]
    # Execute
    arrays, metrics = strategy.aggregate_train(1, replies)
    # Assert
    assert arrays is not None
    assert metrics["samples-received"] == 20 and len(strategy.buffer) == 20
    assert metrics["bytes-received"] == sum(sizes)
    assert metrics["samples-received.1"] == metrics["samples-received.2"] == 10
    assert metrics["sites-accepted"] == 2 and metrics["sites-rejected"] == 0
    assert metrics["buffer-size"] == 20 and metrics["train-loss"] > 0
    assert sorted(strategy.buffer.ids.tolist()) == sorted(
        int(i)
        for r in replies
        for i in r.content.array_records[UPLOAD_KEY]["ids"].numpy()
    )
    assert any(
        not torch.equal(a, b) for a, b in zip(before, weights(strategy), strict=True)
    )
    new = ArrayRecord(strategy.model.state_dict())
    assert all(np.array_equal(arrays[k].numpy(), new[k].numpy()) for k in new)


def test_a_site_never_sends_the_same_sample_twice(task_identity):
    strategy = make_strategy()
    context = Context(
        run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={}
    )
    first = site_reply(strategy, 1, context)
    second = site_reply(strategy, 1, context)  # same data offered again
    ids = [
        set(r.content.array_records[UPLOAD_KEY]["ids"].numpy().tolist())
        for r in (first, second)
    ]
    assert len(ids[0]) == len(ids[1]) == 10 and not ids[0] & ids[1]
    assert first.content.metric_records[METRICS_KEY]["num-selected"] == 10


def good_upload(node: int, count: int = 10) -> ArrayRecord:
    return encode(site_data(node).subset(np.arange(count)))


def malformed_uploads():
    ok = dict(good_upload(3).items())
    images_float = ArrayRecord(
        {**ok, "images": Array(np.zeros((10, 28, 28), np.float32))}
    )
    images_32 = ArrayRecord({**ok, "images": Array(np.zeros((10, 32, 32), np.uint8))})
    labels_out = ArrayRecord({**ok, "labels": Array(np.full(10, 10, np.uint8))})
    duplicates = ArrayRecord({**ok, "ids": Array(np.full(10, 7, np.uint16))})
    return {
        "wrong dtype": (images_float, N, "images must be uint8"),
        "wrong shape": (
            images_32,
            N,
            r"images of shape \(32, 32\), expected \(28, 28\)",
        ),
        "labels out of range": (labels_out, N, r"labels must lie in \[0, 10\)"),
        "over budget": (good_upload(3, 11), N, "11 samples exceed the budget of 10"),
        "lying about candidates": (
            good_upload(3, 11),
            5,
            "num-candidates must be an int >= the 11",
        ),
        "duplicate ids": (duplicates, N, "ids must be unique"),
    }


@pytest.mark.parametrize("case", sorted(malformed_uploads()))
def test_a_malformed_upload_is_rejected_and_the_round_goes_on(
    task_identity, case, caplog
):
    # Prepare: one good site, one bad one (node 3)
    upload, candidates, reason = malformed_uploads()[case]
    strategy = make_strategy()
    strategy.aggregate_train(1, [site_reply(strategy, 1)])  # buffer holds 28x28 images
    held = (len(strategy.buffer), strategy.buffer.ids.copy())
    good = site_reply(strategy, 2)
    bad = forged_reply(strategy, 3, upload, candidates)
    # Execute
    arrays, metrics = strategy.aggregate_train(2, [bad, good])
    # Assert: the good one is in, the bad one left no trace
    assert arrays is not None
    assert metrics["sites-rejected"] == 1 and metrics["sites-accepted"] == 1
    assert len(strategy.buffer) == held[0] + 10
    assert not (strategy.buffer.sites == 3).any()
    np.testing.assert_array_equal(strategy.buffer.ids[: held[0]], held[1])
    import re

    assert any(
        re.search(reason, r.getMessage()) and "node 3" in r.getMessage()
        for r in caplog.records
    )


def test_resent_ids_and_broken_replies_are_rejected(task_identity):
    strategy = make_strategy()
    strategy.aggregate_train(1, [forged_reply(strategy, 3, good_upload(3))])
    state = (len(strategy.buffer), weights(strategy))
    failed = Message(
        Error(code=0, reason="the site crashed"), reply_to=request(strategy, 4)
    )
    empty = Message(RecordDict(), reply_to=request(strategy, 5))
    no_metrics = Message(
        RecordDict({UPLOAD_KEY: good_upload(4)}), reply_to=request(strategy, 4)
    )
    # Execute: the same ids again from node 3, a failed site and two broken replies
    resent = forged_reply(strategy, 3, good_upload(3))
    arrays, metrics = strategy.aggregate_train(2, [resent, failed, empty, no_metrics])
    # Assert: the model and the buffer are untouched
    assert arrays is None
    assert metrics["sites-rejected"] == 3 and metrics["sites-failed"] == 1
    assert metrics["samples-received"] == 0
    assert len(strategy.buffer) == state[0]
    assert all(
        torch.equal(a, b) for a, b in zip(state[1], weights(strategy), strict=True)
    )


def test_the_same_ids_from_another_site_are_accepted(task_identity):
    strategy = make_strategy()
    upload = good_upload(3)
    _, metrics = strategy.aggregate_train(
        1, [forged_reply(strategy, 3, upload), forged_reply(strategy, 4, upload)]
    )
    assert metrics["sites-accepted"] == 2 and len(strategy.buffer) == 20
