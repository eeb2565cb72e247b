"""Biased-sampling data parallelism end to end: the Flower app and the experiment."""

from pathlib import Path

import pytest

from flwr_select.files import read_json_lines
from simulations.biased import CONFIGURATIONS, SHORT, run_experiment
from simulations.experiments import Data

ROUNDS = 30
RUN = {
    "num-server-rounds": ROUNDS,
    "eval-every": 10,
    "validation-size": 1000,
    "pool-size": 4000,
    "lr": 0.05,
    "sampling": '"favoured"',
    "reduction": '"median"',
    "seed": 2,
}


def simulate(flower_simulation, out: Path, mnist_dir: Path, **overrides):
    config = {**RUN, **overrides, "data-dir": f'"{mnist_dir}"', "out-dir": f'"{out}"'}
    return flower_simulation(
        "simulations.mnist_data_parallel",
        "--num-supernodes",
        "2",
        "--run-config",
        " ".join(f"{k}={v}" for k, v in config.items()),
    )


@pytest.fixture(scope="module")
def run_out(mnist_dir, tmp_path_factory, flower_simulation):
    out = tmp_path_factory.mktemp("data-parallel")
    done = simulate(flower_simulation, out, mnist_dir)
    assert done.returncode == 0, done.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def records(run_out):
    return read_json_lines(run_out / "rounds.jsonl")


def test_the_same_seed_gives_the_same_records_to_the_bit(
    run_out, mnist_dir, tmp_path, flower_simulation
):
    # Execute: the run again; the engine gives its nodes new ids and the
    # gradients arrive in their own order
    done = simulate(flower_simulation, tmp_path, mnist_dir)
    assert done.returncode == 0, done.stderr[-3000:]
    # Assert: every loss, accuracy, monitor and gradient norm the same
    first = (run_out / "rounds.jsonl").read_bytes()
    assert (tmp_path / "rounds.jsonl").read_bytes() == first


def test_two_workers_on_flower_bring_the_loss_down(records):
    assert [r["round"] for r in records] == [0, 10, 20, 30]
    assert records[-1]["loss"] < records[0]["loss"] - 0.3
    assert records[-1]["accuracy"] > records[0]["accuracy"] + 0.2
    assert "test_accuracy" in records[-1] and "test_accuracy" not in records[0]


def test_every_record_holds_the_monitors(records):
    for r in records:
        assert len(r["type1_error"]) == len(r["type2_error"]) == 10
        assert all(0.0 <= e <= 1.0 for e in r["type1_error"] + r["type2_error"])
        assert len(r["filter_redundancy"]) == 2  # LeNet-5's two conv layers
        assert r["iterations"] == r["round"]
    for r in records[1:]:
        assert r["workers_accepted"] == 2 and r["workers_rejected"] == 0
        assert len(r["grad_norms"]) == 2
        gap = max(r["grad_norms"]) - min(r["grad_norms"])
        assert r["grad_norm_gap"] == pytest.approx(gap)


def test_an_unknown_reduction_stops_the_run_with_its_name(
    mnist_dir, tmp_path, flower_simulation
):
    done = simulate(
        flower_simulation,
        tmp_path,
        mnist_dir,
        **{"reduction": '"avg"', "num-server-rounds": 1},
    )
    assert "unknown reduction 'avg'" in done.stdout + done.stderr
    assert not (tmp_path / "rounds.jsonl").exists()


def test_the_short_experiment_writes_every_configuration_and_a_figure(
    mnist_dir, tmp_path
):
    summary = run_experiment(Data("mnist", mnist_dir), SHORT, tmp_path, seeds=[0])
    assert set(summary["lines"]) == {c.label for c in CONFIGURATIONS}
    assert (tmp_path / "biased" / "biased-mnist.png").stat().st_size > 20_000
    expected = list(range(0, SHORT.iterations + 1, SHORT.eval_every))
    for path in (tmp_path / "biased" / "runs-short").glob("*.jsonl"):
        run = read_json_lines(path)
        assert [r["iterations"] for r in run] == expected
        reached = [r["iterations"] for r in run if r["accuracy"] >= SHORT.target]
        assert run[-1]["iterations_to_target"] == (reached[0] if reached else None)
        assert all(r["workers_accepted"] == SHORT.workers for r in run[1:])
    baseline = summary["lines"]["uniform+mean"]
    assert baseline["accuracy"][0][-1] > baseline["accuracy"][0][0] + 0.2
