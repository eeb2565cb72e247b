import numpy as np
import pytest
import torch
from torch import nn

from flwr_select.data import SiteData
from flwr_select.models import build_model
from flwr_select.selection.scores import CONFIDENCE_METRICS, score
from flwr_select.selection.trial import trial_test


def random_site(n=50, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 28, 28), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 10, (n,), generator=g)
    return SiteData(images, labels, 10, ids=torch.arange(n) * 3 + 7)


class BatchRecorder(nn.Module):
    """Wraps a model and records the size and dtype of every batch it sees."""

    def __init__(self, model):
        super().__init__()
        self.model, self.seen = model, []

    def forward(self, x):
        self.seen.append((len(x), x.dtype))
        return self.model(x)


def test_scores_equal_a_direct_computation_and_batching_changes_nothing():
    # Prepare
    site = random_site(50)
    model = build_model("lenet5", seed=1)
    with torch.no_grad():
        logits = model.eval()(site.images)
    # Execute
    small, large = (trial_test(model, site, batch_size=b) for b in (7, 1024))
    # Assert
    assert small.ids.tolist() == site.ids.tolist()
    assert small.predictions.tolist() == logits.argmax(1).tolist()
    for name in CONFIDENCE_METRICS:
        expected = score(name, logits, site.labels).numpy()
        np.testing.assert_allclose(
            small.confidence[name], expected, rtol=1e-5, atol=1e-7
        )
        # the model's float32 arithmetic may round differently per batch size
        np.testing.assert_allclose(
            small.confidence[name], large.confidence[name], rtol=1e-6
        )
    np.testing.assert_array_equal(small.score("correctness"), small.wrong.astype(float))
    assert small.accuracy == pytest.approx(
        float((logits.argmax(1) == site.labels).float().mean())
    )


def test_only_batch_size_images_reach_the_model_at_once_as_uint8():
    recorder = BatchRecorder(build_model("lenet5", seed=0))
    trial_test(recorder, random_site(50), batch_size=16)
    assert recorder.seen == [(16, torch.uint8)] * 3 + [(2, torch.uint8)]


def test_transform_is_applied_per_batch_and_the_mode_is_restored():
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 10))
    model.train()
    seen = []

    def to_unit(x):
        seen.append(x.dtype)
        return x.float() / 255

    trial = trial_test(model, random_site(20), batch_size=8, transform=to_unit)
    assert seen == [torch.uint8] * 3
    assert model.training
    assert len(trial) == 20


def test_empty_site_and_broken_model_are_refused():
    model = build_model("lenet5", seed=0)
    empty = SiteData(
        torch.zeros(0, 28, 28, dtype=torch.uint8), torch.zeros(0, dtype=torch.long), 10
    )
    with pytest.raises(ValueError, match="no samples"):
        trial_test(model, empty)
    with pytest.raises(ValueError, match="batch_size must be >= 1, got 0"):
        trial_test(model, random_site(), batch_size=0)

    class NaNAfterFirstBatch(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.zeros(1))
            self.calls = 0

        def forward(self, x):
            self.calls += 1
            out = torch.zeros(len(x), 10)
            return out if self.calls == 1 else out + float("nan")

    with pytest.raises(ValueError, match="NaN or inf logits"):
        trial_test(NaNAfterFirstBatch(), random_site(20), batch_size=8)


def test_a_model_with_too_few_classes_is_refused():
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 5))
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 5\)"):
        trial_test(model, random_site(), transform=lambda x: x.float())
