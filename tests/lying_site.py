"""The sample-selection app on MNIST in which site 0 lies in every phase-1 summary.

Site 0 (``partition-id`` 0) runs the real summary handler, then claims the most
candidates a site may (2**40) and a worth of 1e9 at every rank of its sketch, to
win the whole of a global budget; it then uploads what its real site code
selects, which is worth less than it claimed. The other sites answer honestly.
"""

from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from clients.site import make_select_handler, make_summary_handler
from flwr_select.messages import METRICS_KEY
from flwr_select.selection.protocol import (
    ACTION,
    SUMMARY_ACTION,
)
from flwr_select.selection.server import MAX_CANDIDATES
from simulations.mnist import DEFAULTS, check_config, server_app

summarise = make_summary_handler()
client_app = ClientApp()
client_app.train(ACTION)(make_select_handler())


@client_app.query(SUMMARY_ACTION)
def summarise_or_lie(msg: Message, context: Context) -> Message:
    """Answer as a real site; site 0 claims far more than it holds."""
    honest = summarise(msg, context)
    if context.node_config["partition-id"] != 0:
        return honest
    metrics = dict(honest.content.metric_records[METRICS_KEY])
    metrics["num-candidates"] = MAX_CANDIDATES
    metrics["sketch-values"] = [1e9] * len(metrics["sketch-values"])
    return Message(RecordDict({METRICS_KEY: MetricRecord(metrics)}), reply_to=msg)


__all__ = ["DEFAULTS", "check_config", "client_app", "server_app"]
