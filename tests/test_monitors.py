"""Tests of flwr_select.parallel.monitors: per-class error rates, filter redundancy, norm gap.

``monitor`` itself is tested elsewhere (tests/test_biased.py checks its records).
"""

import numpy as np
import pytest
import torch
from torch import nn

from flwr_select.parallel.monitors import (
    class_error_rates,
    filter_redundancy,
    grad_norm_gap,
)


def test_class_error_rates_on_three_classes_with_one_absent():
    # labels      0 0 0 1 1 1
    # predictions 0 1 2 1 1 0
    # confusion (rows: label, columns: prediction)
    #   0: [1, 1, 1]
    #   1: [1, 2, 0]
    #   2: [0, 0, 0]   (class 2 has no samples)
    # true positives [1, 2, 0]; samples of c [3, 3, 0]; samples not of c [3, 3, 6]
    # predicted c [2, 3, 1] -> false positives [1, 1, 1]
    # type I  = [1/3, 1/3, 1/6]
    # type II = [(3 - 1)/3, (3 - 2)/3, 0 (no sample)] = [2/3, 1/3, 0]
    labels = np.array([0, 0, 0, 1, 1, 1])
    predictions = np.array([0, 1, 2, 1, 1, 0])
    type1, type2 = class_error_rates(predictions, labels, 3)
    assert type1 == pytest.approx([1 / 3, 1 / 3, 1 / 6])
    assert type2 == pytest.approx([2 / 3, 1 / 3, 0.0])


def test_class_error_rates_are_zero_where_no_sample_lies_outside_the_class():
    # labels 0 0, predictions 0 1: confusion [[1, 1], [0, 0]]
    # class 0: no sample outside it -> type I 0; type II 1/2
    # class 1: 1 false positive of 2 samples not of 1 -> type I 1/2; no sample -> type II 0
    type1, type2 = class_error_rates([0, 1], [0, 0], 2)
    assert type1 == pytest.approx([0.0, 0.5])
    assert type2 == pytest.approx([0.5, 0.0])


def test_class_error_rates_of_perfect_predictions_are_zero_lists():
    type1, type2 = class_error_rates([2, 0, 1, 1], [2, 0, 1, 1], 3)
    assert type1 == [0.0, 0.0, 0.0]
    assert type2 == [0.0, 0.0, 0.0]


def conv(filters, kernel_size=1) -> nn.Conv2d:
    """A bias-free conv layer whose weight is ``filters`` (out, in, kh, kw)."""
    weight = torch.tensor(filters, dtype=torch.float32)
    layer = nn.Conv2d(weight.shape[1], weight.shape[0], kernel_size, bias=False)
    with torch.no_grad():
        layer.weight.copy_(weight)
    return layer


# three 1x1 filters over 2 input channels: [1, 0], [0, 1], [-1, 0]
THREE_FILTERS = [[[[1.0]], [[0.0]]], [[[0.0]], [[1.0]]], [[[-1.0]], [[0.0]]]]


def test_filter_redundancy_averages_absolute_cosines_of_filter_pairs():
    # |cos| of pairs (0, 1) = 0, (0, 2) = |-1| = 1, (1, 2) = 0 -> mean 1/3, max 1
    means, largest = filter_redundancy(conv(THREE_FILTERS))
    assert means == pytest.approx([1 / 3])
    assert largest == pytest.approx([1.0])


def test_filter_redundancy_gives_one_value_per_conv_layer_in_module_order():
    # second layer: 2 filters of 3 channels x 1x2 kernel, flattened to
    # [3, 4, 0, 0, 0, 0] and [4, 0, 0, 3, 0, 0] -> cos = 12 / (5 * 5) = 0.48
    second = conv(
        [
            [[[3.0, 4.0]], [[0.0, 0.0]], [[0.0, 0.0]]],
            [[[4.0, 0.0]], [[0.0, 3.0]], [[0.0, 0.0]]],
        ],
        kernel_size=(1, 2),
    )
    # the linear layer's two equal rows would count as 1 if it were not ignored
    linear = nn.Linear(3, 2)
    with torch.no_grad():
        linear.weight.fill_(1.0)
    model = nn.Sequential(
        conv(THREE_FILTERS), nn.ReLU(), nn.Sequential(second), nn.Flatten(), linear
    )
    means, largest = filter_redundancy(model)
    assert means == pytest.approx([1 / 3, 0.48])
    assert largest == pytest.approx([1.0, 0.48])


def test_filter_redundancy_of_copies_is_one():
    # [1, 2] and [2, 4]: cos = (2 + 8) / (sqrt(5) * sqrt(20)) = 10 / 10 = 1
    means, largest = filter_redundancy(conv([[[[1.0]], [[2.0]]], [[[2.0]], [[4.0]]]]))
    assert means == pytest.approx([1.0])
    assert largest == pytest.approx([1.0])


def test_filter_redundancy_of_a_single_filter_layer_is_zero():
    assert filter_redundancy(conv([[[[5.0]], [[-2.0]]]])) == ([0.0], [0.0])


def test_filter_redundancy_ignores_linear_layers():
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    assert filter_redundancy(model) == ([], [])


def test_grad_norm_gap_is_the_largest_minus_the_smallest_norm():
    # norms 5 and 13 -> 13 - 5 = 8
    assert grad_norm_gap(torch.tensor([[3.0, 4.0], [5.0, 12.0]])) == pytest.approx(8.0)


def test_grad_norm_gap_spans_all_workers_not_neighbours():
    # norms 5, 0, sqrt(2), 13 -> 13 - 0 = 13
    grads = torch.tensor([[3.0, 4.0], [0.0, 0.0], [1.0, 1.0], [5.0, 12.0]])
    assert grad_norm_gap(grads) == pytest.approx(13.0)


def test_grad_norm_gap_of_one_worker_is_zero():
    assert grad_norm_gap(torch.tensor([[3.0, 4.0]])) == 0.0
