"""Config values checked: every key declares the values it accepts next to its field (:func:`opt`), and a section is
built from a dict (:func:`_build`) with each value coerced to its annotation and checked against those rules; a bad
value is a :class:`ConfigValueError` naming its dotted key.
"""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import field
from typing import Any

from .errors import SceneprobeError

# ------------------------------------------------------------------------------------------- declared ranges
# Every config key declares the values it accepts next to its field (``opt(default, ge=…, choices=…)``); they are
# checked when the config is read (:func:`_check_rules`), before any folder is touched. Whatever the metadata,
# every float must be finite and every int must fit in 64 bits (seeds go to torch/numpy generators as int64).
INT64_MAX = 2**63 - 1


def opt(default: Any = dataclasses.MISSING, *, factory: Any = dataclasses.MISSING, ge: float | None = None,
        gt: float | None = None, le: float | None = None, lt: float | None = None, choices: tuple | None = None,
        min_items: int | None = None) -> Any:
    """A dataclass field with its allowed values; for a tuple field the value rules apply to every item."""
    rules = {k: v for k, v in dict(ge=ge, gt=gt, le=le, lt=lt, choices=choices, min_items=min_items).items()
             if v is not None}
    return field(default=default, default_factory=factory, metadata={"rules": rules})


def seed_opt(default: int = 0) -> Any:
    return opt(default, ge=0, le=INT64_MAX)


def describe_rules(rules: dict) -> str:
    """The allowed values in words: ``one of l1, mse`` / ``>= 1 and <= 512``."""
    if "choices" in rules:
        return "one of " + ", ".join(map(str, rules["choices"]))
    words = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}
    return " and ".join(f"{words[k]} {rules[k]}" for k in ("ge", "gt", "le", "lt") if k in rules)


class ConfigValueError(SceneprobeError):
    """A bad value for one config key: ``key`` (dotted path) and ``problem`` (the rest of the sentence)."""

    def __init__(self, key: str, problem: str):
        super().__init__(f"config key {key} {problem}")
        self.key, self.problem = key, problem


def _check_scalar(value: Any, rules: dict, where: str) -> None:
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigValueError(where, f"must be a finite number, got {value!r}")
    if isinstance(value, int) and not isinstance(value, bool) and not -INT64_MAX <= value <= INT64_MAX:
        raise ConfigValueError(where, f"must fit in 64 bits (|x| <= {INT64_MAX}), got {value}")
    if "choices" in rules and value not in rules["choices"]:
        raise ConfigValueError(where, f"must be {describe_rules(rules)}, got {value!r}")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        ok = all(op(value, rules[k]) for k, op in (("ge", lambda a, b: a >= b), ("gt", lambda a, b: a > b),
                                                   ("le", lambda a, b: a <= b), ("lt", lambda a, b: a < b))
                 if k in rules)
        if not ok:
            raise ConfigValueError(where, f"must be {describe_rules({k: v for k, v in rules.items() if k != 'min_items'})}"
                                          f", got {value!r}")


def _check_rules(value: Any, rules: dict, where: str) -> None:
    """Check one coerced value against its field's declared rules (and the global finite / 64-bit rules)."""
    if isinstance(value, tuple):
        if len(value) < rules.get("min_items", 0):
            raise ConfigValueError(where, f"needs at least {rules['min_items']} item(s), got {list(value)!r}")
        for i, v in enumerate(value):
            _check_scalar(v, rules, f"{where}[{i}]")
    else:
        _check_scalar(value, rules, where)


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` against the annotation ``tp``; lists become tuples; ints are accepted for floats."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigValueError(where, f"must be a mapping, got {type(value).__name__}")
        return _build(tp, value, where)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigValueError(where, f"must be a list, got {value!r}")
        (item,) = {a for a in typing.get_args(tp) if a is not Ellipsis}
        return tuple(_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value))
    if origin in (typing.Union, types.UnionType):
        for a in typing.get_args(tp):
            if a is type(None) and value is None:
                return None
        return _coerce(value, [a for a in typing.get_args(tp) if a is not type(None)][0], where)
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if tp in (str, bool) and type(value) is tp:
        return value
    raise ConfigValueError(where, f"must be {getattr(tp, '__name__', tp)}, got {value!r}")


def _build(cls: type, data: dict, where: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        prefix = f"{where}." if where else ""
        raise ConfigValueError(f"{prefix}{unknown[0]}", f"is unknown; known keys here: {', '.join(sorted(names))}")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            continue
        key = f"{where}.{f.name}" if where else f.name
        kwargs[f.name] = _coerce(data[f.name], hints[f.name], key)
        _check_rules(kwargs[f.name], f.metadata.get("rules", {}), key)  # fields without rules: type and global only
    obj = cls(**kwargs)
    for key, problem in getattr(obj, "problems", lambda: ())():
        raise ConfigValueError(f"{where}.{key}" if where else key, problem)
    return obj
