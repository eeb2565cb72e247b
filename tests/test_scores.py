import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from flwr_select.selection.scores import (
    CONFIDENCE_METRICS,
    SCORES,
    combine_proxy,
    proxy,
    score,
)

# Row 0: p = (0.5, 0.25, 0.25), label 0 -> right.  Row 1: p = (0.1, 0.6, 0.3), label 2 -> wrong.
PROBS = torch.tensor([[0.5, 0.25, 0.25], [0.1, 0.6, 0.3]], dtype=torch.float64)
LOGITS = PROBS.log()
LABELS = torch.tensor([0, 2])
ln = math.log

EXPECTED = {
    "correctness": [0.0, 1.0],
    "cross-entropy": [-ln(0.5), -ln(0.3)],  # 0.6931, 1.2040
    # -(0.5 ln 0.5 + 2 * 0.25 ln 0.25) = 1.0397; -(0.1 ln 0.1 + 0.6 ln 0.6 + 0.3 ln 0.3) = 0.8979
    "entropy": [
        -(0.5 * ln(0.5) + 0.5 * ln(0.25)),
        -(0.1 * ln(0.1) + 0.6 * ln(0.6) + 0.3 * ln(0.3)),
    ],
    "gini-simpson": [
        1 - (0.25 + 0.0625 + 0.0625),
        1 - (0.01 + 0.36 + 0.09),
    ],  # 0.625, 0.54
    "max-likelihood": [1 - 0.5, 1 - 0.6],  # 0.5, 0.4
    "margin": [1 - (0.5 - 0.25), 1 - (0.6 - 0.3)],  # 0.75, 0.7
    # right: -1 / (H + eps) with H = -ln 0.5; wrong: H = -ln 0.3
    "proxy": [-1 / (-ln(0.5) + 1e-6), -ln(0.3)],
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_every_score_matches_the_hand_computed_value(name):
    # Execute
    values = score(name, LOGITS, LABELS)
    # Assert
    assert values.dtype == torch.float64
    assert values.tolist() == pytest.approx(EXPECTED[name], rel=1e-9)


def test_every_named_score_is_tested():
    assert set(SCORES) == set(EXPECTED)


def test_proxy_with_another_confidence_metric():
    # right row: -1 / (gini + eps) = -1 / 0.625001; wrong row: gini = 0.54
    values = proxy(LOGITS, LABELS, confidence="gini-simpson", eps=1e-6)
    assert values.tolist() == pytest.approx([-1 / 0.625001, 0.54], rel=1e-9)


def test_scores_stay_finite_at_probabilities_zero_and_one():
    # p = (1, 0) up to float64: exp(-1000) underflows to exactly 0.
    logits = torch.tensor([[1000.0, 0.0], [0.0, 1000.0]])
    labels = torch.tensor([0, 0])
    for name in SCORES:
        assert torch.isfinite(score(name, logits, labels)).all(), name
    assert score("cross-entropy", logits, labels).tolist() == [0.0, 1000.0]
    assert score("entropy", logits, labels).tolist() == [0.0, 0.0]
    assert score("margin", logits, labels).tolist() == [0.0, 0.0]


@given(
    st.lists(
        st.lists(st.floats(-30, 30), min_size=4, max_size=4), min_size=1, max_size=20
    ),
    st.data(),
)
def test_ranges_direction_and_shift_invariance(rows, data):
    logits = torch.tensor(rows, dtype=torch.float32)
    labels = torch.tensor(
        data.draw(st.lists(st.integers(0, 3), min_size=len(rows), max_size=len(rows)))
    )
    c = 4
    bounds = {
        "cross-entropy": (0, math.inf),
        "entropy": (0, ln(c)),
        "gini-simpson": (0, 1 - 1 / c),
        "max-likelihood": (0, 1 - 1 / c),
        "margin": (0, 1),
    }
    for name, (lo, hi) in bounds.items():
        values = score(name, logits, labels)
        assert (values >= lo).all() and (values <= hi + 1e-12).all(), name
        # softmax ignores a constant shift of the logits
        shifted = score(name, logits + 7.0, labels)
        assert torch.allclose(values, shifted, atol=1e-5), name
    wrong = score("correctness", logits, labels).bool()
    g = score("proxy", logits, labels)
    if wrong.any() and (~wrong).any():
        assert g[wrong].min() > g[~wrong].max()  # every wrong sample ranks first


def test_combine_proxy_is_the_same_on_numpy_and_torch():
    wrong = np.array([True, False, False])
    h = np.array([0.2, 0.2, 0.9])
    expected = [0.2, -1 / (0.2 + 1e-6), -1 / (0.9 + 1e-6)]
    assert combine_proxy(wrong, h).tolist() == pytest.approx(expected)
    assert combine_proxy(
        torch.tensor(wrong), torch.tensor(h)
    ).tolist() == pytest.approx(expected)
    # a less confident right sample (0.9) ranks above a more confident one (0.2)
    assert combine_proxy(wrong, h)[2] > combine_proxy(wrong, h)[1]


@pytest.mark.parametrize(
    ("logits", "labels", "message"),
    [
        (torch.tensor([[float("nan"), 0.0]]), torch.tensor([0]), "NaN"),
        (
            torch.tensor([[0.0, 1.0]]),
            torch.tensor([2]),
            r"labels must lie in \[0, 2\), got values from 2 to 2",
        ),
        (torch.tensor([[0.0, 1.0]]), torch.tensor([-1]), "labels must lie in"),
        (
            torch.zeros(2, 3),
            torch.tensor([0]),
            "labels has 1 entries but logits has 2 rows",
        ),
        (torch.zeros(3), torch.tensor([0]), "logits must be a 2-D float tensor"),
        (
            torch.zeros(2, 3),
            torch.tensor([0.0, 1.0]),
            "labels must be a 1-D integer tensor",
        ),
    ],
)
def test_bad_input_names_the_problem(logits, labels, message):
    with pytest.raises(ValueError, match=message):
        score("cross-entropy", logits, labels)


def test_unknown_names_are_refused():
    with pytest.raises(ValueError, match="unknown score 'loss'"):
        score("loss", LOGITS, LABELS)
    with pytest.raises(ValueError, match="unknown confidence metric 'variance'"):
        proxy(LOGITS, LABELS, confidence="variance")
    with pytest.raises(ValueError, match="eps must be > 0, got 0"):
        proxy(LOGITS, LABELS, eps=0)


def test_confidence_metrics_are_addressable_by_the_config_names():
    assert sorted(CONFIDENCE_METRICS) == [
        "cross-entropy",
        "entropy",
        "gini-simpson",
        "margin",
        "max-likelihood",
    ]
