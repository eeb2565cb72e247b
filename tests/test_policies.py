import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from flwr_select.selection.ledger import SentLedger
from flwr_select.selection.policies import (
    GROUPS,
    POLICIES,
    Budget,
    Candidates,
    Proxy,
    TrimmedLowestConfidence,
    TrimmedProxy,
    make_policy,
    rank,
    ranked,
    select,
)
from flwr_select.selection.scores import CONFIDENCE_METRICS, combine_proxy
from flwr_select.selection.trial import TrialResult

NUM_CLASSES = 4
OPTIONS = {
    "group": {"group": "correct-unconfident"},
    "stochastic": {"temperature": 0.5},
}
ALL_POLICIES = [make_policy(name, **OPTIONS.get(name, {})) for name in POLICIES]
WRONG_FIRST = ("oblivious", "proxy", "lowest-confidence")


def make_trial(wrong, confidence, labels, ids=None):
    wrong, labels = np.asarray(wrong, bool), np.asarray(labels, np.int64)
    n = len(wrong)
    return TrialResult(
        ids=np.arange(100, 100 + n) if ids is None else np.asarray(ids),
        labels=labels,
        predictions=np.where(wrong, (labels + 1) % NUM_CLASSES, labels),
        confidence={
            name: np.asarray(confidence, np.float64) for name in CONFIDENCE_METRICS
        },
    )


@st.composite
def trials(draw):
    n = draw(st.integers(1, 40))
    wrong = draw(st.lists(st.booleans(), min_size=n, max_size=n))
    # a coarse grid of values, so that ties are frequent
    confidence = [
        q / 4 for q in draw(st.lists(st.integers(0, 12), min_size=n, max_size=n))
    ]
    labels = draw(st.lists(st.integers(0, NUM_CLASSES - 1), min_size=n, max_size=n))
    ids = draw(st.lists(st.integers(0, 10_000), min_size=n, max_size=n, unique=True))
    return make_trial(wrong, confidence, labels, ids)


@st.composite
def cases(draw):
    trial = draw(trials())
    budget = draw(
        st.sampled_from(
            [
                Budget(rho=draw(st.floats(0.01, 1.0))),
                Budget(count=draw(st.integers(0, 50))),
            ]
        )
    )
    sent = draw(st.lists(st.sampled_from(trial.ids.tolist()), max_size=len(trial)))
    return trial, budget, SentLedger(sent), draw(st.integers(0, 2**32))


@pytest.mark.parametrize("policy", ALL_POLICIES, ids=lambda p: p.name)
@given(case=cases())
def test_budget_uniqueness_ledger_and_determinism(policy, case):
    # Prepare
    trial, budget, sent, seed = case
    # Execute
    chosen = select(trial, budget, policy, seed=seed, sent=sent)
    again = select(trial, budget, policy, seed=seed, sent=sent)
    # Assert
    assert len(chosen) <= budget.sample_limit(len(trial))
    assert len(set(chosen.tolist())) == len(chosen)
    assert not sent.contains(trial.ids[chosen]).any()
    np.testing.assert_array_equal(chosen, again)
    eligible = int((~sent.contains(trial.ids)).sum())
    if policy.name != "group":  # only a group can leave budget unused
        assert len(chosen) == min(eligible, budget.sample_limit(len(trial)))


@pytest.mark.parametrize("policy", ALL_POLICIES, ids=lambda p: p.name)
@given(case=cases())
def test_priorities_never_increase_along_the_order_and_head_it(policy, case):
    # what a site tells the server for a global budget must rank as the site sends
    trial, budget, sent, seed = case
    positions, priorities = ranked(trial, policy, seed=seed, sent=sent)
    assert len(priorities) == len(positions) and np.isfinite(priorities).all()
    assert (np.diff(priorities) <= 0).all()
    chosen = select(trial, budget, policy, seed=seed, sent=sent)
    np.testing.assert_array_equal(positions[: len(chosen)], chosen)


@pytest.mark.parametrize("name", WRONG_FIRST)
@given(case=cases())
def test_wrong_samples_are_sent_before_right_ones(name, case):
    trial, budget, sent, seed = case
    chosen = select(trial, budget, name, seed=seed, sent=sent)
    wrong = trial.wrong[chosen]
    # the order is wrong..., right...: never a wrong one after a right one
    assert not np.any(~wrong[:-1] & wrong[1:])
    if (~wrong).any():  # a right sample was sent, so every eligible wrong one was too
        eligible_wrong = trial.wrong & ~sent.contains(trial.ids)
        assert eligible_wrong.sum() == wrong.sum()


@given(trial=trials(), seed=st.integers(0, 2**32))
def test_the_highest_scored_sample_is_chosen_first(trial, seed):
    budget = Budget(count=len(trial))
    proxy_scores = combine_proxy(trial.wrong, trial.confidence["cross-entropy"])
    for name in ("proxy", "class-balanced"):
        first = select(trial, budget, name, seed=seed)[0]
        assert proxy_scores[first] == proxy_scores.max(), name
    # proxy: the whole order is non-increasing in eq. (6)
    assert np.all(np.diff(proxy_scores[select(trial, budget, "proxy", seed=seed)]) <= 0)
    # lowest-confidence: right samples come in non-increasing uncertainty
    order = select(trial, budget, "lowest-confidence", seed=seed)
    right = order[~trial.wrong[order]]
    assert np.all(np.diff(trial.confidence["cross-entropy"][right]) <= 0)
    # stochastic at a tiny temperature is greedy by confidence (grid gaps are 0.25)
    first = select(
        trial, budget, make_policy("stochastic", temperature=1e-3), seed=seed
    )[0]
    assert (
        trial.confidence["cross-entropy"][first]
        == trial.confidence["cross-entropy"].max()
    )


@given(trial=trials(), seed=st.integers(0, 2**32))
def test_class_balanced_fills_equal_quotas(trial, seed):
    for k in range(len(trial) + 1):
        chosen = select(trial, Budget(count=k), "class-balanced", seed=seed)
        counts = np.bincount(trial.labels[chosen], minlength=NUM_CLASSES)
        available = np.bincount(trial.labels, minlength=NUM_CLASSES)
        for a in range(NUM_CLASSES):
            for b in range(NUM_CLASSES):
                # class a may only exceed class b by more than one if b ran out
                if counts[a] > counts[b] + 1:
                    assert counts[b] == available[b]


@pytest.mark.parametrize("group", GROUPS)
@given(trial=trials(), seed=st.integers(0, 2**32))
def test_group_sends_only_its_group_split_at_the_median(group, trial, seed):
    chosen = select(
        trial, Budget(rho=1.0), make_policy("group", group=group), seed=seed
    )
    want_wrong = group.startswith("wrong")
    assert (trial.wrong[chosen] == want_wrong).all()
    same = trial.wrong == want_wrong
    m = int(same.sum())
    # the unconfident half is the m // 2 least confident, the confident half the rest
    assert len(chosen) == (m // 2 if "-unconfident" in group else m - m // 2)
    others = np.setdiff1d(np.flatnonzero(same), chosen)
    conf = trial.confidence["cross-entropy"]
    if len(chosen) and len(others):
        if "-unconfident" in group:
            assert conf[chosen].min() >= conf[others].max()
        else:
            assert conf[chosen].max() <= conf[others].min()


def test_ties_are_broken_by_the_seed_not_by_array_order():
    trial = make_trial([False] * 10, [0.5] * 10, [0] * 10)
    firsts = {
        int(select(trial, Budget(count=1), "proxy", seed=s)[0]) for s in range(30)
    }
    assert len(firsts) > 5


def test_stochastic_draws_with_the_softmax_probabilities():
    # confidence 0 and 1 at temperature 1: P(first = sample 1) = e / (1 + e) = 0.731
    trial = make_trial([False, False], [0.0, 1.0], [0, 1])
    draws = [
        int(select(trial, Budget(count=1), "stochastic", seed=s)[0])
        for s in range(4000)
    ]
    assert np.mean(draws) == pytest.approx(np.e / (1 + np.e), abs=0.03)
    # a huge temperature is uniform
    hot = make_policy("stochastic", temperature=1e6)
    draws = [int(select(trial, Budget(count=1), hot, seed=s)[0]) for s in range(4000)]
    assert np.mean(draws) == pytest.approx(0.5, abs=0.03)


def test_uniform_and_oblivious_are_uniform_where_they_should_be():
    # 2 wrong, 8 right; budget 3: oblivious takes both wrong, then one right uniformly
    trial = make_trial([True, True] + [False] * 8, np.linspace(0, 1, 10), [0] * 10)
    counts = np.zeros(10)
    for s in range(2000):
        counts[select(trial, Budget(count=3), "oblivious", seed=s)] += 1
    assert counts[:2].tolist() == [2000, 2000]
    assert counts[2:] / 2000 == pytest.approx(np.full(8, 1 / 8), abs=0.03)
    counts[:] = 0
    for s in range(2000):
        counts[select(trial, Budget(count=3), "uniform", seed=s)] += 1
    assert counts / 2000 == pytest.approx(np.full(10, 0.3), abs=0.04)


@pytest.mark.parametrize(
    ("budget", "n", "limit"),
    [
        (Budget(rho=0.05), 5000, 250),
        (Budget(rho=0.29), 100, 29),  # 0.29 * 100 = 28.999999999999996 in floats
        (Budget(rho=0.999), 10, 9),  # floor, never more
        (Budget(rho=0.01), 50, 0),
        (Budget(rho=1.0), 7, 7),
        (Budget(count=30), 20, 20),
        (Budget(rho=0.5, count=3), 100, 3),
        (Budget(max_bytes=10_000), 8, 8),  # bytes are applied by the wire format
    ],
)
def test_budget_sample_limit(budget, n, limit):
    assert budget.sample_limit(n) == limit


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"rho": 0.0}, r"rho must be in \(0, 1\], got 0.0"),
        ({"rho": 1.5}, r"rho must be in \(0, 1\], got 1.5"),
        ({"rho": float("nan")}, "rho must be in"),
        ({"count": -1}, "count must be an integer >= 0, got -1"),
        ({"count": 2.5}, "count must be an integer"),
        ({"max_bytes": 0}, "max_bytes must be > 0"),
        ({}, "a Budget needs rho, count or max_bytes"),
    ],
)
def test_bad_budgets_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Budget(**kwargs)


def test_bad_names_and_options_are_refused_before_any_work():
    trial = make_trial([True], [1.0], [0])
    with pytest.raises(ValueError, match="unknown policy 'greedy'"):
        select(trial, Budget(count=1), "greedy")
    with pytest.raises(ValueError, match="unknown confidence metric 'loss'"):
        select(trial, Budget(count=1), "proxy", confidence="loss")
    with pytest.raises(ValueError, match="unknown group 'wrong'"):
        make_policy("group", group="wrong")
    with pytest.raises(ValueError, match="policy 'uniform' got bad options"):
        make_policy("uniform", temperature=2.0)
    with pytest.raises(ValueError, match="temperature must be > 0, got 0"):
        make_policy("stochastic", temperature=0)
    with pytest.raises(ValueError, match="eps must be > 0"):
        select(trial, Budget(count=1), "proxy", eps=-1.0)


def test_the_ledger_remembers_what_was_sent():
    ledger = SentLedger([5, 3])
    ledger.add(np.array([3, 9]))
    assert len(ledger) == 3
    assert ledger.contains(np.array([1, 3, 5, 9])).tolist() == [False, True, True, True]
    assert SentLedger(ledger.to_array()).to_array().tolist() == [3, 5, 9]
    # a second round with the same data offers none of the sent samples again
    trial = make_trial([True] * 4, [1.0] * 4, [0] * 4, ids=[3, 4, 5, 6])
    assert sorted(trial.ids[select(trial, Budget(rho=1.0), "proxy", sent=ledger)]) == [
        4,
        6,
    ]


def test_rank_sorts_descending_with_the_first_key_primary():
    rng = np.random.default_rng(0)
    assert rank(
        rng, np.array([1, 0, 1, 0]), np.array([0.1, 0.9, 0.5, 0.2])
    ).tolist() == [2, 0, 1, 3]


def test_candidates_proxy_is_eq6():
    c = Candidates(
        np.array([True, False]),
        np.array([0.3, 0.3]),
        np.array([0, 1]),
        np.array([0.7, 0.7]),
        eps=0.1,
    )
    assert c.proxy.tolist() == pytest.approx([0.3, -1 / 0.4])


def by_label_probability(wrong, label_probability):
    """Return candidates whose cross-entropy confidence follows their label's probability."""
    label_probability = np.asarray(label_probability)
    return Candidates(
        wrong=np.asarray(wrong),
        confidence=-np.log(label_probability),
        labels=np.zeros(len(label_probability), dtype=np.int64),
        label_probability=label_probability,
    )


def test_the_trimmed_proxy_keeps_the_proxy_order_with_likely_flipped_labels_last():
    # Prepare: two confidently wrong samples (label probability 0.001: likely
    # flipped), one wrong but plausible, and three right ones of falling doubt
    candidates = by_label_probability(
        [True, True, False, False, True, False], [0.001, 0.3, 0.9, 0.6, 0.001, 0.99]
    )
    rng = np.random.default_rng(0)
    # Execute
    trimmed = TrimmedProxy(trim=0.01).order(candidates, rng)
    proxy = Proxy().order(candidates, rng)
    # Assert: the proxy takes the likely flipped first, the trimmed proxy last
    assert set(proxy[:2].tolist()) == {0, 4}
    assert trimmed[:4].tolist() == [1, 3, 2, 5]
    assert set(trimmed[4:].tolist()) == {0, 4}
    with pytest.raises(ValueError, match="trim must be in"):
        TrimmedProxy(trim=1.0)


def test_trimmed_lowest_confidence_draws_the_plausible_wrong_at_random_then_doubt():
    # Prepare: wrong ones whose label got 0.001 (likely flipped), 0.1 and 0.4;
    # right ones of falling doubt (label probability 0.5, 0.7, 0.99)
    candidates = by_label_probability(
        [True, False, True, False, True, False], [0.1, 0.99, 0.001, 0.5, 0.4, 0.7]
    )
    policy = TrimmedLowestConfidence(trim=0.01)
    # Execute: the order under many seeds
    orders = [
        policy.order(candidates, np.random.default_rng(seed)).tolist()
        for seed in range(20)
    ]
    # Assert: the plausible wrong (0 and 4) first, in either order as the seed
    # draws; then the right ones least confident first; the likely flipped last
    assert {tuple(order[:2]) for order in orders} == {(0, 4), (4, 0)}
    assert {tuple(order[2:]) for order in orders} == {(3, 5, 1, 2)}
    with pytest.raises(ValueError, match="trim must be in"):
        TrimmedLowestConfidence(trim=0.0)
