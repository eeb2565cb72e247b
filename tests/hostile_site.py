"""The sample-selection app on MNIST in which site 0 attacks the server every round.

Site 0 (``partition-id`` 0) runs the real site handler, then replaces its reply
with the next of :func:`tests.hostile.attacks` (in name order, one per round);
the other sites answer honestly.
"""

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from clients.site import make_select_handler
from flwr_select.messages import CONFIG_KEY
from flwr_select.selection.protocol import (
    ACTION,
    UPLOAD_KEY,
)
from simulations.mnist import DEFAULTS, check_config, server_app
from tests.hostile import attacks

select_and_upload = make_select_handler()
client_app = ClientApp()


@client_app.train(ACTION)
def select_or_attack(msg: Message, context: Context) -> Message:
    """Answer as a real site; site 0 sends this round's attack instead."""
    honest = select_and_upload(msg, context)
    if context.node_config["partition-id"] != 0:
        return honest
    server_round = int(msg.content.config_records[CONFIG_KEY]["server-round"])
    names = sorted(attacks())
    build, _ = attacks()[names[server_round % len(names)]]
    return Message(build(honest.content.array_records[UPLOAD_KEY]), reply_to=msg)


__all__ = ["DEFAULTS", "check_config", "client_app", "server_app"]
