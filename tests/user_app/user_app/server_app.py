"""The user's ServerApp: SampleSelection where FedAvg was."""

from flwr.app import ArrayRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp

from flwr_select import SelectionConfig, TrainConfig, evaluate
from strategies import SampleSelection
from user_app.task import Net, server_samples, test_samples, to_input

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    data_dir = context.run_config["data-dir"]
    strategy = SampleSelection(
        Net,  # your model, as for FedAvg
        num_classes=10,
        selection=SelectionConfig(rho=0.1),  # each site sends its best 10 %
        server_training=TrainConfig(epochs=2, optimizer="adam", lr=1e-3),
        sample_shape=(28, 28),  # one raw image; uploads of another shape are rejected
        transform=to_input,  # raw uint8 samples -> Net's input; the same on the sites
        site_config={"data-dir": data_dir},  # what your sites need to find their data
        run_dir=context.run_config["run-dir"],  # checkpoint every round
    )
    # The method needs a model trained on samples the server holds: the sites
    # choose what to send by its mistakes. A random model would choose at random.
    initial_arrays = strategy.pretrain(server_samples(data_dir))
    held_out = test_samples(data_dir)

    def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        model = Net()
        model.load_state_dict(arrays.to_torch_state_dict())
        result = evaluate(model, held_out, transform=to_input)
        return MetricRecord({"accuracy": result.accuracy, "loss": result.loss})

    strategy.start(
        grid,
        initial_arrays,
        num_rounds=context.run_config["num-server-rounds"],
        evaluate_fn=evaluate_fn,
    )
