"""Data-parallel worker and server: gradients, validation of replies, failures."""

import copy
import functools
import io

import numpy as np
import pytest
import torch
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Error,
    Message,
    MetricRecord,
    RecordDict,
)
from torch import nn

from clients.worker import make_gradient_handler
from flwr_select.data import SiteData
from flwr_select.messages import (
    CONFIG_KEY,
    METRICS_KEY,
    MODEL_KEY,
)
from flwr_select.models import build_model
from flwr_select.parallel.batches import Sampling, WorkerStep
from flwr_select.parallel.gradients import (
    GRADIENT_KEY,
    MESSAGE_TYPE,
    DataParallelConfig,
    flat_parameters,
    num_parameters,
    worker_gradient,
)
from flwr_select.trainer import TrainConfig
from strategies.data_parallel import BiasedDataParallel
from tests.hostile import npy_header

N = 64


def worker_data(worker: int) -> SiteData:
    g = torch.Generator().manual_seed(worker)
    images = torch.randint(0, 256, (N, 28, 28), dtype=torch.uint8, generator=g)
    labels = torch.arange(N) % 10
    return SiteData(images, labels, 10)


def make_strategy(reduction: str = "mean") -> BiasedDataParallel:
    torch.manual_seed(0)
    return BiasedDataParallel(
        functools.partial(build_model, "lenet5"),
        config=DataParallelConfig(reduction=reduction, batch_size=8),
        sampling=Sampling(sampling="favoured", bias=0.5, seed=1),
        optimizer=TrainConfig(lr=0.1, momentum=0.0),
    )


def request(strategy: BiasedDataParallel, worker: int, server_round: int = 1):
    config = ConfigRecord(
        {
            **strategy.sampling.to_config(),
            **strategy.config.to_config(),
            "server-round": server_round,
            "num-server-rounds": 5,
            "num-workers": 2,
            "worker-index": worker,
            "num-classes": 10,
            "model": "lenet5",
        }
    )
    arrays = ArrayRecord(strategy.model.state_dict())
    return Message(
        RecordDict({MODEL_KEY: arrays, CONFIG_KEY: config}),
        message_type=MESSAGE_TYPE,
        dst_node_id=worker + 1,
    )


def worker_reply(strategy: BiasedDataParallel, worker: int) -> Message:
    """A real reply: the worker's own handler answers a real request."""
    handler = make_gradient_handler(load_data=lambda ctx, cfg: worker_data(worker))
    context = Context(
        run_id=1, node_id=worker + 1, node_config={}, state=RecordDict(), run_config={}
    )
    return handler(request(strategy, worker), context)


def tampered(reply: Message, gradient=None, metrics=None) -> Message:
    """The same reply with its gradient array or metrics replaced."""
    content = RecordDict(
        {
            GRADIENT_KEY: ArrayRecord(
                {
                    GRADIENT_KEY: gradient
                    if isinstance(gradient, Array)
                    else Array(gradient)
                }
            )
            if gradient is not None
            else reply.content.array_records[GRADIENT_KEY],
            METRICS_KEY: MetricRecord(metrics)
            if metrics is not None
            else reply.content.metric_records[METRICS_KEY],
        }
    )
    return Message(content, reply_to=request_of(reply))


def npz_bytes(size: int) -> bytes:
    """A zip of one array, where a .npy belongs."""
    buffer = io.BytesIO()
    np.savez(buffer, gradient=np.zeros(size, np.float32))
    return buffer.getvalue()


def test_a_reply_with_an_extra_record_is_rejected(task_identity, caplog):
    strategy = make_strategy()
    good, source = worker_reply(strategy, 0), worker_reply(strategy, 1)
    extra = RecordDict(
        {**dict(source.content.items()), "note": ConfigRecord({"hi": "server"})}
    )
    bad = Message(extra, reply_to=request_of(source))
    _, result = strategy.aggregate_train(1, [good, bad])
    assert result["workers-accepted"] == 1 and result["workers-rejected"] == 1
    assert "'note' (ConfigRecord)" in caplog.text


def request_of(reply: Message) -> Message:
    return Message(
        RecordDict(), message_type=MESSAGE_TYPE, dst_node_id=reply.metadata.src_node_id
    )


def test_one_local_step_returns_the_gradient_of_the_drawn_batch():
    torch.manual_seed(0)
    model = build_model("lenet5")
    data = worker_data(0)
    config = DataParallelConfig(batch_size=16)
    sampling = Sampling(sampling="favoured", seed=2)
    before = flat_parameters(model)
    result = worker_gradient(
        copy.deepcopy(model),
        data.images,
        data.labels,
        config,
        sampling,
        num_classes=10,
        worker=1,
        num_workers=2,
        server_round=3,
        num_rounds=5,
    )
    # the same batch, by hand: global step (3 - 1) * 1 = 2
    idx = sampling.draw(data.labels.numpy(), 16, 10, WorkerStep(1, 2, 2, 5))
    loss = nn.functional.cross_entropy(model(data.images[idx]), data.labels[idx])
    expected = torch.autograd.grad(loss, list(model.parameters()))
    assert torch.allclose(
        result.gradient, torch.cat([g.flatten() for g in expected]), atol=1e-6
    )
    assert result.loss == pytest.approx(float(loss.detach()))
    assert result.num_examples == 16
    assert torch.equal(flat_parameters(model), before)  # the original is untouched


def test_several_local_steps_return_the_pseudo_gradient_of_local_sgd():
    torch.manual_seed(0)
    model = build_model("lenet5")
    data = worker_data(0)
    config = DataParallelConfig(batch_size=8, local_steps=3, local_lr=0.05)
    sampling = Sampling()
    start = flat_parameters(model)
    result = worker_gradient(
        copy.deepcopy(model),
        data.images,
        data.labels,
        config,
        sampling,
        num_classes=10,
        worker=0,
        num_workers=2,
        server_round=2,
        num_rounds=4,
    )
    # three plain SGD steps on the batches of global steps 3, 4 and 5
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    for step in (3, 4, 5):
        idx = sampling.draw(data.labels.numpy(), 8, 10, WorkerStep(0, 2, step, 12))
        optimizer.zero_grad()
        nn.functional.cross_entropy(
            model(data.images[idx]), data.labels[idx]
        ).backward()
        optimizer.step()
    expected = (start - flat_parameters(model)) / 0.05
    assert torch.allclose(result.gradient, expected, atol=1e-4)
    assert result.num_examples == 24


def test_the_server_steps_with_the_reduced_gradient(task_identity):
    strategy = make_strategy("sum")
    before = flat_parameters(strategy.model)
    replies = [worker_reply(strategy, w) for w in (0, 1)]
    grads = [
        torch.from_numpy(r.content.array_records[GRADIENT_KEY][GRADIENT_KEY].numpy())
        for r in replies
    ]
    assert all(g.dtype == torch.float32 and g.shape == (61_706,) for g in grads)
    arrays, metrics = strategy.aggregate_train(1, replies)
    assert arrays is not None
    # plain SGD, lr 0.1, on the sum of the two gradients
    after = flat_parameters(strategy.model)
    assert torch.allclose(after, before - 0.1 * (grads[0] + grads[1]), atol=1e-6)
    norms = sorted(float(g.norm()) for g in grads)
    assert metrics["workers-accepted"] == 2 and metrics["workers-rejected"] == 0
    assert metrics["grad-norm-gap"] == pytest.approx(norms[1] - norms[0], rel=1e-5)
    loaded = build_model("lenet5")
    loaded.load_state_dict(arrays.to_torch_state_dict())
    assert torch.equal(flat_parameters(loaded), after)


def test_the_same_seed_gives_the_same_gradient(task_identity):
    first = worker_reply(make_strategy(), 1)
    second = worker_reply(make_strategy(), 1)
    get = lambda r: r.content.array_records[GRADIENT_KEY][GRADIENT_KEY].numpy()  # noqa: E731
    assert np.array_equal(get(first), get(second))


@pytest.mark.parametrize(
    ("gradient", "metrics", "reason"),
    [
        (np.zeros(10, np.float32), None, "shape"),
        ("float64", None, "dtype float64"),
        ("nan", None, "NaN or inf"),
        ("inf", None, "NaN or inf"),
        (None, {"loss": float("nan"), "num-examples": 8}, "loss must be"),
        (None, {"loss": -1.0, "num-examples": 8}, "loss must be"),
        (None, {"loss": 1.0, "num-examples": 0}, "num-examples"),
        (None, {"loss": 1.0}, "num-examples"),
        (None, {"loss": 1.0, "num-examples": 8, "bonus": 1}, "the metrics hold"),
        ("npz bytes", None, "the gradient is not a readable array: not a .npy array"),
        ("2**61 elements over 10 bytes", None, "the .npy body holds 10 bytes"),
        ("big-endian", None, "dtype >f4 is not allowed"),
    ],
)
def test_a_bad_gradient_is_rejected_and_the_round_goes_on(
    task_identity, caplog, gradient, metrics, reason
):
    strategy = make_strategy()
    good = worker_reply(strategy, 0)
    bad_source = worker_reply(strategy, 1)
    size = num_parameters(strategy.model)
    if isinstance(gradient, str):
        gradient = {
            "float64": np.zeros(size, np.float64),
            "nan": np.full(size, np.nan, np.float32),
            "inf": np.full(size, np.inf, np.float32),
            "npz bytes": Array("float32", (size,), "numpy.ndarray", npz_bytes(size)),
            "2**61 elements over 10 bytes": Array(
                "float32",
                (size,),
                "numpy.ndarray",
                npy_header((2**61,), "<f4") + bytes(10),
            ),
            "big-endian": Array(
                "float32",
                (size,),
                "numpy.ndarray",
                Array(np.zeros(size, ">f4")).data,
            ),
        }[gradient]
    bad = tampered(bad_source, gradient, metrics)
    before = flat_parameters(strategy.model)
    arrays, result = strategy.aggregate_train(1, [good, bad])
    assert result["workers-accepted"] == 1 and result["workers-rejected"] == 1
    assert reason in caplog.text and "node 2" in caplog.text
    # the step used only the good gradient (mean of one = itself; lr 0.1)
    good_gradient = torch.from_numpy(
        good.content.array_records[GRADIENT_KEY][GRADIENT_KEY].numpy()
    )
    assert torch.allclose(
        flat_parameters(strategy.model), before - 0.1 * good_gradient, atol=1e-6
    )
    assert arrays is not None


def test_a_failed_worker_is_counted_and_the_round_goes_on(task_identity):
    strategy = make_strategy()
    good = worker_reply(strategy, 0)
    failed = Message(Error(code=0, reason="worker crashed"), reply_to=request_of(good))
    arrays, metrics = strategy.aggregate_train(1, [good, failed])
    assert arrays is not None
    assert metrics["workers-accepted"] == 1 and metrics["workers-failed"] == 1


def test_a_round_with_no_valid_gradient_leaves_the_model_unchanged(
    task_identity, caplog
):
    strategy = make_strategy()
    reply = worker_reply(strategy, 0)
    before = copy.deepcopy(strategy.model.state_dict())
    bad = tampered(reply, np.full(num_parameters(strategy.model), np.nan, np.float32))
    failed = Message(Error(code=0, reason="boom"), reply_to=request_of(reply))
    arrays, metrics = strategy.aggregate_train(1, [bad, failed])
    assert arrays is None
    assert metrics["workers-accepted"] == 0 and "train-loss" not in metrics
    assert "no valid gradient; the model is unchanged" in caplog.text
    for key, value in strategy.model.state_dict().items():
        assert torch.equal(value, before[key])


def test_a_reply_without_the_gradient_record_is_rejected(task_identity):
    strategy = make_strategy()
    reply = worker_reply(strategy, 0)
    odd = Message(
        RecordDict({"something": MetricRecord({"loss": 1.0})}),
        reply_to=request_of(reply),
    )
    _, metrics = strategy.aggregate_train(1, [odd])
    assert metrics["workers-rejected"] == 1


def test_each_worker_is_told_its_index_and_the_reduction(task_identity):
    strategy = make_strategy("median")
    arrays = ArrayRecord(strategy.model.state_dict())
    messages = strategy.worker_messages(4, arrays, ConfigRecord({"lr": 0.5}), [11, 7])
    configs = {
        m.metadata.dst_node_id: m.content.config_records[CONFIG_KEY] for m in messages
    }
    assert {n: c["worker-index"] for n, c in configs.items()} == {7: 0, 11: 1}
    for config in configs.values():
        assert config["reduction"] == "median" and config["server-round"] == 4
        assert config["num-workers"] == 2 and config["sampling"] == "favoured"
        assert config["lr"] == 0.5  # the caller's config is forwarded
    assert all(m.metadata.message_type == MESSAGE_TYPE for m in messages)


def test_an_unknown_reduction_is_refused_when_configured():
    with pytest.raises(ValueError, match="unknown reduction 'avg'"):
        DataParallelConfig(reduction="avg")
    with pytest.raises(ValueError, match="local-steps"):
        DataParallelConfig(local_steps=0)
