"""What the server asks of a site each round, and the names both sides use.

The server sends a :class:`SelectionConfig` (as plain config values under the
run-config spellings) with the model in a ``train.select`` message; the site
replies with its upload and its metrics. Both the strategy and the ClientApp
build their budget and policy from this one class, so they cannot disagree.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Self

from flwr_select.policies import Budget, Policy, make_policy
from flwr_select.scores import check_confidence

ACTION = "select"
"""The ClientApp action: messages of type ``train.select`` reach the handler."""
MESSAGE_TYPE = f"train.{ACTION}"
MODEL_KEY, CONFIG_KEY = "arrays", "config"
"""Keys of the server's message: the model's ArrayRecord and the ConfigRecord."""
UPLOAD_KEY, METRICS_KEY = "upload", "metrics"
"""Keys of a site's reply: the upload's ArrayRecord and a MetricRecord."""
UNDELIVERED_KEY = "undelivered-rounds"
"""Config key of the rounds whose upload from this node the server did not keep."""


class RunConfigFields:
    """Mixin for frozen dataclasses whose fields are run-config keys.

    A field ``max_count`` is the run-config key ``max-count``; both sides of a
    protocol build the dataclass from the same config, so they cannot disagree.
    """

    def to_config(self) -> dict[str, float | int | str | bool]:
        """Return the values under their run-config names (``max-count``...)."""
        return {f.name.replace("_", "-"): getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_config(cls, config: Mapping[str, object]) -> Self:
        """Build from run-config names; keys this class does not know are ignored."""
        known = {f.name.replace("_", "-"): f for f in fields(cls)}
        values: dict[str, object] = {}
        for key, field in known.items():
            if key in config:
                values[field.name] = _as_type(str(field.type), config[key])
        return cls(**values)  # type: ignore[arg-type]


@dataclass(frozen=True)
class SelectionConfig(RunConfigFields):
    """How every site selects this round; validated when built.

    Parameters
    ----------
    rho : float (default: 0.05)
        Fraction of a site's samples this round it may send (0 < rho <= 1).
    selection_policy : str (default: "proxy")
        A name from :data:`flwr_select.policies.POLICIES`.
    confidence : str (default: "cross-entropy")
        The confidence metric of the policy and of eq. (6).
    max_count : int (default: 0)
        At most this many samples per site and round; 0 for no limit.
    max_bytes : int (default: 0)
        At most this many bytes per upload on the wire; 0 for no limit.
    compress : bool (default: False)
        Compress the image block (Zstandard).
    group : str (default: "")
        The group of the ``group`` policy.
    temperature : float (default: 1.0)
        The temperature of the ``stochastic`` policy.
    seed : int (default: 0)
        Sites seed their choices with ``(seed, round, site)``.
    """

    rho: float = 0.05
    selection_policy: str = "proxy"
    confidence: str = "cross-entropy"
    max_count: int = 0
    max_bytes: int = 0
    compress: bool = False
    group: str = ""
    temperature: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        self.budget()
        self.policy()
        check_confidence(self.confidence)

    def budget(self) -> Budget:
        """Return the per-site, per-round budget."""
        return Budget(
            rho=self.rho,
            count=self.max_count or None,
            max_bytes=self.max_bytes or None,
        )

    def policy(self) -> Policy:
        """Return the policy with the options it takes."""
        options: dict[str, object] = {}
        if self.selection_policy == "group":
            options["group"] = self.group
        if self.selection_policy == "stochastic":
            options["temperature"] = self.temperature
        return make_policy(self.selection_policy, **options)


def _as_type(kind: str, value: object) -> object:
    """Convert a config value to a field's type; ``"false"`` is False, not True."""
    if kind == "bool" and isinstance(value, str):
        return value.strip().lower() in ("true", "1", "yes")
    return {"float": float, "int": int, "str": str, "bool": bool}[kind](value)
