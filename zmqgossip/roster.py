"""Rosters: which host runs which peers, at which tcp endpoints.

A roster is a TOML file::

    experiment = "label-digits"      # preset name or TOML path (relative to the roster)
    set = ["rounds=10"]              # optional --set style overrides
    out = "runs/roster-demo"         # run directory on each host
    security = "none"                # "curve": only roster keys may connect (see keys)

    [[hosts]]
    name = "a"
    address = "127.0.0.1"            # where the other hosts reach this one
    base_port = 47100                # peer k of this host listens on base_port + k
    peers = [0, 1, 2, 3, 4, 5, 6]

``zmqgossip worker --roster FILE --host a`` runs host a's peers; ``zmqgossip run
--roster FILE`` starts every host as a local worker process (loopback tcp).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .config import ConfigError, ExperimentConfig, format_error, load

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


class Host(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(..., min_length=1, description="host name used with `zmqgossip worker --host`")
    address: str = Field(..., min_length=1, description="address the other hosts reach this one at")
    base_port: int = Field(..., ge=1, le=65535, description="peer k of this host listens on base_port + k")
    peers: list[int] = Field(..., min_length=1, description="peer ids this host runs")

    @model_validator(mode="after")
    def _ports(self) -> "Host":
        if self.base_port + len(self.peers) - 1 > 65535:
            raise ValueError(f"host {self.name}: ports {self.base_port}..{self.base_port + len(self.peers) - 1} exceed 65535")
        return self


class Roster(BaseModel):
    model_config = ConfigDict(extra="forbid")

    experiment: str = Field(..., description="preset name or TOML path (relative to the roster file)")
    set: list[str] = Field([], description="overrides, as with --set")
    out: str = Field("runs/roster", description="run directory on each host")
    security: Literal["none", "curve"] = Field("none", description="curve: authenticated, encrypted peers")
    keys: str | None = Field(None, description="folder of CURVE keys (zmqgossip keys ROSTER)")
    hosts: list[Host] = Field(..., min_length=1)

    @model_validator(mode="after")
    def _unique(self) -> "Roster":
        names = [h.name for h in self.hosts]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"host names appear twice: {dup}")
        seen: dict[int, str] = {}
        for h in self.hosts:
            for p in h.peers:
                if p in seen:
                    raise ValueError(f"peer {p} is named twice (hosts {seen[p]} and {h.name})")
                seen[p] = h.name
        return self

    def directory(self) -> dict[int, str]:
        return {p: f"tcp://{h.address}:{h.base_port + k}" for h in self.hosts for k, p in enumerate(h.peers)}

    def host(self, name: str) -> Host:
        for h in self.hosts:
            if h.name == name:
                return h
        raise ConfigError(f"host {name!r} is not in the roster (hosts: {', '.join(x.name for x in self.hosts)})")


def load_roster(path: str | Path) -> tuple[Roster, ExperimentConfig]:
    """Read and validate a roster and the experiment it names."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"roster {path} does not exist")
    try:
        with open(path, "rb") as f:
            raw = tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None
    try:
        roster = Roster.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(format_error(e, str(path))) from None
    exp = roster.experiment
    rel = path.parent / exp
    if exp.endswith(".toml") and rel.is_file():
        exp = str(rel)
    overrides = [*roster.set]
    cfg = load(exp, overrides, schedule="async")
    cfg = cfg.model_copy(update={"network": cfg.network.model_copy(update={"transport": "tcp"})})
    ids = sorted(p for h in roster.hosts for p in h.peers)
    if ids != list(range(cfg.peers)):
        missing = sorted(set(range(cfg.peers)) - set(ids))[:10]
        extra = sorted(set(ids) - set(range(cfg.peers)))[:10]
        raise ConfigError(f"{path}: roster peers must be exactly 0..{cfg.peers - 1}: missing {missing}, unknown {extra}")
    return roster, cfg
