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
from flwr_select.selection.allocation import SKETCH_POINTS, ScoreSketch
from flwr_select.selection.buffer import default_device
from flwr_select.selection.ledger import SiteLedger
from flwr_select.selection.policies import Budget, likely_mislabelled, ranked
from flwr_select.selection.protocol import SelectionConfig
from flwr_select.selection.trial import TrialResult, trial_test
from flwr_select.selection.wire import pack, wire_bytes


def rank_candidates(
    model: nn.Module,
    site: SiteData,
    selection: SelectionConfig,
    *,
    server_round: int,
    site_key: int,
    ledger: SiteLedger,
    undelivered: Sequence[int] = (),
    undelivered_top_ups: Sequence[int] = (),
    transform: Transform = None,
    top_up: bool = False,
    trial: TrialResult | None = None,
) -> tuple[TrialResult, np.ndarray, np.ndarray]:
    """Trial-test the site's samples; return the trial and the policy's ranking.

    The ranking is :func:`~flwr_select.selection.policies.ranked`'s: every
    eligible position best first, and its priority. The same arguments give the
    same ranking, so a round's phases (summary, upload, top-up) agree: a
    ``top_up`` ranks with what the round's upload ranked with and leaves out
    the samples that upload sent. ``trial`` is this model's trial test of these
    samples if the site already ran it (phase 1); else it is run here.
    """
    if trial is None:
        trial = site_trial(model, site, transform)
    positions, priorities = ranked(
        trial,
        selection.policy(),
        confidence=selection.confidence,
        seed=(selection.seed, server_round, site_key),
        sent=(
            ledger.before(server_round)
            if top_up
            else ledger.kept_by_server(server_round, undelivered, undelivered_top_ups)
        ),
    )
    if top_up:
        fresh = ~np.isin(trial.ids[positions], ledger.sent_in(server_round))
        positions, priorities = positions[fresh], priorities[fresh]
    return trial, positions, priorities


def site_trial(model: nn.Module, site: SiteData, transform: Transform) -> TrialResult:
    """Trial-test the site's samples with the received model, on the site's device.

    A model that cannot take the samples is refused first, with the fix named
    (:func:`~flwr_select.models.check_model`).
    """
    model = model.to(default_device())
    check_model(model, site.images.shape[1:], site.num_classes, transform)
    return trial_test(model, site, transform=model_input(transform))


def byte_cap(selection: SelectionConfig, node_max_bytes: int = 0) -> int | None:
    """Return the cap on one upload's wire bytes: the run's and the node's, or None."""
    caps = [cap for cap in (selection.max_bytes, node_max_bytes) if cap]
    return min(caps) if caps else None


def site_summary(
    model: nn.Module,
    site: SiteData,
    selection: SelectionConfig,
    *,
    server_round: int,
    site_key: int,
    ledger: SiteLedger,
    undelivered: Sequence[int] = (),
    undelivered_top_ups: Sequence[int] = (),
    transform: Transform = None,
    node_max_bytes: int = 0,
    trial: TrialResult | None = None,
) -> dict[str, int | list[int] | list[float]]:
    """Phase 1 of a round with one global budget: what the site's best are worth.

    The site ranks its candidates as :func:`site_round` would and sketches the
    priorities of as many as it could send (``max-count``, and the run's and the
    node's byte caps, measured on the wire format): ``num-candidates``,
    ``sketch-ranks`` and ``sketch-values`` (:class:`ScoreSketch`, at up to
    twice as many ranks as its rho share, so that phase 1 weighs little beside the
    uploads, and at most :data:`SKETCH_POINTS`). Nothing is
    sent or recorded in the ledger. ``trial``: as for :func:`rank_candidates`.
    """
    _, positions, priorities = rank_candidates(
        model,
        site,
        selection,
        server_round=server_round,
        site_key=site_key,
        ledger=ledger,
        undelivered=undelivered,
        undelivered_top_ups=undelivered_top_ups,
        transform=transform,
        trial=trial,
    )
    if selection.max_count:
        positions = positions[: selection.max_count]
    cap = byte_cap(selection, node_max_bytes)
    if cap is not None:
        fits = pack(site, positions, max_bytes=cap, compress=selection.compress)
        positions = positions[: len(fits["ids"].numpy())]
    # at most twice the points the site's own rho would send: phase 1 stays a
    # small part of what the round uploads, however few samples a site holds
    share = selection.budget().sample_limit(len(site))
    points = min(SKETCH_POINTS, max(2, 2 * share))
    sketch = ScoreSketch.of(priorities, len(positions), points)
    return {
        "num-candidates": len(site),
        "sketch-ranks": sketch.ranks.tolist(),
        "sketch-values": sketch.values.tolist(),
    }


def site_round(
    model: nn.Module,
    site: SiteData,
    selection: SelectionConfig,
    *,
    server_round: int,
    site_key: int,
    ledger: SiteLedger,
    undelivered: Sequence[int] = (),
    undelivered_top_ups: Sequence[int] = (),
    transform: Transform = None,
    quota: int | None = None,
    top_up: bool = False,
    node_max_bytes: int = 0,
    trial: TrialResult | None = None,
) -> tuple[ArrayRecord, dict[str, int | float]]:
    """One site's round: trial test, selection, upload; ``ledger`` records the ids.

    The site sends its best ``rho`` share (and at most ``max-count``), or, in a
    round with one global budget, its ``quota`` (phase 2, after
    :func:`site_summary`); never more bytes than the run's and the node's caps
    (``node_max_bytes``: 0 for none). A ``top_up`` (a second pass of a global
    round, for the quotas other sites did not send) sends the ``quota`` best
    after what the round's upload sent.

    ``undelivered`` are the rounds whose upload the server says it did not keep,
    ``undelivered_top_ups`` those whose top-up only it did not keep
    (see :class:`~flwr_select.selection.ledger.SiteLedger`). Choices are seeded
    by ``(selection.seed, server_round, site_key)``. ``transform`` says how the
    raw samples become model input, as on the server (see :func:`site_trial`);
    ``trial`` is the round's trial test if phase 1 already ran it.

    Returns the upload and the site's metrics (the keys of
    :data:`~flwr_select.selection.server.SITE_METRICS`): candidates, wrong
    predictions, samples and wrong samples sent, trial accuracy, upload bytes, and
    ``num-suspect``: the candidates whose label the model gives less than the
    selection's ``trim`` (likely mislabelled), so that the server sees a noisy
    site even when its policy leaves those samples out of the upload.
    """
    trial, positions, _ = rank_candidates(
        model,
        site,
        selection,
        server_round=server_round,
        site_key=site_key,
        ledger=ledger,
        undelivered=undelivered,
        undelivered_top_ups=undelivered_top_ups,
        transform=transform,
        top_up=top_up,
        trial=trial,
    )
    budget = selection.budget() if quota is None else Budget(count=quota)
    chosen = positions[: budget.sample_limit(len(trial))]
    cap = byte_cap(selection, node_max_bytes)
    upload = pack(site, chosen, max_bytes=cap, compress=selection.compress)
    sent_ids = upload["ids"].numpy().astype(np.int64)
    ledger.record(sent_ids, server_round, top_up=top_up)
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
