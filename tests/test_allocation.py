"""One global budget across sites: the allocation's arithmetic, and its checks."""

import re

import numpy as np
import pytest
from flwr.app import ArrayRecord, MetricRecord, RecordDict
from hypothesis import given
from hypothesis import strategies as st

from flwr_select.config import ConfigError
from flwr_select.messages import METRICS_KEY
from flwr_select.selection.allocation import (
    PROBATION_LEVELS,
    SKETCH_POINTS,
    Probation,
    ScoreSketch,
    allocate,
)
from flwr_select.selection.ledger import SiteLedger
from flwr_select.selection.protocol import (
    SUMMARY_MESSAGE_TYPE,
    SelectionConfig,
)
from flwr_select.selection.site import site_round, site_summary
from flwr_select.selection.wire import UploadError
from tests.hostile import (
    RHO,
    SENT,
    N,
    content,
    good_upload,
    make_strategy,
    random_site,
    reply,
)
from tests.memory import LIMIT, peak_growth


def sketch(priorities, points=SKETCH_POINTS):
    """The exact sketch of a site whose candidates are worth ``priorities``."""
    best_first = np.sort(np.asarray(priorities, np.float64))[::-1]
    return ScoreSketch.of(best_first, len(best_first), points)


@given(
    sizes=st.lists(st.integers(0, SKETCH_POINTS), min_size=1, max_size=6),
    budget=st.integers(0, 400),
    seed=st.integers(0, 2**16),
)
def test_the_quotas_take_the_budgets_best_samples_of_all_sites(sizes, budget, seed):
    # Prepare: sites with distinct random priorities, sketched exactly
    rng = np.random.default_rng(seed)
    worth = {10 + i: rng.random(n) for i, n in enumerate(sizes)}
    # Execute
    quotas = allocate({site: sketch(w) for site, w in worth.items()}, budget)
    # Assert: the budget (or all there is) is spent, no site beyond its limit, and
    # the quotas are exactly the heads that hold the budget's best values
    assert sum(quotas.values()) == min(budget, sum(sizes))
    assert all(0 <= quotas[site] <= len(w) for site, w in worth.items())
    every = np.sort(np.concatenate([w for w in worth.values()]))[::-1]
    chosen = np.concatenate([np.sort(w)[::-1][: quotas[s]] for s, w in worth.items()])
    assert np.array_equal(np.sort(chosen)[::-1], every[: len(chosen)])


def test_equal_worth_is_shared_by_size_and_the_same_whatever_the_order():
    # Prepare: a policy that ranks nothing (uniform) at three sites of 100, 300, 0
    sketches = {2: sketch(np.zeros(100)), 1: sketch(np.zeros(300)), 9: sketch([])}
    # Execute
    quotas = allocate(sketches, 40)
    reordered = allocate(dict(reversed(list(sketches.items()))), 40)
    # Assert
    assert quotas == reordered == {1: 30, 2: 10, 9: 0}


def test_a_site_of_informative_samples_gets_the_budget_an_easy_site_does_not_need():
    # an easy site (all right and confident) and a hard one, each of 1,000 samples
    easy, hard = sketch(np.full(1000, -0.9)), sketch(np.linspace(0.9, 0.1, 1000))
    assert allocate({1: easy, 2: hard}, 100) == {1: 0, 2: 100}


def test_a_coarse_sketch_allocates_close_to_the_exact_one():
    # Prepare: 5 sites of 2,000 candidates each, sketched at 128 of their ranks
    rng = np.random.default_rng(0)
    worth = {site: rng.beta(1 + site, 2, 2000) for site in range(5)}
    exact = allocate({s: sketch(w, 2000) for s, w in worth.items()}, 1500)
    coarse = allocate({s: sketch(w) for s, w in worth.items()}, 1500)
    # Assert: within two of a sketch's steps (2000 / 127 ranks) per site
    assert sum(coarse.values()) == 1500
    assert all(abs(coarse[s] - exact[s]) <= 2 * 2000 / 127 for s in worth)


BAD_SKETCHES = {
    "not lists": ((1, 2), [0.5, 0.4], "must be lists"),
    "too many points": (
        list(range(1, SKETCH_POINTS + 2)),
        [0.0] * (SKETCH_POINTS + 1),
        "at most 128",
    ),
    "fewer values than ranks": ([1, 2], [0.5], "as many values as ranks"),
    "a rank that is a float": ([1, 2.0], [0.5, 0.4], "ranks must be ints"),
    "a value that is an int": ([1, 2], [1, 0.4], "values floats"),
    "ranks from 0": ([0, 2], [0.5, 0.4], "increase from 1"),
    "ranks beyond the candidates": ([1, 51], [0.5, 0.4], "num-candidates = 50"),
    "ranks that do not increase": ([1, 3, 3], [0.5, 0.4, 0.3], "must increase"),
    "a value that is nan": ([1, 2], [0.5, float("nan")], "finite"),
    "an infinite value": ([1, 2], [float("inf"), 0.4], "finite"),
    "values that increase": ([1, 2], [0.4, 0.5], "never increase"),
}


@pytest.mark.parametrize("name", sorted(BAD_SKETCHES))
def test_a_malformed_sketch_is_refused_with_its_reason(name):
    ranks, values, reason = BAD_SKETCHES[name]
    with pytest.raises(UploadError, match=reason):
        ScoreSketch.check(ranks, values, candidates=50)


def test_a_well_formed_sketch_is_taken_as_sent():
    checked = ScoreSketch.check([1, 25, 50], [0.5, 0.5, -0.25], candidates=50)
    assert checked.limit == 50 and checked.values.tolist() == [0.5, 0.5, -0.25]
    assert ScoreSketch.check([], [], candidates=0).limit == 0


# The server's phase 1, on Flower messages: hostile summaries and what quotas bind


def summary(candidates=N, ranks=(1, 50, N), values=(0.9, 0.5, 0.1), **extra):
    """A phase-1 reply's content: the site's metrics, and any ``extra`` records."""
    metrics = {
        "num-candidates": candidates,
        "sketch-ranks": list(ranks),
        "sketch-values": list(values),
    }
    return RecordDict({METRICS_KEY: MetricRecord(metrics), **extra})


HOSTILE_SUMMARIES = {
    "an upload beside it": (
        summary(upload=ArrayRecord()),
        r"got 'metrics' \(MetricRecord\), 'upload' \(ArrayRecord\)",
    ),
    "an unknown metric": (
        RecordDict(
            {
                METRICS_KEY: MetricRecord(
                    {
                        "num-candidates": N,
                        "sketch-ranks": [1],
                        "sketch-values": [0.5],
                        "bonus": 1,
                    }
                )
            }
        ),
        "a summary holds",
    ),
    "no sketch": (
        RecordDict({METRICS_KEY: MetricRecord({"num-candidates": N})}),
        "a summary holds",
    ),
    "candidates as a float": (
        summary(candidates=100.0),
        r"must be an int in \[0, 2\*\*40\]",
    ),
    "negative candidates": (
        summary(candidates=-1),
        r"must be an int in \[0, 2\*\*40\]",
    ),
    "ranks beyond its candidates": (
        summary(ranks=(1, 50, N + 1)),
        f"num-candidates = {N}",
    ),
    "a nan worth": (summary(values=(0.9, float("nan"), 0.1)), "finite"),
    "worth that rises": (summary(values=(0.1, 0.5, 0.9)), "never increase"),
    "candidates beyond 2**40": (
        summary(candidates=2**40 + 1),
        r"must be an int in \[0, 2\*\*40\]",
    ),
    "a huge sketch": (
        summary(ranks=range(1, 2**12), values=[0.0] * (2**12 - 1)),
        "at most 128",
    ),
}


@pytest.mark.parametrize("name", sorted(HOSTILE_SUMMARIES))
def test_a_hostile_summary_gets_no_quota_and_the_others_share_the_budget(
    task_identity, name, caplog
):
    # Prepare: nodes 1 and 2 are honest, node 3 hostile
    strategy = make_strategy(selection=SelectionConfig(rho=RHO, allocation="global"))
    content, reason = HOSTILE_SUMMARIES[name]
    replies = [
        reply(1, summary(), SUMMARY_MESSAGE_TYPE),
        reply(2, summary(values=(0.95, 0.9, 0.85)), SUMMARY_MESSAGE_TYPE),
        reply(3, content, SUMMARY_MESSAGE_TYPE),
    ]
    # Execute
    quotas = strategy.allocate_quotas(1, replies)
    # Assert: the honest sites share what their per-site budgets would have been,
    # node 2's better candidates first; node 3 is rejected with its reason
    assert set(quotas) == {1, 2} and sum(quotas.values()) == 2 * SENT
    assert quotas[2] > quotas[1]
    phase_one = strategy.phase_one
    assert (phase_one["summaries-accepted"], phase_one["summaries-rejected"]) == (2, 1)
    assert phase_one["summary-bytes"] > 0 and phase_one["round-budget"] == 2 * SENT
    logged = [r.getMessage() for r in caplog.records if "node 3" in r.getMessage()]
    assert any(re.search(reason, line) for line in logged), logged


class RealSites:
    """Sites of random samples whose summaries and uploads are the site's own code.

    Each has its ledger, kept across a round's phases, and trial-tests with the
    strategy's model (the round's).
    """

    def __init__(self, strategy, selection, nodes):
        self.strategy, self.selection = strategy, selection
        self.data = {node: random_site(node) for node in nodes}
        self.ledgers = {node: SiteLedger() for node in nodes}
        self.round = 1

    def _of(self, node):
        return {
            "server_round": self.round,
            "site_key": node,
            "ledger": self.ledgers[node],
        }

    def summary(self, node) -> dict:
        model, data = self.strategy.model, self.data[node]
        return site_summary(model, data, self.selection, **self._of(node))

    def summary_reply(self, node, metrics=None):
        metrics = self.summary(node) if metrics is None else metrics
        content = RecordDict({METRICS_KEY: MetricRecord(metrics)})
        return reply(node, content, SUMMARY_MESSAGE_TYPE)

    def upload(self, node, candidates=N, **options):
        model, data = self.strategy.model, self.data[node]
        record, _ = site_round(model, data, self.selection, **self._of(node), **options)
        return reply(node, content(record, candidates))


def test_an_upload_beyond_its_quota_or_unlike_its_summary_is_rejected(
    task_identity, caplog
):
    # Prepare: four sites' real summaries (the site's own code, the round's model);
    # node 4 claims its best candidate is worth 0.5 more than it is
    selection = SelectionConfig(rho=RHO, allocation="global")
    strategy = make_strategy(selection=selection)
    sites = RealSites(strategy, selection, (1, 2, 3, 4))
    summaries = {node: sites.summary(node) for node in sites.data}
    summaries[4]["sketch-values"][0] += 0.5
    strategy.allocate_quotas(
        1, [sites.summary_reply(n, metrics) for n, metrics in summaries.items()]
    )
    quotas, strategy.round_nodes = strategy.quotas, [1, 2, 3, 4]
    assert min(quotas.values()) > 0
    uploads = [
        sites.upload(1, quota=quotas[1]),  # as asked
        sites.upload(2, quota=quotas[2] + 1),  # one too many
        sites.upload(3, N + 1, quota=quotas[3]),  # another count than its summary's
        sites.upload(4, quota=quotas[4]),  # its real best, worth less than it claimed
    ]
    # Execute
    _, metrics = strategy.aggregate_train(1, uploads)
    # Assert
    assert (metrics["sites-accepted"], metrics["sites-rejected"]) == (1, 3)
    assert strategy.rounds[1]["samples-received.1"] == quotas[1]
    assert metrics["summaries-accepted"] == 4 and metrics["round-budget"] == 4 * SENT
    assert strategy.undelivered == {2: [1], 3: [1], 4: [1]}
    logged = " ".join(r.getMessage() for r in caplog.records)
    assert re.search(r"node 4: at rank 1 the upload is worth .* claimed", logged)


def test_a_budget_in_bytes_buys_that_many_samples_at_their_wire_cost(task_identity):
    selection = SelectionConfig(
        rho=RHO, allocation="global", round_budget_bytes=7 * (784 + 9) + 5
    )
    strategy = make_strategy(selection=selection)
    quotas = strategy.allocate_quotas(
        1, [reply(n, summary(), SUMMARY_MESSAGE_TYPE) for n in (1, 2)]
    )
    assert sum(quotas.values()) == 7 == strategy.phase_one["round-budget"]


def test_the_quota_a_rejected_site_leaves_is_topped_up_by_the_others(
    task_identity, caplog
):
    # Prepare: three sites' real summaries and uploads (their own code, ledgers
    # kept across the passes); node 3's upload is one over its quota
    selection = SelectionConfig(rho=RHO, allocation="global")
    strategy = make_strategy(selection=selection)
    sites = RealSites(strategy, selection, (1, 2, 3))
    quotas = dict(
        strategy.allocate_quotas(1, [sites.summary_reply(n) for n in (1, 2, 3)])
    )
    strategy.round_nodes = [1, 2, 3]
    asked = []

    def top_up(extra, top_ups):  # the second pass; node 2 sends its first upload again
        asked.append(dict(extra))
        replies = [sites.upload(n, quota=q, top_up=n != 2) for n, q in extra.items()]
        return strategy.uploads_of(1, replies)[0]

    phase_two = [sites.upload(n, quota=quotas[n]) for n in (1, 2)]
    phase_two.append(sites.upload(3, quota=quotas[3] + 1))
    # Execute
    metrics = strategy.accept_uploads(
        1, strategy.uploads_of(1, phase_two)[0], asked=[1, 2, 3], top_up=top_up
    )
    # Assert: node 3's quota was offered to nodes 1 and 2, as their next best;
    # node 1's top-up is in, node 2's repeat is refused and its top-up only is
    # undelivered (its first upload stays kept)
    (extra,) = asked
    assert set(extra) == {1, 2} and sum(extra.values()) == quotas[3]
    assert (metrics["top-up-budget"], metrics["top-up-samples"]) == (
        quotas[3],
        extra[1],
    )
    assert metrics["samples-received.1"] == quotas[1] + extra[1]
    assert metrics["samples-received.2"] == quotas[2]
    assert (metrics["sites-accepted"], metrics["sites-rejected"]) == (2, 1)
    assert metrics["top-ups-failed"] == 1
    assert strategy.undelivered == {3: [1]} and strategy.undelivered_top_ups == {2: [1]}
    assert len(np.unique(strategy.buffer.ids)) == len(strategy.buffer)
    logged = " ".join(r.getMessage() for r in caplog.records)
    assert re.search(r"rejected the top-up of node 2: .* already accepted", logged)


def test_a_top_up_released_by_the_server_frees_only_its_own_ids():
    # Prepare: round 1 sent ids 1-3, its top-up 4-5; round 2 sent 6
    ledger = SiteLedger()
    ledger.record(np.array([1, 2, 3]), 1)
    ledger.record(np.array([4, 5]), 1, top_up=True)
    ledger.record(np.array([6]), 2)
    # Execute: the server asks for round 3; it kept round 1 but not its top-up
    kept = ledger.kept_by_server(3, undelivered=[], undelivered_top_ups=[1])
    # Assert
    assert kept.to_array().tolist() == [1, 2, 3, 6]
    assert ledger.before(3).to_array().tolist() == [1, 2, 3, 6]
    stored = SiteLedger(
        **{k.replace("-", "_"): v for k, v in ledger.to_arrays().items()}
    )
    assert stored.top_ups.tolist() == [False] * 4


def test_no_single_site_raises_the_round_budget_by_claiming_candidates(task_identity):
    # Prepare: nodes 1 and 2 hold N candidates; node 3 claims 2**40, the most allowed
    strategy = make_strategy(selection=SelectionConfig(rho=RHO, allocation="global"))
    replies = [
        reply(1, summary(), SUMMARY_MESSAGE_TYPE),
        reply(2, summary(), SUMMARY_MESSAGE_TYPE),
        reply(
            3,
            summary(candidates=2**40, ranks=(1, 2**40), values=(0.9, 0.1)),
            SUMMARY_MESSAGE_TYPE,
        ),
    ]
    # Execute
    quotas = strategy.allocate_quotas(1, replies)
    # Assert: node 3 counts as a site as large as the others, so the honest sites
    # are never asked for more than three per-site budgets together
    assert strategy.phase_one["round-budget"] == 3 * SENT == sum(quotas.values())
    assert quotas[1] + quotas[2] <= 3 * SENT


def lie(metrics, value):
    """A summary whose sketch claims ``value`` at every rank."""
    return {**metrics, "sketch-values": [value] * len(metrics["sketch-values"])}


def second_pass(strategy, sites, asked):
    """The strategy's second pass, answered by the sites' own code; notes the ask."""

    def ask(quotas, top_ups):
        asked.append((dict(quotas), set(top_ups)))
        replies = [
            sites.upload(node, quota=quota, top_up=node in top_ups)
            for node, quota in quotas.items()
        ]
        return strategy.uploads_of(sites.round, replies)[0]

    return ask


def test_what_a_liar_wins_goes_to_the_honest_sites_and_it_is_held_after(
    task_identity, caplog
):
    # Prepare: node 3 claims 1e9 at every rank, so it wins the whole budget
    selection = SelectionConfig(rho=RHO, allocation="global")
    strategy = make_strategy(selection=selection)
    sites = RealSites(strategy, selection, (1, 2, 3))
    summaries = {n: sites.summary(n) for n in (1, 2)}
    summaries[3] = lie(sites.summary(3), 1e9)
    quotas = dict(
        strategy.allocate_quotas(
            1, [sites.summary_reply(n, m) for n, m in summaries.items()]
        )
    )
    assert quotas == {1: 0, 2: 0, 3: 3 * SENT}
    asked = []
    # Execute: round 1; its real upload is worth less than it claimed
    metrics = strategy.accept_uploads(
        1,
        strategy.uploads_of(1, [sites.upload(3, quota=quotas[3])])[0],
        asked=[3],
        top_up=second_pass(strategy, sites, asked),
    )
    # Assert: its budget went to nodes 1 and 2 in the same round, as their first
    # uploads (not top-ups), and was spent whole; node 3 is held
    ((extra, top_ups),) = asked
    assert set(extra) == {1, 2} and not top_ups and sum(extra.values()) == 3 * SENT
    assert metrics["samples-received"] == 3 * SENT
    assert metrics["samples-received.1"] + metrics["samples-received.2"] == 3 * SENT
    assert (metrics["sites-accepted"], metrics["sites-rejected"]) == (2, 1)
    assert metrics["sites-caught"] == 1 and strategy.probation.levels == {3: 0}
    assert strategy.undelivered == {3: [1]}
    assert re.search(r"node 3 sent 0 of the 30 samples", caplog.text)
    # Execute: round 2, the same lie
    sites.round = 2
    summaries = {n: sites.summary(n) for n in (1, 2)}
    summaries[3] = lie(sites.summary(3), 1e9)
    quotas = strategy.allocate_quotas(
        2, [sites.summary_reply(n, m) for n, m in summaries.items()]
    )
    # Assert: held at the least a site may be given; the honest sites share the rest
    assert quotas[3] == 1 and quotas[1] + quotas[2] == 3 * SENT - 1
    assert strategy.phase_one["sites-held"] == 1


def test_a_site_that_sends_less_than_it_claimed_is_held_and_not_asked_again(
    task_identity,
):
    # Prepare: node 3's sketch is flat at its true best, so only its first sample
    # can be checked; it wins most of the budget and sends that one sample
    selection = SelectionConfig(rho=RHO, allocation="global")
    strategy = make_strategy(selection=selection)
    sites = RealSites(strategy, selection, (1, 2, 3))
    summaries = {n: sites.summary(n) for n in (1, 2, 3)}
    summaries[3] = lie(summaries[3], summaries[3]["sketch-values"][0])
    quotas = dict(
        strategy.allocate_quotas(
            1, [sites.summary_reply(n, m) for n, m in summaries.items()]
        )
    )
    assert quotas[3] > SENT
    phase_two = [sites.upload(n, quota=q) for n, q in quotas.items() if n != 3]
    phase_two.append(sites.upload(3, quota=1))
    asked = []
    # Execute
    metrics = strategy.accept_uploads(
        1,
        strategy.uploads_of(1, phase_two)[0],
        asked=[n for n, q in quotas.items() if q],
        top_up=second_pass(strategy, sites, asked),
    )
    # Assert: its one sample is kept, the rest of its quota went to the others in
    # the same round, and it is held
    ((extra, _),) = asked
    assert 3 not in extra and sum(extra.values()) == quotas[3] - 1
    assert metrics["samples-received.3"] == 1
    assert metrics["samples-received"] == 3 * SENT
    assert metrics["sites-caught"] == 1 and strategy.probation.levels == {3: 0}


def test_a_held_site_earns_trust_back_by_keeping_its_word():
    # Prepare
    held = Probation()
    held.caught(5)
    caps = []
    # Execute: it delivers in full, round after round
    for _ in range(PROBATION_LEVELS + 1):
        caps.append(held.cap(5, even_share=64))
        held.delivered(5)
    # Assert: its cap doubles each round from 1/16 of an even share, then it is free;
    # caught again, it starts over
    assert caps == [4, 8, 16, 32, None]
    held.caught(5)
    assert held.cap(5, even_share=64) == 4 and held.cap(5, even_share=1) == 1


def test_a_round_budget_that_buys_no_sample_is_refused_before_start():
    # Prepare: one 28x28 sample costs 784 + 9 bytes on the wire
    selection = SelectionConfig(
        rho=RHO, allocation="global", round_budget_bytes=784 + 8
    )
    strategy = make_strategy(selection=selection)
    # Execute / Assert
    with pytest.raises(ConfigError, match=r"round-budget-bytes must be .* >= 793"):
        strategy.start(None, ArrayRecord(strategy.model.state_dict()), num_rounds=1)


def test_no_site_adds_more_than_max_site_samples_a_round(task_identity, caplog):
    # Prepare: a site claims enough candidates for 30 samples; the cap is 20
    strategy = make_strategy(max_site_samples=20)
    upload = content(good_upload(1, 30), candidates=300)
    # Execute
    _, metrics = strategy.aggregate_train(1, [reply(1, upload)])
    # Assert: refused whole, nothing buffered
    assert metrics["sites-rejected"] == 1 and len(strategy.buffer) == 0
    assert "30 samples exceed the budget of 20" in caplog.text


@pytest.mark.parametrize("value", [0, -1, 2.5])
def test_max_site_samples_below_one_is_refused_by_the_constructor(value):
    with pytest.raises(ConfigError, match="max-site-samples must be an int >= 1"):
        make_strategy(max_site_samples=value)


def test_a_summary_claiming_the_most_candidates_costs_the_server_no_memory():
    # Prepare: in a process of its own, two honest summaries and one claiming
    # 2**40 candidates sketched at 128 ranks up to 2**40, every one worth 1e9
    setup = """
        from flwr_select.selection.protocol import SelectionConfig
        from tests.hostile import make_strategy

        strategy = make_strategy(selection=SelectionConfig(rho=0.5, allocation="global"))
        honest = {"num-candidates": 100, "sketch-ranks": [1, 50], "sketch-values": [0.9, 0.1]}
        ranks = [1 + k * (2**40 - 1) // 127 for k in range(128)]
        liar = {"num-candidates": 2**40, "sketch-ranks": ranks, "sketch-values": [1e9] * 128}
        summaries = [(1, lambda: honest), (2, lambda: honest), (3, lambda: liar)]
    """
    # Execute
    raised, growth = peak_growth(
        setup,
        """
        strategy.allocate_round(1, summaries)
        assert strategy.phase_one["round-budget"] == 150, strategy.phase_one
        """,
    )
    # Assert: the budget is three honest shares; the phase costs no memory to speak of
    assert raised == "" and growth < LIMIT
