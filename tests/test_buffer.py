import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from flwr_select.data import SiteData
from flwr_select.selection.buffer import CAP_SLACK, TrainingBuffer

NUM_CLASSES = 10
BIG_SITE = 2**63 + 12_345  # Flower node ids are uint64, often above 2**63


def upload(ids, shape=(4, 4), num_classes=NUM_CLASSES):
    """Samples whose pixels and labels are derived from their ids, so they can be checked."""
    ids = torch.as_tensor(ids, dtype=torch.long)
    images = (ids % 256).to(torch.uint8).view(-1, *[1] * len(shape)).expand(-1, *shape)
    return SiteData(images.clone(), ids % num_classes, num_classes, ids)


def snapshot(buffer):
    return (
        len(buffer),
        None if buffer.images is None else buffer.images.clone(),
        buffer.labels.clone(),
        buffer.sites.copy(),
        buffer.ids.copy(),
    )


def assert_same(a, b):
    assert a[0] == b[0]
    assert (a[1] is None) == (b[1] is None)
    if a[1] is not None:
        assert torch.equal(a[1], b[1])
    assert torch.equal(a[2], b[2])
    np.testing.assert_array_equal(a[3], b[3])
    np.testing.assert_array_equal(a[4], b[4])
    assert a[3].dtype == b[3].dtype and a[4].dtype == b[4].dtype


def test_add_counts_new_samples_and_deduplicates_per_site():
    # Prepare
    buffer = TrainingBuffer(NUM_CLASSES, device="cpu")
    # Execute / Assert
    assert buffer.add(1, upload([10, 11, 12])) == 3
    assert buffer.add(1, upload([11, 12, 13, 14])) == 2  # 11 and 12 already sent
    assert buffer.add(1, upload([10, 14])) == 0
    assert buffer.add(2, upload([10, 11])) == 2  # same ids, another site: new samples
    assert len(buffer) == 7
    assert buffer.ids.tolist() == [10, 11, 12, 13, 14, 10, 11]
    assert buffer.sites.tolist() == [1, 1, 1, 1, 1, 2, 2]
    assert buffer.sites.dtype == np.uint64 and buffer.ids.dtype == np.int64
    # pixels and labels stayed with their ids (label = id % 10, pixel = id % 256)
    assert buffer.labels.tolist() == [0, 1, 2, 3, 4, 0, 1]
    assert buffer.images[:, 0, 0].tolist() == [10, 11, 12, 13, 14, 10, 11]
    assert buffer.image_shape == (4, 4)


def test_an_empty_buffer():
    buffer = TrainingBuffer(NUM_CLASSES, device="cpu")
    assert len(buffer) == 0 and buffer.images is None and buffer.image_shape is None
    assert buffer.nbytes == 0
    assert buffer.seen(5, np.array([1, 2])).tolist() == [False, False]


def test_seen_marks_what_a_site_delivered():
    buffer = TrainingBuffer(NUM_CLASSES, device="cpu")
    buffer.add(3, upload([1, 5, 9]))
    assert buffer.seen(3, np.array([0, 1, 5, 7, 9])).tolist() == [
        False,
        True,
        True,
        False,
        True,
    ]
    assert buffer.seen(4, np.array([1, 5])).tolist() == [False, False]  # other site
    assert buffer.seen(3, np.array([], dtype=np.int64)).tolist() == []


def test_the_cap_keeps_the_newest_in_order_and_dropped_ids_stay_refused():
    # Prepare
    buffer = TrainingBuffer(NUM_CLASSES, device="cpu", max_samples=4)
    # Execute
    buffer.add(1, upload([0, 1, 2]))
    buffer.add(2, upload([0, 1, 2]))  # 6 samples; the oldest two are dropped
    # Assert
    assert len(buffer) == 4
    assert list(zip(buffer.sites.tolist(), buffer.ids.tolist(), strict=True)) == [
        (1, 2),
        (2, 0),
        (2, 1),
        (2, 2),
    ]
    assert buffer.labels.tolist() == [2, 0, 1, 2]
    assert buffer.images[:, 0, 0].tolist() == [2, 0, 1, 2]
    # site 1's ids 0 and 1 were dropped by the cap, yet are never accepted again
    assert buffer.seen(1, np.array([0, 1, 2, 3])).tolist() == [True, True, True, False]
    assert buffer.add(1, upload([0, 1])) == 0
    assert buffer.add(1, upload([0, 1, 3])) == 1
    assert list(zip(buffer.sites.tolist(), buffer.ids.tolist(), strict=True)) == [
        (2, 0),
        (2, 1),
        (2, 2),
        (1, 3),
    ]


def test_one_upload_larger_than_the_cap_keeps_its_tail():
    buffer = TrainingBuffer(NUM_CLASSES, device="cpu", max_samples=2)
    assert buffer.add(7, upload([4, 5, 6, 7, 8])) == 5  # all accepted, 2 kept
    assert buffer.ids.tolist() == [7, 8] and buffer.labels.tolist() == [7, 8]
    assert buffer.seen(7, np.array([4, 5, 6, 7, 8])).all()


@given(
    cap=st.integers(1, 12),
    uploads=st.lists(
        st.tuples(
            st.integers(0, 2),
            st.lists(st.integers(0, 15), min_size=0, max_size=8, unique=True),
        ),
        max_size=8,
    ),
)
def test_buffer_matches_a_plain_model(cap, uploads):
    # Prepare: the model is a list of (site, id) in arrival order and a set per site
    buffer = TrainingBuffer(NUM_CLASSES, device="cpu", max_samples=cap)
    arrived, accepted = [], {}
    for site, ids in uploads:
        # Execute
        got = buffer.add(site, upload(ids))
        ledger = accepted.setdefault(site, set())
        fresh = [i for i in ids if i not in ledger]
        ledger.update(fresh)
        arrived += [(site, i) for i in fresh]
        # Assert
        assert got == len(fresh)
        kept = arrived[-cap:]
        assert (
            list(zip(buffer.sites.tolist(), buffer.ids.tolist(), strict=True)) == kept
        )
        assert buffer.labels.tolist() == [i % NUM_CLASSES for _, i in kept]
        assert len(buffer) == len(kept) <= cap


def test_a_bad_max_samples_is_refused():
    with pytest.raises(ValueError, match="max_samples must be >= 1, got 0"):
        TrainingBuffer(NUM_CLASSES, device="cpu", max_samples=0)


def test_shape_mismatch_raises_and_leaves_the_buffer_unchanged():
    # Prepare
    buffer = TrainingBuffer(NUM_CLASSES, device="cpu")
    buffer.add(1, upload([1, 2, 3], shape=(4, 4)))
    before = snapshot(buffer)
    # Execute / Assert
    with pytest.raises(
        ValueError, match=r"images of shape \(5, 4\); the buffer holds \(4, 4\)"
    ):
        buffer.add(1, upload([7, 8], shape=(5, 4)))
    with pytest.raises(ValueError, match=r"images of shape \(1, 4, 4\)"):
        buffer.add(2, upload([7, 8], shape=(1, 4, 4)))  # a channel axis is a shape too
    assert_same(snapshot(buffer), before)
    # nothing was recorded as delivered either
    assert buffer.seen(1, np.array([7, 8])).tolist() == [False, False]
    assert buffer.add(1, upload([7, 8])) == 2


def test_num_classes_mismatch_raises_and_leaves_the_buffer_unchanged():
    buffer = TrainingBuffer(NUM_CLASSES, device="cpu")
    buffer.add(1, upload([1, 2]))
    before = snapshot(buffer)
    with pytest.raises(ValueError, match="samples have 3 classes, the buffer 10"):
        buffer.add(1, upload([5, 6], num_classes=3))
    assert_same(snapshot(buffer), before)
    assert buffer.seen(1, np.array([5, 6])).tolist() == [False, False]
    # also refused into an empty buffer, which then takes no shape
    empty = TrainingBuffer(NUM_CLASSES, device="cpu")
    with pytest.raises(ValueError, match="samples have 3 classes"):
        empty.add(1, upload([5], shape=(2, 2), num_classes=3))
    assert len(empty) == 0 and empty.image_shape is None


def test_nbytes_counts_images_and_labels():
    buffer = TrainingBuffer(NUM_CLASSES, device="cpu")
    buffer.add(1, upload(range(5), shape=(28, 28)))
    # 5 images * 784 uint8 bytes + 5 int64 labels * 8 bytes
    assert buffer.nbytes == 5 * 784 + 5 * 8 == 3960
    buffer = TrainingBuffer(NUM_CLASSES, device="cpu", max_samples=3)
    buffer.add(1, upload(range(5), shape=(3, 8, 8)))
    # capped at 3: 3 * 3*8*8 + 3 * 8
    assert buffer.nbytes == 3 * 192 + 3 * 8 == 600


def test_save_load_round_trip_is_exact(tmp_path):
    # Prepare
    buffer = TrainingBuffer(NUM_CLASSES, device="cpu", max_samples=5)
    buffer.add(BIG_SITE, upload([100, 101, 102]))
    buffer.add(3, upload([7, 100]))
    buffer.add(BIG_SITE, upload([103]))  # 6 samples: (BIG_SITE, 100) dropped
    path = tmp_path / "buffer.npz"
    # Execute
    buffer.save(path)
    back = TrainingBuffer.load(path, device="cpu")
    # Assert
    assert_same(snapshot(back), snapshot(buffer))
    assert back.sites.tolist() == [BIG_SITE, BIG_SITE, 3, 3, BIG_SITE]
    assert back.ids.tolist() == [101, 102, 7, 100, 103]
    assert back.max_samples == 5 and back.num_classes == NUM_CLASSES
    assert back.images.dtype == torch.uint8 and back.labels.dtype == torch.int64
    assert back.device == torch.device("cpu") and back.images.device.type == "cpu"
    # the ledgers came back: dedup still works, the dropped sample included
    assert back.seen(BIG_SITE, np.array([100, 101, 103, 104])).tolist() == [
        True,
        True,
        True,
        False,
    ]
    assert back.add(BIG_SITE, upload([100, 104])) == 1
    assert back.add(3, upload([7, 100])) == 0
    assert back.add(4, upload([7])) == 1
    assert back.ids.tolist() == [7, 100, 103, 104, 7]  # cap 5 still applies


def test_save_load_of_an_empty_uncapped_buffer(tmp_path):
    buffer = TrainingBuffer(NUM_CLASSES, device="cpu")
    buffer.save(tmp_path / "empty.npz")
    back = TrainingBuffer.load(tmp_path / "empty.npz", device="cpu")
    assert len(back) == 0 and back.images is None and back.max_samples is None
    assert back.sites.dtype == np.uint64 and back.ids.dtype == np.int64
    assert back.add(1, upload([1, 2])) == 2


def test_save_is_atomic_and_replaces_the_file(tmp_path):
    # Prepare
    path = tmp_path / "buffer.npz"
    buffer = TrainingBuffer(NUM_CLASSES, device="cpu")
    buffer.add(1, upload([1, 2]))
    # Execute
    buffer.save(path)
    buffer.add(2, upload([3]))
    buffer.save(path)  # over the same path
    # Assert
    assert sorted(p.name for p in tmp_path.iterdir()) == ["buffer.npz"]  # no .tmp
    back = TrainingBuffer.load(path, device="cpu")
    assert back.ids.tolist() == [1, 2, 3] and back.sites.tolist() == [1, 1, 2]
    assert back.seen(2, np.array([3])).tolist() == [True]


def test_a_save_that_fails_midway_leaves_the_previous_file_intact(
    tmp_path, monkeypatch
):
    # Prepare
    path = tmp_path / "buffer.npz"
    buffer = TrainingBuffer(NUM_CLASSES, device="cpu")
    buffer.add(1, upload([1, 2]))
    buffer.save(path)
    buffer.add(1, upload([3]))

    def crash(file, **arrays):
        file.write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(np, "savez", crash)
    # Execute
    with pytest.raises(OSError, match="disk full"):
        buffer.save(path)
    monkeypatch.undo()
    # Assert: the file still holds the first save, whole
    assert TrainingBuffer.load(path, device="cpu").ids.tolist() == [1, 2]


@pytest.mark.parametrize("site", [-1, 2**64])
def test_a_site_outside_uint64_is_refused_without_changing_the_buffer(site):
    # Prepare
    buffer = TrainingBuffer(NUM_CLASSES, device="cpu")
    buffer.add(1, upload([1, 2]))
    before = snapshot(buffer)
    # Execute
    with pytest.raises(ValueError, match="site must be an unsigned 64-bit integer"):
        buffer.add(site, upload([3, 4]))
    # Assert
    assert_same(snapshot(buffer), before)


@given(
    st.lists(st.integers(1, 40), min_size=1, max_size=12),
    st.none() | st.integers(1, 100),
)
def test_uploads_added_one_by_one_hold_what_one_concatenation_would(sizes, cap):
    # Prepare: consecutive id ranges, one upload each
    bounds = np.cumsum([0, *sizes])
    buffer = TrainingBuffer(NUM_CLASSES, device="cpu", max_samples=cap)
    # Execute
    for start, stop in zip(bounds[:-1], bounds[1:], strict=True):
        buffer.add(1, upload(range(start, stop)))
    # Assert: exactly the newest min(total, cap) samples, in order
    total = int(bounds[-1])
    kept = total if cap is None else min(total, cap)
    expected = upload(range(total - kept, total))
    assert len(buffer) == kept == len(buffer.images) == len(buffer.labels)
    assert torch.equal(buffer.images, expected.images)
    assert torch.equal(buffer.labels, expected.labels)
    assert buffer.ids.tolist() == list(range(total - kept, total))
    assert buffer.nbytes == kept * (16 + 8)  # 4x4 uint8 pixels and an int64 label
    if cap is not None:  # storage: the cap and its slack, or what one add needed
        slack = max(max(1, cap // CAP_SLACK), max(sizes))
        assert len(buffer._images) <= cap + slack


def arrays_of_a_buffer():
    buffer = TrainingBuffer(NUM_CLASSES, device="cpu", max_samples=3)
    buffer.add(BIG_SITE, upload([1, 2]))
    buffer.add(3, upload([5, 6]))  # (BIG_SITE, 1) dropped, still in its ledger
    return buffer.to_arrays()  # accepted_0: site 3, accepted_1: BIG_SITE


FLAWS = {
    "float images": (
        lambda a: a.update(images=a["images"].astype(np.float32)),
        r"'images' is float32 of shape \(3, 4, 4\); expected uint8 with 3 or 4",
    ),
    "label out of range": (
        lambda a: a.update(labels=np.array([2, 5, 10])),
        r"'labels' holds 10, outside \[0, 10\)",
    ),
    "labels shorter than images": (
        lambda a: a.update(labels=a["labels"][:2]),
        r"'labels' holds 2 values; expected 3, one per image",
    ),
    "negative id": (
        lambda a: a.update(ids=np.array([2, -5, 6])),
        r"'ids' holds -5; expected ids >= 0",
    ),
    "missing array": (
        lambda a: a.pop("sites"),
        r"buffer arrays \['sites'\] are missing",
    ),
    "unknown array": (
        lambda a: a.update(extra=np.zeros(1)),
        r"unexpected buffer arrays \['extra'\]",
    ),
    "sample not in its ledger": (
        lambda a: a.update(accepted_1=np.array([1], np.int64)),
        rf"sample \(site {BIG_SITE}, id 2\) is missing from its site's ledger 'accepted_1'",
    ),
}


@pytest.mark.parametrize("edit, problem", FLAWS.values(), ids=FLAWS.keys())
def test_from_arrays_refuses_a_flawed_buffer_naming_the_array(edit, problem):
    # Prepare
    arrays = arrays_of_a_buffer()
    edit(arrays)
    # Execute / Assert
    with pytest.raises(ValueError, match=problem):
        TrainingBuffer.from_arrays(arrays, device="cpu")


def test_load_refuses_a_damaged_file_naming_it(tmp_path):
    # Prepare
    path = tmp_path / "buffer.npz"
    arrays = arrays_of_a_buffer()
    arrays["labels"] = arrays["labels"][:1]
    np.savez(path, **arrays)
    # Execute / Assert
    with pytest.raises(ValueError, match=rf"^{path}: buffer array 'labels' holds 1"):
        TrainingBuffer.load(path, device="cpu")
    path.write_bytes(path.read_bytes()[:-30])  # cut short
    with pytest.raises(ValueError, match=rf"^{path} is not a readable .npz file"):
        TrainingBuffer.load(path, device="cpu")
