"""A small on-disk cache of JSON records, keyed by content hashes (e.g. a model config's layout).

Location: `$MPOSURGEON_CACHE`, else `$XDG_CACHE_HOME/mposurgeon`, else `~/.cache/mposurgeon`;
`MPOSURGEON_NO_CACHE=1` turns it off. The cache only saves time: a record that is missing,
unreadable or malformed is a miss, and failing to write one is silently skipped. Records are
written to a temporary sibling and renamed, so a reader never sees half a record.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any


def cache_dir() -> Path | None:
    """The cache root, or None when caching is turned off."""
    if os.environ.get("MPOSURGEON_NO_CACHE", "").strip() not in ("", "0"):
        return None
    if root := os.environ.get("MPOSURGEON_CACHE"):
        return Path(root).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "mposurgeon"


def record_key(*parts: str | bytes) -> str:
    """The sha256 (hex) of `parts`, each length-prefixed so that no two part lists collide."""
    digest = hashlib.sha256()
    for part in parts:
        data = part.encode() if isinstance(part, str) else part
        digest.update(len(data).to_bytes(8, "little"))
        digest.update(data)
    return digest.hexdigest()


def read_record(namespace: str, key: str) -> dict[str, Any] | None:
    """The record stored under `namespace/key`, or None (missing, unreadable, not a dict)."""
    root = cache_dir()
    if root is None:
        return None
    try:
        data = json.loads((root / namespace / f"{key}.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def write_record(namespace: str, key: str, data: dict[str, Any]) -> bool:
    """Store `data` under `namespace/key`; True if written, False if the cache is off or
    not writable."""
    root = cache_dir()
    if root is None:
        return False
    directory = root / namespace
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{key}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(data, f)
            os.replace(tmp, directory / f"{key}.json")
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except OSError:
        return False
    return True
