import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from flwr_select import trainer
from flwr_select.data import SiteData
from flwr_select.models import build_model
from flwr_select.selection.buffer import TrainingBuffer
from flwr_select.trainer import TrainConfig, TrainResult, batch_order, train, translate


def brightness_task(n=64, seed=0):
    """Two classes of 28x28 uint8 images: dark (label 0) and bright (label 1)."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 2
    low = torch.randint(0, 60, (n, 28, 28), generator=g)
    high = torch.randint(190, 256, (n, 28, 28), generator=g)
    images = torch.where(labels.view(-1, 1, 1) == 1, high, low).to(torch.uint8)
    return images, labels


class FixedLogits(nn.Module):
    """Logits (mean pixel / 10, 0): a model whose loss per sample is known by hand.

    Its one parameter gets a zero gradient, so training never changes it.
    """

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(()))

    def forward(self, images):
        a = images.float().mean(dim=(1, 2)) / 10
        return torch.stack([a, torch.zeros_like(a)], 1) + 0 * self.w


def cross_entropy(model, images, labels):
    with torch.no_grad():
        return float(nn.functional.cross_entropy(model(images), labels))


def accuracy(model, images, labels):
    with torch.no_grad():
        return float((model(images).argmax(1) == labels).float().mean())


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny convolutions run faster on one thread than on two shared cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------- TrainConfig


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"optimizer": "rmsprop"},
            r"unknown optimizer 'rmsprop'; choose one of \['adam', 'sgd'\]",
        ),
        ({"optimizer": "SGD"}, "unknown optimizer 'SGD'"),
        ({"lr": 0.0}, "lr must be > 0, got 0.0"),
        ({"lr": -0.1}, "lr must be > 0, got -0.1"),
        ({"lr": float("nan")}, "lr must be > 0, got nan"),
        ({"epochs": 0}, "epochs, batch_size and steps must be >= 1, got 0, 64, None"),
        (
            {"batch_size": 0},
            "epochs, batch_size and steps must be >= 1, got 1, 0, None",
        ),
        ({"steps": 0}, "epochs, batch_size and steps must be >= 1, got 1, 64, 0"),
        ({"steps": -3}, "got 1, 64, -3"),
    ],
)
def test_bad_train_configs_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**kwargs)


def test_make_optimizer_builds_the_named_optimizer():
    model = nn.Linear(2, 2)
    sgd = TrainConfig(lr=0.5, momentum=0.7, weight_decay=0.01).make_optimizer(model)
    assert type(sgd) is torch.optim.SGD
    group = sgd.param_groups[0]
    assert (group["lr"], group["momentum"], group["weight_decay"]) == (0.5, 0.7, 0.01)
    assert len(group["params"]) == 2  # weight and bias
    adam = TrainConfig(optimizer="adam", lr=0.002).make_optimizer(model)
    assert type(adam) is torch.optim.Adam and adam.param_groups[0]["lr"] == 0.002


# ---------------------------------------------------------------- batch_order


def test_epochs_cover_every_index_once_per_epoch():
    # Prepare: 10 samples, batches of 4, 3 epochs -> sizes 4, 4, 2 per epoch
    config = TrainConfig(epochs=3, batch_size=4)
    # Execute
    batches = batch_order(10, config, torch.Generator().manual_seed(0))
    # Assert
    assert [len(b) for b in batches] == [4, 4, 2] * 3
    for epoch in range(3):
        seen = torch.cat(batches[3 * epoch : 3 * epoch + 3])
        assert sorted(seen.tolist()) == list(range(10))
    assert all(b.dtype == torch.int64 for b in batches)


def test_steps_give_exactly_that_many_batches_cycling_through_permutations():
    # 10 samples, batches of 4, 7 steps: perm 1 -> 4, 4, 2; perm 2 -> 4, 4, 2; perm 3 -> 4
    config = TrainConfig(steps=7, batch_size=4, epochs=5)  # epochs is ignored
    batches = batch_order(10, config, torch.Generator().manual_seed(1))
    assert [len(b) for b in batches] == [4, 4, 2, 4, 4, 2, 4]
    assert sorted(torch.cat(batches[0:3]).tolist()) == list(range(10))
    assert sorted(torch.cat(batches[3:6]).tolist()) == list(range(10))
    assert len(set(batches[6].tolist())) == 4
    # the batches are the generator's successive permutations, split
    g = torch.Generator().manual_seed(1)
    perms = [torch.randperm(10, generator=g) for _ in range(3)]
    expected = [b for p in perms for b in p.split(4)][:7]
    for got, want in zip(batches, expected, strict=True):
        assert torch.equal(got, want)


def test_steps_with_a_batch_larger_than_the_data():
    batches = batch_order(3, TrainConfig(steps=4, batch_size=64), torch.Generator())
    assert len(batches) == 4
    assert all(sorted(b.tolist()) == [0, 1, 2] for b in batches)


@given(
    n=st.integers(1, 40),
    batch_size=st.integers(1, 12),
    epochs=st.integers(1, 3),
    steps=st.one_of(st.none(), st.integers(1, 25)),
    seed=st.integers(0, 2**31),
)
def test_batch_order_properties(n, batch_size, epochs, steps, seed):
    config = TrainConfig(epochs=epochs, steps=steps, batch_size=batch_size)
    batches = batch_order(n, config, torch.Generator().manual_seed(seed))
    again = batch_order(n, config, torch.Generator().manual_seed(seed))
    assert len(batches) == len(again)
    assert all(torch.equal(a, b) for a, b in zip(batches, again, strict=True))
    assert all(1 <= len(b) <= batch_size for b in batches)
    per_pass = math.ceil(n / batch_size)
    if steps is None:
        assert len(batches) == epochs * per_pass
        passes, rest = epochs, 0
    else:
        assert len(batches) == steps
        passes, rest = divmod(steps, per_pass)
    # every complete pass is a permutation of 0..n-1; a partial one has no repeats
    for p in range(passes):
        seen = torch.cat(batches[p * per_pass : (p + 1) * per_pass]).tolist()
        assert sorted(seen) == list(range(n))
    if rest:
        tail = torch.cat(batches[passes * per_pass :]).tolist()
        assert len(set(tail)) == len(tail) == rest * batch_size


def test_another_seed_gives_another_order():
    config = TrainConfig(epochs=1, batch_size=100)
    a = batch_order(100, config, torch.Generator().manual_seed(0))[0]
    b = batch_order(100, config, torch.Generator().manual_seed(1))[0]
    assert not torch.equal(a, b)


# ---------------------------------------------------------------- train


def test_train_counts_samples_and_steps():
    images, labels = brightness_task(50)
    model = FixedLogits()
    # 2 epochs of 50 in batches of 16: 16, 16, 16, 2 per epoch
    result = train(model, images, labels, TrainConfig(epochs=2, batch_size=16), seed=0)
    assert isinstance(result, TrainResult)
    assert (result.samples, result.steps) == (100, 8)
    assert result.seconds >= 0
    # 5 steps: 16, 16, 16, 2 from the first permutation, then 16 from the second
    result = train(model, images, labels, TrainConfig(steps=5, batch_size=16), seed=0)
    assert (result.samples, result.steps) == (66, 5)
    assert model.training  # left in train mode


def test_train_loss_is_the_per_sample_mean():
    # Prepare: mean pixels 0, 10, 20, 30, 40 -> logits (v/10, 0), all labelled 1,
    # so sample i costs softplus(v_i / 10) = log(1 + e^(v_i / 10))
    values = torch.tensor([0, 10, 20, 30, 40], dtype=torch.uint8)
    images = values.view(-1, 1, 1).expand(-1, 2, 2).clone()
    labels = torch.ones(5, dtype=torch.long)
    expected = sum(math.log1p(math.exp(v / 10)) for v in [0, 10, 20, 30, 40]) / 5
    # = (0.6931 + 1.3133 + 2.1269 + 3.0486 + 4.0181) / 5 = 2.2400
    # Execute: batches of 2, 2, 1 -- an unweighted mean of batch means would differ
    result = train(FixedLogits(), images, labels, TrainConfig(batch_size=2), seed=3)
    # Assert
    assert result.loss == pytest.approx(expected, rel=1e-6)
    assert result.loss == pytest.approx(2.2400, abs=1e-4)


def test_batch_order_of_nothing_raises_instead_of_looping():
    with pytest.raises(ValueError, match="nothing to train on"):
        batch_order(0, TrainConfig(steps=3), torch.Generator().manual_seed(0))


def test_train_on_an_empty_buffer_raises():
    buffer = TrainingBuffer(10, device="cpu")
    with pytest.raises(ValueError, match="nothing to train on: the buffer is empty"):
        train(
            FixedLogits(),
            torch.zeros(0, 28, 28, dtype=torch.uint8),
            buffer.labels,
            TrainConfig(),
            seed=0,
        )


def test_train_is_deterministic_for_a_seed():
    # Prepare
    images, labels = brightness_task(48)
    config = TrainConfig(epochs=2, batch_size=8, lr=0.05)
    a, b, c = (build_model("lenet5", seed=0) for _ in range(3))
    # Execute
    ra = train(a, images, labels, config, seed=11)
    rb = train(b, images, labels, config, seed=11)
    train(c, images, labels, config, seed=12)
    # Assert
    assert ra.loss == rb.loss
    for pa, pb in zip(a.state_dict().values(), b.state_dict().values(), strict=True):
        assert torch.equal(pa, pb)
    # a different seed draws other batches, so other weights
    assert any(
        not torch.equal(pa, pc)
        for pa, pc in zip(a.state_dict().values(), c.state_dict().values(), strict=True)
    )
    # and the model really was trained in place
    fresh = build_model("lenet5", seed=0)
    assert not torch.equal(a.classifier[-1].weight, fresh.classifier[-1].weight)


@pytest.mark.parametrize(
    ("config", "steps"),
    [
        (TrainConfig(epochs=8, batch_size=8, lr=0.01), 8 * 64 // 8),
        (TrainConfig(steps=24, batch_size=16, optimizer="adam", lr=0.002), 24),
    ],
    ids=["sgd-epochs", "adam-steps"],
)
def test_lenet5_learns_brightness_from_the_buffer(config, steps):
    # Prepare: the buffer holds the training samples, a fresh draw tests
    images, labels = brightness_task(64, seed=0)
    test_images, test_labels = brightness_task(64, seed=1)
    buffer = TrainingBuffer(10, device="cpu")
    buffer.add(1, SiteData(images, labels, 10))
    model = build_model("lenet5", seed=0)
    initial = cross_entropy(model, test_images, test_labels)
    # Execute
    result = train(model, buffer.images, buffer.labels, config, seed=0)
    # Assert
    final = cross_entropy(model, test_images, test_labels)
    assert initial == pytest.approx(math.log(10), abs=0.3)  # 10 outputs, untrained
    assert final < 0.5 and final < initial / 4
    assert result.loss < initial  # the mean over training is below the start too
    assert accuracy(model, test_images, test_labels) >= 0.95
    assert (result.steps, result.samples) == (steps, steps * config.batch_size)


# ------------------------------------------------- schedules and augmentation


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"schedule": "step"}, r"unknown schedule 'step'; choose one of"),
        ({"warmup": 1.0}, r"warmup must be in \[0, 1\), got 1.0"),
        ({"warmup": -0.1}, r"warmup must be in \[0, 1\)"),
        ({"augment": "flip"}, r"unknown augment 'flip'; choose one of"),
        ({"max_shift": 0}, "max_shift must be >= 1, got 0"),
        ({"weight_decay": -1.0}, "weight_decay must be >= 0, got -1.0"),
    ],
)
def test_bad_schedules_and_augmentations_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**kwargs)


def test_warmup_rises_linearly_then_the_schedule_holds_or_decays_to_zero():
    constant = TrainConfig(lr=0.2, warmup=0.25)
    cosine = TrainConfig(lr=0.2, warmup=0.25, schedule="cosine")
    total = 20  # 5 warm-up steps: 0.04, 0.08, ..., 0.2
    ramp = [constant.lr_at(step, total) for step in range(5)]
    assert ramp == pytest.approx([0.04, 0.08, 0.12, 0.16, 0.2])
    assert [cosine.lr_at(step, total) for step in range(5)] == pytest.approx(ramp)
    assert {constant.lr_at(step, total) for step in range(5, total)} == {0.2}
    decay = [cosine.lr_at(step, total) for step in range(5, total)]
    assert decay[0] == pytest.approx(0.2) and decay[-1] == pytest.approx(0.0)
    assert all(a > b for a, b in zip(decay, decay[1:], strict=False))
    assert TrainConfig(schedule="cosine").lr_at(0, 1) == pytest.approx(0.01)


def test_translate_shifts_each_image_within_the_bound_and_keeps_its_pixels():
    # Prepare: 200 images, each with one bright pixel away from the border
    g = torch.Generator().manual_seed(0)
    images = torch.zeros(200, 12, 12, dtype=torch.uint8)
    images[:, 5, 6] = torch.arange(200, dtype=torch.uint8) + 1
    # Execute
    moved = translate(images, 2, g)
    # Assert: the pixel moved by (dy, dx) in [-2, 2]^2, nothing else changed
    assert moved.shape == images.shape and moved.dtype == torch.uint8
    where = moved.flatten(1).argmax(1)
    dy, dx = where // 12 - 5, where % 12 - 6
    assert dy.abs().max() <= 2 and dx.abs().max() <= 2
    assert torch.equal(moved.flatten(1).max(1).values, images[:, 5, 6])
    assert torch.equal(moved.flatten(1).sum(1), images.flatten(1).sum(1))
    assert len(set(zip(dy.tolist(), dx.tolist(), strict=True))) == 25  # every offset
    # the same generator state gives the same shifts; channels move together
    again = translate(images, 2, torch.Generator().manual_seed(0))
    assert torch.equal(again, moved)
    colour = translate(images[:, None].expand(-1, 3, -1, -1), 2, g)
    assert colour.shape == (200, 3, 12, 12)
    assert torch.equal(colour[:, 0], colour[:, 2])


def test_training_with_augmentation_and_a_schedule_learns_and_is_seeded():
    images, labels = brightness_task(128)
    config = TrainConfig(
        epochs=3, lr=0.05, schedule="cosine", warmup=0.2, augment="translate"
    )

    def trained():
        model = build_model("lenet5", seed=0, num_classes=2)
        train(model, images, labels, config, seed=4)
        return model

    first, again = trained(), trained()
    assert accuracy(first, images, labels) >= 0.9  # chance: 0.5
    for a, b in zip(
        first.state_dict().values(), again.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b)


def test_dropout_is_seeded_by_the_call_and_the_global_generator_left_alone():
    images, labels = brightness_task(64)
    config = TrainConfig(epochs=1, lr=0.05)

    def trained():
        model = build_model("lenet5-wide", seed=0, num_classes=2)
        train(model, images, labels, config, seed=3)
        return model.state_dict()

    first = trained()
    torch.rand(1000)  # whatever ran before draws from the global generator
    state = torch.random.get_rng_state()
    again = trained()
    assert torch.equal(torch.random.get_rng_state(), state)  # not consumed
    for a, b in zip(first.values(), again.values(), strict=True):
        assert torch.equal(a, b)


def test_a_long_training_call_says_how_far_it_is_and_trains_the_same(
    monkeypatch, caplog
):
    # Prepare: the same call twice; the second says where it is at every step
    images, labels = brightness_task()
    config = TrainConfig(epochs=2, batch_size=16, lr=0.1)
    quiet, chatty = (build_model("lenet5", seed=0) for _ in range(2))
    train(quiet, images, labels, config, seed=1)
    monkeypatch.setattr(trainer, "PROGRESS_EVERY_S", 0.0)
    # Execute
    with caplog.at_level("INFO", logger="flwr.select"):
        train(chatty, images, labels, config, seed=1)
    # Assert: a line before every step, and the same weights
    said = [r.getMessage() for r in caplog.records if "training on" in r.getMessage()]
    assert len(said) == 8 and said[-1].startswith("training on 64 samples: step 7 of 8")
    pairs = zip(quiet.state_dict().values(), chatty.state_dict().values(), strict=True)
    for a, b in pairs:
        assert torch.equal(a, b)
