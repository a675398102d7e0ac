"""`zmqgossip keys`: one CURVE key pair per peer of a roster."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .. import config as config_mod
from .app import app, fail


@app.command()
def keys(
    roster: Path = typer.Argument(..., help="the roster TOML (its `keys` folder, default keys/ beside it)"),
    out_dir: Optional[Path] = typer.Option(None, "--out", help="write the keys here instead of the roster's keys folder"),
    force: bool = typer.Option(False, "--force", help="replace existing key files"),
) -> None:
    """Generate a CURVE key pair per roster peer (secret files mode 0600, folder 0700)."""
    from ..roster import load_roster
    from ..security import generate_keys, keys_folder

    try:
        ros, _ = load_roster(roster)
        folder = out_dir if out_dir is not None else keys_folder(ros.keys, roster)
        peers = [p for h in ros.hosts for p in h.peers]
        generate_keys(folder, peers, force=force)
    except (config_mod.ConfigError, ValueError) as e:
        fail(str(e))
    except OSError as e:
        fail(f"cannot write keys to {folder}: {e.strerror or e}")
    typer.echo(f"wrote {len(peers)} CURVE key pairs to {folder}")
    if ros.security != "curve":
        typer.echo(f"note: {roster} has security = \"{ros.security}\"; set security = \"curve\" to use them", err=True)
    typer.echo(
        "copy every peer-N.key (public) to every host, and each host's own peer-N.key_secret to that host only",
        err=True,
    )
