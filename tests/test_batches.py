"""Tests of flwr_select.parallel.batches: class mixes of drawn batches, bias schedules, config.

Frequencies are measured over 400 seeded draws of 160 samples (64,000 labels); the
tolerance 0.01 is at least 5 standard errors (sqrt(0.25 / 64000) = 0.002).
"""

import numpy as np
import pytest

from flwr_select.parallel.batches import Sampling, WorkerStep

# 100 samples over 10 classes, unbalanced: class c has COUNTS[c] samples
COUNTS = [30, 10, 20, 10, 10, 5, 5, 5, 3, 2]
LABELS = np.repeat(np.arange(10), COUNTS)
DATA_FREQUENCIES = np.array(COUNTS) / 100
TOLERANCE = 0.01


def frequencies(sampling, labels, num_classes, *, worker=0, num_workers=2):
    """Class frequencies of 400 draws of 160 samples at steps 0..399."""
    drawn = np.concatenate(
        [
            sampling.draw(
                labels, 160, num_classes, WorkerStep(worker, num_workers, step, 400)
            )
            for step in range(400)
        ]
    )
    return np.bincount(labels[drawn], minlength=num_classes) / len(drawn)


def test_uniform_batches_mirror_the_class_frequencies_of_the_data():
    measured = frequencies(Sampling(sampling="uniform", seed=1), LABELS, 10)
    np.testing.assert_allclose(measured, DATA_FREQUENCIES, atol=TOLERANCE)


@pytest.mark.parametrize(
    ("worker", "expected"),
    [
        # 0.5 * COUNTS / 100 + 0.5 * 1/5 on the favoured classes {0, 2, 4, 6, 8}:
        # 0: .15 + .1, 1: .05, 2: .10 + .1, 3: .05, 4: .05 + .1, 5: .025,
        # 6: .025 + .1, 7: .025, 8: .015 + .1, 9: .01
        (0, [0.25, 0.05, 0.20, 0.05, 0.15, 0.025, 0.125, 0.025, 0.115, 0.01]),
        # favoured classes {1, 3, 5, 7, 9}:
        # 0: .15, 1: .05 + .1, 2: .10, 3: .05 + .1, 4: .05, 5: .025 + .1,
        # 6: .025, 7: .025 + .1, 8: .015, 9: .01 + .1
        (1, [0.15, 0.15, 0.10, 0.15, 0.05, 0.125, 0.025, 0.125, 0.015, 0.11]),
    ],
)
def test_favoured_batches_mix_the_data_with_every_other_class(worker, expected):
    sampling = Sampling(sampling="favoured", bias=0.5, seed=2)
    measured = frequencies(sampling, LABELS, 10, worker=worker, num_workers=2)
    np.testing.assert_allclose(measured, expected, atol=TOLERANCE)


def test_favoured_classes_k_gives_k_consecutive_classes_wrapping_around():
    # worker 3, k = 3: classes 9, 10, 11 mod 10 = {9, 0, 1}, sorted
    sampling = Sampling(sampling="favoured", favoured_classes=3)
    np.testing.assert_array_equal(sampling.favoured(3, 4, 10), [0, 1, 9])


def test_favoured_batches_with_k_classes_draw_them_more_often():
    # balanced data (0.1 per class), bias 0.5, worker 1 with k = 3 favours {3, 4, 5}:
    # favoured 0.5 * 0.1 + 0.5 / 3 = 13/60, others 0.5 * 0.1 = 0.05
    labels = np.repeat(np.arange(10), 10)
    sampling = Sampling(sampling="favoured", bias=0.5, favoured_classes=3, seed=3)
    expected = np.full(10, 0.05)
    expected[[3, 4, 5]] = 13 / 60
    measured = frequencies(sampling, labels, 10, worker=1, num_workers=4)
    np.testing.assert_allclose(measured, expected, atol=TOLERANCE)


def test_a_worker_beyond_the_class_count_favours_a_uniform_mix():
    # worker 5 of 8 on 4 classes: classes c with c % 8 == 5 -> none -> 1/4 each
    sampling = Sampling(sampling="favoured")
    assert len(sampling.favoured(5, 8, 4)) == 0
    np.testing.assert_array_equal(sampling.target(5, 8, 4), [0.25] * 4)


def mix_of(sampling, worker):
    return sampling.class_mix(LABELS, 10, WorkerStep(worker, 2, 0, 1))


def test_dirichlet_batches_follow_the_workers_class_mix():
    sampling = Sampling(sampling="dirichlet", bias=0.5, alpha=0.5, seed=4)
    measured = frequencies(sampling, LABELS, 10, worker=1, num_workers=2)
    np.testing.assert_allclose(measured, mix_of(sampling, 1), atol=TOLERANCE)


def test_dirichlet_mixes_sum_to_one_and_differ_between_workers():
    sampling = Sampling(sampling="dirichlet", bias=0.5, alpha=0.5, seed=4)
    mix0, mix1 = mix_of(sampling, 0), mix_of(sampling, 1)
    assert mix0.sum() == pytest.approx(1.0)
    assert mix1.sum() == pytest.approx(1.0)
    assert sampling.target(0, 2, 10).sum() == pytest.approx(1.0)
    assert np.abs(mix0 - mix1).max() > 0.05
    # every class is in the data, so the mix is half data frequencies, half target
    np.testing.assert_allclose(
        mix0, 0.5 * DATA_FREQUENCIES + 0.5 * sampling.target(0, 2, 10)
    )


@pytest.mark.parametrize("name", ["favoured", "dirichlet"])
def test_bias_zero_draws_the_same_batches_as_uniform(name):
    biased = Sampling(sampling=name, bias=0.0, seed=5)
    uniform = Sampling(sampling="uniform", seed=5)
    for step in range(3):
        at = WorkerStep(1, 2, step, 3)
        np.testing.assert_array_equal(
            biased.draw(LABELS, 32, 10, at),
            uniform.draw(LABELS, 32, 10, at),
        )


@pytest.mark.parametrize(
    ("schedule", "expected"),
    [
        # total 5 steps: progress at steps 0, 2, 4 = 0, 2/4, 4/4
        ("constant", [0.8, 0.8, 0.8]),
        ("linear-decay", [0.8, 0.4, 0.0]),  # 0.8 * (1 - progress)
        ("linear-growth", [0.0, 0.4, 0.8]),  # 0.8 * progress
    ],
)
def test_bias_at_follows_the_schedule_from_first_to_last_step(schedule, expected):
    sampling = Sampling(sampling="favoured", bias=0.8, bias_schedule=schedule)
    measured = [sampling.bias_at(step, 5) for step in (0, 2, 4)]
    assert measured == pytest.approx(expected)


def test_bias_at_holds_the_last_value_past_the_last_step():
    # progress min(7 / 4, 1) = 1 -> 0.8 * (1 - 1) = 0
    sampling = Sampling(sampling="favoured", bias=0.8, bias_schedule="linear-decay")
    assert sampling.bias_at(7, 5) == pytest.approx(0.0)


def test_uniform_sampling_has_bias_zero_whatever_the_bias_field():
    assert Sampling(sampling="uniform", bias=0.9).bias_at(0, 5) == 0.0


def test_linear_decay_draws_uniform_batches_at_the_last_step():
    decayed = Sampling(sampling="favoured", bias=1.0, bias_schedule="linear-decay")
    at = WorkerStep(0, 2, 9, 10)
    np.testing.assert_array_equal(
        decayed.draw(LABELS, 32, 10, at),
        Sampling(sampling="uniform").draw(LABELS, 32, 10, at),
    )


def test_a_class_missing_from_the_data_is_never_drawn_and_the_mix_renormalised():
    # 4 classes, class 2 absent: data frequencies 1/3 for classes 0, 1, 3
    # worker 0 of 2 favours {0, 2}; bias 0.9:
    # 0.1 * [1/3, 1/3, 0, 1/3] + 0.9 * [1/2, 0, 1/2, 0] = [29/60, 2/60, 27/60, 2/60]
    # class 2 set to 0, renormalised by 33/60 -> [29/33, 2/33, 0, 2/33]
    labels = np.array([0, 0, 1, 1, 3, 3])
    sampling = Sampling(sampling="favoured", bias=0.9, seed=6)
    expected = [29 / 33, 2 / 33, 0.0, 2 / 33]
    mix = sampling.class_mix(labels, 4, WorkerStep(0, 2, 0, 1))
    np.testing.assert_allclose(mix, expected)
    measured = frequencies(sampling, labels, 4, worker=0, num_workers=2)
    assert measured[2] == 0.0
    np.testing.assert_allclose(measured, expected, atol=TOLERANCE)


def test_class_mix_refuses_a_worker_without_samples():
    sampling = Sampling(sampling="favoured")
    with pytest.raises(ValueError, match="no samples"):
        sampling.class_mix(np.array([], dtype=np.int64), 10, WorkerStep(0, 2, 0, 1))


@pytest.mark.parametrize("name", ["uniform", "favoured", "dirichlet"])
def test_draws_are_deterministic_in_seed_worker_and_step(name):
    def draw(seed=7, worker=0, step=3):
        sampling = Sampling(sampling=name, seed=seed)
        return sampling.draw(LABELS, 32, 10, WorkerStep(worker, 2, step, 10))

    batch = draw()
    assert len(batch) == 32
    np.testing.assert_array_equal(batch, draw())
    assert not np.array_equal(batch, draw(step=4))
    assert not np.array_equal(batch, draw(worker=1))
    assert not np.array_equal(batch, draw(seed=8))


def test_draw_refuses_a_batch_size_below_one():
    with pytest.raises(ValueError, match="batch-size must be >= 1, got 0"):
        Sampling().draw(LABELS, 0, 10, WorkerStep(0, 1, 0, 1))


def test_to_config_and_from_config_round_trip_with_run_config_names():
    sampling = Sampling(
        sampling="favoured",
        bias=0.25,
        favoured_classes=3,
        alpha=2.0,
        bias_schedule="linear-decay",
        seed=7,
    )
    config = sampling.to_config()
    assert config == {
        "sampling": "favoured",
        "bias": 0.25,
        "favoured-classes": 3,
        "alpha": 2.0,
        "bias-schedule": "linear-decay",
        "seed": 7,
    }
    assert Sampling.from_config(config) == sampling


def test_from_config_converts_types_and_ignores_unknown_keys():
    config = {
        "sampling": "dirichlet",
        "bias": 1,
        "favoured-classes": 2,
        "bias-schedule": "linear-growth",
        "num-workers": 4,
    }
    sampling = Sampling.from_config(config)
    assert sampling == Sampling(
        sampling="dirichlet",
        bias=1.0,
        favoured_classes=2,
        bias_schedule="linear-growth",
    )
    assert isinstance(sampling.bias, float)
    assert isinstance(sampling.favoured_classes, int)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (dict(sampling="biased"), "unknown sampling 'biased'"),
        (dict(bias_schedule="cosine"), "unknown bias-schedule 'cosine'"),
        (dict(bias=-0.1), r"bias must be in \[0, 1\], got -0.1"),
        (dict(bias=1.5), r"bias must be in \[0, 1\], got 1.5"),
        (dict(favoured_classes=-1), "favoured-classes must be >= 0, got -1"),
        (dict(alpha=0.0), "alpha must be > 0, got 0.0"),
        (dict(alpha=-1.0), "alpha must be > 0, got -1.0"),
    ],
)
def test_sampling_refuses_invalid_fields(options, message):
    with pytest.raises(ValueError, match=message):
        Sampling(**options)


def test_full_bias_without_any_target_class_falls_back_to_the_data():
    # worker 0 of 2 favours {0, 2, 4, 6, 8}; it holds only classes 1 and 3
    sampling = Sampling(sampling="favoured", bias=1.0)
    labels = np.array([1, 1, 3])
    mix = sampling.class_mix(labels, 10, WorkerStep(0, 2, 0, 1))
    assert mix[1] == pytest.approx(2 / 3) and mix[3] == pytest.approx(1 / 3)
    batch = sampling.draw(labels, 4, 10, WorkerStep(0, 2, 0, 1))
    assert set(labels[batch]) <= {1, 3}
