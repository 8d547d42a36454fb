"""A store's identity: a canonical, order-independent fingerprint of what determines its contents.

Two processes (another ``PYTHONHASHSEED``, another rank of ``accelerate launch``, a rerun after a kill) that would
write the same store must compute the same fingerprint. So the identity is turned into canonical JSON first:

* mappings → keys sorted (as strings); sets / frozensets → sorted lists (their iteration order depends on the
  process's hash seed); tuples → lists; paths, dtypes, devices → ``str``; numpy / torch scalars → Python numbers;
* diffusers' bookkeeping keys in a config (``_diffusers_version``, ``_use_default_values`` — a list built from a
  set, so its order changes with the hash seed —, ``_name_or_path``) are dropped: they do not change what is
  computed (the defaults they list are in the config with their values).

The fingerprint is the first 16 hex digits of the SHA-256 of that JSON (compact separators, ASCII only).
"""
from __future__ import annotations

import hashlib
import json
import math
from pathlib import PurePath
from typing import Any, Mapping

CONFIG_NOISE = frozenset({"_diffusers_version", "_use_default_values", "_name_or_path"})


def canonical(obj: Any) -> Any:
    """Plain JSON-able value with a canonical order (see the module doc); floats stay exact (``repr`` round-trip)."""
    if isinstance(obj, Mapping):
        return {str(k): canonical(v) for k, v in sorted(obj.items(), key=lambda kv: str(kv[0]))
                if str(k) not in CONFIG_NOISE}
    if isinstance(obj, (set, frozenset)):
        items = [canonical(v) for v in obj]
        return sorted(items, key=lambda v: json.dumps(v, sort_keys=True))
    if isinstance(obj, (list, tuple)):
        return [canonical(v) for v in obj]
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, int):
        return int(obj)
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else repr(obj)
    if isinstance(obj, PurePath):
        return str(obj)
    item = getattr(obj, "item", None)                      # numpy / torch scalars
    if callable(item) and getattr(obj, "ndim", 1) == 0:
        return canonical(item())
    tolist = getattr(obj, "tolist", None)                  # small arrays
    if callable(tolist):
        return canonical(tolist())
    return str(obj)                                        # torch.dtype, torch.device, enums …


def canonical_json(obj: Any) -> str:
    return json.dumps(canonical(obj), sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def store_fingerprint(identity: Mapping[str, Any]) -> str:
    """16 hex digits: the same for every process that would write the same store."""
    return hashlib.sha256(canonical_json(identity).encode()).hexdigest()[:16]
