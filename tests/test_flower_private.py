"""Each private Flower name of ``flwr_select.flower_private`` does what its user needs.

A Flower release that moves or changes one of them fails here, naming it.
"""

import ast
import hashlib
import inspect
import io
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import numpy as np
import pytest
from click import ClickException
from flwr.app import Array, ArrayRecord, Message, RecordDict

from flwr_select.flower_private import (
    _run_simulation,
    build_fab_from_disk,
    flatten_dict,
    fuse_dicts,
    get_all_nested_objects,
    get_project_config,
    load_app,
    parse_config_args,
    sample_nodes,
    simulation_run,
    task_identity,
)
from flwr_select.selection.wire import wire_bytes

ROOT = Path(__file__).resolve().parents[1]
MiB = 2**20


def test_a_record_is_sent_as_content_addressed_objects_each_distinct_one_once():
    # Prepare: noise does not repeat; 15 MiB of zeros fill identical 5 MiB chunks
    noise = np.random.default_rng(0).integers(0, 256, 6 * MiB, dtype=np.uint8)
    zeros = np.zeros(15 * MiB, dtype=np.uint8)
    record = ArrayRecord({"noise": Array(noise), "zeros": Array(zeros)})

    # Execute
    objects = get_all_nested_objects(record)

    # Assert: keyed by the sha256 of their bytes, children before their parents...
    for object_id, obj in objects.items():
        assert object_id == hashlib.sha256(obj.deflate()).hexdigest()
        assert all(child in objects for child in (obj.children or {}))
    assert list(objects)[-1] == record.object_id
    # ...and a repeated chunk is one object: what wire_bytes counts is less than raw
    sent = sum(len(obj.deflate()) for obj in objects.values())
    assert noise.nbytes < sent < noise.nbytes + zeros.nbytes - 4 * MiB
    assert wire_bytes(record) == sent  # which sizes chunks without copying them


class ConnectingGrid:
    """Nodes that connect one per poll: all that ``sample_nodes`` asks of a Grid."""

    def __init__(self, *polls: list[int]) -> None:
        self.polls = list(polls)
        self.calls = 0

    def get_node_ids(self) -> list[int]:
        self.calls += 1
        return self.polls[min(self.calls, len(self.polls)) - 1]


def test_sample_nodes_waits_until_the_sample_size_is_connected_then_samples():
    # Prepare: two nodes at first, a third on the next poll (Flower polls every 1 s)
    grid = ConnectingGrid([10, 11], [10, 11, 12])

    # Execute: at least one node available, three to sample
    sampled, connected = sample_nodes(grid, 1, 3)

    # Assert
    assert grid.calls == 2
    assert connected == [10, 11, 12]
    assert sorted(sampled) == [10, 11, 12]


def test_a_run_config_is_read_as_flwr_run_reads_it_and_laid_over_the_defaults():
    # Prepare
    defaults = {"rho": 0.05, "out-dir": "runs/a", "compress": False, "seed": 0}

    # Execute
    overrides = parse_config_args(['rho=0.1 out-dir="runs/b c" compress=true'])
    config = fuse_dicts(defaults, overrides)

    # Assert
    assert overrides == {"rho": 0.1, "out-dir": "runs/b c", "compress": True}
    assert config == {"rho": 0.1, "out-dir": "runs/b c", "compress": True, "seed": 0}
    assert defaults["rho"] == 0.05  # the defaults are left as they were
    with pytest.raises(ValueError, match="Key 'rhoo' is not present"):
        fuse_dicts(defaults, {"rhoo": 0.1})
    with pytest.raises(ClickException):
        parse_config_args(["rho=0.1.2"])


APP_PYPROJECT = """
[project]
name = "app"
version = "1.0.0"

[tool.flwr.app]
publisher = "test"

[tool.flwr.app.components]
serverapp = "app.server:app"
clientapp = "app.client:app"

[tool.flwr.app.config]
rounds = 3

[tool.flwr.app.config.model]
width = 8
"""


def test_an_app_folders_pyproject_is_read_and_refused_as_flwr_run_does(tmp_path):
    # Prepare
    (tmp_path / "pyproject.toml").write_text(APP_PYPROJECT)

    # Execute
    app = get_project_config(tmp_path)["tool"]["flwr"]["app"]

    # Assert: the components as written; the defaults' nested tables as dotted keys
    assert app["components"] == {
        "serverapp": "app.server:app",
        "clientapp": "app.client:app",
    }
    assert flatten_dict(app["config"]) == {"rounds": 3, "model.width": 8}
    (tmp_path / "pyproject.toml").write_text(
        APP_PYPROJECT.split("[tool.flwr.app.components]")[0]
    )
    with pytest.raises(ValueError, match=r"Missing \[tool.flwr.app.components\]"):
        get_project_config(tmp_path)


def test_a_component_is_imported_with_its_app_folder_left_on_the_path(
    tmp_path, monkeypatch
):
    # Prepare: a module of the folder only; sys.path and sys.modules restored after
    (tmp_path / "tiny_component.py").write_text("app = 'the app'\n")
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.setitem(sys.modules, "tiny_component", None)  # undone: removed
    del sys.modules["tiny_component"]  # so that load_app imports it

    # Execute
    component = load_app("tiny_component:app", LookupError, tmp_path)

    # Assert: on the path still, where Ray's workers take theirs from
    assert component == "the app"
    assert str(tmp_path) in sys.path
    with pytest.raises(LookupError, match="Unable to load attribute nope"):
        load_app("tiny_component:nope", LookupError, tmp_path)


def test_a_simulation_run_carries_the_overrides_and_is_the_task_messages_come_from():
    with task_identity():  # restored after
        # Execute
        run = simulation_run({"rounds": 5})
        message = Message(RecordDict(), dst_node_id=5, message_type="train")
        another = simulation_run({})

    # Assert: the engine needs a primary task; a ServerApp sends from the SuperLink
    assert run.override_config == {"rounds": 5}
    assert isinstance(run.primary_task_id, int)
    assert message.metadata.run_id == run.run_id
    assert message.metadata.src_node_id == 1  # Flower's SUPERLINK_NODE_ID
    assert another.run_id != run.run_id


def test_the_simulation_engine_takes_every_keyword_flower_simulation_passes():
    # Prepare: the keywords of the one call in simulations/cli.py
    tree = ast.parse((ROOT / "simulations" / "cli.py").read_text())
    [call] = [
        node
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Name)
        and node.func.id == "_run_simulation"
    ]
    keywords = [keyword.arg for keyword in call.keywords]
    assert "server_app_context" in keywords  # how the run config reaches the app

    # Execute, Assert: binds (no unknown keyword, no required one left out)
    inspect.signature(_run_simulation).bind(**dict.fromkeys(keywords))


def test_the_fab_builder_packs_the_project_as_a_zip_of_its_app_files():
    # Execute
    fab = build_fab_from_disk(ROOT)

    # Assert
    with zipfile.ZipFile(io.BytesIO(fab)) as archive:
        names = set(archive.namelist())
        packed = archive.read("flwr_select/flower_private.py")
    assert packed == (ROOT / "flwr_select" / "flower_private.py").read_bytes()
    assert "pyproject.toml" in names
    assert "README.md" not in names  # narrowed by fab-include


def message_run_id() -> int:
    return Message(RecordDict(), dst_node_id=5, message_type="train").metadata.run_id


def test_task_identity_names_the_sender_and_restores_the_one_before():
    with task_identity(run_id=7, node_id=3, task_id=9):
        # Execute
        message = Message(RecordDict(), dst_node_id=5, message_type="train")
        with pytest.raises(KeyError):
            with task_identity(run_id=8):
                inner = message_run_id()
                raise KeyError("the body fails")
        # Assert
        after = message_run_id()
    assert message.metadata.run_id == 7
    assert message.metadata.src_node_id == 3
    assert message.metadata.src_task_id == 9
    assert (inner, after) == (8, 7)


def test_task_identity_leaves_a_process_without_one_as_it_was():
    # Prepare: a fresh interpreter has no task identity
    script = textwrap.dedent(
        """
        from flwr.app import Message, RecordDict
        from flwr_select.flower_private import task_identity

        def run_id():
            try:
                return Message(RecordDict(), 5, "train").metadata.run_id
            except RuntimeError as err:
                return str(err)

        before = run_id()
        with task_identity(run_id=7):
            inside = run_id()
        print(before, inside, run_id(), sep="|")
        """
    )

    # Execute
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True
    )

    # Assert
    unset = "TaskIdentity.run_id is not set."
    assert done.stdout.strip().split("|") == [unset, "7", unset]
