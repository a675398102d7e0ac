"""`zmqgossip presets`: the experiments that ship."""

from __future__ import annotations


import typer

from .. import config as config_mod
from .app import app


@app.command()
def presets() -> None:
    """List the presets: name, what it runs, roughly how long it takes here."""
    for name, path in config_mod.list_presets().items():
        try:
            raw, _ = config_mod.load_raw(str(path))
            desc = raw.get("description", "")
        except config_mod.ConfigError as e:
            desc = f"(invalid: {e})"
        typer.echo(f"{name:<30} {desc}")
