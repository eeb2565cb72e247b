"""The site's and the worker's handlers: one ClientApp, beside a user's own."""

import ast
import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from clients.site import add_select_handler, keep_trial, kept_trial
from clients.worker import add_gradient_handler
from flwr_select.data import SiteData
from flwr_select.messages import (
    CONFIG_KEY,
    METRICS_KEY,
    MODEL_KEY,
)
from flwr_select.models import build_model
from flwr_select.parallel.batches import Sampling
from flwr_select.parallel.gradients import GRADIENT_KEY, DataParallelConfig
from flwr_select.selection.protocol import (
    UPLOAD_KEY,
    SelectionConfig,
)
from flwr_select.selection.site import site_trial
from flwr_select.selection.wire import wire_bytes

CLIENTS = Path(__file__).resolve().parents[1] / "clients"


def samples(_context, _config) -> SiteData:
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (64, 28, 28), dtype=torch.uint8, generator=g)
    return SiteData(images, torch.arange(64) % 10, 10, ids=torch.arange(64))


def message(message_type: str, config: dict) -> Message:
    arrays = ArrayRecord(build_model("lenet5").state_dict())
    shared = {"server-round": 1, "num-classes": 10, "model": "lenet5"}
    content = RecordDict(
        {MODEL_KEY: arrays, CONFIG_KEY: ConfigRecord({**shared, **config})}
    )
    return Message(content, message_type=message_type, dst_node_id=1)


def test_both_handlers_answer_beside_a_users_own_train(task_identity):
    # Prepare: a user's ClientApp with its own @app.train(), then both handlers
    app = ClientApp()

    @app.train()
    def own(msg, context):
        return Message(RecordDict({"own": ConfigRecord({"ok": True})}), reply_to=msg)

    add_select_handler(app, load_site=samples)
    add_gradient_handler(app, samples)  # positional, as the arguments always were
    context = Context(
        run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={}
    )
    gradient_config = {
        **DataParallelConfig(batch_size=8).to_config(),
        **Sampling().to_config(),
        "num-server-rounds": 2,
        "num-workers": 1,
        "worker-index": 0,
    }
    # Execute
    mine = app(message("train", {}), context)
    selected = app(message("train.select", SelectionConfig().to_config()), context)
    gradient = app(message("train.gradient", gradient_config), context)
    # Assert: each message reached its own handler
    assert mine.content.config_records["own"]["ok"] is True
    assert UPLOAD_KEY in selected.content.array_records
    assert selected.content.metric_records[METRICS_KEY]["num-candidates"] == 64
    assert GRADIENT_KEY in gradient.content.array_records
    assert gradient.content.metric_records[METRICS_KEY]["num-examples"] == 8


def client_modules_imported(name: str) -> set[str]:
    """The modules of ``clients`` that ``clients/<name>`` imports."""
    modules = set()
    for node in ast.walk(ast.parse((CLIENTS / name).read_text())):
        if isinstance(node, ast.ImportFrom) and node.module == "clients":
            modules |= {f"clients.{alias.name}" for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            modules.add(node.module)
        elif isinstance(node, ast.Import):
            modules |= {alias.name for alias in node.names}
    return {module for module in modules if module.split(".")[0] == "clients"}


def test_neither_client_imports_the_other_only_what_they_share():
    assert client_modules_imported("site.py") == {"clients.common"}
    assert client_modules_imported("worker.py") == {"clients.common"}


def test_a_boxs_own_byte_cap_bounds_its_summary_and_its_upload(task_identity):
    # Prepare: a box that declares 20 samples' worth of bytes (788 + headers each)
    app = ClientApp()
    add_select_handler(app, load_site=samples)
    cap = 20 * 788 + 1400

    def context(node_config):
        return Context(
            run_id=1,
            node_id=1,
            node_config=node_config,
            state=RecordDict(),
            run_config={},
        )

    config = SelectionConfig(rho=1.0, allocation="global").to_config()
    # Execute: phase 1, then phase 2 with more than the box can take
    summary = app(message("query.select_summary", config), context({"max-bytes": cap}))
    upload = app(
        message("train.select", {**config, "quota": 64}), context({"max-bytes": cap})
    )
    # Assert: the sketch says what fits, the upload holds no more, a bad cap is named
    limit = summary.content.metric_records[METRICS_KEY]["sketch-ranks"][-1]
    sent = upload.content.metric_records[METRICS_KEY]
    assert 15 <= limit < 64 and sent["num-selected"] == limit
    assert sent["upload-bytes"] <= cap
    with pytest.raises(ValueError, match="node config max-bytes must be an int >= 0"):
        app(message("train.select", config), context({"max-bytes": -1}))


def test_a_global_rounds_later_phases_reuse_phase_ones_trial_test(task_identity):
    # Prepare: a node that answered phase 1 of round 1
    app = ClientApp()
    add_select_handler(app, load_site=samples)
    context = Context(
        run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={}
    )
    config = SelectionConfig(rho=0.25, allocation="global").to_config()
    phase_one = message("query.select_summary", config)
    app(phase_one, context)
    model, site = build_model("lenet5"), samples(None, None)
    model.load_state_dict(phase_one.content[MODEL_KEY].to_torch_state_dict())

    def phase_two():  # the same model, with a quota
        msg = message("train.select", {**config, "quota": 16})
        msg.content[MODEL_KEY] = phase_one.content[MODEL_KEY]
        return msg

    # Execute
    kept = kept_trial(context, model, 1, site)
    # Assert: the kept trial is this model's of these samples, to the bit, and
    # phase 2 sends what a fresh trial test would have chosen
    fresh = site_trial(model, site, None)
    assert kept is not None
    for name in ("ids", "labels", "predictions"):
        assert np.array_equal(getattr(kept, name), getattr(fresh, name))
    assert kept.confidence.keys() == fresh.confidence.keys()
    assert all(
        np.array_equal(kept.confidence[k], v) for k, v in fresh.confidence.items()
    )
    reused = app(phase_two(), context)
    alone = Context(
        run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={}
    )
    anew = app(phase_two(), alone)
    assert wire_bytes(reused.content[UPLOAD_KEY]) == wire_bytes(
        anew.content[UPLOAD_KEY]
    )
    assert np.array_equal(
        reused.content[UPLOAD_KEY]["ids"].numpy(),
        anew.content[UPLOAD_KEY]["ids"].numpy(),
    )
    # phase 2 ranks by the kept trial: one kept with reversed scores changes it
    reversed_scores = {k: -v for k, v in fresh.confidence.items()}
    keep_trial(
        context, model, 1, dataclasses.replace(fresh, confidence=reversed_scores)
    )
    changed = app(phase_two(), context).content[UPLOAD_KEY]["ids"].numpy()
    assert not np.array_equal(changed, anew.content[UPLOAD_KEY]["ids"].numpy())
    # another round, another model or other samples: tested anew
    assert kept_trial(context, model, 2, site) is None
    assert kept_trial(context, build_model("lenet5", seed=3), 1, site) is None
    relabelled = SiteData(site.images, (site.labels + 1) % 10, 10, ids=site.ids)
    assert kept_trial(context, model, 1, relabelled) is None
