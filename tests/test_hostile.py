"""Nothing a site sends ends a run: hostile replies, by bytes, against the server."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from flwr.app import ArrayRecord, RecordDict
from flwr.common.serde import recorddict_to_proto

from flwr_select.files import read_json_lines
from flwr_select.selection.checkpoint import latest
from flwr_select.selection.server import SiteReport
from tests.hostile import (
    SENT,
    attacks,
    content,
    fuzz,
    good_upload,
    make_strategy,
    reply,
    reported,
    state_of,
    unchanged,
)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def holding_strategy():
    """A strategy whose buffer already holds one site's accepted upload."""
    strategy = make_strategy()
    strategy.accept_uploads(1, [(1, lambda: (good_upload(1), SiteReport(100)))])
    return strategy


@pytest.mark.parametrize("attack", sorted(attacks()))
def test_each_attack_rejects_only_itself(
    task_identity, holding_strategy, attack, caplog
):
    # Prepare: node 3 attacks, node 2 is honest, in the same round
    build, reason = attacks()[attack]
    strategy = holding_strategy
    strategy.round_nodes = [2, 3]
    before = state_of(strategy)
    replies = [reply(3, build(good_upload(3))), reply(2, content(good_upload(2)))]
    # Execute
    arrays, metrics = strategy.aggregate_train(2, replies)
    # Assert: the honest upload is in and trained on; the attack left no trace
    assert (metrics["sites-rejected"], metrics["sites-accepted"]) == (1, 1)
    assert arrays is not None and strategy.rounds[2]["samples-received.2"] == SENT
    assert not (strategy.buffer.sites == 3).any()
    assert len(strategy.buffer) == len(before[0]["labels"]) + SENT
    assert 3 in strategy.undelivered and 2 not in strategy.undelivered
    logged = [r.getMessage() for r in caplog.records if "node 3" in r.getMessage()]
    assert any(re.search(reason, line) for line in logged), logged


@pytest.mark.parametrize("attack", sorted(attacks()))
def test_an_attack_alone_leaves_buffer_and_model_bit_identical(
    task_identity, holding_strategy, attack
):
    build, _ = attacks()[attack]
    before = state_of(holding_strategy)
    arrays, metrics = holding_strategy.aggregate_train(
        2, [reply(3, build(good_upload(3)))]
    )
    assert arrays is None and metrics["sites-rejected"] == 1
    assert unchanged(holding_strategy, before)


def test_the_first_upload_cannot_fix_the_sample_shape(task_identity):
    # Prepare: no pretraining, an empty buffer; a hostile site sends 5x5 images
    strategy = make_strategy()
    hostile = attacks()["images of another shape"][0](good_upload(3))
    # Execute: the hostile reply comes first in the round
    arrays, metrics = strategy.aggregate_train(
        1, [reply(3, hostile), reply(2, content(good_upload(2)))]
    )
    # Assert: the honest 28x28 upload is the one kept, and training ran on it
    assert (metrics["sites-rejected"], metrics["sites-accepted"]) == (1, 1)
    assert strategy.buffer.image_shape == (28, 28) and arrays is not None


def test_a_strategy_that_does_not_know_the_sample_shape_refuses_to_start():
    strategy = make_strategy(sample_shape=None)
    with pytest.raises(ValueError, match=r"pass sample_shape=\(28, 28\)"):
        strategy.start(None, ArrayRecord(strategy.model.state_dict()), num_rounds=1)


def test_no_fuzzed_reply_escapes_aggregate_train(task_identity, holding_strategy):
    def submit(strategy, record):
        _, metrics = strategy.aggregate_train(2, [reply(3, content(record))])
        return dict(metrics)

    accepted = fuzz(holding_strategy, submit, max_examples=400)
    assert accepted <= 1  # the same ids are accepted once at most


def test_a_fuzzed_upload_under_1_mb_costs_under_64_mb_of_memory():
    # Execute: a process of its own, so that its peak RSS is the fuzz's alone
    done = subprocess.run(
        [sys.executable, "-m", "tests.hostile", "300"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    # Assert: every upload was under 1 MB and none raised (the child asserts it)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.splitlines()[-1])
    assert result["examples"] == 300
    assert result["growth_bytes"] < 64 * 2**20, result


def test_a_site_that_attacks_every_round_is_rejected_every_round(
    mnist_dir, tmp_path, flower_simulation
):
    # Prepare: three sites; site 0 sends another attack each round
    rounds = 3
    config = (
        f'data-dir="{mnist_dir}" out-dir="{tmp_path}" num-server-rounds={rounds} '
        "validation-size=500 initial-size=500 pool-size=1500 initial-epochs=1 "
        'server-epochs=1 rho=0.1 model="lenet5"'
    )
    # Execute
    done = flower_simulation(
        "tests.hostile_site", "--num-supernodes", "3", "--run-config", config
    )
    # Assert: every round completed, the attacker rejected each time, the others in
    assert done.returncode == 0, done.stderr[-3000:]
    records = read_json_lines(tmp_path / "rounds.jsonl")
    assert [r["round"] for r in records] == list(range(rounds + 1))
    for record in records[1:]:
        assert (record["sites_rejected"], record["sites_accepted"]) == (1, 2)
        assert record["model_updated"] == 1
    log = done.stderr + done.stdout
    for server_round in range(1, rounds + 1):
        assert re.search(f"round {server_round}: rejected the upload of node", log)
    checkpoint = latest(tmp_path, device="cpu")
    assert checkpoint.round == rounds
    assert len(checkpoint.buffer) == records[-1]["buffer_size"]


def test_a_site_that_lies_in_every_summary_cannot_starve_a_global_round(
    mnist_dir, tmp_path, flower_simulation
):
    # Prepare: three sites share one global budget; site 0 claims 2**40 candidates
    # worth 1e9 each in every phase 1, then uploads its real (worse) best
    rounds, fold, rho = 3, 500, 0.1
    honest_budget = 2 * int(rho * fold)  # what the two honest sites' rho allows
    config = (
        f'data-dir="{mnist_dir}" out-dir="{tmp_path}" num-server-rounds={rounds} '
        f"validation-size=500 initial-size=500 pool-size={3 * rounds * fold} "
        f'initial-epochs=1 server-epochs=1 rho={rho} model="lenet5" '
        'allocation="global"'
    )
    # Execute
    done = flower_simulation(
        "tests.lying_site", "--num-supernodes", "3", "--run-config", config
    )
    # Assert: every round, the liar's upload is refused and it is held; the honest
    # sites bring at least 90% of their budget, and the budget is not inflated
    assert done.returncode == 0, done.stderr[-3000:]
    records = read_json_lines(tmp_path / "rounds.jsonl")
    execution = read_json_lines(tmp_path / "execution.jsonl")
    assert [r["round"] for r in records] == list(range(rounds + 1))
    for record, nodes in zip(records[1:], execution[1:], strict=True):
        honest = nodes["samples_received_by_node"]
        assert len(honest) == 2 and sum(honest.values()) >= 0.9 * honest_budget
        assert sum(nodes["quota_by_node"].values()) <= 3 * int(rho * fold)
        assert (record["sites_rejected"], record["sites_accepted"]) == (1, 2)
    log = done.stderr + done.stdout
    caught = re.findall(r"round (\d+): node \d+ sent 0 of the (\d+) samples", log)
    assert [int(r) for r, _ in caught] == list(range(1, rounds + 1))
    assert int(caught[0][1]) > int(caught[1][1])  # held at a small quota after


def test_what_sites_say_of_their_candidates_cannot_overflow_the_records(task_identity):
    # Prepare: three sites claim 2**64 - 1 candidates and as many suspect, three
    # others the most allowed, 2**40
    strategy = make_strategy()

    def claims(node, count):
        metrics = {"num-candidates": count, "num-suspect": count}
        return reply(node, reported(good_upload(node), metrics))

    replies = [claims(node, 2**64 - 1) for node in (1, 2, 3)]
    replies += [claims(node, 2**40) for node in (4, 5, 6)]
    # Execute
    _, metrics = strategy.aggregate_train(1, replies)
    # Assert: the first three are refused; the totals stay inside int64, and Flower
    # can serialise the round's record
    assert (metrics["sites-rejected"], metrics["sites-accepted"]) == (3, 3)
    assert metrics["suspect-candidates"] == 3 * 2**40 < 2**63
    assert recorddict_to_proto(RecordDict({"metrics": metrics})).ByteSize() > 0
