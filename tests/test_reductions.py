"""Tests of flwr_select.parallel.reductions: the nine reductions, their options and checks.

Expected values are computed by hand from small stacks (workers x parameters).
"""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from flwr_select.parallel.reductions import (
    REDUCTIONS,
    make_reduction,
    reduce,
    trimmed_mean,
)

GRADS = [[1.0, 2.0], [3.0, -4.0], [5.0, 0.0]]
WEIGHTS = [1.0, 1.0, 2.0]
LOSSES = [0.0, 1.0, 3.0]


def t(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def apply(name, grads, weights=None, losses=None, **options) -> torch.Tensor:
    count = len(grads)
    weights = [1.0] * count if weights is None else weights
    losses = [1.0] * count if losses is None else losses
    return reduce(make_reduction(name, **options), t(grads), t(weights), t(losses))


def assert_equal(actual: torch.Tensor, expected) -> None:
    torch.testing.assert_close(actual, t(expected))


def test_mean_weights_by_example_counts():
    # [(1 + 3 + 2*5) / 4, (2 - 4 + 2*0) / 4] = [3.5, -0.5]
    assert_equal(apply("mean", GRADS, WEIGHTS), [3.5, -0.5])


def test_mean_with_weights_summing_to_zero_is_the_plain_mean():
    # [(1 + 3 + 5) / 3, (2 - 4 + 0) / 3] = [3, -2/3]
    assert_equal(apply("mean", GRADS, [0.0, 0.0, 0.0]), [3.0, -2.0 / 3.0])


def test_median_of_an_odd_count_is_the_middle_value():
    # column 0 sorted: 1, 3, 5 -> 3; column 1 sorted: -4, 0, 2 -> 0
    assert_equal(apply("median", GRADS, WEIGHTS), [3.0, 0.0])


def test_median_of_an_even_count_is_the_mean_of_the_middle_two():
    # column 0 sorted: 1, 2, 4, 10 -> (2 + 4) / 2 = 3; column 1: 0, 2, 6, 8 -> (2 + 6) / 2 = 4
    grads = [[1.0, 8.0], [4.0, 2.0], [2.0, 6.0], [10.0, 0.0]]
    assert_equal(apply("median", grads), [3.0, 4.0])


def test_trimmed_mean_drops_the_lowest_and_highest_share():
    # 5 workers, trim 0.2 -> floor(1.0) = 1 value dropped each side
    # column 0: 1, 2, 3, 4, 100 -> mean(2, 3, 4) = 3; column 1: -50, 0, 1, 2, 3 -> mean(0, 1, 2) = 1
    grads = [[100.0, 0.0], [2.0, -50.0], [3.0, 3.0], [1.0, 1.0], [4.0, 2.0]]
    assert_equal(apply("trimmed-mean", grads, trim=0.2), [3.0, 1.0])


def test_trimmed_mean_with_the_default_trim_on_five_workers_drops_nothing():
    # floor(0.1 * 5) = 0 -> plain mean: (1 + 2 + 3 + 4 + 100) / 5 = 22
    grads = [[100.0], [2.0], [3.0], [1.0], [4.0]]
    assert_equal(apply("trimmed-mean", grads), [22.0])


@pytest.mark.parametrize(
    ("grads", "expected"),
    [
        # 4 workers, trim 0.5: floor(2) = 2 is capped at (4 - 1) // 2 = 1 -> mean(2, 3) = 2.5
        ([[1.0], [3.0], [2.0], [9.0]], [2.5]),
        # 2 workers: floor(1) = 1 is capped at (2 - 1) // 2 = 0 -> mean(1, 3) = 2
        ([[1.0], [3.0]], [2.0]),
        # 1 worker: capped at 0 -> the value itself
        ([[7.0]], [7.0]),
    ],
)
def test_trimmed_mean_caps_the_cut_so_one_value_stays(grads, expected):
    ones = t([1.0] * len(grads))
    assert_equal(trimmed_mean(t(grads), ones, ones, trim=0.5), expected)


def test_sum_adds_the_workers_gradients():
    # [1 + 3 + 5, 2 - 4 + 0] = [9, -2]
    assert_equal(apply("sum", GRADS, WEIGHTS), [9.0, -2.0])


def test_largest_norm_picks_the_first_worker_on_a_tie():
    # norms: sqrt(5), 5, 5 -> tie between workers 1 and 2 -> worker 1
    assert_equal(apply("largest-norm", GRADS, WEIGHTS), [3.0, -4.0])


def test_smallest_norm_picks_the_smallest_gradient():
    # norms: sqrt(5), 5, 5 -> worker 0
    assert_equal(apply("smallest-norm", GRADS, WEIGHTS), [1.0, 2.0])


def test_smallest_norm_picks_the_first_worker_on_a_tie():
    # norms: 10, 5, 5 -> tie between workers 1 and 2 -> worker 1
    grads = [[6.0, 8.0], [3.0, 4.0], [0.0, 5.0]]
    assert_equal(apply("smallest-norm", grads), [3.0, 4.0])


def test_norm_weighted_mean_weights_by_gradient_norms():
    # norms 5, 1, 0 -> (5*[3, 4] + 1*[0, 1] + 0*[0, 0]) / 6 = [15/6, 21/6] = [2.5, 3.5]
    grads = [[3.0, 4.0], [0.0, 1.0], [0.0, 0.0]]
    assert_equal(apply("norm-weighted", grads, WEIGHTS), [2.5, 3.5])


def test_norm_weighted_mean_of_zero_gradients_is_zero_not_nan():
    # all norms 0 -> plain mean of zeros = [0, 0] (a weighted mean would be 0/0)
    assert_equal(apply("norm-weighted", [[0.0, 0.0], [0.0, 0.0]]), [0.0, 0.0])


def test_loss_weighted_mean_weights_by_batch_losses():
    # losses 0, 1, 3 -> (0*[1, 2] + 1*[3, -4] + 3*[5, 0]) / 4 = [18/4, -4/4] = [4.5, -1]
    assert_equal(apply("loss-weighted", GRADS, WEIGHTS, LOSSES), [4.5, -1.0])


def test_loss_weighted_mean_with_all_zero_losses_is_the_plain_mean():
    # [(1 + 3 + 5) / 3, (2 - 4 + 0) / 3] = [3, -2/3]; the example counts are ignored
    assert_equal(
        apply("loss-weighted", GRADS, WEIGHTS, [0.0, 0.0, 0.0]), [3.0, -2.0 / 3.0]
    )


CLIP_GRADS = [[3.0, 4.0], [0.0, 1.0], [6.0, 8.0]]


def test_clipped_mean_scales_gradients_down_to_a_fixed_clip_norm():
    # norms 5, 1, 10; clip 2: [3, 4]*2/5 = [1.2, 1.6], [0, 1] kept, [6, 8]*2/10 = [1.2, 1.6]
    # weights 1, 1, 2: ([1.2, 1.6] + [0, 1] + 2*[1.2, 1.6]) / 4 = [3.6/4, 5.8/4] = [0.9, 1.45]
    assert_equal(apply("clipped-mean", CLIP_GRADS, WEIGHTS, clip_norm=2.0), [0.9, 1.45])


def test_clipped_mean_with_clip_zero_clips_to_the_median_norm():
    # norms 5, 1, 10 -> median 5: [3, 4] and [0, 1] kept, [6, 8]*5/10 = [3, 4]
    # weights 1, 1, 2: ([3, 4] + [0, 1] + 2*[3, 4]) / 4 = [9/4, 13/4] = [2.25, 3.25]
    assert_equal(apply("clipped-mean", CLIP_GRADS, WEIGHTS), [2.25, 3.25])


def test_clipped_mean_with_clip_zero_and_even_count_uses_the_midpoint_median():
    # norms 5, 1 -> median (5 + 1) / 2 = 3: [3, 4]*3/5 = [1.8, 2.4], [0, 1] kept
    # equal weights: ([1.8, 2.4] + [0, 1]) / 2 = [0.9, 1.7]
    assert_equal(apply("clipped-mean", [[3.0, 4.0], [0.0, 1.0]]), [0.9, 1.7])


def test_clipped_mean_scales_one_worker_down_to_a_smaller_fixed_clip_norm():
    # norm 5, clip 1 -> [3, 4] / 5 = [0.6, 0.8]
    assert_equal(apply("clipped-mean", [[3.0, 4.0]], clip_norm=1.0), [0.6, 0.8])


@pytest.mark.parametrize("name", sorted(REDUCTIONS))
def test_every_reduction_returns_a_single_workers_gradient(name):
    grad = [3.0, -4.0, 0.5]
    assert_equal(apply(name, [grad], [2.0], [0.7]), grad)


def test_reductions_lists_the_nine_run_config_names():
    assert set(REDUCTIONS) == {
        "mean",
        "median",
        "trimmed-mean",
        "sum",
        "largest-norm",
        "smallest-norm",
        "norm-weighted",
        "loss-weighted",
        "clipped-mean",
    }


def test_make_reduction_binds_the_trim_option():
    # 5 workers, trim 0.4 -> floor(2.0) = 2 dropped each side -> the median 3
    grads = [[1.0], [5.0], [3.0], [2.0], [40.0]]
    assert_equal(apply("trimmed-mean", grads, trim=0.4), [3.0])


def test_make_reduction_refuses_an_unknown_name():
    with pytest.raises(ValueError, match="unknown reduction 'average'"):
        make_reduction("average")


@pytest.mark.parametrize("trim", [-0.1, 0.5, 0.7])
def test_make_reduction_refuses_a_trim_outside_zero_to_half(trim):
    with pytest.raises(ValueError, match=r"trim must be in \[0, 0.5\)"):
        make_reduction("trimmed-mean", trim=trim)


def test_make_reduction_refuses_a_negative_clip_norm():
    with pytest.raises(ValueError, match="clip-norm must be >= 0"):
        make_reduction("clipped-mean", clip_norm=-1.0)


@pytest.mark.parametrize(
    "grads",
    [torch.ones(3), torch.empty(0, 2), torch.ones(2, 2, 2)],
    ids=["1-d", "empty", "3-d"],
)
def test_reduce_refuses_a_stack_that_is_not_a_non_empty_matrix(grads):
    count = len(grads)
    with pytest.raises(ValueError, match=r"non-empty \(workers, parameters\) stack"):
        reduce(REDUCTIONS["mean"], grads, torch.ones(count), torch.ones(count))


@pytest.mark.parametrize(
    ("weights", "losses"),
    [(torch.ones(2), torch.ones(3)), (torch.ones(3), torch.ones(4))],
)
def test_reduce_refuses_weights_or_losses_of_the_wrong_length(weights, losses):
    with pytest.raises(ValueError, match=r"one value per worker \(3\)"):
        reduce(REDUCTIONS["mean"], t(GRADS), weights, losses)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_reduce_refuses_non_finite_gradients(bad):
    grads = t(GRADS)
    grads[1, 0] = bad
    with pytest.raises(
        ValueError, match="gradients, weights and losses must be finite"
    ):
        reduce(REDUCTIONS["mean"], grads, t(WEIGHTS), t(LOSSES))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_reduce_refuses_non_finite_losses(bad):
    with pytest.raises(
        ValueError, match="gradients, weights and losses must be finite"
    ):
        reduce(REDUCTIONS["mean"], t(GRADS), t(WEIGHTS), t([0.0, bad, 1.0]))


@pytest.mark.parametrize(
    ("weights", "losses"), [([1.0, -1.0, 1.0], LOSSES), (WEIGHTS, [0.0, -0.5, 1.0])]
)
def test_reduce_refuses_negative_weights_or_losses(weights, losses):
    with pytest.raises(ValueError, match="weights and losses must be >= 0"):
        reduce(REDUCTIONS["mean"], t(GRADS), t(weights), t(losses))


@st.composite
def stacks(draw) -> torch.Tensor:
    """A (1-6 workers) x (1-5 parameters) stack of values in [-10, 10]."""
    workers = draw(st.integers(1, 6))
    params = draw(st.integers(1, 5))
    size = workers * params
    values = draw(st.lists(st.floats(-10.0, 10.0), min_size=size, max_size=size))
    return t(values).reshape(workers, params)


@given(
    grads=stacks(),
    name=st.sampled_from(["median", "trimmed-mean"]),
    trim=st.floats(0.0, 0.49),
)
def test_median_and_trimmed_mean_lie_within_the_coordinate_range(grads, name, trim):
    ones = torch.ones(len(grads), dtype=torch.float64)
    result = reduce(make_reduction(name, trim=trim), grads, ones, ones)
    assert result.shape == (grads.shape[1],)
    values = grads.numpy()
    assert (result.numpy() >= values.min(axis=0) - 1e-9).all()
    assert (result.numpy() <= values.max(axis=0) + 1e-9).all()


@given(
    grad=st.lists(st.floats(-10.0, 10.0), min_size=1, max_size=5),
    counts=st.lists(st.integers(0, 10), min_size=1, max_size=6),
)
def test_mean_of_identical_gradients_is_that_gradient(grad, counts):
    grads = t([grad] * len(counts))
    result = reduce(REDUCTIONS["mean"], grads, t(counts), torch.ones(len(counts)))
    torch.testing.assert_close(result, t(grad), rtol=1e-9, atol=1e-9)


@given(grads=stacks(), clip_norm=st.floats(0.01, 10.0))
def test_clipped_mean_never_exceeds_a_fixed_clip_norm(grads, clip_norm):
    ones = torch.ones(len(grads), dtype=torch.float64)
    result = reduce(
        make_reduction("clipped-mean", clip_norm=clip_norm), grads, ones, ones
    )
    assert float(result.norm()) <= clip_norm * (1 + 1e-9)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_reduce_refuses_non_finite_weights(bad):
    with pytest.raises(ValueError, match="finite"):
        reduce(
            REDUCTIONS["mean"],
            torch.tensor([[1.0, 2.0], [3.0, 4.0]]),
            torch.tensor([bad, 1.0]),
            torch.zeros(2),
        )


def test_make_reduction_refuses_a_nan_clip_norm():
    with pytest.raises(ValueError, match="clip-norm"):
        make_reduction("clipped-mean", clip_norm=float("nan"))
