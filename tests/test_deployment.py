"""The app on real Flower processes: one SuperLink, two SuperNodes, TLS and auth.

Everything runs on loopback through :class:`tests.loopback.LocalDeployment`:
certificates and SuperNode keys are made here (:mod:`tests.deployment_keys`),
each site reads its own ``data.npz`` of real MNIST samples (node config
``data-dir``), and the app is submitted with ``flwr run``. One deployment serves
the whole module (starting it costs about 10 s); its teardown checks that no
process it started, or that those spawned, is left running. A failing test
prints every process's log tail. First, without processes: the app that
``flwr run`` packs holds every module the apps import, and no test code.
"""

import contextlib
import http.client
import math
import socket
import ssl
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from clients.site import LEDGER_FILE
from flwr_select.data import load_mnist
from flwr_select.files import read_json_lines
from flwr_select.selection.checkpoint import latest
from tests.deployment_keys import make_supernode_key, make_tls_files
from tests.loopback import (
    PROJECT_DIR,
    AuthKeys,
    LocalDeployment,
    command_line,
    descendants,
    packed_files,
    still_running,
)

SITES, SITE_SIZE, ROUNDS, RHO = 2, 1500, 2, 0.1
INITIAL_SIZE = 1000
PER_SITE_ROUND = math.floor(RHO * SITE_SIZE)  # each site offers all it has not sent
APPS = [
    "simulations.mnist",
    "simulations.fashion_mnist",
    "simulations.mnist_data_parallel",
]
PROJECT_PACKAGES = (
    "flwr_select",
    "strategies",
    "clients",
    "simulations",
    "tests",
    "bench",
)


def test_the_app_packs_every_module_the_apps_import_and_no_test_code():
    # Prepare: the project's files that the apps import, in a fresh interpreter
    script = textwrap.dedent(
        f"""
        import sys
        import {", ".join(APPS)}
        for name, module in sys.modules.items():
            if name.split(".")[0] in {PROJECT_PACKAGES!r}:
                print(module.__file__)
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        check=True,
        cwd=PROJECT_DIR,
    )
    imported = {
        Path(line).relative_to(PROJECT_DIR).as_posix()
        for line in done.stdout.splitlines()
    }

    # Execute
    packed = set(packed_files())

    # Assert
    assert "simulations/runner.py" in imported
    assert imported <= packed, f"not packed by fab-include: {imported - packed}"
    assert not [name for name in packed if name.startswith(("tests/", "bench/"))]


@pytest.fixture(scope="module")
def site_folders(mnist_dir, tmp_path_factory):
    """Two data folders of different MNIST training samples; ids are MNIST indices."""
    images, labels = load_mnist(mnist_dir, "train")
    chosen = np.random.default_rng(7).permutation(len(labels))[: SITES * SITE_SIZE]
    folders = []
    for site, ids in enumerate(np.split(np.sort(chosen), SITES)):
        folder = tmp_path_factory.mktemp(f"site-{site}")
        np.savez(
            folder / "data.npz",
            images=images.numpy()[ids],
            labels=labels.numpy()[ids],
            ids=ids,
        )
        folders.append(folder)
    return folders


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory):
    return make_tls_files(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="module")
def deployment(site_folders, tls_files, tmp_path_factory):
    """A SuperLink with TLS and SuperNode auth, and one SuperNode per site folder."""
    keys_dir = tmp_path_factory.mktemp("keys")
    keys = [make_supernode_key(keys_dir, f"site-{i}") for i in range(SITES)]
    deployment = LocalDeployment(
        tmp_path_factory.mktemp("flower"),
        [{"data-dir": str(folder)} for folder in site_folders],
        tls=tls_files,
        auth=AuthKeys(keys),
    )
    with deployment:
        yield deployment
        processes = deployment.process_tree()
    left = [pid for pid, started in processes if still_running(pid, started)]
    assert not left, f"processes left running after the deployment stopped: {left}"


@contextlib.contextmanager
def logs_on_failure(deployment):
    """Print every process's log tail (pytest shows it) if the body fails."""
    try:
        yield
    except BaseException:
        print(deployment.log_tails())
        raise


def finished_run(deployment, run_config: dict) -> set[int]:
    """Submit a new experiment, wait for it to succeed; return the ServerApp pids seen.

    Each site starts it with its ledger deleted, as an operator does for a new
    experiment (a site refuses a round earlier than the latest it answered).
    """
    for node in deployment.supernodes:
        (Path(node.node_config["data-dir"]) / LEDGER_FILE).unlink(missing_ok=True)
    run = deployment.start_run(run_config)
    serverapps, deadline = set(), time.monotonic() + 300
    while run.running and time.monotonic() < deadline:
        serverapps.update(deployment.serverapp_pids())
        time.sleep(0.5)
    assert not run.running, "the run did not finish in 300 s"
    assert run.popen.returncode == 0, run.tail(60)
    return serverapps


def paper_run_config(mnist_dir, out_dir, **extra) -> dict:
    """The short run both uploads tests submit: ROUNDS rounds at RHO."""
    return {
        "num-server-rounds": ROUNDS,
        "rho": RHO,
        "validation-size": 1000,
        "initial-size": INITIAL_SIZE,
        "initial-epochs": 1,
        "server-epochs": 1,
        "model": "lenet5",  # the paper's: the app is tested, not the recipe
        "data-dir": str(mnist_dir),
        "out-dir": str(out_dir),
        **extra,
    }


def test_two_sites_upload_their_real_samples_over_tls_with_auth(
    deployment, site_folders, mnist_dir, tmp_path
):
    # Prepare
    out_dir = tmp_path / "out"
    run_config = paper_run_config(mnist_dir, out_dir)
    node_ids = {node.node_id: node for node in deployment.supernodes if node.running}

    with logs_on_failure(deployment):
        # Execute
        serverapps = finished_run(deployment, run_config)

        # Assert: the run, then each round's record
        assert serverapps, "no flwr-serverapp process was seen during the run"
        records = read_json_lines(out_dir / "rounds.jsonl")
        assert [record["round"] for record in records] == list(range(ROUNDS + 1))
        assert records[0]["buffer_size"] == INITIAL_SIZE
        for record in records[1:]:
            assert record["sites_accepted"] == SITES, record
            assert record["sites_rejected"] == 0, record
            assert record["samples_received"] == SITES * PER_SITE_ROUND, record
            # 784 pixels and a label byte per sample at least, uncompressed
            assert record["bytes_received"] > record["samples_received"] * 785
        assert records[-1]["buffer_size"] == INITIAL_SIZE + ROUNDS * SITES * (
            PER_SITE_ROUND
        )

        # Assert: the server's buffer holds each site's own pixels, once each
        checkpoint = latest(out_dir, device="cpu")
        assert checkpoint is not None and checkpoint.round == ROUNDS
        buffer = checkpoint.buffer
        images, labels = buffer.images.numpy(), buffer.labels.numpy()
        uploaded = np.isin(buffer.sites, np.array(list(node_ids), dtype=np.uint64))
        assert (~uploaded).sum() == INITIAL_SIZE  # the server's own samples
        for node_id, node in node_ids.items():
            rows = np.flatnonzero(buffer.sites == np.uint64(node_id))
            assert len(rows) == ROUNDS * PER_SITE_ROUND
            ids = buffer.ids[rows]
            assert len(np.unique(ids)) == len(ids)
            with np.load(f"{node.node_config['data-dir']}/data.npz") as site:
                position = {int(i): p for p, i in enumerate(site["ids"])}
                assert set(ids.tolist()) <= set(position)
                at = [position[int(i)] for i in ids]
                np.testing.assert_array_equal(images[rows], site["images"][at])
                np.testing.assert_array_equal(labels[rows], site["labels"][at])


def test_real_supernodes_share_one_global_budget_in_two_phases(
    deployment, mnist_dir, tmp_path
):
    # Prepare: the same sites, one round, one budget: what their per-site
    # budgets allow together
    out_dir = tmp_path / "out"
    run_config = paper_run_config(
        mnist_dir, out_dir, allocation="global", **{"num-server-rounds": 1}
    )
    node_ids = {str(node.node_id) for node in deployment.supernodes if node.running}

    with logs_on_failure(deployment):
        # Execute
        finished_run(deployment, run_config)

        # Assert: both sites summarised and got quotas that spend the budget;
        # their uploads kept to the quotas; phase 1 weighed little
        records = read_json_lines(out_dir / "rounds.jsonl")[1:]
        execution = read_json_lines(out_dir / "execution.jsonl")[1:]
        assert len(records) == len(execution) == 1
        for record, detail in zip(records, execution, strict=True):
            assert record["sites_accepted"] == SITES, record
            assert record["samples_received"] == SITES * PER_SITE_ROUND, record
            assert set(detail["quota_by_node"]) == node_ids, detail
            assert detail["samples_received_by_node"] == detail["quota_by_node"]
            assert 0 < record["summary_bytes"] <= 0.05 * record["bytes_received"]
        buffer = latest(out_dir, device="cpu").buffer
        keys = buffer.sites.astype(np.int64) * 10**6 + buffer.ids
        assert len(np.unique(keys)) == len(keys)  # each sample once


def test_supernodes_without_a_registered_key_are_refused(
    deployment, site_folders, tmp_path
):
    # Prepare: a key the SuperLink was never given, and no key at all
    unregistered_key = make_supernode_key(tmp_path, "stray")
    members = {node.node_id for node in deployment.supernodes if node.running}

    with logs_on_failure(deployment):
        # Execute: both try to join at once
        strays = [
            deployment.start_supernode(
                {"data-dir": str(site_folders[0])}, private_key=key, register=False
            )
            for key in (unregistered_key, None)
        ]
        returncodes = [stray.popen.wait(60) for stray in strays]

        # Assert
        for stray, returncode in zip(strays, returncodes, strict=True):
            assert returncode != 0, stray.tail()
            assert "Failed to initialize the connection to the SuperLink" in stray.log()
            assert "SuperNode ID:" not in stray.log()
        online = {
            int(node["node-id"])
            for node in deployment.nodes()
            if node["status"] == "online"
        }
        assert online == members


def test_the_superlink_speaks_only_tls_with_a_certificate_for_loopback(
    deployment, tls_files
):
    # Prepare
    host, port = deployment.address.rsplit(":", 1)
    context = ssl.create_default_context(cafile=str(tls_files.ca_certificate))

    # Execute, Assert: a verified TLS handshake for 127.0.0.1 succeeds...
    with socket.create_connection((host, int(port)), timeout=10) as raw:
        with context.wrap_socket(raw, server_hostname=host) as tls:
            assert tls.version() in ("TLSv1.2", "TLSv1.3")
    # ...and plain HTTP gets no HTTP answer
    plain = http.client.HTTPConnection(host, int(port), timeout=10)
    with pytest.raises((http.client.HTTPException, ConnectionError)):
        plain.request("GET", "/")
        plain.getresponse()
    plain.close()


def test_an_authenticated_node_keeps_its_id_when_it_restarts(deployment):
    # Prepare
    node = deployment.supernodes[0]
    assert node.running and node.node_id is not None

    with logs_on_failure(deployment):
        # Execute: a clean stop (the SuperLink marks it offline), then a restart
        node.stop(deployment.stop_timeout)
        restarted = deployment.restart_supernode(node)

        # Assert
        assert restarted.wait_connected(60) == node.node_id


def clientapps_of(node) -> list[int]:
    """The ``flwr-clientapp`` processes ``node`` runs now (one per message)."""
    return [
        pid
        for pid, _ in descendants(node.pid)
        if any(Path(arg).name == "flwr-clientapp" for arg in command_line(pid)[:2])
    ]


def wait_for(condition, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"{what} did not happen in {seconds} s"
        time.sleep(0.2)


def test_a_supernode_killed_mid_round_is_left_out_and_then_lands_its_samples_once(
    deployment, mnist_dir, tmp_path
):
    # Prepare: a third site (its own key, its own MNIST samples), two rounds;
    # each round waits until all three nodes are online before it samples them
    images, labels = load_mnist(mnist_dir, "train")
    ids = np.arange(len(labels) - SITE_SIZE, len(labels))
    folder = tmp_path / "data"
    folder.mkdir()
    np.savez(
        folder / "data.npz",
        images=images.numpy()[ids],
        labels=labels.numpy()[ids],
        ids=ids,
    )
    key = make_supernode_key(tmp_path, "site-2")
    node = deployment.start_supernode({"data-dir": str(folder)}, private_key=key)
    node_id = node.wait_connected(60)
    out_dir = tmp_path / "out"
    config = paper_run_config(mnist_dir, out_dir, **{"min-nodes": 3})
    rounds_file = out_dir / "rounds.jsonl"

    def rounds_done() -> int:
        return len(read_json_lines(rounds_file)) - 1 if rounds_file.exists() else -1

    with logs_on_failure(deployment):
        restarted = None
        try:
            run = deployment.start_run(config)
            # Execute: the box dies (SIGKILL) while its ClientApp works on round 1
            wait_for(lambda: clientapps_of(node), 120, "the site's round-1 ClientApp")
            working = clientapps_of(node)
            deployment.kill(node.pid)
            for pid in working:
                deployment.kill(pid)
            # the round ends without it once the SuperLink marks it offline
            wait_for(lambda: rounds_done() >= 1, 120, "round 1's end")
            assert rounds_done() == 1
            restarted = deployment.restart_supernode(node)
            assert restarted.wait_connected(60) == node_id
            wait_for(lambda: not run.running, 240, "the run's end")
            assert run.popen.returncode == 0, run.tail(60)
        finally:
            if restarted is not None:
                restarted.stop(deployment.stop_timeout)

        # Assert: round 1 went on with the two others, the third failed
        records = read_json_lines(rounds_file)
        assert (records[1]["sites_accepted"], records[1]["sites_failed"]) == (2, 1)
        assert records[2]["sites_accepted"] == 3, records[2]
        # the site was told round 1 was not kept, and its samples landed once:
        # the server holds from it exactly what its own ledger says was kept
        checkpoint = latest(out_dir, device="cpu")
        assert checkpoint.undelivered[node_id] == [1]
        held = checkpoint.buffer.ids[checkpoint.buffer.sites == np.uint64(node_id)]
        with np.load(folder / "sent-ids.npz") as ledger:
            kept = ledger["ids"]
        assert len(held) >= PER_SITE_ROUND and len(np.unique(held)) == len(held)
        assert sorted(held.tolist()) == sorted(kept.tolist())
