"""A small JSON result cache under the cache root (:func:`pruning_core.lm.default_cache_root`:
``$PRUNING_CACHE`` or ``~/.cache/pruning-pipeline``).

:class:`ResultCache` stores small JSON results (e.g. a dense model's perplexity) by key under
``results/<namespace>/``; entries are written atomically and an unreadable one is a miss (the
caller computes the value again and overwrites it). Keys are :func:`digest` s of what the result
depends on (e.g. :func:`pruning_core.lm.model_fingerprint`, the model's content hash).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pruning_core.io.atomic import atomic_write_text
from pruning_core.lm import default_cache_root

log = logging.getLogger(__name__)


def digest(data: Mapping[str, Any]) -> str:
    """sha256 of a JSON-able mapping, keys sorted (a cache key)."""
    return hashlib.sha256(json.dumps(dict(data), sort_keys=True, separators=(",", ":")).encode()).hexdigest()


class ResultCache:
    """Small JSON results by key, under ``<cache root>/results/<namespace>/<key>.json``."""

    def __init__(self, namespace: str, *, root: Path | None = None) -> None:
        self.folder = (root or default_cache_root()) / "results" / namespace

    def _file(self, key: str) -> Path:
        return self.folder / f"{key}.json"

    def get(self, key: str) -> dict[str, Any] | None:
        """The entry stored under ``key``; None if there is none or it cannot be read (corrupt)."""
        try:
            data = json.loads(self._file(key).read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            log.warning("ignoring the unreadable cache entry %s (%s)", self._file(key), exc)
            return None
        return data if isinstance(data, dict) else None

    def put(self, key: str, value: Mapping[str, Any]) -> None:
        """Store ``value`` under ``key`` atomically (a failure to write is logged, not raised)."""
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self._file(key), json.dumps(dict(value), indent=1, sort_keys=True))
        except OSError as exc:
            log.warning("cannot write the cache entry %s: %s", self._file(key), exc)


__all__ = ["ResultCache", "digest"]
