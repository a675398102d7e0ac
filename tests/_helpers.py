"""Helpers shared by the test modules (not a test module itself)."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any


def toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    raise TypeError(type(v))


def to_toml(d: dict[str, Any]) -> str:
    """Top-level keys, then one ``[table]`` per dict value, then ``[[array]]`` tables."""
    def is_tables(v: Any) -> bool:
        return isinstance(v, list) and bool(v) and isinstance(v[0], dict)

    lines = [f"{k} = {toml_value(v)}" for k, v in d.items() if not isinstance(v, dict) and not is_tables(v)]
    for k, v in d.items():
        if isinstance(v, dict):
            lines += ["", f"[{k}]"] + [f"{kk} = {toml_value(vv)}" for kk, vv in v.items()]
    for k, v in d.items():
        if is_tables(v):
            for item in v:
                lines += ["", f"[[{k}]]"] + [f"{kk} = {toml_value(vv)}" for kk, vv in item.items()]
    return "\n".join(lines) + "\n"


def zmqgossip_cmd() -> list[str]:
    """The installed console script when there is one, else the app through this Python."""
    script = Path(sys.executable).parent / "zmqgossip"
    if script.is_file() and os.access(script, os.X_OK):
        return [str(script)]
    found = shutil.which("zmqgossip")
    if found:
        return [found]
    return [sys.executable, "-c", "from zmqgossip.cli import app; app()"]
