import time
from pathlib import Path

import numpy as np
import pytest
import torch
import zstandard
from flwr.app import (
    Array,
    ArrayRecord,
    Context,
    Error,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.common.constant import ErrorCode
from hypothesis import given
from hypothesis import strategies as st

from clients.site import load_ledger, make_select_handler
from flwr_select.config import ConfigError
from flwr_select.data import SiteData
from flwr_select.messages import METRICS_KEY
from flwr_select.selection.protocol import (
    MESSAGE_TYPE,
    UNDELIVERED_KEY,
    UPLOAD_KEY,
)
from flwr_select.selection.protocol import request as selection_request
from flwr_select.selection.server import INGEST_STAGES, SiteReport
from flwr_select.selection.wire import ZSTD, encode, wire_bytes
from simulations.runner import ServerConfig
from strategies.data_parallel import BiasedDataParallel
from strategies.nodes import EverySiteFailed
from strategies.sample_selection import SampleSelection
from tests.hostile import SENT, N, make_strategy  # a site offers N, sends 10 of them


def site_data(site: int) -> SiteData:
    g = torch.Generator().manual_seed(site)
    images = torch.randint(0, 256, (N, 28, 28), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 10, (N,), generator=g)
    return SiteData(images, labels, 10, ids=torch.arange(N) + 1000 * site)


def request(strategy: SampleSelection, node: int, server_round: int = 1) -> Message:
    config = {
        **strategy.selection.to_config(),
        "server-round": server_round,
        "num-classes": 10,
        "model": "lenet5",
        UNDELIVERED_KEY: strategy.undelivered.get(node, []),
    }
    arrays = ArrayRecord(strategy.model.state_dict())
    return Message(
        selection_request(arrays, config),
        message_type=MESSAGE_TYPE,
        dst_node_id=node,
    )


def site_reply(
    strategy: SampleSelection,
    node: int,
    context: Context | None = None,
    server_round: int = 1,
) -> Message:
    """A real reply: the site's own handler answers a real request."""
    handler = make_select_handler(load_site=lambda ctx, cfg: site_data(node))
    context = context or Context(
        run_id=1, node_id=node, node_config={}, state=RecordDict(), run_config={}
    )
    return handler(request(strategy, node, server_round), context)


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
    started = time.perf_counter()
    arrays, metrics = strategy.aggregate_train(1, replies)
    elapsed = time.perf_counter() - started
    # Assert
    assert arrays is not None
    assert metrics["samples-received"] == 20 and len(strategy.buffer) == 20
    assert metrics["bytes-received"] == sum(sizes)
    # per node in the round's record; the MetricRecord Flower logs holds totals
    kept = strategy.rounds[1]
    assert kept["samples-received.1"] == kept["samples-received.2"] == 10
    assert not [key for key in metrics if "." in key]
    assert metrics["sites-accepted"] == 2 and metrics["sites-rejected"] == 0
    assert metrics["buffer-size"] == 20 and metrics["train-loss"] > 0
    # where the server's time went: each stage timed, all of it within the call
    assert all(metrics[stage] > 0 for stage in INGEST_STAGES)
    assert sum(metrics[s] for s in INGEST_STAGES) < elapsed
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


def sent_ids(reply: Message) -> set[int]:
    return set(reply.content.array_records[UPLOAD_KEY]["ids"].numpy().tolist())


def node_context(node: int, node_config=None) -> Context:
    return Context(
        run_id=1,
        node_id=node,
        node_config=node_config or {},
        state=RecordDict(),
        run_config={},
    )


def test_a_site_never_sends_the_same_sample_twice(task_identity):
    strategy = make_strategy()
    context = node_context(1)
    first = site_reply(strategy, 1, context, server_round=1)
    second = site_reply(strategy, 1, context, server_round=2)  # same data again
    ids = [sent_ids(r) for r in (first, second)]
    assert len(ids[0]) == len(ids[1]) == 10 and not ids[0] & ids[1]
    assert first.content.metric_records[METRICS_KEY]["num-selected"] == 10


def test_an_edge_box_keeps_its_ledger_on_disk_across_a_restart(task_identity, tmp_path):
    # Prepare: a site with a data folder (an edge box); its process restarts
    # between rounds: a fresh Context, nothing in memory
    strategy = make_strategy()
    config = {"data-dir": str(tmp_path)}
    # Execute
    first = site_reply(strategy, 1, node_context(1, config), server_round=1)
    second = site_reply(strategy, 1, node_context(1, config), server_round=2)
    # Assert
    assert (tmp_path / "sent-ids.npz").is_file()
    assert len(sent_ids(first)) == 10 and not sent_ids(first) & sent_ids(second)
    assert [p.name for p in tmp_path.iterdir() if "tmp" in p.name] == []


def test_an_edge_boxs_ledger_from_before_top_ups_is_still_read(tmp_path):
    # Prepare: a ledger file as an earlier release wrote it (no top-up marks)
    np.savez(tmp_path / "sent-ids.npz", ids=np.array([4, 9]), rounds=np.array([1, 2]))
    # Execute
    ledger = load_ledger(node_context(1, {"data-dir": str(tmp_path)}))
    # Assert: its ids and rounds, none sent by a top-up
    assert ledger.ids.tolist() == [4, 9] and ledger.rounds.tolist() == [1, 2]
    assert ledger.top_ups.tolist() == [False, False]


def test_an_upload_lost_on_the_way_is_offered_again_and_kept_once(
    task_identity, tmp_path
):
    # Prepare: nodes 1 and 2 were asked in round 1; node 1 answered, but its
    # reply failed on the way (the server got an error instead)
    strategy = make_strategy()
    contexts = {
        n: node_context(n, {"data-dir": str(tmp_path / str(n))}) for n in (1, 2)
    }
    for folder in contexts.values():
        Path(folder.node_config["data-dir"]).mkdir()
    strategy.round_nodes = [1, 2]
    site_reply(strategy, 1, contexts[1], server_round=1)  # lost on the way
    failed = Message(
        Error(code=0, reason="upload failed"), reply_to=request(strategy, 1)
    )
    strategy.aggregate_train(1, [failed, site_reply(strategy, 2, contexts[2], 1)])
    assert strategy.undelivered == {1: [1]}
    # Execute: round 2 tells node 1 that round 1 was not kept
    strategy.round_nodes = [1, 2]
    again = site_reply(strategy, 1, contexts[1], server_round=2)
    newer = site_reply(strategy, 2, contexts[2], server_round=2)
    _, metrics = strategy.aggregate_train(2, [again, newer])
    # Assert: node 1's ledger released round 1 (its ids are candidates again)
    # and holds only what round 2 sent; both uploads kept, no (node, id) twice
    ledger = load_ledger(contexts[1])
    assert set(ledger.ids.tolist()) == sent_ids(again) and set(ledger.rounds) == {2}
    assert metrics["sites-accepted"] == 2 and strategy.undelivered == {1: [1]}
    assert set(strategy.buffer.ids[strategy.buffer.sites == 1]) == sent_ids(again)
    pairs = zip(
        strategy.buffer.sites.tolist(), strategy.buffer.ids.tolist(), strict=True
    )
    assert len(set(pairs)) == len(strategy.buffer) == 30


def test_a_round_the_server_never_checkpointed_is_offered_again(
    task_identity, tmp_path
):
    # Prepare: the site answered round 2, but the server crashed before it
    # checkpointed round 2 and resumed after round 1: it asks for round 2 again
    strategy = make_strategy()
    config = {"data-dir": str(tmp_path)}
    round1 = site_reply(strategy, 1, node_context(1, config), server_round=1)
    lost = site_reply(strategy, 1, node_context(1, config), server_round=2)
    # Execute
    again = site_reply(strategy, 1, node_context(1, config), server_round=2)
    after = site_reply(strategy, 1, node_context(1, config), server_round=3)
    # Assert: round 2's samples come again, round 1's never; the same seed and
    # ledger give the same choice, so the resumed round repeats the lost one
    assert sent_ids(again) == sent_ids(lost)
    assert not sent_ids(again) & sent_ids(round1)
    assert not sent_ids(after) & (sent_ids(round1) | sent_ids(again))


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
    nan_scores = ArrayRecord(
        {**ok, "scores": Array(np.array([np.nan] * 10, np.float32))}
    )
    # 760 MB if decompressed: refused on its declared count, before decompression
    tiny = zstandard.ZstdCompressor().compress(bytes(1000))
    bomb = ArrayRecord(
        {
            **ok,
            "images": Array(
                dtype="uint8", shape=(1_000_000, 28, 28), stype=ZSTD, data=tiny
            ),
        }
    )
    return {
        "wrong dtype": (images_float, N, "images has dtype 'float32'"),
        "wrong shape": (
            images_32,
            N,
            r"images of shape \(32, 32\), expected \(28, 28\)",
        ),
        "labels out of range": (labels_out, N, r"labels must lie in \[0, 10\)"),
        "over budget": (good_upload(3, 11), N, "11 samples exceed the budget of 10"),
        "lying about candidates": (
            good_upload(3, 11),
            5,  # would allow floor(0.1 * 5) = 0
            "11 samples exceed the budget of 0$",
        ),
        "candidates not an int": (
            good_upload(3),
            100.0,
            "num-candidates must be an int",
        ),
        "scores not finite": (nan_scores, N, "scores must be finite"),
        "a compressed block declaring a million images": (
            bomb,
            N,
            "1000000 samples exceed the budget of 10$",
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


def test_empty_uploads_to_an_empty_buffer_leave_the_model_as_it_was(
    task_identity, caplog
):
    # Prepare: a server holding none of its own samples; a site sends nothing
    strategy = make_strategy()
    before = weights(strategy)
    # Execute
    arrays, metrics = strategy.aggregate_train(
        1, [forged_reply(strategy, 3, good_upload(3, count=0))]
    )
    # Assert: accepted, nothing to train on, the round goes on unchanged
    assert arrays is None and metrics["sites-accepted"] == 1
    assert len(strategy.buffer) == 0 and "train-loss" not in strategy.rounds[1]
    assert all(
        torch.equal(a, b) for a, b in zip(before, weights(strategy), strict=True)
    )
    assert "no upload accepted held a sample" in caplog.text


def test_the_same_ids_from_another_site_are_accepted(task_identity):
    strategy = make_strategy()
    upload = good_upload(3)
    _, metrics = strategy.aggregate_train(
        1, [forged_reply(strategy, 3, upload), forged_reply(strategy, 4, upload)]
    )
    assert metrics["sites-accepted"] == 2 and len(strategy.buffer) == 20


def test_an_upload_over_the_servers_byte_cap_is_rejected_whatever_the_budget(
    task_identity, caplog
):
    strategy = make_strategy()
    strategy.max_upload_bytes = wire_bytes(good_upload(3)) - 1
    _, metrics = strategy.aggregate_train(
        1, [forged_reply(strategy, 3, good_upload(3))]
    )
    assert metrics["sites-rejected"] == 1 and len(strategy.buffer) == 0
    assert "exceed the cap of" in caplog.text and "node 3" in caplog.text


def corrupted(upload: dict, data) -> tuple[dict, SiteReport]:
    """One corruption, drawn by hypothesis, that no server may accept."""
    arrays, report = dict(upload), SiteReport(N)
    count = len(arrays["labels"].numpy())
    kind = data.draw(
        st.sampled_from(
            [
                "missing",
                "unknown",
                "images dtype",
                "images rank",
                "image size",
                "label range",
                "label dtype",
                "duplicate id",
                "length",
                "scores",
                "bytes",
                "candidates",
                "suspect",
            ]
        )
    )
    if kind == "missing":
        del arrays[data.draw(st.sampled_from(["images", "labels", "ids"]))]
    elif kind == "unknown":
        arrays[
            data.draw(st.text(min_size=1, max_size=8).filter(lambda k: k not in arrays))
        ] = Array(np.zeros(count, np.uint8))
    elif kind == "images dtype":
        dtype = data.draw(
            st.sampled_from(
                [np.float32, np.int8, np.int64, np.float16, np.bool_, np.uint16]
            )
        )
        arrays["images"] = Array(np.zeros((count, 28, 28), dtype))
    elif kind == "images rank":
        shape = data.draw(
            st.sampled_from([(count,), (count, 784), (count, 1, 1, 28, 28)])
        )
        arrays["images"] = Array(np.zeros(shape, np.uint8))
    elif kind == "image size":
        side = data.draw(st.integers(1, 40).filter(lambda s: s != 28))
        arrays["images"] = Array(np.zeros((count, side, 28), np.uint8))
    elif kind == "label range":
        labels = arrays["labels"].numpy().copy()
        labels[data.draw(st.integers(0, count - 1))] = data.draw(st.integers(10, 255))
        arrays["labels"] = Array(labels)
    elif kind == "label dtype":
        dtype = data.draw(st.sampled_from([np.int8, np.int64, np.float32]))
        arrays["labels"] = Array(arrays["labels"].numpy().astype(dtype))
    elif kind == "duplicate id":
        ids = arrays["ids"].numpy().copy()
        i, j = data.draw(
            st.lists(st.integers(0, count - 1), min_size=2, max_size=2, unique=True)
        )
        ids[j] = ids[i]
        arrays["ids"] = Array(ids)
    elif kind == "length":
        name = data.draw(st.sampled_from(["labels", "ids"]))
        arrays[name] = Array(
            arrays[name].numpy()[: data.draw(st.integers(0, count - 1))]
        )
    elif kind == "scores":
        scores = data.draw(
            st.lists(
                st.floats(allow_nan=True, allow_infinity=True, width=32),
                min_size=count,
                max_size=count,
            ).filter(lambda v: not np.isfinite(v).all())
        )
        arrays["scores"] = Array(np.array(scores, np.float32))
    elif kind == "bytes":
        name = data.draw(st.sampled_from(["images", "labels", "ids"]))
        array = arrays[name]
        raw = data.draw(st.binary(max_size=64))
        arrays[name] = Array(
            dtype=array.dtype, shape=array.shape, stype=array.stype, data=raw
        )
    elif kind == "candidates":  # too few candidates for its count, or not a number
        report = SiteReport(
            data.draw(
                st.one_of(
                    st.integers(-(2**40), 10 * count - 1),
                    st.floats(),
                    st.text(max_size=4),
                )
            )
        )
    else:  # more suspect candidates than candidates, fewer than none, or not a number
        suspect = st.one_of(
            st.integers(max_value=-1), st.integers(min_value=N + 1), st.floats()
        )
        report = SiteReport(N, data.draw(suspect))
    return arrays, report


@given(data=st.data())
def test_no_corrupted_upload_touches_the_buffer_or_the_model(data, accepted_strategy):
    # Prepare: a strategy that already holds one site's accepted upload
    strategy = accepted_strategy
    held = (strategy.buffer.to_arrays(), weights(strategy))
    arrays, report = corrupted(dict(good_upload(3).items()), data)
    record = ArrayRecord(arrays)
    # Execute
    metrics = strategy.accept_uploads(2, [(3, lambda: (record, report))])
    # Assert
    assert metrics["sites-rejected"] == 1 and metrics["sites-accepted"] == 0
    assert "train-loss" not in metrics
    after = strategy.buffer.to_arrays()
    assert after.keys() == held[0].keys()
    assert all(np.array_equal(after[k], held[0][k]) for k in after)
    assert all(
        torch.equal(a, b) for a, b in zip(held[1], weights(strategy), strict=True)
    )


@pytest.fixture(scope="module")
def accepted_strategy():
    strategy = make_strategy()
    strategy.accept_uploads(1, [(3, lambda: (good_upload(3, 5), SiteReport(N)))])
    assert len(strategy.buffer) == 5
    return strategy


def failure(strategy: SampleSelection, node: int, reason: str, code: int) -> Message:
    return Message(Error(code=code, reason=reason), reply_to=request(strategy, node))


def test_a_round_where_every_node_raised_the_same_error_stops_the_run(task_identity):
    # The error every site's app raises when the model cannot take its batches
    # under Ray, each reason is a traceback naming its worker's pid; the last line
    # is the exception, the same on both
    strategy = make_strategy()
    raised = ErrorCode.CLIENT_APP_RAISED_EXCEPTION
    replies = [
        failure(
            strategy,
            node,
            f"<class 'RayTaskError'>:<'ray::run() (pid={pid})\n  File ...\n"
            "Exception ClientAppException occurred. Message: the model cannot "
            "take this data'>",
            raised,
        )
        for node, pid in ((1, 101), (2, 202))
    ]
    with pytest.raises(EverySiteFailed, match="all 2 nodes failed the same way"):
        strategy.aggregate_train(1, replies)


@pytest.mark.parametrize(
    "kind",
    ["different reasons", "one node answered", "nodes gone, not raising"],
)
def test_failures_that_need_not_repeat_leave_the_round_going(task_identity, kind):
    strategy = make_strategy()
    raised = ErrorCode.CLIENT_APP_RAISED_EXCEPTION
    replies = {
        "different reasons": [
            failure(strategy, 1, "site 1 crashed", raised),
            failure(strategy, 2, "site 2 crashed", raised),
        ],
        "one node answered": [
            failure(strategy, 1, "crashed", raised),
            site_reply(strategy, 2),
        ],
        "nodes gone, not raising": [
            failure(strategy, n, "node offline", ErrorCode.NODE_UNAVAILABLE)
            for n in (1, 2)
        ],
    }[kind]
    _, metrics = strategy.aggregate_train(1, replies)
    assert metrics["sites-failed"] == sum(r.has_error() for r in replies)


def test_the_audit_counts_per_site_the_labels_the_model_calls_wrong():
    # Prepare: a confident model (its last layer scaled up) and two uploads of the
    # same images: one labelled as the model predicts, one with every third
    # label moved to the next class
    strategy = make_strategy()
    with torch.no_grad():
        strategy.model.classifier[-1].weight.mul_(200.0)
        strategy.model.classifier[-1].bias.zero_()
    g = torch.Generator().manual_seed(5)
    images = torch.randint(0, 256, (SENT, 28, 28), dtype=torch.uint8, generator=g)
    strategy.model.eval()
    with torch.no_grad():
        predicted = strategy.model(images).argmax(dim=1)
    flipped = predicted.clone()
    flipped[::3] = (flipped[::3] + 1) % 10

    def upload(site, labels):
        data = SiteData(images, labels, 10, ids=torch.arange(SENT) + 1000 * site)
        return lambda: (encode(data), SiteReport(N, 7 * site))

    # Execute
    metrics = strategy.accept_uploads(
        1, [(1, upload(1, predicted)), (2, upload(2, flipped))]
    )
    # Assert: the noisy site is named with its moved labels; the total adds up
    moved = int((flipped != predicted).sum())
    assert metrics["sites-accepted"] == 2 and moved == len(range(0, SENT, 3))
    assert metrics["suspect-labels.1"] == 0
    assert metrics["suspect-labels.2"] == moved == metrics["suspect-labels"]
    # and what the sites said of their candidates is kept beside it, per site
    assert (
        metrics["suspect-candidates.1"] == 7 and metrics["suspect-candidates.2"] == 14
    )
    assert metrics["suspect-candidates"] == 21


@pytest.mark.parametrize(
    ("argument", "value", "allowed"),
    [
        ("fraction_train", 1.5, "a number in (0, 1]"),
        ("fraction_train", 0.0, "a number in (0, 1]"),
        ("fraction_train", float("nan"), "a number in (0, 1]"),
        ("fraction_train", "1", "a number in (0, 1]"),
        ("min_train_nodes", 0, "an integer >= 1"),
        ("min_train_nodes", 2.5, "an integer >= 1"),
        ("min_available_nodes", -1, "an integer >= 1"),
        ("min_available_nodes", True, "an integer >= 1"),
    ],
)
@pytest.mark.parametrize("strategy", ["SampleSelection", "BiasedDataParallel"])
def test_a_strategy_refuses_sampling_that_would_wait_for_ever_when_built(
    strategy, argument, value, allowed
):
    # Prepare
    def build():
        if strategy == "SampleSelection":
            return make_strategy(**{argument: value})
        return BiasedDataParallel(lambda: torch.nn.Linear(2, 2), **{argument: value})

    # Execute
    with pytest.raises(ConfigError) as refused:
        build()
    # Assert: named as the constructor's argument, allowed as the run config's
    assert str(refused.value).startswith(f"{argument} must be {allowed}, got ")


def test_the_constructor_and_the_run_config_check_sampling_alike():
    # Execute
    with pytest.raises(ConfigError) as in_config:
        ServerConfig(fraction_train=1.5)
    with pytest.raises(ConfigError) as in_code:
        make_strategy(fraction_train=1.5)
    # Assert: the same rule, each under the name its caller knows
    assert str(in_config.value) == "fraction-train must be a number in (0, 1], got 1.5"
    assert str(in_code.value) == "fraction_train must be a number in (0, 1], got 1.5"
    assert make_strategy(fraction_train=1.0, min_train_nodes=1).fraction_train == 1.0
