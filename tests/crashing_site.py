"""The sample-selection app on MNIST with sites that crash on demand (failure tests).

The environment variable ``CRASH_SITES`` lists ``round:partition`` pairs, e.g.
``"1:0 2:0 2:1"``: the site with that ``partition-id`` raises in its handler in that
round instead of answering, as a site whose code or data breaks would;
``round:partition:top-up`` crashes only in the round's top-up. (Simulated
sites see the environment of ``flower-simulation``, not its run config.) Phase 1
of a round with one global budget is always answered: a site that crashes there
fails between the two phases.
"""

import os

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from clients.site import make_select_handler, make_summary_handler
from flwr_select.messages import CONFIG_KEY
from flwr_select.selection.protocol import (
    ACTION,
    SUMMARY_ACTION,
    TOP_UP_KEY,
)
from simulations.mnist import DEFAULTS, check_config, server_app

select_and_upload = make_select_handler()
client_app = ClientApp()
client_app.query(SUMMARY_ACTION)(make_summary_handler())


@client_app.train(ACTION)
def select_or_crash(msg: Message, context: Context) -> Message:
    """Raise where ``CRASH_SITES`` says so, else answer as a real site."""
    config = msg.content.config_records[CONFIG_KEY]
    here = f"{config['server-round']}:{context.node_config['partition-id']}"
    if config.get(TOP_UP_KEY, False):
        here += ":top-up"
    if here in os.environ.get("CRASH_SITES", "").split():
        raise RuntimeError(f"site {here} crashed on purpose")
    return select_and_upload(msg, context)


__all__ = ["DEFAULTS", "check_config", "client_app", "server_app"]
