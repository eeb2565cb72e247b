"""The server's checkpoint: exact round trip, atomic replacement, refusal to mix runs."""

import functools

import numpy as np
import pytest
import torch

from flwr_select.buffer import TrainingBuffer
from flwr_select.checkpoint import CHECKPOINT, Checkpoint, latest
from flwr_select.data import SiteData
from flwr_select.models import build_model
from flwr_select.protocol import SelectionConfig
from strategies.sample_selection import SampleSelection


def samples(ids) -> SiteData:
    ids = torch.tensor(ids)
    images = (ids[:, None, None] % 256).to(torch.uint8).expand(-1, 28, 28)
    return SiteData(images.contiguous(), ids % 10, 10, ids=ids)


def strategy(run_dir, **selection) -> SampleSelection:
    torch.manual_seed(0)
    return SampleSelection(
        functools.partial(build_model, "lenet5"),
        10,
        selection=SelectionConfig(**selection),
        buffer=TrainingBuffer(10, device="cpu"),
        run_dir=run_dir,
    )


def test_a_checkpoint_comes_back_exactly(tmp_path):
    # Prepare
    buffer = TrainingBuffer(10, device="cpu")
    buffer.add(7, samples([1, 2, 3]))
    buffer.add(9, samples([1]))
    model = build_model("lenet5")
    saved = Checkpoint(
        round=3,
        model_state=model.state_dict(),
        buffer=buffer,
        train_metrics={1: {"samples-received": 4}, 3: {"train-loss": 0.5}},
        records={0: {"accuracy": 0.1}, 3: {"accuracy": 0.9}},
        undelivered={2**63 + 5: [2, 3]},
        config={"rho": 0.05, "dataset": "mnist", "compress": False},
    )
    # Execute
    path = saved.save(tmp_path)
    back = latest(tmp_path, device="cpu")
    # Assert
    assert path == tmp_path / CHECKPOINT
    assert [p.name for p in tmp_path.iterdir()] == [CHECKPOINT]  # no temp file left
    assert back.round == 3 and back.config == saved.config
    assert back.train_metrics == saved.train_metrics and back.records == saved.records
    assert back.undelivered == saved.undelivered
    assert back.model_state.keys() == saved.model_state.keys()
    assert all(
        torch.equal(back.model_state[k], v) for k, v in saved.model_state.items()
    )
    assert torch.equal(back.buffer.images, buffer.images)
    assert back.buffer.sites.tolist() == [7, 7, 7, 9]
    assert back.buffer.add(7, samples([3, 4])) == 1  # the ledger came back too


def test_there_is_nothing_to_resume_in_an_empty_folder(tmp_path):
    assert latest(tmp_path) is None
    assert strategy(tmp_path).resume() is None


def test_resume_restores_the_model_the_buffer_and_the_records(tmp_path):
    # Prepare: a run that checkpointed after round 2
    first = strategy(tmp_path, rho=0.2)
    first.buffer.add(5, samples([10, 11]))
    first.rounds = {1: {"samples-received": 2}}
    first.records = {0: {"accuracy": 0.5}}
    first._finish_round(2, None, None)
    # Execute: a new process builds the same strategy and resumes
    second = strategy(tmp_path, rho=0.2)
    torch.nn.init.zeros_(next(second.model.parameters()))
    # Assert
    assert second.resume() == 2 and second.completed_round == 2
    assert second.rounds == first.rounds and second.records == first.records
    assert second.buffer.ids.tolist() == [10, 11]
    assert second.buffer.seen(5, np.array([10, 12])).tolist() == [True, False]
    assert all(
        torch.equal(a, b)
        for a, b in zip(
            first.model.state_dict().values(),
            second.model.state_dict().values(),
            strict=True,
        )
    )


def test_a_run_with_other_settings_is_refused_not_mixed_in(tmp_path):
    strategy(tmp_path, rho=0.2)._finish_round(0, None, None)
    with pytest.raises(ValueError, match=r"other settings \(rho\)"):
        strategy(tmp_path, rho=0.1).resume()
