"""What the server asks of a site each round, and the names both sides use.

The server sends a :class:`SelectionConfig` (as plain config values under the
run-config spellings) with the model in a ``train.select`` message; the site
replies with its upload and its metrics. Both the strategy and the ClientApp
build their budget and policy from this one class, so they cannot disagree.

The rest of what a message asks (its round, the classes, a quota, a top-up, the
rounds the server did not keep) a site reads through :class:`SiteRequest`: the
server is someone else's, so every value is checked by type and range and a
refusal names the key, as the server checks a site's upload.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields

from flwr.app import ArrayRecord, ConfigRecord, RecordDict

from flwr_select.config import RunConfigFields, check, check_name, convert, required
from flwr_select.messages import (
    CONFIG_KEY,
    MAX_ROUND,
    MODEL_KEY,
    NUM_CLASSES_KEY,
    ROUND_KEY,
    check_num_classes,
)
from flwr_select.selection.policies import GROUPS, POLICIES, Budget, Policy, make_policy
from flwr_select.selection.scores import CONFIDENCE_METRICS

ACTION = "select"
"""The ClientApp action: messages of type ``train.select`` reach the handler."""
MESSAGE_TYPE = f"train.{ACTION}"
UPLOAD_KEY = "upload"
"""Key of a site's reply: the upload's ArrayRecord (beside its metrics,
:data:`~flwr_select.messages.METRICS_KEY`)."""
ALLOCATIONS = ("per-site", "global")
"""How a round's upload budget is shared: each site its rho, or one for all."""
UNDELIVERED_KEY = "undelivered-rounds"
"""Config key of the rounds whose upload from this node the server did not keep."""
SUMMARY_ACTION = "select_summary"
"""The ClientApp action of phase 1 of a round with one global budget."""
SUMMARY_MESSAGE_TYPE = f"query.{SUMMARY_ACTION}"
QUOTA_KEY = "quota"
"""Config key of phase 2: how many samples this node sends (its share of the budget)."""
TOP_UP_KEY = "top-up"
"""Config key of a global round's second pass: true when the quota is a top-up."""
UNDELIVERED_TOP_UPS_KEY = "undelivered-top-ups"
"""Config key of the rounds whose top-up (not the upload) the server did not keep."""
NODE_MAX_BYTES_KEY = "max-bytes"
"""Node-config key: a site's own cap on the bytes it sends in one round (its link
budget), its upload and its top-up together."""


def request(arrays: ArrayRecord, config: Mapping[str, object]) -> RecordDict:
    """Return the content of a ``train.select`` message: the model and the config."""
    return RecordDict({MODEL_KEY: arrays, CONFIG_KEY: ConfigRecord(dict(config))})


@dataclass(frozen=True)
class SelectionConfig(RunConfigFields):
    """How every site selects this round; every field is validated when built.

    Parameters
    ----------
    rho : float (default: 0.05)
        Fraction of a site's samples this round it may send (0 < rho <= 1).
    selection_policy : str (default: "proxy")
        A name from :data:`flwr_select.selection.policies.POLICIES`.
    confidence : str (default: "cross-entropy")
        The confidence metric of the policy and of eq. (6).
    max_count : int (default: 0)
        At most this many samples per site and round; 0 for no limit.
    max_bytes : int (default: 0)
        At most this many bytes per upload on the wire; 0 for no limit.
    compress : bool (default: False)
        Compress the image block (Zstandard).
    group : str (default: "")
        The group of the ``group`` policy: one of
        :data:`~flwr_select.selection.policies.GROUPS` ("" only when another
        policy is chosen).
    temperature : float (default: 1.0)
        The temperature of the ``stochastic`` policy; > 0.
    trim : float (default: 0.01)
        The threshold of ``trimmed-proxy`` and ``trimmed-lowest-confidence``,
        in (0, 1): a label the model gives a lower probability is likely wrong.
        The server's audit of every upload counts those, whatever the policy.
    seed : int (default: 0)
        Sites seed their choices with ``(seed, round, site)``; >= 0.
    allocation : str (default: "per-site")
        ``"per-site"``: every site sends its own best ``rho`` share (the paper).
        ``"global"``: a round has two phases; sites first say what their best
        candidates are worth, and the server gives each a quota so that one
        budget buys the best samples anywhere
        (:mod:`~flwr_select.selection.allocation`).
    round_budget_bytes : int (default: 0)
        The global budget of a round, in upload bytes; 0: what the per-site
        budgets would have allowed together, none counted above the largest
        other's (so that no site raises it by what it claims).

    Raises
    ------
    flwr_select.config.ConfigError
        If a value is not allowed, naming the run-config key.
    """

    rho: float = 0.05
    selection_policy: str = "proxy"
    confidence: str = "cross-entropy"
    max_count: int = 0
    max_bytes: int = 0
    compress: bool = False
    group: str = ""
    temperature: float = 1.0
    trim: float = 0.01
    seed: int = 0
    allocation: str = "per-site"
    round_budget_bytes: int = 0

    def __post_init__(self) -> None:
        check("rho", self.rho, 0 < self.rho <= 1, "in (0, 1]")
        check_name("selection-policy", self.selection_policy, sorted(POLICIES))
        check_name("confidence", self.confidence, sorted(CONFIDENCE_METRICS))
        check("max-count", self.max_count, self.max_count >= 0, ">= 0 (0: no limit)")
        check("max-bytes", self.max_bytes, self.max_bytes >= 0, ">= 0 (0: no limit)")
        # Checked whatever the policy, so a mistyped option fails at once.
        if self.group or self.selection_policy == "group":
            check_name("group", self.group, GROUPS)
        check("temperature", self.temperature, self.temperature > 0, "> 0")
        check("trim", self.trim, 0 < self.trim < 1, "in (0, 1)")
        check("seed", self.seed, self.seed >= 0, ">= 0")
        check_name("allocation", self.allocation, ALLOCATIONS)
        budget = self.round_budget_bytes
        check("round-budget-bytes", budget, budget >= 0, ">= 0 (0: the per-site sum)")

    def budget(self) -> Budget:
        """Return the per-site, per-round budget."""
        return Budget(
            rho=self.rho,
            count=self.max_count or None,
            max_bytes=self.max_bytes or None,
        )

    def policy(self) -> Policy:
        """Return the policy, given those of its options that its class declares.

        A policy's options are dataclass fields named as here (``group``,
        ``temperature``, ``trim``), so a new option needs no change in this method.
        """
        takes = {option.name for option in fields(POLICIES[self.selection_policy])}
        options = {name: getattr(self, name) for name in takes}
        return make_policy(self.selection_policy, **options)


@dataclass(frozen=True)
class SiteRequest:
    """What one message asks of a site beside the selection, read strictly.

    A site answers someone else's server, so it reads every key it acts on
    through this class (and the selection through :class:`SelectionConfig`),
    before it builds a model or touches its ledger. Build it with
    :meth:`from_config`: a value of another type (a float or a string for an
    int, a string for a bool) or out of range is refused, never cast.

    Parameters
    ----------
    server_round : int
        ``server-round``, in [1, :data:`~flwr_select.messages.MAX_ROUND`]; required.
    num_classes : int
        ``num-classes``, in [2, :data:`~flwr_select.messages.MAX_NUM_CLASSES`];
        required.
    quota : int or None (default: None)
        ``quota``: the samples a round with one global budget asks of this site
        (its upload or its top-up), >= 1. None: the site's own ``rho`` share.
    top_up : bool (default: False)
        ``top-up``: the quota is the round's second pass; a bool, with a quota.
    undelivered_rounds, undelivered_top_ups : tuple of int (default: ())
        ``undelivered-rounds`` and ``undelivered-top-ups``: the rounds whose
        upload, or whose top-up, the server did not keep; each an earlier
        round, in [1, server-round).

    Raises
    ------
    flwr_select.config.ConfigError
        If a value is missing, of another type or not allowed, naming the key.
    """

    server_round: int
    num_classes: int
    quota: int | None = None
    top_up: bool = False
    undelivered_rounds: tuple[int, ...] = ()
    undelivered_top_ups: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        server_round = self.server_round
        ok = 1 <= server_round <= MAX_ROUND
        check(ROUND_KEY, server_round, ok, f"in [1, {MAX_ROUND}]")
        check_num_classes(self.num_classes)
        if self.quota is not None:
            check(QUOTA_KEY, self.quota, self.quota >= 1, ">= 1")
        ok = not self.top_up or self.quota is not None
        check(TOP_UP_KEY, self.top_up, ok, f"false without a {QUOTA_KEY}")
        earlier = f"earlier rounds only, in [1, {server_round})"
        for key, rounds in (
            (UNDELIVERED_KEY, self.undelivered_rounds),
            (UNDELIVERED_TOP_UPS_KEY, self.undelivered_top_ups),
        ):
            for listed in rounds:
                check(key, listed, 1 <= listed < server_round, f"a list of {earlier}")

    @classmethod
    def from_config(cls, config: Mapping[str, object]) -> SiteRequest:
        """Read the request from a message's config (keys it does not know: ignored)."""
        quota = config.get(QUOTA_KEY)
        return cls(
            server_round=required(config, ROUND_KEY, "int"),
            num_classes=required(config, NUM_CLASSES_KEY, "int"),
            quota=None if quota is None else convert(QUOTA_KEY, "int", quota),
            top_up=_flag(config, TOP_UP_KEY),
            undelivered_rounds=_rounds(config, UNDELIVERED_KEY),
            undelivered_top_ups=_rounds(config, UNDELIVERED_TOP_UPS_KEY),
        )


def _flag(config: Mapping[str, object], key: str) -> bool:
    """Return a flag the server sends as a bool; a string ("false") is refused."""
    value = config.get(key, False)
    check(key, value, isinstance(value, bool), "true or false (a bool)")
    return value


def _rounds(config: Mapping[str, object], key: str) -> tuple[int, ...]:
    """Return a list of rounds the server sends (default: none) as a tuple of ints."""
    value = config.get(key, [])
    check(key, value, isinstance(value, list | tuple), "a list of integers")
    for listed in value:
        integer = isinstance(listed, int) and not isinstance(listed, bool)
        check(key, listed, integer, "a list of integers only")
    return tuple(value)
