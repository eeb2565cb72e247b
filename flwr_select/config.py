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

import importlib
import inspect
import math
import re
from collections.abc import Collection, Iterable, Mapping
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


SECTION_RULE = re.compile(r"-{3,}")
ROLE = re.compile(r":[a-z]+:`~?([^`]+)`")
"""A Sphinx cross-reference (``:data:`~pkg.NAME```)."""


def key_meanings(classes: Iterable[type]) -> dict[str, str]:
    """Return what each run-config key of ``classes`` means, from their docstrings.

    The text is the one the dataclass that declares the key gives it in the
    ``Parameters`` section of its docstring (NumPy style; one entry may name
    several fields), the nearest class first: the one place a key is
    described, for ``--help`` and the docs. A cross-reference to a collection
    of names (``:data:`~flwr_select.data.DATASETS```) shows its names, so the
    text cannot drift from what the code allows; any other shows its last name.

    Examples
    --------
    >>> from flwr_select.selection.protocol import SelectionConfig
    >>> key_meanings([SelectionConfig])["rho"]
    "Fraction of a site's samples this round it may send (0 < rho <= 1)."
    """
    meanings: dict[str, str] = {}
    for cls in classes:
        declared = {_key(f.name) for f in fields(cls)}
        for klass in cls.__mro__:
            for names, text in _parameters(klass.__dict__.get("__doc__") or ""):
                module = klass.__module__
                shown = ROLE.sub(lambda m, at=module: _reference(m[1], at), text)
                for key in {_key(name) for name in names} & declared:
                    meanings.setdefault(key, shown.replace("``", ""))
    return meanings


def _reference(target: str, module: str) -> str:
    """Show a cross-reference by its last name, with its value if it is plain.

    A collection of names gets them (sorted), a number its value: what the code
    allows, read from the code.
    """
    path, _, name = target.rpartition(".")
    try:
        value = getattr(importlib.import_module(path or module), name)
    except (ImportError, AttributeError, ValueError):
        return name
    if isinstance(value, Mapping | tuple | list | set | frozenset) and value:
        if all(isinstance(item, str) for item in value):
            return f"{name} ({', '.join(sorted(value))})"
    if isinstance(value, int | float) and not isinstance(value, bool):
        return f"{name} ({value})"
    return name


def _parameters(doc: str) -> list[tuple[list[str], str]]:
    """Return the entries of a NumPy-style ``Parameters`` section: names and text."""
    lines = inspect.cleandoc(doc).splitlines()
    entries: list[tuple[list[str], list[str]]] = []
    inside = False
    for line, below in zip(lines, [*lines[1:], ""], strict=True):
        if SECTION_RULE.fullmatch(below.strip()):
            inside = line.strip() == "Parameters"
        elif not inside or SECTION_RULE.fullmatch(line.strip()) or not line.strip():
            continue
        elif not line.startswith(" "):
            names = line.partition(" : ")[0]
            entries.append(([name.strip() for name in names.split(",")], []))
        elif entries:
            entries[-1][1].append(line.strip())
    return [(names, " ".join(text)) for names, text in entries]
