"""Small files the stages write: JSON, replaced atomically so a reader never sees half of one."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def write_json(data: Any, path: Path) -> None:
    """`data` as indented JSON with sorted keys at `path` (parents made), via a temporary file and
    os.replace: an interrupted write leaves the old file, never a truncated one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)
