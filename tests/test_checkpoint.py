"""The server's checkpoint: exact round trip, append-only segments, refusal to mix runs.

Resuming trusts nothing: each damaged file below was written by a real
``Checkpoint.save`` (or as the release before segments wrote it) and then
truncated, flipped or rewritten with one thing wrong, and ``latest`` must refuse
it with a ``CheckpointError`` naming the file and the problem.
"""

import functools
import hashlib
import io
import itertools
import json
import os
import random
import re
import struct
import subprocess
import sys
import time
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord
from hypothesis import given, settings
from hypothesis import strategies as st

from flwr_select.data import SiteData
from flwr_select.models import build_model
from flwr_select.npy import CHUNK, STORED_OR_DEFLATED, NpyError, read_npz
from flwr_select.selection.allocation import PROBATION_LEVELS
from flwr_select.selection.buffer import TrainingBuffer
from flwr_select.selection.checkpoint import (
    CHECKPOINT,
    STATE_ALLOWANCE,
    Checkpoint,
    CheckpointError,
    latest,
    segment_path,
)
from flwr_select.selection.protocol import SelectionConfig
from strategies.sample_selection import SampleSelection
from tests.hostile import make_strategy
from tests.memory import LIMIT, peak_growth


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


def assert_same(back: Checkpoint, saved: Checkpoint) -> None:
    """Everything equal; the buffer's arrays byte for byte, dtypes included."""
    assert (back.round, back.config, back.undelivered) == (
        saved.round,
        saved.config,
        saved.undelivered,
    )
    assert back.undelivered_top_ups == saved.undelivered_top_ups
    assert back.probation == saved.probation
    assert back.train_metrics == saved.train_metrics and back.records == saved.records
    assert back.model_state.keys() == saved.model_state.keys()
    for name, value in saved.model_state.items():
        assert back.model_state[name].dtype == value.dtype
        assert torch.equal(back.model_state[name], value)
    got, want = back.buffer.to_arrays(), saved.buffer.to_arrays()
    assert got.keys() == want.keys()
    for name, value in want.items():
        assert (got[name].dtype, got[name].shape) == (value.dtype, value.shape)
        assert got[name].tobytes() == value.tobytes()


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
    # Execute: the resuming run's expectations are met
    path = saved.save(tmp_path)
    back = latest(
        tmp_path,
        device="cpu",
        num_classes=10,
        sample_shape=(28, 28),
        model_state=build_model("lenet5").state_dict(),
    )
    # Assert: the manifest and one segment, no temp file left
    assert path == tmp_path / CHECKPOINT
    files = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    assert files == [CHECKPOINT, "segments", "segments/000000.npz"]
    assert_same(back, saved)
    assert back.round == 3 and back.config == saved.config
    assert torch.equal(back.buffer.images, buffer.images)
    assert back.buffer.sites.tolist() == [7, 7, 7, 9]
    assert back.buffer.add(7, samples([3, 4])) == 1  # the ledger came back too


def test_an_empty_buffer_meets_any_sample_shape(tmp_path):
    # Prepare: round 0, nothing uploaded yet
    saved = Checkpoint(0, {}, TrainingBuffer(10, device="cpu"), {}, {0: {}}, {}, {})
    saved.save(tmp_path)
    # Execute
    back = latest(tmp_path, device="cpu", num_classes=10, sample_shape=(1, 28, 28))
    # Assert
    assert_same(back, saved)
    assert back.buffer.images is None and back.buffer.max_samples is None


def test_there_is_nothing_to_resume_in_an_empty_folder(tmp_path):
    assert latest(tmp_path) is None
    assert strategy(tmp_path).resume() is None


def test_resume_restores_the_model_the_buffer_and_the_records(tmp_path):
    # Prepare: a run that checkpointed after round 2
    first = strategy(tmp_path, rho=0.2)
    first.buffer.add(5, samples([10, 11]))
    first.rounds = {1: {"samples-received": 2}}
    first.records = {0: {"accuracy": 0.5}}
    first.probation.caught(7)  # held: a liar does not win trust back by a restart
    first.finish_round(2, None)
    # Execute: a new process builds the same strategy and resumes
    second = strategy(tmp_path, rho=0.2)
    torch.nn.init.zeros_(next(second.model.parameters()))
    # Assert
    assert second.resume() == 2 and second.completed_round == 2
    assert second.rounds == first.rounds and second.records == first.records
    assert second.buffer.ids.tolist() == [10, 11]
    assert second.probation.levels == {7: 0}
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
    strategy(tmp_path, rho=0.2).finish_round(0, None)
    with pytest.raises(ValueError, match=r"other settings \(rho\)"):
        strategy(tmp_path, rho=0.1).resume()


# --- Append-only segments --------------------------------------------------------

ROUNDS = [
    [(0, range(5))],  # round 0: the server's own samples
    [(7, [1, 2, 3]), (9, [1])],
    [],  # a round that accepted nothing
    [(7, [3, 4, 5, 6, 7, 8])],  # 3 again: only 4..8 are new
]


def save_rounds(folder, buffer: TrainingBuffer, rounds, first: int = 0, segments=()):
    """Add each round's uploads and save, as the server does; return the last save."""
    segments = list(segments)
    for number, uploads in enumerate(rounds, start=first):
        for site, ids in uploads:
            buffer.add(site, samples(list(ids)))
        checkpoint = Checkpoint(
            round=number,
            model_state=tiny_model().state_dict(),
            buffer=buffer,
            train_metrics={},
            records={r: {"round": r} for r in range(number + 1)},
            undelivered={},
            config={"rho": 0.05},
            segments=segments,
        )
        checkpoint.save(folder)
        segments = checkpoint.segments
    return checkpoint


def segment_ids(folder) -> list[list[int]]:
    """The ids each segment file in ``folder`` holds, oldest first."""
    paths = sorted((folder / "segments").iterdir())
    return [np.load(path)["ids"].tolist() for path in paths]


@pytest.mark.parametrize("cap", [None, 4])
def test_each_round_writes_only_its_new_samples_and_resumes_exactly(tmp_path, cap):
    # Prepare
    buffer, segments = TrainingBuffer(10, device="cpu", max_samples=cap), []
    for number, uploads in enumerate(ROUNDS):
        # Execute: a round, its checkpoint, a resume
        saved = save_rounds(tmp_path, buffer, [uploads], number, segments)
        segments = saved.segments
        back = latest(tmp_path, device="cpu", num_classes=10, sample_shape=(28, 28))
        # Assert: the buffer, its ledger and the records come back byte for byte
        assert_same(back, saved)
    # Assert: one segment per round that accepted samples, holding only those
    assert segment_ids(tmp_path) == [[0, 1, 2, 3, 4], [1, 2, 3, 1], [4, 5, 6, 7, 8]]
    held = [
        len(np.load(p)["labels"]) for p in sorted((tmp_path / "segments").iterdir())
    ]
    assert held == ([5, 4, 5] if cap is None else [4, 4, 4])  # the cap drops early
    assert back.buffer.add(0, samples([0])) == 0  # dropped, and still in the ledger
    assert back.buffer.add(7, samples([9])) == 1


def test_a_segment_the_manifest_does_not_list_is_ignored_and_written_again(tmp_path):
    # Prepare: round 2's segment is on disk, its manifest is not (a crash between)
    first = save_rounds(tmp_path, TrainingBuffer(10, device="cpu"), ROUNDS[:2])
    after_round_1 = latest(tmp_path, device="cpu")
    manifest = (tmp_path / CHECKPOINT).read_bytes()
    save_rounds(tmp_path, first.buffer, [[(5, [1, 2])]], 2, first.segments)
    (tmp_path / CHECKPOINT).write_bytes(manifest)
    # Execute
    back = latest(tmp_path, device="cpu")
    # Assert: round 1 as it was; the round redone writes its segment over the stray
    assert_same(back, after_round_1)
    assert len(back.buffer) == 9 and back.buffer.add(5, samples([1])) == 1
    again = save_rounds(tmp_path, back.buffer, [[(6, [1])]], 2, back.segments)
    assert_same(latest(tmp_path, device="cpu"), again)
    assert segment_ids(tmp_path)[-1] == [1, 1]  # (5, 1) and (6, 1)


def uploads_of_round(number: int) -> list:
    """Round ``number`` of :func:`write_rounds_forever`: 300 new samples of one site."""
    return [(number % 3, range(300 * number, 300 * (number + 1)))]


def write_rounds_forever(folder: str) -> None:
    """Checkpoint round after round into ``folder``, saying when round 0 is saved."""
    buffer, segments = TrainingBuffer(10, device="cpu"), []
    for number in itertools.count():
        saved = save_rounds(
            Path(folder), buffer, [uploads_of_round(number)], number, segments
        )
        segments = saved.segments
        if number == 0:
            print("saved", flush=True)


@pytest.mark.parametrize("seed", range(3))
def test_a_server_killed_while_it_checkpoints_loses_nothing_saved_before(
    tmp_path, seed
):
    # Prepare: a process that checkpoints round after round, SIGKILLed at random
    code = "import sys; from tests.test_checkpoint import write_rounds_forever as w; w(sys.argv[1])"
    writer = subprocess.Popen(
        [sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True
    )
    assert writer.stdout.readline() == "saved\n"
    time.sleep(random.Random(seed).uniform(0.05, 0.5))
    writer.kill()
    writer.wait()
    # Execute
    back = latest(tmp_path, device="cpu")
    # Assert: the last round whose manifest landed, exactly as it was written
    rounds = [uploads_of_round(r) for r in range(back.round + 1)]
    expected = save_rounds(tmp_path / "again", TrainingBuffer(10, device="cpu"), rounds)
    assert_same(back, expected)
    assert len(back.buffer) == 300 * (back.round + 1)
    # Assert: the run goes on from there, the killed round redone
    going_on = save_rounds(
        tmp_path, back.buffer, [[(1, [10**6])]], back.round + 1, back.segments
    )
    assert_same(latest(tmp_path, device="cpu"), going_on)


# --- Damaged checkpoints ---------------------------------------------------------

BIG_SITE = 2**63 + 5


def tiny_model() -> torch.nn.Module:
    """Float weights and an int64 counter (BatchNorm's), in a small file."""
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.BatchNorm2d(2))


def small_checkpoint() -> Checkpoint:
    # 5 samples under a cap of 4: (7, 1) is dropped, yet stays in site 7's ledger
    buffer = TrainingBuffer(10, device="cpu", max_samples=4)
    buffer.add(7, samples([1, 2, 3]))
    buffer.add(BIG_SITE, samples([1, 2]))
    return Checkpoint(
        round=3,
        model_state=tiny_model().state_dict(),
        buffer=buffer,
        train_metrics={1: {"samples-received": 5}, 3: {"train-loss": 0.5}},
        records={0: {"accuracy": 0.1}, 3: {"accuracy": 0.9}},
        undelivered={BIG_SITE: [2, 3], 4: []},
        config={"rho": 0.05, "dataset": "mnist"},
        undelivered_top_ups={4: [1, 3]},
        probation={4: 1},
    )


def save_as_before_segments(checkpoint: Checkpoint, folder) -> Path:
    """Write ``checkpoint`` as the release before segments did: all in one file."""
    fields = {
        "round": checkpoint.round,
        "config": checkpoint.config,
        "train_metrics": checkpoint.train_metrics,
        "records": checkpoint.records,
        "undelivered": checkpoint.undelivered,
        "undelivered_top_ups": checkpoint.undelivered_top_ups,
    }
    path = folder / CHECKPOINT
    np.savez(
        path,
        state=np.frombuffer(json.dumps(fields).encode(), np.uint8),
        **{f"buffer/{k}": v for k, v in checkpoint.buffer.to_arrays().items()},
        **{f"model/{k}": v.numpy() for k, v in checkpoint.model_state.items()},
    )
    return path


@pytest.fixture
def saved(tmp_path):
    """A checkpoint in the one-file form, so that each buffer array can be damaged."""
    checkpoint = small_checkpoint()
    return checkpoint, save_as_before_segments(checkpoint, tmp_path)


def test_a_checkpoint_of_the_release_before_segments_resumes_and_goes_on(saved):
    # Prepare
    checkpoint, path = saved
    # Execute
    back = latest(path.parent, device="cpu")
    back.buffer.add(3, samples([9]))
    back.round = 4
    back.save(path.parent)
    # Assert: as it was, then the next save wrote it all as the first segment
    assert len(latest(path.parent, device="cpu").segments) == 1
    assert_same(latest(path.parent, device="cpu"), back)
    assert segment_ids(path.parent) == [[1, 2, 3, 1, 2, 9]]  # (7, 1) dropped first
    assert back.buffer.add(7, samples([1])) == 0 and len(back.buffer) == 4


def refused(path, **expected) -> str:
    """Assert ``latest`` refuses the file at ``path``; return the message."""
    with pytest.raises(CheckpointError) as info:
        latest(path.parent, device="cpu", **expected)
    message = str(info.value)
    assert message.startswith(f"{path} is corrupt or does not belong to this run: ")
    return message


def rewrite(path, edit) -> None:
    """Rewrite the checkpoint at ``path`` with ``edit(arrays)`` applied to its arrays."""
    with np.load(path) as data:
        arrays = dict(data)
    edit(arrays)
    np.savez(path, **arrays)


def put(name, value):
    return lambda arrays: arrays.__setitem__(name, value)


def drop(name):
    return lambda arrays: arrays.pop(name)


def change(name, fn):
    return lambda arrays: arrays.__setitem__(name, fn(arrays[name].copy()))


def at(index, value):
    def edit(array):
        array[index] = value
        return array

    return edit


def state(fn):
    """Edit the JSON state's fields with ``fn(fields)``."""

    def edit(arrays):
        fields = json.loads(arrays["state"].tobytes())
        fn(fields)
        arrays["state"] = np.frombuffer(json.dumps(fields).encode(), np.uint8)

    return edit


def field(name, value):
    return state(lambda fields: fields.__setitem__(name, value))


def raw_state(text: bytes):
    return put("state", np.frombuffer(text, np.uint8))


MAX_NODE_ID = str(2**64 - 1)

DAMAGE = {
    # the zip's members
    "unknown member": (put("extra", np.zeros(1)), r"unexpected member 'extra.npy'"),
    "unknown buffer member": (
        put("buffer/extra", np.zeros(1, np.int64)),
        r"unexpected member 'buffer/extra.npy'",
    ),
    "missing state": (drop("state"), r"lacks the arrays \['state'\]"),
    "missing labels": (
        drop("buffer/labels"),
        r"buffer arrays \['labels'\] are missing",
    ),
    "float images": (
        change("buffer/images", lambda a: a.astype(np.float32)),
        r"array 'buffer/images': dtype <f4 is not allowed \(allowed: uint8\)",
    ),
    "bool model array": (
        change("model/0.weight", lambda a: a > 0),
        r"array 'model/0.weight': dtype \|b1 is not allowed",
    ),
    "state of int8": (
        change("state", lambda a: a.astype(np.int8)),
        r"array 'state': dtype \|i1 is not allowed \(allowed: uint8\)",
    ),
    # the buffer
    "label out of range": (
        change("buffer/labels", at(0, 10)),
        r"'labels' holds 10, outside \[0, 10\)",
    ),
    "negative label": (
        change("buffer/labels", at(2, -1)),
        r"'labels' holds -1, outside \[0, 10\)",
    ),
    "labels shorter than images": (
        change("buffer/labels", lambda a: a[:-1]),
        r"'labels' holds 3 values; expected 4, one per image",
    ),
    "labels but no images": (
        drop("buffer/images"),
        r"'labels' holds 4 values; expected 0, one per image",
    ),
    "sites shorter": (
        change("buffer/sites", lambda a: a[1:]),
        r"'sites' holds 3 values; expected 4",
    ),
    "images of 2 dimensions": (
        change("buffer/images", lambda a: a[0]),
        r"'images' is uint8 of shape \(28, 28\); expected uint8 with 3 or 4 dim",
    ),
    "labels of 2 dimensions": (
        change("buffer/labels", lambda a: a[:, None]),
        r"'labels' is int64 of shape \(4, 1\); expected int64 with 1 dim",
    ),
    "one class": (
        put("buffer/num_classes", np.array(1)),
        r"'num_classes' is 1; expected an int >= 2",
    ),
    "num_classes an array": (
        put("buffer/num_classes", np.array([10])),
        r"'num_classes' is int64 of shape \(1,\); expected int64 with 0 dim",
    ),
    "a cap of 0": (
        put("buffer/max_samples", np.array(0)),
        r"'max_samples' is 0; expected -1 \(no cap\) or >= 1",
    ),
    "over the cap": (
        put("buffer/max_samples", np.array(2)),
        r"holds 4 samples, over its 'max_samples' 2",
    ),
    "negative id": (
        change("buffer/ids", at(0, -1)),
        r"'ids' holds -1; expected ids >= 0",
    ),
    "sample not in its ledger": (
        change("buffer/accepted_0", lambda a: a[:-1]),
        r"sample \(site 7, id 3\) is missing from its site's ledger 'accepted_0'",
    ),
    "unsorted ledger": (
        change("buffer/accepted_0", lambda a: a[::-1]),
        r"'accepted_0' is not a ledger",
    ),
    "site twice in accepted_sites": (
        change("buffer/accepted_sites", at(1, 7)),
        r"'accepted_sites' is not strictly increasing",
    ),
    "site without a ledger": (
        change("buffer/sites", at(0, 5)),
        r"'sites' holds 5, which has no ledger",
    ),
    "missing ledger": (
        drop("buffer/accepted_1"),
        r"buffer arrays \['accepted_1'\] \(ledgers\) are missing",
    ),
    "extra ledger": (
        put("buffer/accepted_2", np.zeros(0, np.int64)),
        r"unexpected buffer arrays \['accepted_2'\]",
    ),
    # the JSON state
    "state not JSON": (raw_state(b"not json"), r"'state' is not JSON"),
    "state not UTF-8": (raw_state(b'{"round": "\xff"}'), r"'state' is not JSON"),
    "state 2-D": (
        change("state", lambda a: a[None]),
        r"'state' has shape \(1, \d+\); expected 1-D",
    ),
    "state a list": (raw_state(b"[]"), r"'state' holds list; expected \['config'"),
    "state lacks round": (
        state(lambda fields: fields.pop("round")),
        r"'state' holds \['config', 'probation', 'records', 'segments', "
        r"'train_metrics', 'undelivered', 'undelivered_top_ups'\]",
    ),
    "state has an extra field": (
        field("extra", 1),
        r"'state' holds \['config', 'extra',",
    ),
    "round -1": (field("round", -1), r"'round' is -1; expected an int >= 0"),
    "round 2.5": (field("round", 2.5), r"'round' is 2.5; expected an int >= 0"),
    "round true": (field("round", True), r"'round' is True; expected an int >= 0"),
    "round a string": (field("round", "3"), r"'round' is '3'; expected an int >= 0"),
    "config a list": (field("config", []), r"'config' is \[\]; expected a dict"),
    "metrics after the round": (
        field("round", 1),
        r"'train_metrics' has the key '3'; expected an int in \[0, 1\]",
    ),
    "records after the round": (
        field("records", {"4": {}}),
        r"'records' has the key '4'; expected an int in \[0, 3\]",
    ),
    "metrics key negative": (
        field("train_metrics", {"-1": {}}),
        r"'train_metrics' has the key '-1'; expected an int in \[0, 3\]",
    ),
    "metrics key not canonical": (
        field("train_metrics", {"01": {}}),
        r"'train_metrics' has the key '01'",
    ),
    "metrics a list": (field("train_metrics", []), r"'train_metrics' is \[\]"),
    "record not a dict": (
        field("records", {"0": 0.5}),
        r"'records' holds 0.5 at '0'; expected a dict",
    ),
    "node id negative": (
        field("undelivered", {"-5": [1]}),
        rf"'undelivered' has the key '-5'; expected an int in \[0, {MAX_NODE_ID}\]",
    ),
    "node id beyond uint64": (
        field("undelivered", {str(2**64): [1]}),
        r"'undelivered' has the key '18446744073709551616'",
    ),
    "node id of 5000 digits": (
        field("undelivered", {"9" * 5000: [1]}),
        r"'undelivered' has the key '9999",
    ),
    "undelivered round 0": (
        field("undelivered", {"4": [0]}),
        r"'undelivered' holds \[0\] at '4'; expected a list of rounds \(ints in \[1, 3\]\)",
    ),
    "undelivered after the round": (
        field("undelivered", {"4": [4]}),
        r"'undelivered' holds \[4\] at '4'",
    ),
    "undelivered round true": (
        field("undelivered", {"4": [True]}),
        r"'undelivered' holds \[True\] at '4'",
    ),
    "top-up undelivered after the round": (
        field("undelivered_top_ups", {"4": [4]}),
        r"'undelivered_top_ups' holds \[4\] at '4'",
    ),
    "undelivered not a list": (
        field("undelivered", {"4": 2}),
        r"'undelivered' holds 2 at '4'",
    ),
    "a probation level beyond the last": (
        field("probation", {"4": PROBATION_LEVELS}),
        rf"'probation' holds {PROBATION_LEVELS} at '4'; expected a level",
    ),
    "a probation level that is not an int": (
        field("probation", {"4": 1.5}),
        r"'probation' holds 1.5 at '4'",
    ),
}


@pytest.mark.parametrize("edit, problem", DAMAGE.values(), ids=DAMAGE.keys())
def test_a_checkpoint_with_one_thing_wrong_is_refused_naming_it(saved, edit, problem):
    # Prepare
    _, path = saved
    rewrite(path, edit)
    # Execute / Assert
    assert re.search(problem, refused(path))


def test_a_checkpoint_of_the_release_before_top_ups_still_resumes(saved):
    # Prepare: the state as written before a global round had a top-up pass
    checkpoint, path = saved
    rewrite(path, state(lambda fields: fields.pop("undelivered_top_ups")))
    # Execute
    back = latest(path.parent, device="cpu")
    # Assert: no top-up was undelivered; everything else as saved
    assert back.undelivered_top_ups == {}
    assert back.undelivered == checkpoint.undelivered and len(back.buffer) == 4


@pytest.fixture
def segmented(tmp_path):
    """Rounds 0 and 1 saved: segments 0 (site 0, ids 0..4) and 1 (sites 7, 9)."""
    return save_rounds(tmp_path, TrainingBuffer(10, device="cpu"), ROUNDS[:2])


def resegment(folder, index, edit) -> None:
    """Rewrite segment ``index`` with ``edit(arrays)`` and relist its new digest."""
    path = segment_path(folder, index)
    with np.load(path) as data:
        arrays = dict(data)
    edit(arrays)
    np.savez(path, **arrays)
    relist(folder, index, path.read_bytes())


def relist(folder, index, content: bytes) -> None:
    """List segment ``index`` in the manifest as ``content``'s size and digest."""
    digest = {"bytes": len(content), "sha256": hashlib.sha256(content).hexdigest()}
    rewrite(
        folder / CHECKPOINT, state(lambda f: f["segments"].__setitem__(index, digest))
    )


SEGMENT_DAMAGE = {
    "label out of range": (
        change("labels", at(0, 10)),
        r"'labels' holds 10, outside \[0, 10\)",
    ),
    "more labels than ids": (
        change("labels", lambda a: np.append(a, 1)),
        r"segment 1: 4 sites, 4 ids and 5 labels: expected one site per id",
    ),
    "labels but no images": (drop("images"), r"segment 1: 4 labels but no images"),
    "images of another shape": (
        change("images", lambda a: a[:, :27]),
        r"the segments hold images of shapes \[\(27, 28\), \(28, 28\)\]",
    ),
    "float images": (
        change("images", lambda a: a.astype(np.float32)),
        r"000001.npz: array 'images': dtype <f4 is not allowed",
    ),
    "unknown array": (put("extra", np.zeros(1)), r"unexpected member 'extra.npy'"),
    "missing ids": (drop("ids"), r"segment 1: arrays \['ids'\] are missing"),
    "sites shorter than ids": (
        change("sites", lambda a: a[1:]),
        r"segment 1: 3 sites, 4 ids and 4 labels",
    ),
    "a pair accepted twice": (
        lambda a: [change("sites", at(0, 0))(a), change("ids", at(0, 4))(a)],
        r"the segments accept \(site 0, id 4\) twice",
    ),
    "negative id": (change("ids", at(3, -1)), r"'ids' holds -1; expected ids >= 0"),
}


@pytest.mark.parametrize("edit, problem", SEGMENT_DAMAGE.values(), ids=SEGMENT_DAMAGE)
def test_a_segment_with_one_thing_wrong_is_refused_naming_it(
    tmp_path, segmented, edit, problem
):
    # Prepare: segment 1 rewritten, and listed with its new digest
    resegment(tmp_path, 1, edit)
    # Execute / Assert
    assert re.search(problem, refused(tmp_path / CHECKPOINT))


def cut(path):
    path.write_bytes(path.read_bytes()[:-10])


def flip(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 1
    path.write_bytes(data)


def swap(path):
    other = path.with_name("000000.npz")
    first, second = other.read_bytes(), path.read_bytes()
    other.write_bytes(second)
    path.write_bytes(first)


FILE_DAMAGE = {
    "missing": (Path.unlink, r"segment \S+/segments/000001.npz cannot be read"),
    "cut short": (cut, r"000001.npz holds \d+ bytes that are not the segment the"),
    "a flipped bit": (flip, r"manifest lists \(\d+ bytes, sha256 [0-9a-f]{12}\.\.\.\)"),
    "swapped with another": (swap, r"000000.npz holds \d+ bytes that are not"),
}


@pytest.mark.parametrize("damage, problem", FILE_DAMAGE.values(), ids=FILE_DAMAGE)
def test_a_segment_file_not_as_written_is_refused(tmp_path, segmented, damage, problem):
    # Prepare
    damage(segment_path(tmp_path, 1))
    # Execute / Assert
    assert re.search(problem, refused(tmp_path / CHECKPOINT))


MANIFEST_DAMAGE = {
    "segments not a list": (
        field("segments", {}),
        r"'segments' is \{\}; expected a list",
    ),
    "a digest of 63 digits": (
        state(lambda f: f["segments"][1].__setitem__("sha256", "a" * 63)),
        r"'segments' holds \{'bytes': \d+, 'sha256': 'aaa.* at 1; expected \{'bytes'",
    ),
    "negative bytes": (
        state(lambda f: f["segments"][0].__setitem__("bytes", -1)),
        r"'segments' holds \{'bytes': -1, .* at 0",
    ),
    "an extra key": (
        state(lambda f: f["segments"][0].__setitem__("path", "/etc/passwd")),
        r"'segments' holds \{'bytes': \d+, 'sha256': .* at 0; expected",
    ),
    "buffer arrays beside segments": (
        put("buffer/labels", np.zeros(9, np.int64)),
        r"holds the buffer arrays \['labels', 'max_samples', 'num_classes'\]; one "
        r"that lists segments holds \['max_samples', 'num_classes'\]",
    ),
}


@pytest.mark.parametrize("edit, problem", MANIFEST_DAMAGE.values(), ids=MANIFEST_DAMAGE)
def test_a_manifest_listing_segments_wrongly_is_refused(
    tmp_path, segmented, edit, problem
):
    # Prepare
    rewrite(tmp_path / CHECKPOINT, edit)
    # Execute / Assert
    assert re.search(problem, refused(tmp_path / CHECKPOINT))


@pytest.mark.parametrize("keep", [0, 1, 30, 0.5, -100, -22, -1])
def test_a_truncated_checkpoint_is_refused(saved, keep):
    # Prepare: keep the first bytes (a fraction of them, or all but some)
    _, path = saved
    data = path.read_bytes()
    path.write_bytes(data[: int(keep * len(data)) if isinstance(keep, float) else keep])
    # Execute / Assert
    assert "is not a readable .npz file" in refused(path)


def test_a_flipped_byte_is_caught_by_the_crc(saved):
    # Prepare: flip one pixel inside the stored images
    _, path = saved
    data = bytearray(path.read_bytes())
    offset = zipfile.ZipFile(path).getinfo("buffer/images.npy").header_offset
    name, extra = struct.unpack("<HH", data[offset + 26 : offset + 30])
    data[offset + 30 + name + extra + 500] ^= 0xFF
    path.write_bytes(data)
    # Execute / Assert
    assert re.search(r"Bad CRC-32 for file 'buffer/images.npy'", refused(path))


def test_a_checkpoint_of_another_run_is_refused(saved):
    # Prepare
    _, path = saved
    wider = torch.nn.Sequential(torch.nn.Conv2d(1, 3, 3), torch.nn.BatchNorm2d(3))
    # Execute / Assert
    assert "has 10 classes; this run has 100" in refused(path, num_classes=100)
    assert re.search(
        r"images are of shape \(28, 28\); this run's are \(1, 28, 28\)",
        refused(path, sample_shape=(1, 28, 28)),
    )
    assert re.search(
        r"missing \[.*'standardize.mean'.*\], unexpected \['0.bias', '0.weight'",
        refused(path, model_state=build_model("lenet5").state_dict()),
    )
    assert re.search(
        r"'model/0.weight' is torch.float32 of shape \(2, 1, 3, 3\); this run's "
        r"model has torch.float32 of shape \(3, 1, 3, 3\)",
        refused(path, model_state=wider.state_dict()),
    )
    assert re.search(
        r"'model/0.weight' is torch.float32 .* has torch.float64",
        refused(path, model_state=tiny_model().double().state_dict()),
    )
    # and the right expectations pass
    assert latest(
        path.parent,
        device="cpu",
        num_classes=10,
        sample_shape=[28, 28],
        model_state=tiny_model().state_dict(),
    )


def expected_of(checkpoint: Checkpoint) -> dict:
    """What the run that wrote ``checkpoint`` expects when it resumes."""
    return {
        "num_classes": checkpoint.buffer.num_classes,
        "sample_shape": checkpoint.buffer.image_shape,
        "model_state": tiny_model().state_dict(),
    }


def test_model_arrays_hidden_by_a_damaged_zip_directory_are_refused(saved):
    # Prepare: a huge comment length in the images' directory entry makes zipfile
    # read the model's entries after it as that comment: they vanish silently
    checkpoint, path = saved
    data = bytearray(path.read_bytes())
    entry = data.rindex(b"buffer/images.npy") - 46  # its name ends the entry's header
    assert data[entry : entry + 4] == b"PK\x01\x02"
    data[entry + 32 : entry + 34] = b"\xff\xff"  # the entry's comment length
    path.write_bytes(data)
    # Execute / Assert: refused for the comment, even without the model's state
    assert "the zip holds comments" in refused(path)


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """A checkpoint as saved: its manifest and its one segment, with their bytes."""
    checkpoint = small_checkpoint()
    manifest = checkpoint.save(tmp_path_factory.mktemp("pristine"))
    files = (manifest, segment_path(manifest.parent, 0))
    return checkpoint, {path: path.read_bytes() for path in files}


@settings(max_examples=100, deadline=None)
@given(data=st.data())
def test_a_damaged_checkpoint_comes_back_whole_or_is_refused(pristine, data):
    # Prepare: a few bytes of the manifest or the segment overwritten, maybe the
    # file cut short
    checkpoint, files = pristine
    for path, original in files.items():
        path.write_bytes(original)
    path = data.draw(st.sampled_from(sorted(files)))
    original = files[path]
    damaged = bytearray(original)
    positions = st.integers(0, len(original) - 1)
    for position, value in data.draw(
        st.lists(st.tuples(positions, st.integers(0, 255)), max_size=3)
    ):
        damaged[position] = value
    cut = data.draw(st.none() | positions)
    path.write_bytes(damaged[:cut])
    # Execute: as a resuming run calls it, expecting its own model and data
    manifest = (
        path.parent / CHECKPOINT
        if path.name == CHECKPOINT
        else path.parent.parent / CHECKPOINT
    )
    try:
        back = latest(manifest.parent, device="cpu", **expected_of(checkpoint))
    except CheckpointError as err:
        # Assert: refused, naming the file
        assert str(path) in str(err) or str(manifest) in str(err)
    else:
        # Assert: or it is the checkpoint that was written
        assert_same(back, checkpoint)


def test_a_run_on_a_damaged_checkpoint_starts_nothing(tmp_path):
    # Prepare: a strategy checkpoints its round 0; then the file loses its tail
    first = make_strategy(run_dir=tmp_path)
    first.finish_round(0, None)
    path = tmp_path / "checkpoint.npz"
    path.write_bytes(path.read_bytes()[:-100])
    damaged = path.read_bytes()
    # Execute: a new run in that folder (no grid: it must not get that far)
    again = make_strategy(run_dir=tmp_path)
    with pytest.raises(CheckpointError, match=f"{path.absolute()} is corrupt"):
        again.start(None, ArrayRecord(again.model.state_dict()), num_rounds=2)
    # Assert: the file is as it was, nothing was loaded or written
    assert path.read_bytes() == damaged and again.completed_round is None


# --- A hostile run folder --------------------------------------------------------
# Whoever can write the run folder may leave anything there for the next resume:
# links, FIFOs, zip bombs, a model of NaN. Each is refused with a CheckpointError
# naming the file; the bombs and the endless file are read in a fresh Python
# whose peak memory must grow by less than tests.memory.LIMIT.

CAPPED = """
import resource
from flwr_select.selection.checkpoint import latest
from tests.test_checkpoint import tiny_model
# A regression must fail the test, not exhaust the shared machine: the address
# space may grow by 1 GiB past what the imports took.
with open("/proc/self/status") as status:
    used = next(int(line.split()[1]) for line in status if line.startswith("VmSize:"))
hard = resource.getrlimit(resource.RLIMIT_AS)[1]
resource.setrlimit(resource.RLIMIT_AS, (used * 1024 + 2**30, hard))
"""


def resume_measured(folder, *, model: bool = False, timeout: float = 300):
    """Resume from ``folder`` in a fresh Python; return what it raised, peak growth.

    ``model``: the resuming run names its model (:func:`tiny_model`), which
    bounds the manifest's size. A resume that hangs fails on ``timeout``.
    """
    expected = ", model_state=tiny_model().state_dict()" if model else ""
    return peak_growth(
        CAPPED, f"latest({str(folder)!r}, device='cpu'{expected})", timeout
    )


def refused_in_child(raised: str, folder, problem: str) -> None:
    """Assert ``raised`` is a CheckpointError of ``folder`` naming ``problem``."""
    manifest = folder / CHECKPOINT
    prefix = f"CheckpointError: {manifest} is corrupt or does not belong to this run: "
    assert raised.startswith(prefix), raised
    assert re.search(problem, raised), raised


def test_a_segment_linked_to_dev_zero_is_refused_unread(tmp_path, segmented):
    # Prepare: segment 1 a link to /dev/zero, listed as its stat size says: 0 bytes
    path = segment_path(tmp_path, 1)
    relist(tmp_path, 1, b"")
    path.unlink()
    path.symlink_to("/dev/zero")
    # Execute
    raised, growth = resume_measured(tmp_path)
    # Assert
    refused_in_child(
        raised, tmp_path, re.escape(f"{path} is a symbolic link, not a regular")
    )
    assert growth < LIMIT, f"{growth / 2**20:.0f} MiB"


@pytest.mark.parametrize("name", ["segments/000001.npz", CHECKPOINT])
def test_a_fifo_in_the_run_folder_is_refused_without_waiting(tmp_path, segmented, name):
    # Prepare: a FIFO no one writes to; as a segment, listed as 0 bytes
    path = tmp_path / name
    if name != CHECKPOINT:
        relist(tmp_path, 1, b"")
    path.unlink()
    os.mkfifo(path)
    # Execute: in a child, so that a resume waiting for a writer times out
    raised, _ = resume_measured(tmp_path, timeout=120)
    # Assert
    refused_in_child(
        raised, tmp_path, re.escape(f"{path} is a FIFO, not a regular file")
    )


def link_to_a_copy(path):
    """Replace ``path`` by a link to a copy of it: the same bytes, not the file."""
    copy = path.with_name(f"{path.name}.copy")
    copy.write_bytes(path.read_bytes())
    path.unlink()
    path.symlink_to(copy)


def a_folder(path):
    path.unlink()
    path.mkdir()


NOT_REGULAR = {
    "manifest a link": (CHECKPOINT, link_to_a_copy, "a symbolic link"),
    "segment a link": ("segments/000001.npz", link_to_a_copy, "a symbolic link"),
    "manifest a folder": (CHECKPOINT, a_folder, "a folder"),
    "segment a folder": ("segments/000001.npz", a_folder, "a folder"),
}


@pytest.mark.parametrize("name, replace, kind", NOT_REGULAR.values(), ids=NOT_REGULAR)
def test_a_run_folder_entry_that_is_not_a_regular_file_is_refused(
    tmp_path, segmented, name, replace, kind
):
    # Prepare
    path = tmp_path / name
    replace(path)
    # Execute / Assert
    assert f"{path} is {kind}, not a regular file" in refused(tmp_path / CHECKPOINT)


BOMB_BYTES = 2**28
"""What a bomb member declares: 256 MiB of zeros (4x the limit), in a few KB."""


def write_bomb(path, member: str, others: dict[str, bytes]) -> None:
    """Write a zip at ``path``: ``member``, a ``.npy`` of BOMB_BYTES uint8 zeros
    compressed with bzip2, then ``others`` stored as np.savez stores them."""
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        header, {"descr": "|u1", "fortran_order": False, "shape": (BOMB_BYTES,)}
    )
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_BZIP2) as archive:
        with archive.open(member, "w") as file:
            file.write(header.getvalue())
            for _ in range(BOMB_BYTES // CHUNK):
                file.write(bytes(CHUNK))
        for name, data in others.items():
            archive.writestr(name, data, compress_type=zipfile.ZIP_STORED)


def members_of(path) -> dict[str, bytes]:
    with zipfile.ZipFile(path) as archive:
        return {name: archive.read(name) for name in archive.namelist()}


@pytest.mark.parametrize(
    "name, member", [("segments/000001.npz", "images.npy"), (CHECKPOINT, "state.npy")]
)
def test_a_bzip2_bomb_is_refused_before_it_inflates(tmp_path, segmented, name, member):
    # Prepare: the member replaced by a bomb, the others kept; a segment is listed
    # with the bomb's own size and digest, so only its compression gives it away
    path = tmp_path / name
    write_bomb(path, member, {k: v for k, v in members_of(path).items() if k != member})
    if name != CHECKPOINT:
        relist(tmp_path, 1, path.read_bytes())
    assert path.stat().st_size < 100_000
    # Execute
    raised, growth = resume_measured(tmp_path)
    # Assert
    refused_in_child(
        raised,
        tmp_path,
        rf"{path}: member '{member}' is compressed with bzip2; only stored members",
    )
    assert growth < LIMIT, f"{growth / 2**20:.0f} MiB"


def recompress(path, method) -> None:
    """Rewrite the zip at ``path`` with every member compressed by ``method``."""
    members = members_of(path)
    with zipfile.ZipFile(path, "w", compression=method) as archive:
        for name, data in members.items():
            archive.writestr(name, data)


@pytest.mark.parametrize("name", ["segments/000001.npz", CHECKPOINT])
@pytest.mark.parametrize(
    "method, shown", [(zipfile.ZIP_DEFLATED, "deflate"), (zipfile.ZIP_LZMA, "lzma")]
)
def test_a_checkpoint_file_compressed_otherwise_is_refused(
    tmp_path, segmented, name, method, shown
):
    # Prepare: the same arrays, compressed (a segment relisted as it now is)
    path = tmp_path / name
    recompress(path, method)
    if name != CHECKPOINT:
        relist(tmp_path, 1, path.read_bytes())
    # Execute / Assert
    assert re.search(
        rf"{path}: member '\S+' is compressed with {shown}; only stored members are",
        refused(tmp_path / CHECKPOINT),
    )


def test_a_stored_member_of_another_size_than_it_holds_is_refused(tmp_path, segmented):
    # Prepare: the directory says 'ids.npy' takes one byte more than it holds
    path = segment_path(tmp_path, 1)
    data = bytearray(path.read_bytes())
    entry = data.rindex(b"ids.npy") - 46  # its name ends the entry's header
    assert data[entry : entry + 4] == b"PK\x01\x02"
    (size,) = struct.unpack("<L", data[entry + 20 : entry + 24])
    data[entry + 20 : entry + 24] = struct.pack("<L", size + 1)
    path.write_bytes(data)
    relist(tmp_path, 1, bytes(data))
    # Execute / Assert
    assert re.search(
        rf"{path}: member 'ids.npy' is stored in {size + 1} bytes but says it "
        rf"holds {size}",
        refused(tmp_path / CHECKPOINT),
    )


def write_stored_zip(path, names, head: bytes, zeros: int) -> None:
    """Write a zip whose members ``names`` all hold one stored body: ``head`` and
    ``zeros`` zero bytes, a hole in the file (sparse: its size, not its disk).

    Each local header but the last has an extra field spanning the headers after
    it, so that every member's bytes start at the one body.
    """
    size = len(head) + zeros
    crc = zlib.crc32(head)
    for _ in range(zeros // CHUNK):
        crc = zlib.crc32(bytes(CHUNK), crc)
    encoded = [name.encode() for name in names]
    headers = [30 + len(name) for name in encoded]
    offsets = list(itertools.accumulate(headers, initial=0))
    with open(path, "wb") as file:
        for index, name in enumerate(encoded):
            following = offsets[-1] - offsets[index + 1]
            fixed = (20, 0, 0, 0, 33, crc, size, size, len(name), following)
            file.write(struct.pack("<4s5H3L2H", b"PK\x03\x04", *fixed) + name)
        file.write(head)
        file.truncate(file.tell() + zeros)
        file.seek(0, os.SEEK_END)
        directory = b"".join(
            struct.pack(
                "<4s6H3L5H2L",
                *(b"PK\x01\x02", 20, 20, 0, 0, 0, 33, crc, size, size, len(name)),
                *(0, 0, 0, 0, 0, offset),
            )
            + name
            for name, offset in zip(encoded, offsets[:-1], strict=True)
        )
        end = file.tell()
        file.write(directory)
        count = len(encoded)
        file.write(
            struct.pack(
                "<4s4H2LH", b"PK\x05\x06", 0, 0, count, count, len(directory), end, 0
            )
        )


def npy_header(descr: str, count: int) -> bytes:
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        header, {"descr": descr, "fortran_order": False, "shape": (count,)}
    )
    return header.getvalue()


def test_model_arrays_sharing_one_body_are_refused_unread(tmp_path, segmented):
    # Prepare: 64 model arrays, all the same 8 MiB of float32 zeros: 512 MiB read
    # from an 8 MiB file
    path = tmp_path / CHECKPOINT
    names = [f"model/{index}.weight.npy" for index in range(64)]
    write_stored_zip(path, names, npy_header("<f4", 2**21), 2**23)
    assert np.load(path)["model/63.weight"].shape == (2**21,)  # a valid zip
    # Execute
    raised, growth = resume_measured(tmp_path)
    # Assert
    refused_in_child(
        raised, tmp_path, r"members 'model/0.weight.npy' and 'model/1.weight.npy' share"
    )
    assert growth < LIMIT, f"{growth / 2**20:.0f} MiB"


def test_a_manifest_larger_than_the_run_can_hold_is_refused_unread(tmp_path, segmented):
    # Prepare: a 'state' of 320 MiB, stored (so every byte is in the file), more
    # than the resuming model and STATE_ALLOWANCE (256 MiB) take
    path = tmp_path / CHECKPOINT
    write_stored_zip(path, ["state.npy"], npy_header("|u1", 320 * 2**20), 320 * 2**20)
    # Execute
    raised, growth = resume_measured(tmp_path, model=True)
    # Assert
    refused_in_child(
        raised,
        tmp_path,
        rf"it holds {path.stat().st_size} bytes, more than this run's model "
        rf"\(\d+ bytes\) and its state \({STATE_ALLOWANCE} bytes\) can take",
    )
    assert growth < LIMIT, f"{growth / 2**20:.0f} MiB"


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_a_model_that_is_not_finite_is_refused(saved, value):
    # Prepare: one weight of the stored model
    _, path = saved
    rewrite(path, change("model/0.weight", at((1, 0, 2, 2), value)))
    # Execute / Assert
    assert re.search(
        r"model array 'model/0.weight' holds 1 NaN or infinite values; a model that "
        "resumes must be finite",
        refused(path, model_state=tiny_model().state_dict()),
    )


def test_the_strict_reader_takes_deflate_only_where_asked(tmp_path):
    # Prepare: a site's data.npz as np.savez_compressed writes it
    path = tmp_path / "data.npz"
    images = np.arange(4 * 28 * 28, dtype=np.uint8).reshape(4, 28, 28)
    np.savez_compressed(path, images=images)
    allowed = {"images": [np.dtype(np.uint8)]}
    # Execute / Assert: refused by default, read when deflate is allowed
    with pytest.raises(NpyError, match="'images.npy' is compressed with deflate"):
        read_npz(path, allowed)
    back = read_npz(path, allowed, compressions=STORED_OR_DEFLATED)
    assert back["images"].tobytes() == images.tobytes()
    # Assert: and bzip2, which inflates a chunk whole, cannot be asked for
    with pytest.raises(ValueError, match="others inflate without a bound"):
        read_npz(path, allowed, compressions={zipfile.ZIP_BZIP2})
