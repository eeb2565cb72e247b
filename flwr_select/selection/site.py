"""One remote site's round without Flower: trial test, selection, upload.

:func:`site_round` is what a site of Jiang et al. does with the model it
receives, whoever carries it: the ClientApp handlers (``clients.site``,
``clients.legacy``) wrap it in messages, the in-process experiments
(``simulations.paper``) call it directly, so both run the same site.

The site answers someone else's server, so what it is asked is bounded by its
own ledger, not by the server's word (:func:`check_request`,
:func:`answer_cap`): no round earlier than the latest it answered, one top-up per
round and only after the round's upload, and never more bytes in a round than
the node's own ``max-bytes``. A refusal raises, naming the key, before the
ledger changes.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from flwr.app import ArrayRecord
from torch import nn

from flwr_select.config import check
from flwr_select.data import SiteData
from flwr_select.messages import ROUND_KEY
from flwr_select.models import Transform, check_model, model_input
from flwr_select.selection.allocation import SKETCH_POINTS, ScoreSketch
from flwr_select.selection.buffer import default_device
from flwr_select.selection.ledger import SiteLedger
from flwr_select.selection.policies import Budget, likely_mislabelled, ranked
from flwr_select.selection.protocol import (
    TOP_UP_KEY,
    SelectionConfig,
)
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


def check_request(ledger: SiteLedger, server_round: int, *, top_up: bool) -> None:
    """Refuse what the site must not answer, whatever the server asks.

    A round earlier than the latest the site answered: a resumed server redoes
    its round, never an earlier one, and an earlier round would release (and
    send again) what the later rounds sent. A top-up before the round's upload,
    or a second one in the round: each sends the best samples past what the
    round sent, so asked again and again, a site would send everything.

    Raises
    ------
    flwr_select.config.ConfigError
        Naming ``server-round`` or ``top-up``; the ledger is not changed.
    """
    latest = ledger.latest_round()
    check(
        ROUND_KEY,
        server_round,
        server_round >= latest,
        f">= {latest}, the latest round this site answered (a new experiment "
        "starts with the site's ledger deleted)",
    )
    if top_up:
        uploaded = ledger.answered_in(server_round, top_up=False)
        check(
            TOP_UP_KEY, top_up, uploaded, f"false before round {server_round}'s upload"
        )
        again = ledger.answered_in(server_round, top_up=True)
        check(
            TOP_UP_KEY,
            top_up,
            not again,
            f"false: round {server_round} had its top-up (one a round)",
        )


def answer_cap(
    site: SiteData,
    selection: SelectionConfig,
    ledger: SiteLedger,
    server_round: int,
    node_max_bytes: int = 0,
    *,
    top_up: bool = False,
) -> int | None:
    """Return the cap on an answer's wire bytes (None for none), if it may answer.

    The request must be one the site answers (:func:`check_request`). The cap
    is the run's on one upload (the selection's ``max-bytes``) and what is
    left of the node's own budget for the round (``node_max_bytes`` less what
    the ledger says the round sent; 0 for no budget).

    Raises
    ------
    flwr_select.config.ConfigError
        If the request is refused (:func:`check_request`), or the run's cap is
        below the bytes of an empty upload.
    ValueError
        If what is left of the node's round budget is below an empty upload's
        bytes: the site sends nothing more in the round (the message names the
        node config ``max-bytes``).
    """
    check_request(ledger, server_round, top_up=top_up)
    empty = wire_bytes(pack(site, np.empty(0, np.int64), compress=selection.compress))
    run_cap = selection.max_bytes
    check(
        "max-bytes",
        run_cap,
        run_cap == 0 or run_cap >= empty,
        f"0 (no limit) or >= {empty}, an empty upload's bytes",
    )
    caps = [run_cap] if run_cap else []
    if node_max_bytes:
        sent = ledger.bytes_sent_in(server_round)
        left = node_max_bytes - sent
        if left < empty:
            raise ValueError(
                f"node config max-bytes: server-round {server_round} may send "
                f"{node_max_bytes} bytes and sent {sent}, and an answer needs "
                f"{empty} or more; the site sends nothing more in this round"
            )
        caps.append(left)
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
    node's byte caps, measured on the wire format: :func:`answer_cap`):
    ``num-candidates``, ``sketch-ranks`` and ``sketch-values``
    (:class:`ScoreSketch`, at up to twice as many ranks as its rho share, so
    that phase 1 weighs little beside the uploads, and at most
    :data:`SKETCH_POINTS`). Nothing is sent or recorded in the ledger; a round
    earlier than the site's latest is refused (:func:`check_request`).
    ``trial``: as for :func:`rank_candidates`.
    """
    cap = answer_cap(site, selection, ledger, server_round, node_max_bytes)
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
    :func:`site_summary`); never more bytes than the run's cap on an upload,
    nor, with what it sent before in the round, than the node's round budget
    (``node_max_bytes``: 0 for none; :func:`answer_cap`). A ``top_up`` (a second
    pass of a global round, for the quotas other sites did not send) sends the
    ``quota`` best after what the round's upload sent; one a round, after the
    upload. A request the site must not answer is refused before the ledger
    changes (:func:`check_request`).

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
    cap = answer_cap(
        site, selection, ledger, server_round, node_max_bytes, top_up=top_up
    )
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
    upload = pack(site, chosen, max_bytes=cap, compress=selection.compress)
    sent_ids = upload["ids"].numpy().astype(np.int64)
    sent_bytes = wire_bytes(upload)
    ledger.record(sent_ids, server_round, top_up=top_up, sent_bytes=sent_bytes)
    return upload, {
        "num-candidates": len(site),
        "num-wrong": int(trial.wrong.sum()),
        "num-selected": len(sent_ids),
        "num-selected-wrong": int(trial.wrong[np.isin(trial.ids, sent_ids)].sum()),
        "trial-accuracy": trial.accuracy,
        "upload-bytes": sent_bytes,
        "num-suspect": int(
            likely_mislabelled(trial.label_probability, selection.trim).sum()
        ),
    }
