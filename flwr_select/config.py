"""Run-config values: strict conversion, range checks, and errors that name the key.

A frozen dataclass whose fields are run-config keys (field ``max_count`` is the
key ``max-count``) mixes in :class:`RunConfigFields`: ``from_config`` converts
each value to its field's annotated type and refuses anything that is not
plainly of that type, and a field without a default is a key the config must
hold; the dataclass's ``__post_init__`` checks ranges with :func:`check` and
names with :func:`check_name`. Every refusal is a :class:`ConfigError` naming
the key, the value and what is allowed. Both sides of a protocol build the
dataclass from the same config, so they cannot disagree; a site reads the
server's messages with the same functions (:func:`required` for a key a
message must hold).
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping
from dataclasses import MISSING, Field, fields
from typing import Self

ConfigValue = bool | int | float | str
"""What a run-config value is."""


class ConfigError(ValueError):
    """A run-config value that is not allowed.

    Parameters
    ----------
    key : str
        The run-config key (``max-count``).
    value : object
        The value given.
    allowed : str or collection of str
        What is allowed, completing "``key`` must be ...", or the names allowed.
    missing : bool (default: False)
        The key is not in the config at all (``value`` is then None).

    Examples
    --------
    >>> str(ConfigError("rho", 1.5, "in (0, 1]"))
    'rho must be in (0, 1], got 1.5'
    >>> str(ConfigError("partitioner", "shards", ["iid", "dirichlet"]))
    "unknown partitioner 'shards'; choose one of iid, dirichlet"
    >>> str(ConfigError("server-round", None, "an integer", missing=True))
    'server-round is missing; it must be an integer'
    """

    def __init__(
        self,
        key: str,
        value: object,
        allowed: str | Collection[str],
        *,
        missing: bool = False,
    ) -> None:
        if missing:
            message = f"{key} is missing; it must be {allowed}"
        elif isinstance(allowed, str):
            message = f"{key} must be {allowed}, got {value!r}"
        else:
            message = f"unknown {key} {value!r}; choose one of {', '.join(allowed)}"
        super().__init__(message)
        self.key, self.value, self.allowed = key, value, allowed


def check(key: str, value: object, ok: bool, allowed: str) -> None:
    """Raise :class:`ConfigError` unless ``ok``, i.e. ``value`` is ``allowed``."""
    if not ok:
        raise ConfigError(key, value, allowed)


def check_name(key: str, value: str, names: Collection[str]) -> None:
    """Raise :class:`ConfigError` unless ``value`` is one of ``names``."""
    if value not in names:
        raise ConfigError(key, value, list(names))


KINDS = {
    "bool": "true or false",
    "int": "an integer",
    "float": "a finite number",
    "str": "a string",
}
"""The kinds of value :func:`convert` reads, and what a value of each must be."""


def convert(key: str, kind: str, value: object) -> ConfigValue:
    """Return ``value`` of ``key`` as a ``kind``: "bool", "int", "float" or "str".

    Strict: a bool is a bool or the string "true" or "false" (any case); an int
    is an int, not a bool or a float; a float is a finite int or float, not a
    bool; a str is a str.

    Examples
    --------
    >>> convert("compress", "bool", "False"), convert("rho", "float", 1)
    (False, 1.0)
    >>> convert("max-count", "int", 2.5)
    Traceback (most recent call last):
    ...
    flwr_select.config.ConfigError: max-count must be an integer, got 2.5
    """
    allowed = _allowed(key, kind)
    if kind == "bool":
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        check(key, value, isinstance(value, bool), allowed)
    elif kind == "int":
        integer = isinstance(value, int) and not isinstance(value, bool)
        check(key, value, integer, allowed)
    elif kind == "float":
        number = isinstance(value, int | float) and not isinstance(value, bool)
        check(key, value, number and math.isfinite(value), allowed)
        return float(value)
    else:
        check(key, value, isinstance(value, str), allowed)
    return value


def required(config: Mapping[str, object], key: str, kind: str) -> ConfigValue:
    """Return ``config[key]`` as a ``kind`` (:func:`convert`); it must be there.

    Examples
    --------
    >>> required({"server-round": 3}, "server-round", "int")
    3
    >>> required({}, "server-round", "int")
    Traceback (most recent call last):
    ...
    flwr_select.config.ConfigError: server-round is missing; it must be an integer
    """
    if key not in config:
        raise ConfigError(key, None, _allowed(key, kind), missing=True)
    return convert(key, kind, config[key])


def _allowed(key: str, kind: str) -> str:
    if kind not in KINDS:
        raise TypeError(f"run-config field {key} must be bool, int, float or str")
    return KINDS[kind]


class RunConfigFields:
    """Mixin for frozen dataclasses whose fields are run-config keys.

    A field ``max_count`` is the run-config key ``max-count``; its annotation
    (bool, int, float or str) is the type a value must have. A field without a
    default is required: a config without its key is refused, naming it.
    """

    def to_config(self) -> dict[str, ConfigValue]:
        """Return the values under their run-config names (``max-count``...)."""
        return {_key(f.name): getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_config(cls, config: Mapping[str, object]) -> Self:
        """Build from run-config names; keys this class does not know are ignored.

        Raises
        ------
        ConfigError
            If a value is not of its field's type or not allowed, or the key of
            a field without a default is missing.
        """
        values = {
            f.name: required(config, _key(f.name), _kind(f.type))
            for f in fields(cls)
            if _key(f.name) in config or _has_no_default(f)
        }
        return cls(**values)


def _has_no_default(field: Field) -> bool:
    return field.default is MISSING and field.default_factory is MISSING


def _key(name: str) -> str:
    return name.replace("_", "-")


def _kind(annotation: object) -> str:
    # A string under ``from __future__ import annotations``, else the type itself.
    if isinstance(annotation, str):
        return annotation
    return getattr(annotation, "__name__", str(annotation))
