"""Reading a JSON file that must hold one object, with one-line errors naming the file."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mposurgeon.errors import MposurgeonError


def read_json_object(path: Path, bad: Callable[[str], MposurgeonError]) -> dict[str, Any]:
    """The JSON object in file `path`. Every problem (unreadable, not UTF-8, not JSON, nested
    too deeply for the parser, not an object) raises `bad(what)`, `what` completing a sentence
    that starts with the file's name, e.g. "is not valid JSON (...)"."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise bad(f"cannot be read ({err})") from err
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise bad(
            f"is not valid JSON ({err.msg} at line {err.lineno}, column {err.colno})"
        ) from None
    except RecursionError:
        raise bad("is not valid JSON (nested too deeply)") from None
    if not isinstance(data, dict):
        raise bad(f"is not a JSON object (it holds a {type(data).__name__})")
    return data
