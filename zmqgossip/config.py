"""Experiment configuration: pydantic models, validated on load with clear errors.

An experiment is a TOML file or the name of a preset (the repository's ``launch/``
folder, installed as ``zmqgossip/presets``; see :func:`preset_dirs`).  Every key is documented in the field descriptions below and
unknown keys are refused, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .links import NetworkEmulation
from .policies import METHODS

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

Method = Literal["local", "random", "oracle", "pens", "dac", "dac-var", "dac-plus"]


class ConfigError(ValueError):
    """A config that cannot run; the message names the field and what is allowed."""


class _Strict(BaseModel):
    # allow_inf_nan=False: a timeout, learning rate or bound of inf or nan is refused on load
    # ("Input should be a finite number") instead of hanging or poisoning a run later.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class DataConfig(_Strict):
    dataset: Literal["digits", "mnist-bundled", "mnist", "fashion-mnist", "cifar10"] = Field(
        "digits", description="digits / mnist-bundled ship with the package; mnist, fashion-mnist, cifar10 load from `root`")
    root: str | None = Field(None, description="local folder holding mnist / fashion-mnist / cifar10 files")
    shift: Literal["label", "label-random", "label-permutation", "rotation"] = Field(
        "label", description="how clients fall into clusters")
    groups: list[list[int]] = Field(
        [[0, 1, 8, 9], [2, 3, 4, 5, 6, 7]], description="label shift: the classes of each cluster")
    fractions: list[float] | None = Field(
        None, description="share of clients per cluster (default: 0.4/0.6 for label, 0.7/0.2/0.05/0.05 for rotation, equal otherwise)")
    angles: list[float] = Field([0, 180, 10, 350], description="rotation: degrees per cluster")
    clusters: int = Field(2, ge=1, description="label-random / label-permutation: number of clusters")
    classes_per_cluster: int = Field(4, ge=1, description="label-random: classes per cluster")
    allow_overlap: bool = Field(False, description="rotation: clusters may draw the same images")
    n_train: int = Field(400, ge=1, description="training samples per client")
    n_val: int = Field(100, ge=1, description="validation samples per client")
    test_per_class: int | None = Field(None, ge=1, description="held-out test images per class (bundled data)")

    @field_validator("groups")
    @classmethod
    def _groups(cls, v: list[list[int]]) -> list[list[int]]:
        if not v or any(not g for g in v):
            raise ValueError("groups must be a non-empty list of non-empty class lists, e.g. [[0, 1], [2, 3]]")
        if any(c < 0 for g in v for c in g):
            raise ValueError("class ids in groups must be >= 0")
        return v

    @field_validator("angles")
    @classmethod
    def _angles(cls, v: list[float]) -> list[float]:
        if not v:
            raise ValueError("angles must name at least one rotation")
        return v

    @field_validator("fractions")
    @classmethod
    def _fractions(cls, v: list[float] | None) -> list[float] | None:
        if v is None:
            return v
        if any(not math.isfinite(f) or f < 0 for f in v):
            raise ValueError("fractions must be finite and >= 0")
        if abs(sum(v) - 1.0) > 1e-6:
            raise ValueError(f"fractions must sum to 1, they sum to {sum(v):g}")
        return v


class TrainConfig(_Strict):
    model: Literal["auto", "cnn32", "cnn28", "mlp"] = Field("auto", description="cnn32, cnn28, mlp, or auto (by input shape)")
    epochs: int = Field(3, ge=1, description="local epochs per round (E)")
    batch_size: int = Field(8, ge=1, description="local batch size")
    lr: float = Field(3e-4, gt=0, description="Adam learning rate (a fresh Adam each round)")
    warmup: bool = Field(True, description="one local training before round 0, as the paper")
    test_every: int = Field(5, ge=0, description="evaluate test accuracy every k rounds (0: only at the end)")
    same_init: bool = Field(False, description="all peers start from one initial model")
    checkpoint_every: int = Field(5, ge=0, description="rounds between peer checkpoints, for --resume (0: never)")
    checkpoint_min_s: float = Field(1.0, ge=0, allow_inf_nan=False, description=(
        "seconds at least between a peer's periodic checkpoints, whatever checkpoint_every says "
        "(0: every checkpoint_every rounds): a peer with fast rounds would write many a second"))


class PolicyConfig(_Strict):
    n: int = Field(5, ge=1, description="peers pulled per round")
    tau: float = Field(30.0, gt=0, description="DAC softmax temperature")
    similarity_weighted: bool = Field(False, description="DAC: weight pulled models by p_ij instead of data size")
    pens_sampled: int | None = Field(None, ge=1, description="PENS: peers sampled per round in phase 1 (default 2n)")
    pens_phase1_rounds: int = Field(10, ge=0, description="PENS: rounds of phase 1")
    # DAC's options beyond the paper (policies/dac.py); None: the method's own value, off for
    # dac and dac-var, the recommended one for dac-plus.
    unknown_score: Literal["zero", "mean", "max"] | None = Field(
        None, description="DAC: the score a never-scored peer is ranked with: zero (the paper), or the mean or max "
                          "of the known scores (dac-plus: mean)")
    relative_score: bool | None = Field(
        None, description="DAC: the softmax sees each score over the best known one, so tau weighs loss ratios "
                          "(false: the paper; dac-plus: true)")
    explore: int | None = Field(
        None, ge=0, le=1000, description="DAC: peers pulled and scored per round beyond n, never averaged in "
                                         "(never-scored ones first; 0: none, the paper and dac-plus)")
    drop_ratio: float | None = Field(
        None, ge=0, le=1e6, description="DAC: a pulled model whose loss on my data exceeds this many times the "
                                        "round's lowest gets no weight (0: average all, the paper; dac-plus: 2)")
    fail_decay: float | None = Field(
        None, gt=0, le=1, description="DAC: a failed pull multiplies that peer's score by this (1: the paper; dac-plus: 0.5)")
    fail_limit: int | None = Field(
        None, ge=0, le=1000, description="DAC: after this many failed pulls in a row a peer is forgotten and not drawn for "
                                         "retry_rounds rounds, doubling per further failure (0: never, the paper; dac-plus: 2)")
    retry_rounds: int | None = Field(
        None, ge=1, le=1_000_000, description="DAC: rounds a peer that hit fail_limit is left out (default 5)")
    max_sample_ratio: float = Field(
        1.0, gt=0, le=1e6,
        description="a pulled model weighs at most this many times the puller's own training-set size in the "
                    "average (its n_samples is the sender's claim; 1: no peer outweighs my own data)")


    @field_validator("drop_ratio")
    @classmethod
    def _drop_ratio(cls, v: float | None) -> float | None:
        if v is not None and 0 < v <= 1:
            raise ValueError("drop_ratio must be 0 (off) or above 1 (a ratio of losses)")
        return v

    def dac_options(self) -> dict[str, Any]:
        """DAC's options beyond the paper, None where the method's own value applies."""
        return {k: getattr(self, k) for k in ("unknown_score", "relative_score", "explore", "drop_ratio", "fail_decay", "fail_limit", "retry_rounds")}


FULL_POOL_UP_TO = 33  # peers: up to here every peer keeps a socket to every other
SMALL_POOL = 8  # sockets per peer in larger networks (bounded whatever their size)


class NetworkConfig(_Strict):
    """The network settings of every run, learning or stress: their one definition."""

    transport: Literal["inproc", "ipc", "tcp"] = Field("inproc", description="inproc needs one process")
    timeout_s: float = Field(10.0, gt=0, le=3600, description="per-pull timeout")
    pool_size: int | None = Field(None, ge=1, le=4096, description=(
        "outgoing sockets kept per peer (LRU); default: one per other peer up to 33 peers (no "
        f"socket churn), else {SMALL_POOL}"))
    hwm: int = Field(16, ge=1, le=100_000, description="messages queued per socket (and per connection of an inbox)")
    max_abs: float | None = Field(1e4, gt=0, description="refuse pulled models with a |value| above this (none: no bound)")
    flood_share: float = Field(0.1, gt=0, le=1, description=(
        "under a flood, the most of a process's time an inbox spends answering senders it does not "
        "trust yet; the rest of their messages are dropped unread (1: answer everything)"))

    def resolve(self, peers: int, processes: int) -> None:
        """Fill in what depends on the run: the pool size (small networks: one socket per
        other peer, so none is ever closed and reopened, a reconnect per pull being a large
        share of the event loop's work; large ones: a bounded number per peer) and ipc for
        peers spread over processes."""
        if self.pool_size is None:
            self.pool_size = peers - 1 if peers <= FULL_POOL_UP_TO else SMALL_POOL
        if processes > 1 and self.transport == "inproc":
            self.transport = "ipc"


#: Defaults every layer below the config takes from here (a transport built without a
#: config, a peer's pull timeout).
DEFAULT_TIMEOUT_S: float = NetworkConfig.model_fields["timeout_s"].default
DEFAULT_HWM: int = NetworkConfig.model_fields["hwm"].default
DEFAULT_FLOOD_SHARE: float = NetworkConfig.model_fields["flood_share"].default


class ComputeConfig(_Strict):
    threads: int = Field(1, ge=1, le=1024, description="torch threads per process")
    processes: int = Field(1, ge=1, le=4096, description="worker processes hosting the peers")
    slow_peers: list[int] = Field([], description="peer ids that compute slower")
    slow_factor: float = Field(5.0, ge=1.0, le=1e6, description="how much slower the slow peers are")
    pull_ahead: int = Field(1, ge=0, le=100_000, description=(
        "async: updates per process that may pull while another computes (0: pull only when the "
        "compute thread is free; more hides network latency, but pulled models wait longer)"))
    pull_hold_s: float = Field(0.1, gt=0, le=3600, description=(
        "async: a pull slower than this gives its turn back while it waits on the network"))


class ExperimentConfig(_Strict):
    name: str = Field("experiment", min_length=1, description="shown in summaries and reports")
    description: str = Field("", description="one line for `zmqgossip presets`")
    method: Method = Field("dac-var", description=f"one of {', '.join(METHODS)}")
    schedule: Literal["async", "sequential"] = Field("async", description="async: no barrier; sequential: the reference code's rounds")
    peers: int = Field(20, ge=2, description="number of peers (clients)")
    rounds: int = Field(20, ge=1, description="updates per peer")
    seconds: float | None = Field(None, gt=0, description="async: stop after this many seconds instead")
    seed: int = Field(0, ge=0, le=2**32 - 1, description="random seed (0 .. 2**32 - 1)")
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()
    policy: PolicyConfig = PolicyConfig()
    network: NetworkConfig = NetworkConfig()
    compute: ComputeConfig = ComputeConfig()
    links: NetworkEmulation = NetworkEmulation()

    @model_validator(mode="after")
    def _consistent(self) -> "ExperimentConfig":
        for e in self.links.scenario:
            if e.at_round is not None and self.schedule != "sequential":
                raise ValueError("links.scenario: at_round needs schedule 'sequential'; use at_s with 'async'")
            named = set(e.peers) | {p for g in e.groups for p in g}
            if any(not 0 <= p < self.peers for p in named):
                raise ValueError(f"links.scenario: {e.action} names peers outside 0..{self.peers - 1}")
        for c in self.links.classes:
            if any(not 0 <= p < self.peers for p in c.peers):
                raise ValueError(f"links.classes: peers outside 0..{self.peers - 1}")
        if self.schedule == "sequential" and self.compute.processes > 1:
            raise ValueError("schedule 'sequential' runs in one process: set compute.processes = 1")
        self.network.resolve(self.peers, self.compute.processes)
        if self.compute.processes > self.peers:
            raise ValueError(f"compute.processes ({self.compute.processes}) exceeds peers ({self.peers})")
        bad = [p for p in self.compute.slow_peers if not 0 <= p < self.peers]
        if bad:
            raise ValueError(f"compute.slow_peers names peers {bad} outside 0..{self.peers - 1}")
        return self


def format_error(e: ValidationError, source: str, overridden: Mapping[str, str] | None = None) -> str:
    lines = []
    for err in e.errors():
        loc = ".".join(str(x) for x in err["loc"]) or "(top level)"
        # Blame the --set that put the key (or the list or table holding it) there, not the
        # file the rest came from.
        item = next((v for k, v in (overridden or {}).items() if loc == k or loc.startswith(k + ".")), None)
        where = f"--set {item!r}" if item is not None else source
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        elif err["type"] == "literal_error":
            msg = f"{msg} (got {err.get('input')!r})"
        lines.append(f"{where}: {loc}: {msg}")
    return "\n".join(lines)


def validate(
    raw: Mapping[str, Any], source: str = "config", overridden: Mapping[str, str] | None = None
) -> ExperimentConfig:
    """``overridden``: dotted key -> the ``--set`` item that set it (named in errors)."""
    try:
        return ExperimentConfig.model_validate(dict(raw))
    except ValidationError as e:
        raise ConfigError(format_error(e, source, overridden)) from None


def preset_dirs() -> list[Path]:
    """Where preset names are looked up, first match wins: the presets that ship (the
    installed package's ``presets`` folder, or ``launch/`` in a source checkout, which
    setup.py installs as that folder), then ./launch for the user's own."""
    here = Path(__file__).resolve().parent
    dirs = [here / "presets", here.parent / "launch", Path.cwd() / "launch"]
    return list(dict.fromkeys(d for d in dirs if d.is_dir()))


def find_preset(name: str) -> Path | None:
    for d in preset_dirs():
        p = d / f"{name}.toml"
        if p.is_file():
            return p
    return None


def list_presets() -> dict[str, Path]:
    out: dict[str, Path] = {}
    for d in reversed(preset_dirs()):
        for p in sorted(d.glob("*.toml")):
            out[p.stem] = p
    return dict(sorted(out.items()))


def load_raw(experiment: str) -> tuple[dict[str, Any], str]:
    """The raw TOML of a preset name or a file path, and where it came from."""
    path = Path(experiment)
    if not (path.suffix == ".toml" and path.is_file()):
        found = find_preset(experiment)
        if found is None:
            known = ", ".join(list_presets()) or "none"
            raise ConfigError(f"unknown experiment {experiment!r}: not a TOML file nor a preset (presets: {known})")
        path = found
    try:
        with open(path, "rb") as f:
            return tomllib.load(f), str(path)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None


def parse_override(item: str) -> tuple[list[str], Any]:
    """``a.b=value`` -> (["a", "b"], value), the value read as TOML (strings may be bare)."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected key=value, e.g. policy.tau=10")
    key, _, text = item.partition("=")
    keys = [k.strip() for k in key.split(".") if k.strip()]
    if not keys:
        raise ConfigError(f"--set {item!r}: empty key")
    try:
        value = tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        value = text  # a bare word: a string
    return keys, value


def apply_overrides(raw: dict[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in raw.items()}
    for item in overrides:
        keys, value = parse_override(item)
        node = out
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {item!r}: {k} is not a table")
        node[keys[-1]] = value
    return out


def load(experiment: str, overrides: Iterable[str] = (), **fields: Any) -> ExperimentConfig:
    """Load a preset or TOML file, apply ``--set`` overrides and explicit fields, validate."""
    raw, source = load_raw(experiment)
    overrides = list(overrides)
    raw = apply_overrides(raw, overrides)
    overridden = {".".join(parse_override(item)[0]): item for item in overrides}
    for k, v in fields.items():
        if v is not None:
            raw[k] = v
    return validate(raw, source, overridden)
