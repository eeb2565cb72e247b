"""The only place this project touches Flower's private API.

Flower may move or change these names in any release; the rest of the project
imports them from here, so such a release breaks this one file, and
``tests/test_flower_private.py`` says which name. Each is Flower 1.42's own object,
with a comment saying what it is for and where Flower keeps it. Users:
:func:`flwr_select.selection.wire.wire_bytes` (``get_all_nested_objects``,
``no_object_id_recompute``, ``ArrayChunk``, ``add_header_to_object_body``),
``strategies.nodes`` (``sample_nodes``), the ``flower-simulation`` command
(``simulations.cli``: ``parse_config_args``, ``fuse_dicts``, ``_run_simulation``,
and for a Flower app folder ``get_project_config``, ``flatten_dict``,
``load_app``, ``simulation_run``), the wire tests
(``inflate_object_from_contents``), the tests' ``task_identity`` fixture and
their loopback deployment harness (``tests/loopback.py``: ``build_fab_from_disk``).

The simulation engine (it imports Ray) and the FAB builder are imported on first
use, so a site that imports the wire format does not pay for them.
"""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import Iterator
from importlib import import_module
from typing import Any

from flwr.app import UserConfig

# ArrayChunk: a chunk of an array's bytes, as Flower sends it; with
# add_header_to_object_body (below) to size one without copying it
# (flwr/app/message/arraychunk.py)
from flwr.app.message.arraychunk import ArrayChunk as ArrayChunk

# flatten_dict: [tool.flwr.app.config]'s nested tables as dotted keys, as
# `flwr run` reads an app's defaults (flwr/common/config.py)
from flwr.common.config import flatten_dict as flatten_dict

# fuse_dicts: lay --run-config over an app's defaults (flwr/common/config.py)
from flwr.common.config import fuse_dicts as fuse_dicts

# get_project_config: an app folder's pyproject.toml, refused where `flwr run`
# refuses it (flwr/common/config.py)
from flwr.common.config import get_project_config as get_project_config

# parse_config_args: read --run-config like `flwr run` (flwr/common/config.py)
from flwr.common.config import parse_config_args as parse_config_args

# SUPERLINK_NODE_ID: the node a ServerApp sends from (flwr/common/constant.py)
from flwr.common.constant import SUPERLINK_NODE_ID

# sample_nodes: FedAvg's node sampling (flwr/serverapp/strategy/strategy_utils.py)
from flwr.serverapp.strategy.strategy_utils import sample_nodes as sample_nodes

# NOOP_FEDERATION_ID: the federation of a simulation's run (flwr/supercore/constant.py)
from flwr.supercore.constant import NOOP_FEDERATION_ID

# add_header_to_object_body: the header each object is sent with;
# get_all_nested_objects: the objects a record is sent as; no_object_id_recompute:
# hash each object once while they are listed, as Flower does when it sends a
# message (flwr/supercore/inflatable/)
from flwr.supercore.inflatable.inflatable_object import (
    add_header_to_object_body as add_header_to_object_body,
)
from flwr.supercore.inflatable.inflatable_object import (
    get_all_nested_objects as get_all_nested_objects,
)
from flwr.supercore.inflatable.inflatable_object import (
    no_object_id_recompute as no_object_id_recompute,
)

# inflate_object_from_contents: rebuild a record from them, as a receiver does
# (flwr/supercore/inflatable/inflatable_utils.py; the wire tests only)
from flwr.supercore.inflatable.inflatable_utils import (
    inflate_object_from_contents as inflate_object_from_contents,
)

# load_app: import an app's "module:attribute" component with the app folder on
# sys.path, as Flower loads a ServerApp and a ClientApp (flwr/supercore/object_ref.py)
from flwr.supercore.object_ref import load_app as load_app

# Run: a run as the SuperLink keeps it (flwr/supercore/run.py)
from flwr.supercore.run import Run as Run

# TaskIdentity: whom a new Message is from (flwr/supercore/task_identity.py)
from flwr.supercore.task_identity import TaskIdentity

_IMPORTED_ON_USE = {
    # _run_simulation: the engine under `flwr run` (flwr/simulation/run_simulation.py)
    "_run_simulation": "flwr.simulation.run_simulation",
    # build_fab_from_disk: the app package `flwr run` sends (flwr/cli/build.py)
    "build_fab_from_disk": "flwr.cli.build",
}
"""Names imported on first use, and the Flower module of each."""


def __getattr__(name: str) -> Any:
    """Import a name of ``_IMPORTED_ON_USE`` from its Flower module on first use."""
    if name not in _IMPORTED_ON_USE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(_IMPORTED_ON_USE[name]), name)
    globals()[name] = value
    return value


@contextlib.contextmanager
def task_identity(
    *, run_id: int = 1, node_id: int = 0, task_id: int = 1
) -> Iterator[None]:
    """Act as task ``task_id`` of run ``run_id`` on node ``node_id`` in the body.

    Outside a running app Flower refuses to build a ``Message``
    ("TaskIdentity.run_id is not set"); tests that call a ClientApp or a
    strategy's ``configure_train`` directly run inside this. The identity the
    process had before, set or not, is restored on exit.

    Parameters
    ----------
    run_id : int (default: 1)
        The run new messages belong to (``metadata.run_id``).
    node_id : int (default: 0)
        The node they come from (``metadata.src_node_id``).
    task_id : int (default: 1)
        The task that sends them (``metadata.src_task_id``).
    """
    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id = run_id, node_id
    TaskIdentity.task_id = task_id
    try:
        yield
    finally:
        TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved


def simulation_run(override_config: UserConfig) -> Run:
    """Make a run for ``_run_simulation`` that hands ``override_config`` to the nodes.

    Given no run, ``_run_simulation`` makes one with no overrides, so a Flower
    app's ClientApps would see its ``pyproject.toml`` defaults only. Given this run
    and ``is_app=True``, each node's run config is the app folder's defaults with
    ``override_config`` laid over them, as under ``flwr run``. This copies what
    ``_run_simulation`` does for its own run (flwr/simulation/run_simulation.py),
    which includes making the run this process's task identity, the one the
    ServerApp's messages are sent as: Flower builds no message without one, and
    the in-memory SuperLink drops one of a run it does not know.

    Parameters
    ----------
    override_config : UserConfig
        The ``--run-config`` overrides, flattened.

    Returns
    -------
    Run
        A new run of the simulation federation with a random id and a primary task.
    """
    run = Run.create_empty(run_id=secrets.randbits(64))
    run.override_config = dict(override_config)
    run.primary_task_id = secrets.randbits(64)
    run.federation_id = NOOP_FEDERATION_ID
    # the "dummy task identity" _run_simulation sets for a run it makes
    TaskIdentity.run_id, TaskIdentity.node_id = run.run_id, SUPERLINK_NODE_ID
    TaskIdentity.task_id = 1
    return run
