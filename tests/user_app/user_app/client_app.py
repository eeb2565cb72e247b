"""The user's ClientApp: its own training handler, and the select handler beside it."""

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from clients import add_select_handler
from flwr_select import SiteData
from user_app.task import Net, site_samples, to_input

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    """The app's own FedAvg training, untouched (not used by sample selection)."""
    return Message(
        RecordDict({"metrics": MetricRecord({"num-examples": 0})}), reply_to=msg
    )


def load_site(context: Context, config: ConfigRecord) -> SiteData:
    """This site's samples this round (``config`` is what the server sent)."""
    site = int(context.node_config["partition-id"])
    return site_samples(
        str(context.run_config["data-dir"]), site, int(config["server-round"])
    )


add_select_handler(app, load_site=load_site, model_fn=Net, transform=to_input)
