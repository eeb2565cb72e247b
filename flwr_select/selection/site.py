"""One remote site's round without Flower: trial test, selection, upload.

:func:`site_round` is what a site of Jiang et al. does with the model it
receives, whoever carries it: the ClientApp handlers (``clients.site``,
``clients.legacy``) wrap it in messages, the in-process experiments
(``simulations.paper``) call it directly, so both run the same site.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from flwr.app import ArrayRecord
from torch import nn

from flwr_select.data import SiteData
from flwr_select.models import Transform, check_model, model_input
from flwr_select.selection.buffer import default_device
from flwr_select.selection.ledger import SiteLedger
from flwr_select.selection.policies import likely_mislabelled, select
from flwr_select.selection.protocol import SelectionConfig
from flwr_select.selection.trial import trial_test
from flwr_select.selection.wire import pack, wire_bytes


def site_round(
    model: nn.Module,
    site: SiteData,
    selection: SelectionConfig,
    *,
    server_round: int,
    site_key: int,
    ledger: SiteLedger,
    undelivered: Sequence[int] = (),
    transform: Transform = None,
) -> tuple[ArrayRecord, dict[str, int | float]]:
    """One site's round: trial test, selection, upload; ``ledger`` records the ids.

    ``undelivered`` are the rounds whose upload the server says it did not keep
    (see :class:`~flwr_select.selection.ledger.SiteLedger`). Choices are seeded
    by ``(selection.seed, server_round, site_key)``. ``transform`` says how the
    raw samples become model input, as on the server; a model that cannot take
    them is refused first with the fix named
    (:func:`~flwr_select.models.check_model`).

    Returns the upload and the site's metrics (the keys of
    :data:`~flwr_select.selection.server.SITE_METRICS`): candidates, wrong
    predictions, samples and wrong samples sent, trial accuracy, upload bytes, and
    ``num-suspect``: the candidates whose label the model gives less than the
    selection's ``trim`` (likely mislabelled), so that the server sees a noisy
    site even when its policy leaves those samples out of the upload.
    """
    model = model.to(default_device())
    check_model(model, site.images.shape[1:], site.num_classes, transform)
    trial = trial_test(model, site, transform=model_input(transform))
    budget = selection.budget()
    chosen = select(
        trial,
        budget,
        selection.policy(),
        confidence=selection.confidence,
        seed=(selection.seed, server_round, site_key),
        sent=ledger.kept_by_server(server_round, undelivered),
    )
    upload = pack(site, chosen, max_bytes=budget.max_bytes, compress=selection.compress)
    sent_ids = upload["ids"].numpy().astype(np.int64)
    ledger.record(sent_ids, server_round)
    return upload, {
        "num-candidates": len(site),
        "num-wrong": int(trial.wrong.sum()),
        "num-selected": len(sent_ids),
        "num-selected-wrong": int(trial.wrong[np.isin(trial.ids, sent_ids)].sum()),
        "trial-accuracy": trial.accuracy,
        "upload-bytes": wire_bytes(upload),
        "num-suspect": int(
            likely_mislabelled(trial.label_probability, selection.trim).sum()
        ),
    }
