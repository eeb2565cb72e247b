"""The sample-selection server without Flower: check uploads, buffer, train, resume.

:class:`SelectionServer` is what the central site of Jiang et al. does with the
uploads of a round, whoever carries them: it checks each one (without trusting a
byte: :meth:`~SelectionServer.check_upload`), adds the accepted samples to its
training buffer, trains the central model on the buffer, keeps each round's
metrics and records, and checkpoints all of it so that a crashed run resumes.
The Flower strategies (``strategies.sample_selection``, ``strategies.legacy``)
add messages and node sampling on top; the in-process experiments drive it
directly. Messages go to the ``flwr.select`` logger, under Flower's own.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from dataclasses import fields
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from flwr.app import ArrayRecord
from torch import nn

from flwr_select.config import check
from flwr_select.data import SiteData
from flwr_select.models import Transform, check_model, model_input
from flwr_select.selection.allocation import (
    Probation,
    ScoreSketch,
    allocate,
    round_budget,
)
from flwr_select.selection.buffer import TrainingBuffer
from flwr_select.selection.checkpoint import Checkpoint, Segment, latest
from flwr_select.selection.policies import candidates_of, likely_mislabelled
from flwr_select.selection.protocol import (
    UNDELIVERED_KEY,
    UNDELIVERED_TOP_UPS_KEY,
    SelectionConfig,
)
from flwr_select.selection.trial import TrialResult, trial_test
from flwr_select.selection.wire import UploadError, decode, wire_bytes
from flwr_select.trainer import TrainConfig, TrainResult, train

logger = logging.getLogger("flwr.select")


class SiteReport(NamedTuple):
    """What a site's reply says of its candidates, unchecked (:func:`site_report`)."""

    candidates: object
    """``num-candidates``: the samples it trial-tested; its budget follows from it."""
    suspect: object = None
    """``num-suspect``: those whose label the model calls likely wrong, or None."""


Upload = tuple[int, Callable[[], tuple[ArrayRecord, SiteReport]]]
"""A site key and a function that returns its upload and :class:`SiteReport`."""
Summary = tuple[int, Callable[[], Mapping[str, object]]]
"""A site key and a function that returns its phase-1 metrics (a sketch)."""
TopUp = Callable[[Mapping[int, int], Collection[int]], Iterable[Upload]]
"""Asks the sites for their second-pass quotas; returns their uploads. The
second argument: the sites whose quota is a top-up (the others' is their first
upload of the round)."""
SUMMARY_METRICS = frozenset({"num-candidates", "sketch-ranks", "sketch-values"})
"""The metrics of a site's phase-1 reply (see ``selection.site.site_summary``)."""

SUMMARY_TOLERANCE = 1e-4
"""How far an upload's priorities may fall below its summary's (float noise)."""

SERVER_SITE = 0
"""The buffer's site key for samples the server holds itself (the initial set)."""

SITE_METRICS = frozenset(
    {
        "num-candidates",
        "num-wrong",
        "num-selected",
        "num-selected-wrong",
        "trial-accuracy",
        "upload-bytes",
        "num-suspect",
    }
)
"""The metrics a site's reply may carry (see ``selection.site.site_round``)."""

Settings = dict[str, bool | int | float | str]

TRAINING_KEYS = frozenset(
    spelling
    for field in fields(TrainConfig)
    for spelling in (field.name, field.name.replace("_", "-"))
)
"""Names of the server's training settings, as a Python or a run-config key."""


def site_report(metrics: Mapping[str, object]) -> SiteReport:
    """Return a site's report; refuse metrics beyond :data:`SITE_METRICS`.

    Raises
    ------
    UploadError
        If a key is unknown or ``num-candidates`` is missing (the values are
        checked with the upload, by :meth:`SelectionServer.accept_uploads`).
    """
    if not set(metrics) <= SITE_METRICS or "num-candidates" not in metrics:
        raise UploadError(
            f"the metrics hold num-candidates and some of {sorted(SITE_METRICS)}; "
            f"got {sorted(metrics)}"
        )
    return SiteReport(metrics["num-candidates"], metrics.get("num-suspect"))


def log_rejection(server_round: int, what: str, site: int, err: Exception) -> None:
    """Log that a site's ``what`` (upload, summary) was rejected, and why.

    An ``UploadError`` says its reason; anything else is shown as raised.
    """
    reason = str(err) if isinstance(err, UploadError) else repr(err)
    logger.warning(
        "round %s: rejected the %s of node %s: %s", server_round, what, site, reason
    )


MAX_CANDIDATES = 2**40
"""The most samples a site may say it holds in a round (``num-candidates``).

No site holds a trillion samples; the bound keeps every total the records hold
(``suspect-candidates`` sums a site's ``num-suspect``, at most its
``num-candidates``) far inside int64, whatever sites say.
"""

MAX_SITE_SAMPLES = 10_000
"""The default of ``max-site-samples``: what one site may add to the buffer a round."""


def check_server_bounds(max_upload_bytes: int, max_site_samples: int) -> None:
    """Refuse (``ConfigError``, naming the key) bounds that would admit nothing."""
    check(
        "max-upload-bytes",
        max_upload_bytes,
        type(max_upload_bytes) is int and max_upload_bytes >= 1,
        "an int >= 1",
    )
    check(
        "max-site-samples",
        max_site_samples,
        type(max_site_samples) is int and max_site_samples >= 1,
        "an int >= 1",
    )


def sample_wire_bytes(sample_shape: tuple[int, ...]) -> int:
    """Return what one sample costs on the wire, at most: pixels, label and id.

    A global budget in bytes is this many bytes per sample (uncompressed;
    a compressed upload costs less).
    """
    return math.prod(sample_shape) + 1 + 8


def check_round_budget(
    selection: SelectionConfig, sample_shape: tuple[int, ...]
) -> None:
    """Refuse (``ConfigError``) a ``round-budget-bytes`` that buys no sample.

    One sample of ``sample_shape`` costs :func:`sample_wire_bytes`; 0 (the
    per-site budgets together) is allowed.
    """
    sample_bytes = sample_wire_bytes(sample_shape)
    budget = selection.round_budget_bytes
    check(
        "round-budget-bytes",
        budget,
        selection.allocation != "global" or budget == 0 or budget >= sample_bytes,
        f"0 (the per-site budgets together) or >= {sample_bytes}, the wire cost of "
        "one sample",
    )


def check_candidates(candidates: object) -> int:
    """Return a reply's ``num-candidates``, an int in [0, 2**40], or ``UploadError``."""
    if type(candidates) is not int or not 0 <= candidates <= MAX_CANDIDATES:
        raise UploadError(
            f"num-candidates must be an int in [0, 2**40], got {candidates!r}"
        )
    return candidates


def check_suspect(report: SiteReport) -> int | None:
    """Return a report's ``num-suspect`` (None if unsaid), an int in [0, candidates].

    Call it after :meth:`SelectionServer.check_upload`, which checks
    ``num-candidates``. Raises ``UploadError`` for any other value.
    """
    suspect, candidates = report.suspect, report.candidates
    if suspect is None:
        return None
    if type(suspect) is not int or not 0 <= suspect <= candidates:
        raise UploadError(
            f"num-suspect must be an int in [0, num-candidates = {candidates}], "
            f"got {suspect!r}"
        )
    return suspect


INGEST_STAGES = ("check-seconds", "audit-seconds", "add-seconds")
"""The server's stages for each reply, timed in a round's metrics (wall seconds)."""


@contextlib.contextmanager
def timed(metrics: dict[str, int | float], key: str) -> Iterator[None]:
    """Add the wall seconds the body takes to ``metrics[key]``, also when it raises."""
    started = time.perf_counter()
    try:
        yield
    finally:
        metrics[key] += time.perf_counter() - started


class SelectionServer:
    """The central site: every accepted upload in one buffer, one model trained on it.

    Parameters
    ----------
    model_fn : callable
        Returns a fresh model (the architecture the arrays belong to).
    num_classes : int
        Uploaded labels must lie in ``[0, num_classes)``.
    selection : SelectionConfig (default: SelectionConfig())
        What every site is asked to send; its budget bounds every upload.
    server_training : TrainConfig (default: TrainConfig())
        How the server trains on its buffer each round (not Flower's
        ``train_config``, which is what the sites are sent).
    from_scratch : bool (default: False)
        Retrain a fresh model on the whole buffer each round instead of continuing
        from the current one.
    buffer : TrainingBuffer, optional
        Where accepted samples go (default: a new one on CUDA if available).
    site_config : mapping, optional
        Extra settings every site is told (e.g. which data set fold); part of
        the settings a checkpoint must share with the run resuming it.
    run_dir : str or Path, optional
        Checkpoint the model, the buffer and the records here after every round
        (:meth:`finish_round`), and resume from the last complete one
        (:meth:`resume`).
    sample_shape : tuple of int, optional
        The shape of one image (``(28, 28)`` for MNIST, ``(3, 32, 32)`` for
        CIFAR-10); uploads of any other shape are rejected. Default: the shape
        of the server's own samples (:meth:`train_initial`) or of a resumed buffer;
        never a site's word (see :meth:`expected_sample_shape`).
    max_upload_bytes : int (default: 256 MiB)
        Reject an upload larger than this on the wire, or whose images would be
        larger decoded, whatever the site claims, before anything in it is
        decoded or decompressed.
    max_site_samples : int (default: 10,000)
        The most samples one site may add to the buffer in one round (its upload
        and top-up together), whatever it says it holds: a site's budget follows
        the ``num-candidates`` it reports, which the server cannot check.
    transform : str or callable, optional
        How raw ``uint8`` samples become model input on the server: a name from
        :data:`~flwr_select.models.INPUT_TRANSFORMS` or a callable; the sites
        must use the same (``add_select_handler(app, transform=...)``). Default:
        the batches as stored, which the built-in models take.
    """

    def __init__(
        self,
        model_fn: Callable[[], nn.Module],
        num_classes: int,
        *,
        selection: SelectionConfig | None = None,
        server_training: TrainConfig | None = None,
        from_scratch: bool = False,
        buffer: TrainingBuffer | None = None,
        site_config: Mapping[str, bool | int | float | str] | None = None,
        run_dir: str | Path | None = None,
        sample_shape: tuple[int, ...] | None = None,
        max_upload_bytes: int = 256 * 2**20,
        max_site_samples: int = MAX_SITE_SAMPLES,
        transform: Transform = None,
    ) -> None:
        check_server_bounds(max_upload_bytes, max_site_samples)
        self.model_fn = model_fn
        self.num_classes = num_classes
        self.selection = selection or SelectionConfig()
        self.server_training = server_training or TrainConfig()
        self.from_scratch = from_scratch
        self.buffer = buffer or TrainingBuffer(num_classes)
        self.site_config = dict(site_config or {})
        self.run_dir = None if run_dir is None else Path(run_dir)
        self.sample_shape = None if sample_shape is None else tuple(sample_shape)
        self.max_upload_bytes = max_upload_bytes
        self.max_site_samples = max_site_samples
        self.transform = model_input(transform)
        self.model = model_fn().to(self.buffer.device)
        self.rounds: dict[int, dict[str, float | int]] = {}
        """Metrics of every round whose uploads were handled (``accept_uploads``)."""
        self.records: dict[int, dict[str, float | int]] = {}
        """The evaluation record of every finished round, round 0 included."""
        self.completed_round: int | None = None
        """The last finished round; None before the initial evaluation."""
        self.undelivered: dict[int, list[int]] = {}
        """Per site, the rounds whose upload was not kept (failed, rejected or never
        came). Each request tells the site, which offers those samples again."""
        self.undelivered_top_ups: dict[int, list[int]] = {}
        """Per site, the rounds whose top-up (only) was not kept; told likewise."""
        self.segments: list[Segment] = []
        """The buffer's segments in :attr:`run_dir`, oldest first (see
        :mod:`~flwr_select.selection.checkpoint`)."""
        self.quotas: dict[int, int] = {}
        """With one global budget: each site's quota in the latest round."""
        self.summarised: dict[int, tuple[int, ScoreSketch]] = {}
        """With one global budget: each site's ``num-candidates`` and sketch of
        phase 1, which its upload must agree with (:meth:`check_summary`)."""
        self.phase_one: dict[str, int | float] = {}
        """With one global budget: the metrics of the latest round's phase 1."""
        self.caps: dict[int, int] = {}
        """With one global budget: the most each site may send in the latest round,
        upload and top-up together (:attr:`max_site_samples`, :attr:`probation`)."""
        self.probation = Probation()
        """With one global budget: the sites held at a small quota, having not
        delivered one they won (see :class:`Probation`)."""

    def is_finished(self, server_round: int) -> bool:
        """Say whether ``server_round`` is done (in this run or before a resume)."""
        return self.completed_round is not None and server_round <= self.completed_round

    def seed(self, *parts: int) -> int:
        """Return a seed derived from the selection seed and ``parts`` (a round...)."""
        return int(
            np.random.SeedSequence([self.selection.seed, *parts]).generate_state(1)[0]
        )

    def run_settings(self) -> Settings:
        """Return the settings a checkpoint must share with the run resuming it."""
        return {
            **self.site_config,
            **self.selection.to_config(),
            "num-classes": self.num_classes,
        }

    def round_config(
        self, server_round: int, site: int | None = None
    ) -> dict[str, object]:
        """Return what the sites are told this round (the run-config spellings).

        Told to one ``site``, it also holds the rounds whose upload from that
        site was not kept (:attr:`undelivered`), which it offers again.
        """
        config: dict[str, object] = {**self.run_settings()}
        config["server-round"] = server_round
        if site is not None:
            config[UNDELIVERED_KEY] = self.undelivered.get(site, [])
            config[UNDELIVERED_TOP_UPS_KEY] = self.undelivered_top_ups.get(site, [])
        return config

    def check_site_keys(self, keys: Iterable[str]) -> None:
        """Refuse config keys for the sites that would be lost or misread.

        Flower's ``start(train_config=...)`` goes to the sites beside
        :meth:`round_config`, which would override a key of the same name; and
        a key of the server's training (``lr``, ``epochs``...) there does not
        change the server's training, which is ``server_training``.
        """
        keys = set(keys)
        told = sorted(keys & self.round_config(0, SERVER_SITE).keys())
        training = sorted(keys & TRAINING_KEYS)
        if told:
            raise ValueError(
                f"train_config sets {told}, which the server tells every site "
                "itself: leave them out (they come from the selection and "
                "site_config)"
            )
        if training:
            raise ValueError(
                f"train_config sets {training}: Flower's train_config is sent to "
                "the sites and does not change how the server trains; pass "
                "server_training=TrainConfig(...) to the strategy instead"
            )

    def expected_sample_shape(self) -> tuple[int, ...]:
        """Return the shape every uploaded image must have; never a site's word.

        :attr:`sample_shape` if given, else the shape of the server's own
        samples in the buffer (its initial set, or a resumed buffer).

        Raises
        ------
        ValueError
            If neither is known: the operator must say it.
        """
        shape = self.sample_shape or self.buffer.image_shape
        if shape is None:
            raise ValueError(
                "the sample-selection server does not know the shape of one "
                "sample: pass sample_shape=(28, 28) (or your images' shape), or "
                "pretrain() on the server's own samples first; it is never taken "
                "from an upload"
            )
        return shape

    def check_upload(
        self, site: int, record: ArrayRecord, candidates: object
    ) -> tuple[SiteData, int]:
        """Return the samples of site's upload and its wire bytes, or ``UploadError``.

        Cheap checks come first, so that nothing large is decoded or decompressed
        before it is known to be within bounds: the bytes on the wire against
        :attr:`max_upload_bytes` and the budget's ``max-bytes``, then
        ``num-candidates`` (an int in [0, 2**40]: the site's number of samples
        this round, from which its ``rho`` budget follows), then the upload's
        declarations (:func:`~flwr_select.selection.wire.decode`: the image
        shape against :meth:`expected_sample_shape`, the count against the
        budget and :attr:`max_site_samples`, or the site's quota, the decoded
        size against :attr:`max_upload_bytes`), its bytes
        and values, and last that no id was accepted from this site before.
        """
        size = wire_bytes(record)
        budget = self.selection.budget()
        cap = min(self.max_upload_bytes, budget.max_bytes or self.max_upload_bytes)
        if size > cap:
            raise UploadError(f"{size} bytes exceed the cap of {cap} bytes")
        limit = budget.sample_limit(check_candidates(candidates))
        limit = min(limit, self.max_site_samples)
        if self.selection.allocation == "global":
            summarised, _ = self.summarised.get(site, (None, None))
            if candidates != summarised:
                raise UploadError(
                    f"num-candidates {candidates} is not the "
                    f"{summarised} of the site's summary"
                )
            limit = self.quotas.get(site, 0)
        samples, _ = decode(
            record,
            self.num_classes,
            sample_shape=self.expected_sample_shape(),
            max_samples=limit,
            max_bytes=self.max_upload_bytes,
        )
        repeated = self.buffer.seen(site, samples.ids.numpy())
        if repeated.any():
            raise UploadError(
                f"{int(repeated.sum())} ids were already accepted from this site"
            )
        return samples, size

    def allocate_round(
        self,
        server_round: int,
        summaries: Iterable[Summary],
        *,
        failures: int = 0,
        summary_bytes: int = 0,
    ) -> dict[int, int]:
        """Phase 1 of a round with one global budget: check each sketch, give quotas.

        A summary that is not :data:`SUMMARY_METRICS` with an int
        ``num-candidates`` in [0, 2**40] and a well-formed sketch
        (:meth:`~flwr_select.selection.allocation.ScoreSketch.check`) is
        rejected and logged, as an upload would be; its site gets no quota.

        The budget is ``round-budget-bytes`` in samples (:meth:`sample_bytes`
        each), or with 0 what the per-site budgets of the sites that answered
        would have allowed together, none counted above another's
        (:func:`~flwr_select.selection.allocation.round_budget`): no site can
        raise it by claiming more candidates. A site may be given at most its
        cap (:attr:`caps`): :attr:`max_site_samples`, what one upload can carry
        under :attr:`max_upload_bytes`, and for a site on :attr:`probation` its
        small share of the budget.

        Returns each accepted site's quota (:func:`allocate`), also kept in
        :attr:`quotas`; :attr:`phase_one` keeps the phase's metrics:
        ``summaries-accepted``, ``summaries-rejected``, ``summary-bytes`` (what
        the replies weighed, as the strategy measured them), ``sites-failed``
        (``failures``: sites that failed in phase 1), ``round-budget``
        (samples), ``sites-held`` (on probation) and ``quota.<site>``.
        """
        sketches, shares, rejected = {}, {}, 0
        self.summarised = {}
        for site, unpack in summaries:
            try:
                metrics = unpack()
                if set(metrics) != SUMMARY_METRICS:
                    raise UploadError(
                        f"a summary holds {sorted(SUMMARY_METRICS)}; "
                        f"got {sorted(metrics)}"
                    )
                candidates = check_candidates(metrics["num-candidates"])
                sketch = ScoreSketch.check(
                    metrics["sketch-ranks"], metrics["sketch-values"], candidates
                )
            except Exception as err:  # whatever one reply does, it rejects only itself
                log_rejection(server_round, "summary", site, err)
                rejected += 1
                continue
            sketches[site] = sketch
            self.summarised[site] = (candidates, sketch)
            shares[site] = self.selection.budget().sample_limit(candidates)
        budget = round_budget(shares)
        if self.selection.round_budget_bytes:
            budget = self.selection.round_budget_bytes // self.sample_bytes()
        even_share = budget / max(len(sketches), 1)
        self.caps = {}
        for site in sketches:
            held = self.probation.cap(site, even_share)
            self.caps[site] = min(self.max_site_samples, held or self.max_site_samples)
        self.quotas = allocate(
            {site: s.clipped(self.upload_cap(site)) for site, s in sketches.items()},
            budget,
        )
        self.phase_one = {
            "summaries-accepted": len(sketches),
            "summaries-rejected": rejected,
            "summary-bytes": summary_bytes,
            "sites-failed": failures,
            "round-budget": budget,
            "sites-held": len(self.probation.levels.keys() & sketches.keys()),
            **{f"quota.{site}": quota for site, quota in self.quotas.items()},
        }
        return self.quotas

    def samples_per_upload(self) -> int:
        """Return the most samples one upload can carry (:attr:`max_upload_bytes`)."""
        return self.max_upload_bytes // int(np.prod(self.expected_sample_shape()))

    def upload_cap(self, site: int, sent: int = 0) -> int:
        """Return the most ``site`` may send in its next upload of a global round.

        Its round's cap (:attr:`caps`) less the ``sent`` samples already
        accepted from it this round, and at most one upload's worth
        (:meth:`samples_per_upload`).
        """
        return max(0, min(self.caps[site] - sent, self.samples_per_upload()))

    def allocate_top_up(self, received: Mapping[int, int]) -> dict[int, int]:
        """Return the second pass's quotas: the budget's unspent part, to honest sites.

        ``received`` holds what each site whose upload was accepted sent, and
        :attr:`quotas` what phase 2 asked of each. The quotas other sites
        did not send (they failed, were rejected or sent less) go to the best
        samples of the sites that kept their word, as phase 1 would have given
        them (:func:`allocate` on the sketches past what each sent): those that
        sent their whole quota (a top-up), and those given none (their first
        upload of the round; so a site that won the whole budget and does not
        deliver it leaves it to the others). Only sites with a quota are
        returned; their :attr:`summarised` sketch becomes that of what follows,
        which their upload must agree with.
        """
        unspent = self.phase_one.get("round-budget", 0) - sum(received.values())
        kept_word = [
            site
            for site in self.caps
            if self.quotas.get(site, 0) in (0, received.get(site))
        ]
        rest = {
            site: self.summarised[site][1].after(received.get(site, 0))
            for site in kept_word
        }
        clipped = {
            site: sketch.clipped(self.upload_cap(site, received.get(site, 0)))
            for site, sketch in rest.items()
        }
        quotas = {site: q for site, q in allocate(clipped, unspent).items() if q > 0}
        for site in quotas:
            self.summarised[site] = (self.summarised[site][0], rest[site])
        return quotas

    def sample_bytes(self) -> int:
        """Return what one sample costs on the wire (:func:`sample_wire_bytes`)."""
        return sample_wire_bytes(self.expected_sample_shape())

    def accept_uploads(
        self,
        server_round: int,
        uploads: Iterable[Upload],
        *,
        failures: int = 0,
        asked: Iterable[int] = (),
        top_up: TopUp | None = None,
    ) -> dict[str, int | float]:
        """Check and buffer each site's upload, then train if anything was accepted.

        Whatever goes wrong with one upload (a check refusing it, or anything
        else raising) rejects that upload only: it is logged with the site and
        the reason, and the buffer and the model are as they were.

        Parameters
        ----------
        server_round : int
        uploads : iterable of (site, unpack)
            ``unpack()`` returns the upload's ArrayRecord and the site's
            :class:`SiteReport`.
        failures : int (default: 0)
            Sites that failed instead of replying (``sites-failed``).
        asked : iterable of int (default: ())
            The sites asked this round: each whose upload was not accepted is
            noted in :attr:`undelivered`, so it is told to offer it again.
        top_up : callable, optional
            With one global budget, a second pass: what the other sites did not
            send (:meth:`allocate_top_up`) is asked of those that kept their
            word, whose uploads are checked as any; one not accepted is noted
            in :attr:`undelivered_top_ups` (a top-up) or :attr:`undelivered`
            (a first upload). Without it, the unspent part is lost.

        Returns
        -------
        dict
            The round's metrics, also kept in :attr:`rounds`; ``train-loss`` is
            there only if the model was trained (else it is unchanged).
            ``suspect-labels`` counts the uploads the server's :meth:`audit`
            calls likely mislabelled, ``suspect-candidates`` what the sites say
            of all their candidates (``num-suspect``), both also per site. A
            second pass adds ``top-up-budget`` (the samples it asked for),
            ``top-up-samples`` (those accepted), ``top-ups-failed`` (failed or
            rejected) and ``top-up.<site>`` (the quotas). With one global budget,
            every site given a quota that it does not deliver in full is put on
            :attr:`probation` (``sites-caught``). The seconds the server
            spent on the replies, rejected ones included, are there per stage
            (:data:`INGEST_STAGES`: decode and checks, the audit, the buffer add)
            beside ``train-seconds``, for an operator and the load benchmark.
        """
        metrics: dict[str, int | float] = {
            "samples-received": 0,
            "bytes-received": 0,
            "sites-accepted": 0,
            "sites-rejected": 0,
            "sites-failed": failures,
            "suspect-labels": 0,
            "suspect-candidates": 0,
            **dict.fromkeys(INGEST_STAGES, 0.0),
        }
        if self.selection.allocation == "global":  # phase 1's, its failures too
            metrics.update({**self.phase_one, "sites-failed": failures})
            metrics["sites-failed"] += self.phase_one.get("sites-failed", 0)
        self.expected_sample_shape()  # the operator's error, not a site's: raise
        received, rejected = self._take(server_round, uploads, metrics)
        metrics["sites-accepted"] += len(received)
        metrics["sites-rejected"] += len(rejected)
        for site in asked:
            if site not in received:
                self.undelivered.setdefault(site, []).append(server_round)
        if self.selection.allocation == "global":
            given = {site: quota for site, quota in self.quotas.items() if quota > 0}
            if top_up is not None:
                for site, quota in self._top_up(
                    server_round, received, top_up, metrics
                ).items():
                    given[site] = given.get(site, 0) + quota
            self._judge(server_round, given, received, metrics)
        if metrics["sites-accepted"] and len(self.buffer):
            result = self.train_on_buffer(server_round)
            metrics.update({"train-loss": result.loss, "train-seconds": result.seconds})
        else:  # nothing accepted, or empty uploads and nothing buffered to train on
            logger.warning(
                "round %s: no upload accepted%s; the model is unchanged",
                server_round,
                " held a sample" if metrics["sites-accepted"] else "",
            )
        metrics.update(
            {"buffer-size": len(self.buffer), "buffer-bytes": self.buffer.nbytes}
        )
        self.rounds[server_round] = metrics
        return metrics

    def _take(
        self,
        server_round: int,
        uploads: Iterable[Upload],
        metrics: dict,
        what: str = "upload",
    ) -> tuple[dict[int, int], list[int]]:
        """Check and buffer each upload, counting in ``metrics``.

        Returns what each accepted site sent, and the sites rejected. Whatever
        goes wrong with one upload rejects it alone: logged with the site and
        the reason, the buffer as it was.
        """
        received: dict[int, int] = {}
        rejected: list[int] = []
        for site, unpack in uploads:
            try:
                with timed(metrics, "check-seconds"):
                    record, report = unpack()
                    samples, size = self.check_upload(site, record, report.candidates)
                    reported = check_suspect(report)
                with timed(metrics, "audit-seconds"):
                    suspect = self.audit(site, samples)
                with timed(metrics, "add-seconds"):
                    self.buffer.add(site, samples)
            except Exception as err:  # whatever one reply does, it rejects only itself
                log_rejection(server_round, what, site, err)
                rejected.append(site)
                continue
            received[site] = len(samples)
            counts = {
                "samples-received": len(samples),
                "bytes-received": size,
                "suspect-labels": suspect,
                "suspect-candidates": reported,
            }
            for key, count in counts.items():
                if count is not None:
                    metrics[key] += count
                    metrics[f"{key}.{site}"] = metrics.get(f"{key}.{site}", 0) + count
        return received, rejected

    def _top_up(
        self,
        server_round: int,
        received: dict[int, int],
        top_up: TopUp,
        metrics: dict,
    ) -> dict[int, int]:
        """Ask again for the unspent budget: the second pass of a global round.

        Returns its quotas (:meth:`allocate_top_up`); ``received`` gains what it
        brought. A site that sent its phase-2 quota is asked for a top-up; one
        given none then is asked for its first upload of the round, and counted
        in ``sites-accepted`` or ``sites-rejected`` like phase 2's.
        """
        phase_two = self.quotas
        quotas = self.quotas = self.allocate_top_up(received)
        if not quotas:
            return quotas
        top_ups = {site for site in quotas if phase_two.get(site, 0) > 0}
        samples = metrics["samples-received"]
        topped, rejected = self._take(
            server_round, top_up(quotas, top_ups), metrics, "top-up"
        )
        first = quotas.keys() - top_ups
        metrics["sites-accepted"] += len(first & topped.keys())
        metrics["sites-rejected"] += len(first & set(rejected))
        metrics["top-up-budget"] = sum(quotas.values())
        metrics["top-up-samples"] = metrics["samples-received"] - samples
        metrics["top-ups-failed"] = len(quotas) - len(topped)
        for site, quota in quotas.items():
            metrics[f"top-up.{site}"] = quota
            if site in topped:
                received[site] = received.get(site, 0) + topped[site]
            else:
                missed = (
                    self.undelivered_top_ups if site in top_ups else self.undelivered
                )
                missed.setdefault(site, []).append(server_round)
        return quotas

    def _judge(
        self,
        server_round: int,
        given: Mapping[int, int],
        received: Mapping[int, int],
        metrics: dict,
    ) -> None:
        """Hold on :attr:`probation` each site that did not deliver what it was given.

        ``given`` is each site's quotas of the round together (phase 2 and the
        second pass), ``received`` what was accepted from it. A site that
        delivered a quota > 0 in full earns a level back.
        """
        caught = {site for site, q in given.items() if received.get(site, 0) < q}
        for site in given:
            if site in caught:
                self.probation.caught(site)
                logger.warning(
                    "round %s: node %s sent %s of the %s samples it was given; it "
                    "is held at a small quota until it keeps its word",
                    server_round,
                    site,
                    received.get(site, 0),
                    given[site],
                )
            else:
                self.probation.delivered(site)
        metrics["sites-caught"] = len(caught)

    def audit(self, site: int, samples: SiteData) -> int:
        """Return how many of an upload's labels the model calls likely wrong.

        The model is the one the sites trial-tested with (the round's training
        comes after every upload is in); a label it gives a probability below
        the selection's ``trim`` counts
        (:func:`~flwr_select.selection.policies.likely_mislabelled`). Per site
        and round, this shows an operator a site whose labels are noisy, or one
        that sends such samples on purpose, whatever it claims. With one global
        budget the same trial checks the upload against the site's summary
        (:meth:`check_summary`).
        """
        if len(samples) == 0:
            return 0
        was_training = self.model.training
        self.model.eval()
        try:
            trial = trial_test(self.model, samples, transform=self.transform)
        finally:
            self.model.train(was_training)
        if self.selection.allocation == "global":
            self.check_summary(site, trial)
        suspect = likely_mislabelled(trial.label_probability, self.selection.trim)
        return int(suspect.sum())

    def check_summary(self, site: int, trial: TrialResult) -> None:
        """Refuse an upload whose worth falls short of what its summary claimed.

        With one global budget, a site's upload is its best samples, so the
        upload's k-th best priority (the policy's, under the round's model) is
        the k-th best of its phase-1 sketch, at every sketched k the upload
        reaches. A site that inflated its sketch to win budget is caught here;
        :data:`SUMMARY_TOLERANCE` absorbs the float differences between its
        device and the server's.
        """
        _, sketch = self.summarised[site]
        selection = self.selection
        worth = selection.policy().priority(
            candidates_of(trial, np.arange(len(trial)), confidence=selection.confidence)
        )
        worth = np.sort(worth)[::-1]
        ranks = sketch.ranks[sketch.ranks <= len(worth)]
        claimed = sketch.values[: len(ranks)]
        short = np.flatnonzero(worth[ranks - 1] < claimed - SUMMARY_TOLERANCE)
        if len(short):
            k = short[0]
            raise UploadError(
                f"at rank {ranks[k]} the upload is worth {worth[ranks[k] - 1]:.6g}; "
                f"its summary claimed {claimed[k]:.6g}"
            )

    def train_on_buffer(
        self, server_round: int, training: TrainConfig | None = None
    ) -> TrainResult:
        """Train the central model on the whole buffer (from scratch if configured)."""
        if self.from_scratch:
            torch.manual_seed(self.seed(server_round, 1))
            self.model = self.model_fn().to(self.buffer.device)
        assert self.buffer.images is not None
        return train(
            self.model,
            self.buffer.images,
            self.buffer.labels,
            training or self.server_training,
            seed=self.seed(server_round, 2),
            transform=self.transform,
        )

    def check_model(self) -> None:
        """Refuse (``ValueError``, naming the fix) a model that cannot take the data.

        The model and :attr:`transform` are tried on a dummy batch of
        :meth:`expected_sample_shape` (see :func:`~flwr_select.models.check_model`).
        """
        check_model(
            self.model, self.expected_sample_shape(), self.num_classes, self.transform
        )

    def train_initial(
        self, samples: SiteData, training: TrainConfig | None = None
    ) -> TrainResult:
        """Put the server's own samples in the buffer and train the model on them.

        The paper's initial model: 5k samples the central site already holds.
        The model is checked on the samples' shape first (:meth:`hold_own`).
        """
        self.hold_own(samples)
        return self.train_on_buffer(0, training)

    def hold_own(self, samples: SiteData) -> None:
        """Put the server's own samples in the buffer, without training on them.

        For a model already trained on them elsewhere (:meth:`begin` loads it);
        the model is checked on the samples' shape first (:meth:`check_model`).
        """
        check_model(
            self.model, samples.images.shape[1:], self.num_classes, self.transform
        )
        self.buffer.add(SERVER_SITE, samples)

    def finish_round(
        self, server_round: int, record: Mapping[str, float | int] | None
    ) -> None:
        """Keep the round's evaluation record and checkpoint everything.

        After this a crash loses nothing of the round: :meth:`resume` continues
        with the next one.
        """
        if record is not None:
            self.records[server_round] = dict(record)
        self.completed_round = server_round
        if self.run_dir is not None:
            checkpoint = Checkpoint(
                round=server_round,
                model_state=self.model.state_dict(),
                buffer=self.buffer,
                train_metrics=self.rounds,
                records=self.records,
                undelivered=self.undelivered,
                config=self.run_settings(),
                undelivered_top_ups=self.undelivered_top_ups,
                segments=self.segments,
                probation=self.probation.levels,
            )
            checkpoint.save(self.run_dir)
            self.segments = checkpoint.segments

    def begin(self, initial_state: Mapping[str, torch.Tensor], num_rounds: int) -> dict:
        """Resume from :attr:`run_dir` if it holds a run, else load ``initial_state``.

        Returns the model's state the run starts from. Refuses (``ValueError``)
        to start without :meth:`expected_sample_shape`, with a model that
        cannot take the data (:meth:`check_model`) or with a
        ``round-budget-bytes`` that buys no sample (:func:`check_round_budget`),
        before any round; warns when
        a fresh run holds none of the server's own samples, and when the run in
        :attr:`run_dir` has done all ``num_rounds`` already.
        """
        if self.completed_round is None:
            self.resume()
        if self.completed_round is not None and self.completed_round >= num_rounds:
            logger.warning(
                "%s holds a finished run (%s of %s rounds): nothing is left to do. "
                "To start a new run, give it another run_dir (or delete this one); "
                "to go on, ask for more rounds",
                self.run_dir.resolve(),
                self.completed_round,
                num_rounds,
            )
        if self.completed_round is None:
            self.model.load_state_dict(initial_state)
            if len(self.buffer) == 0:
                logger.warning(
                    "The server holds none of its own samples: the method needs an "
                    "initial model trained on samples the server holds (pretrain() "
                    "them, the paper's 5k), or sites select by the judgement of an "
                    "untrained model and the buffer fills with a few classes"
                )
        self.check_model()
        check_round_budget(self.selection, self.expected_sample_shape())
        return self.model.state_dict()

    def resume(self) -> int | None:
        """Load the checkpoint in :attr:`run_dir`, if any; return its round.

        The model, the buffer (with its ledger of accepted ids), the metrics and
        the records come back as they were after that round, so a run continues
        with the next one. Returns None when there is nothing to resume.

        Raises
        ------
        CheckpointError
            If the file is damaged, or holds another model, class count or
            sample shape (:func:`~flwr_select.selection.checkpoint.latest`
            checks it whole before anything is loaded).
        ValueError
            If the checkpoint was written by a run with other settings (it names
            them): resuming it would mix two experiments.
        """
        checkpoint = None
        if self.run_dir is not None:
            checkpoint = latest(
                self.run_dir,
                device=self.buffer.device,
                num_classes=self.num_classes,
                sample_shape=self.sample_shape,
                model_state=self.model.state_dict(),
            )
        if checkpoint is None:
            return None
        settings = self.run_settings()
        differing = sorted(
            key
            for key in settings.keys() | checkpoint.config.keys()
            if settings.get(key) != checkpoint.config.get(key)
        )
        if differing:
            raise ValueError(
                f"{self.run_dir} holds a run with other settings "
                f"({', '.join(differing)}): resume it with the same settings or "
                "start the new run in another folder"
            )
        self.model.load_state_dict(checkpoint.model_state)
        self.buffer = checkpoint.buffer
        self.rounds, self.records = checkpoint.train_metrics, checkpoint.records
        self.undelivered = checkpoint.undelivered
        self.undelivered_top_ups = checkpoint.undelivered_top_ups
        self.segments = checkpoint.segments
        self.probation = Probation(checkpoint.probation)
        self.completed_round = checkpoint.round
        logger.info(
            "Resuming %s after round %s, %s samples in the buffer",
            self.run_dir.resolve(),
            checkpoint.round,
            len(self.buffer),
        )
        return checkpoint.round
