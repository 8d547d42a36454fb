"""Reading a user's YAML config, guarded: bounded size and depth, keys that are names, one line per failure."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from .config_rules import ConfigValueError
from .errors import fail


MAX_CONFIG_BYTES = 1 << 20   # a config is a few hundred bytes; reads stop here (a device file like /dev/zero never ends)
MAX_CONFIG_DEPTH = 32        # sections are 2 levels deep; deeper nesting is a mistake (and would exhaust the stack)


class _BoundedLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses nesting deeper than :data:`MAX_CONFIG_DEPTH` (the composer is recursive)."""

    def compose_node(self, parent, index):
        self._depth = getattr(self, "_depth", 0) + 1
        try:
            if self._depth > MAX_CONFIG_DEPTH:
                raise _TooDeep
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


class _TooDeep(Exception):
    pass


def _check_keys(node: Any, where: str = "", seen: set | None = None) -> None:
    """Every mapping key is a name (YAML also allows numbers, lists, null): ``{1: 2}`` is a mistake, said so here.
    (``seen``: a node shared through YAML aliases is visited once.)"""
    seen = set() if seen is None else seen
    if not isinstance(node, (dict, list)) or id(node) in seen:
        return
    seen.add(id(node))
    for k, v in (node.items() if isinstance(node, dict) else ((None, v) for v in node)):
        key = where if k is None and isinstance(node, list) else f"{where}.{k}" if where else str(k)
        if isinstance(node, dict) and not isinstance(k, str):
            raise ConfigValueError(key, f"is not a name (its type is {type(k).__name__}); config keys are words "
                                        f"like steps or batch_size")
        _check_keys(v, key, seen)


def read_yaml(path: Path) -> dict:
    """The guarded reader of a user's YAML config: every failure is one SceneprobeError naming the file.

    Reads are bounded (:data:`MAX_CONFIG_BYTES`, :data:`MAX_CONFIG_DEPTH`); integers beyond Python's digit limit,
    and keys that are not names, are refused in one line too."""
    path = Path(path)
    try:
        if path.is_dir():
            raise fail(f"config file {path} is a folder; pass a YAML file with --config")
        with open(path, "rb") as f:
            raw = f.read(MAX_CONFIG_BYTES + 1)
        if len(raw) > MAX_CONFIG_BYTES:
            raise fail(f"config file {path} is larger than {MAX_CONFIG_BYTES >> 20} MB; pass a YAML config file "
                       f"(a few lines of sections and keys)")
        data = yaml.load(raw.decode("utf-8"), Loader=_BoundedLoader) or {}
        _check_keys(data)
    except FileNotFoundError:
        raise fail(f"config file {path} does not exist") from None
    except UnicodeDecodeError:
        raise fail(f"config file {path} is not UTF-8 text (binary or UTF-16?); save it as UTF-8 YAML") from None
    except OSError as e:
        raise fail(f"config file {path} cannot be read ({e.strerror or e})") from None
    except yaml.YAMLError as e:
        raise fail(f"config file {path} is not valid YAML ({str(e).splitlines()[0]})") from None
    except (_TooDeep, RecursionError):
        raise fail(f"config file {path} is nested deeper than {MAX_CONFIG_DEPTH} levels; a config holds sections "
                   f"of keys (e.g. train_vae: {{steps: 300}})") from None
    except ValueError as e:   # int('9' * 5000): beyond Python's integer digit limit
        what = "an integer of thousands of digits" if "digits" in str(e) else f"a value that cannot be read ({e})"
        raise fail(f"config file {path} holds {what}; no config key takes such a value — fix or remove it") from None
    except ConfigValueError as e:
        raise fail(f"config file {path}: key {e.key} {e.problem}") from None
    if not isinstance(data, dict):
        raise fail(f"config file {path} must hold a mapping of sections, got {type(data).__name__}")
    return data
