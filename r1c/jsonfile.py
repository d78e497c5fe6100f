"""Reading the JSON files r1c writes (config, manifest, bench reports) with one-line errors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from r1c.errors import R1CError


def read_json_object(path: Path, error: type[R1CError], stage: str) -> dict[str, Any]:
    """The JSON object in `path` (which the caller has checked exists); malformed JSON or a non-object is `error`."""
    try:
        d = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise error(f"{stage}: {path} is not valid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(d, dict):
        raise error(f"{stage}: {path} does not hold a JSON object")
    return d
