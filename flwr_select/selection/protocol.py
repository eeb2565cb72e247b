"""What the server asks of a site each round, and the names both sides use.

The server sends a :class:`SelectionConfig` (as plain config values under the
run-config spellings) with the model in a ``train.select`` message; the site
replies with its upload and its metrics. Both the strategy and the ClientApp
build their budget and policy from this one class, so they cannot disagree.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields

from flwr.app import ArrayRecord, ConfigRecord, RecordDict

from flwr_select.config import RunConfigFields, check, check_name
from flwr_select.selection.policies import GROUPS, POLICIES, Budget, Policy, make_policy
from flwr_select.selection.scores import CONFIDENCE_METRICS

ACTION = "select"
"""The ClientApp action: messages of type ``train.select`` reach the handler."""
MESSAGE_TYPE = f"train.{ACTION}"
MODEL_KEY, CONFIG_KEY = "arrays", "config"
"""Keys of the server's message: the model's ArrayRecord and the ConfigRecord."""
UPLOAD_KEY, METRICS_KEY = "upload", "metrics"
"""Keys of a site's reply: the upload's ArrayRecord and a MetricRecord."""
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
"""Node-config key: a site's own cap on one upload's bytes (its link budget)."""


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
        budgets would have allowed together, so that both spend the same.

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
