"""A user's own Flower app, switched to sample selection as the README shows.

``tests/user_app`` is Flower's quickstart-pytorch shape on MNIST: its own
float-input ``Net``, its own transform and its own ``@app.train()``; its
ServerApp and ClientApp are the README's plug-in example, verbatim.
"""

import shutil
from pathlib import Path

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord

from flwr_select import SelectionConfig
from flwr_select.selection.checkpoint import latest
from strategies import SampleSelection
from tests.user_app.user_app.task import (
    SERVER_SAMPLES,
    SITE_ROUND_SAMPLES,
    Net,
    server_samples,
    to_input,
)

APP = Path(__file__).resolve().parent / "user_app"
README = Path(__file__).resolve().parents[1] / "README.md"


def test_the_readme_shows_the_apps_code_verbatim():
    readme = README.read_text()
    for part in ("server_app.py", "client_app.py"):
        code = (APP / "user_app" / part).read_text()
        body = code.split('"""', 2)[2].strip()  # the code after the module docstring
        assert body in readme, f"README's plug-in example differs from {part}"


def test_the_users_app_learns_with_selection_on_flowers_engine(
    mnist_dir, tmp_path, flower_simulation
):
    # Execute: 2 rounds, 2 sites, through flower-simulation on the app's folder
    done = flower_simulation(
        str(APP),
        "--num-supernodes",
        "2",
        "--run-config",
        f'data-dir="{mnist_dir}" run-dir="{tmp_path}"',
    )
    # Assert: it ran, every upload arrived, and the model learned from them
    assert done.returncode == 0, done.stderr[-3000:]
    checkpoint = latest(tmp_path, device="cpu")
    assert checkpoint.round == 2
    sent = int(SelectionConfig(rho=0.1).rho * SITE_ROUND_SAMPLES)  # per site, round
    assert len(checkpoint.buffer) == SERVER_SAMPLES + 2 * 2 * sent
    records = checkpoint.records
    assert records[2]["accuracy"] > records[0]["accuracy"] + 0.01
    assert "fraction_evaluate is set to 0.0" not in done.stdout + done.stderr


def test_sites_without_the_transform_stop_the_run_with_the_fix_named(
    mnist_dir, tmp_path, flower_simulation
):
    # Prepare: the same app, but its sites were not given the transform
    app = tmp_path / "app"
    shutil.copytree(APP, app)
    client = app / "user_app" / "client_app.py"
    client.write_text(client.read_text().replace(", transform=to_input)", ")"))
    # Execute
    done = flower_simulation(
        str(app),
        "--run-config",
        f'data-dir="{mnist_dir}" run-dir="{tmp_path / "run"}"',
    )
    # Assert: round 1 ended the run, with the sites' error and its fix
    assert done.returncode != 0
    output = done.stdout + done.stderr
    assert "round 1: all 2 nodes failed the same way" in output
    assert "cannot take this data" in output and "transform=" in output
    assert latest(tmp_path / "run", device="cpu").round == 0  # nothing after round 0


def test_a_model_that_cannot_take_raw_samples_fails_before_round_1(mnist_dir):
    # Net takes float (n, 1, 28, 28); without the transform it gets uint8 (n, 28, 28)
    strategy = SampleSelection(Net, num_classes=10, sample_shape=(28, 28))
    with pytest.raises(ValueError, match=r"cannot take this data.*transform=") as err:
        strategy.pretrain(server_samples(str(mnist_dir)))
    assert "SampleSelection" in str(err.value) and "add_select_handler" in str(
        err.value
    )
    assert len(strategy.buffer) == 0  # refused before anything was buffered
    with pytest.raises(ValueError, match="cannot take this data"):
        strategy.start(None, ArrayRecord(Net().state_dict()), num_rounds=1)


def test_the_same_model_with_the_transform_passes_the_check(mnist_dir):
    strategy = SampleSelection(
        Net, num_classes=10, sample_shape=(28, 28), transform=to_input
    )
    torch.manual_seed(0)
    result = strategy.train_initial(server_samples(str(mnist_dir)))
    assert result.samples == SERVER_SAMPLES and len(strategy.buffer) == SERVER_SAMPLES


@pytest.mark.parametrize(
    ("key", "named"), [("lr", "server_training"), ("rho", "tells every site")]
)
def test_flowers_train_config_cannot_pose_as_the_servers_settings(key, named):
    strategy = SampleSelection(Net, 10, sample_shape=(28, 28), transform=to_input)
    with pytest.raises(ValueError, match=named):
        strategy.start(
            None,
            ArrayRecord(Net().state_dict()),
            num_rounds=1,
            train_config=ConfigRecord({key: 0.1}),
        )


def test_a_fresh_run_without_server_samples_warns(caplog):
    strategy = SampleSelection(Net, 10, sample_shape=(28, 28), transform=to_input)
    strategy.begin(Net().state_dict(), num_rounds=1)
    assert "holds none of its own samples" in caplog.text


def test_a_finished_run_started_again_says_where_and_what_to_do(
    mnist_dir, tmp_path, caplog, monkeypatch
):
    monkeypatch.chdir(tmp_path)

    def strategy():
        return SampleSelection(
            Net, 10, transform=to_input, run_dir="runs/mine", sample_shape=(28, 28)
        )

    first = strategy()
    first.pretrain(server_samples(str(mnist_dir)))
    first.finish_round(0, {"accuracy": 0.5})
    first.finish_round(1, {"accuracy": 0.6})
    again = strategy()
    again.begin(Net().state_dict(), num_rounds=1)
    assert str(tmp_path / "runs" / "mine") in caplog.text  # absolute, not "runs/mine"
    assert "holds a finished run (1 of 1 rounds)" in caplog.text
    assert "another run_dir" in caplog.text
