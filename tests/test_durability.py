"""A run survives its server being killed, and sites that crash, on Flower's real engine."""

import os
import signal
import subprocess
import time

import numpy as np
import torch
from flwr.app import ArrayRecord

from flwr_select.files import read_json_lines
from flwr_select.models import build_model
from flwr_select.selection.checkpoint import latest
from flwr_select.selection.wire import wire_bytes

SITES, FOLD, RHO = 2, 1000, 0.1
SENT = int(RHO * FOLD)  # 100 per site and round


def run_config(mnist_dir, out, rounds: int, **extra) -> str:
    values = {
        "num-server-rounds": rounds,
        "rho": RHO,
        "seed": 5,
        "validation-size": 1000,
        "initial-size": 1000,
        "pool-size": SITES * rounds * FOLD,
        "initial-epochs": 1,
        "server-epochs": 2,
        "model": "lenet5",  # the paper's: the app is tested, not the recipe
        **extra,
    }
    text = " ".join(
        f'{k}="{v}"' if isinstance(v, str) else f"{k}={v}" for k, v in values.items()
    )
    return f'{text} data-dir="{mnist_dir}" out-dir="{out}"'


def records(out) -> list[dict]:
    return read_json_lines(out / "rounds.jsonl")


def test_a_killed_server_resumes_with_every_accepted_sample(
    mnist_dir, tmp_path, flower_simulation_command
):
    # Prepare
    rounds = 3
    command, env = flower_simulation_command
    argv = [
        *command,
        "--app",
        "simulations.mnist",
        "--num-supernodes",
        str(SITES),
        "--run-config",
        run_config(mnist_dir, tmp_path, rounds),
    ]
    server = subprocess.Popen(
        argv,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # its own process group: Ray's processes too
    )
    # Execute: SIGKILL the whole simulation once round 1 is checkpointed
    try:
        deadline = time.monotonic() + 300
        while (checkpoint := latest(tmp_path)) is None or checkpoint.round < 1:
            assert server.poll() is None, "the run ended before it could be killed"
            assert time.monotonic() < deadline, "round 1 never completed"
            time.sleep(0.05)
    finally:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait()
    before = latest(tmp_path, device="cpu")
    assert 1 <= before.round < rounds
    resumed = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600)
    # Assert: it resumed after the checkpointed round and finished the run
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"after round {before.round}" in resumed.stderr + resumed.stdout
    after = latest(tmp_path, device="cpu")
    assert after.round == rounds
    assert [r["round"] for r in records(tmp_path)] == list(range(rounds + 1))
    # every sample accepted before the kill is still there, first, as it was
    kept = len(before.buffer)
    assert kept == 1000 + before.round * SITES * SENT
    assert torch.equal(after.buffer.images[:kept], before.buffer.images)
    assert torch.equal(after.buffer.labels[:kept], before.buffer.labels)
    np.testing.assert_array_equal(after.buffer.ids[:kept], before.buffer.ids)
    np.testing.assert_array_equal(after.buffer.sites[:kept], before.buffer.sites)
    # the same number of rounds, each with every site's budget, no sample twice
    assert len(after.buffer) == 1000 + rounds * SITES * SENT
    assert len(np.unique(after.buffer.ids)) == len(after.buffer)  # MNIST positions
    assert all(
        after.records[r]["samples_received"] == SITES * SENT
        for r in range(1, rounds + 1)
    )


def test_crashing_sites_are_recorded_and_leave_the_model_unchanged_when_all_fail(
    mnist_dir, tmp_path, flower_simulation
):
    # Prepare: three sites; in round 1 site 0 crashes, in round 2 all of them
    sites = 3
    config = run_config(mnist_dir, tmp_path, 2, **{"pool-size": sites * 2 * FOLD})
    # Execute
    done = flower_simulation(
        "tests.crashing_site",
        "--num-supernodes",
        str(sites),
        "--run-config",
        config,
        env={"CRASH_SITES": "1:0 2:0 2:1 2:2"},
    )
    # Assert
    assert done.returncode == 0, done.stderr[-3000:]
    _, one, two = records(tmp_path)
    assert (one["sites_failed"], one["sites_accepted"]) == (1, 2)
    assert one["samples_received"] == 2 * SENT and one["model_updated"] == 1
    assert (two["sites_failed"], two["sites_accepted"]) == (3, 0)
    assert two["samples_received"] == 0 and two["model_updated"] == 0
    assert two["buffer_size"] == one["buffer_size"]
    assert (two["accuracy"], two["loss"]) == (one["accuracy"], one["loss"])
    assert "no upload accepted; the model is unchanged" in done.stderr + done.stdout
    checkpoint = latest(tmp_path, device="cpu")
    assert checkpoint.round == 2 and len(checkpoint.buffer) == one["buffer_size"]


def test_a_global_round_tops_up_the_quota_of_a_site_that_fails_between_the_phases(
    mnist_dir, tmp_path, flower_simulation
):
    # Prepare: three sites share one budget; in round 1 site 0 answers phase 1,
    # then crashes instead of uploading its quota, and site 1 crashes in the
    # top-up that asks it for part of that quota
    sites = 3
    config = run_config(
        mnist_dir,
        tmp_path,
        2,
        **{"pool-size": sites * 2 * FOLD, "allocation": "global"},
    )
    # Execute
    done = flower_simulation(
        "tests.crashing_site",
        "--num-supernodes",
        str(sites),
        "--run-config",
        config,
        env={"CRASH_SITES": "1:0 1:1:top-up"},
    )
    # Assert: the budget is what the per-site budgets allow together, shared by
    # quotas; in round 1 the crashed site's quota goes to the two others, and
    # only the top-up that failed is lost
    assert done.returncode == 0, done.stderr[-3000:]
    _, one, two = records(tmp_path)
    _, first, second = read_json_lines(tmp_path / "execution.jsonl")
    budget = sites * SENT
    assert sum(first["quota_by_node"].values()) == budget
    (crashed,) = set(first["quota_by_node"]) - set(first["samples_received_by_node"])
    top_ups = first["top_up_by_node"]
    assert (
        crashed not in top_ups
        and sum(top_ups.values()) == first["quota_by_node"][crashed]
    )
    assert len(top_ups) == 2 and min(top_ups.values()) > 0
    assert (one["sites_failed"], one["sites_accepted"]) == (1, 2)
    delivered = one["top_up_samples"]
    assert delivered in top_ups.values()  # one of the two top-ups came
    assert (
        one["samples_received"] == budget - first["quota_by_node"][crashed] + delivered
    )
    # round 2: every site's upload lands, none refused for a sample sent before:
    # the failed top-up's samples were offered again, round 1's upload was not
    assert (two["sites_accepted"], two["sites_rejected"]) == (3, 0)
    assert two["samples_received"] == budget and not second["top_up_by_node"]
    # phase 1 costs a small part of what the uploads weigh
    assert 0 < two["summary_bytes"] <= 0.05 * two["bytes_received"]
    # the downlink: a copy of the model to each site in phase 1, to each with a
    # quota in phase 2, and to each asked for a top-up (configs weigh far less)
    model = wire_bytes(ArrayRecord(build_model("lenet5").state_dict()))
    quotas = [q for q in first["quota_by_node"].values() if q > 0]
    assert one["bytes_sent"] // model == sites + len(quotas) + len(top_ups)
    assert two["bytes_sent"] // model == 2 * sites
    assert "quotas by node" in done.stdout and "top-ups by node" in done.stdout
