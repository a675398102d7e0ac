"""Config validation: every bad value is refused on load with a message naming the key."""

from __future__ import annotations

import math

import pytest

from zmqgossip import config, hosting
from zmqgossip.config import ConfigError

BASE = {
    "peers": 6, "rounds": 2,
    "data": {"dataset": "digits", "n_train": 20, "n_val": 10, "test_per_class": 10},
    "train": {"model": "mlp"},
}


def with_value(section: str | None, key: str, value) -> dict:
    raw = {k: (dict(v) if isinstance(v, dict) else v) for k, v in BASE.items()}
    if section is None:
        raw[key] = value
    else:
        raw[section] = {**raw.get(section, {}), key: value}
    return raw


@pytest.mark.parametrize(
    "section, key, value, needle",
    [
        ("network", "timeout_s", math.inf, "network.timeout_s: Input should be a finite number"),
        ("network", "timeout_s", 0, "network.timeout_s: Input should be greater than 0"),
        ("network", "hwm", 0, "network.hwm: Input should be greater than or equal to 1"),
        ("network", "hwm", 10**9, "network.hwm: Input should be less than or equal to 100000"),
        ("network", "pool_size", 0, "network.pool_size"),
        ("network", "max_abs", math.nan, "network.max_abs: Input should be a finite number"),
        ("network", "max_abs", -1.0, "network.max_abs: Input should be greater than 0"),
        ("network", "transport", "udp", "network.transport: Input should be 'inproc', 'ipc' or 'tcp' (got 'udp')"),
        ("train", "lr", math.inf, "train.lr: Input should be a finite number"),
        ("train", "model", "resnet", "train.model: Input should be 'auto', 'cnn32', 'cnn28' or 'mlp' (got 'resnet')"),
        ("train", "epochs", 0, "train.epochs"),
        ("policy", "tau", math.inf, "policy.tau: Input should be a finite number"),
        ("policy", "max_sample_ratio", 0, "policy.max_sample_ratio: Input should be greater than 0"),
        ("data", "groups", [], "data.groups: Value error, groups must be a non-empty list"),
        ("data", "groups", [[0, 1], []], "data.groups: Value error, groups must be a non-empty list"),
        ("data", "angles", [0, math.nan], "data.angles.1: Input should be a finite number"),
        ("data", "fractions", [0.5, 0.6], "data.fractions: Value error, fractions must sum to 1"),
        ("compute", "slow_factor", math.inf, "compute.slow_factor: Input should be a finite number"),
        ("compute", "slow_peers", [7], "compute.slow_peers names peers [7] outside 0..5"),
        (None, "seconds", math.inf, "seconds: Input should be a finite number"),
        (None, "seed", -1, "seed: Input should be greater than or equal to 0"),
        (None, "peers", 1, "peers: Input should be greater than or equal to 2"),
        (None, "name", "", "name: String should have at least 1 character"),
        (None, "typo", 1, "typo: unknown key"),
    ],
)
def test_bad_values_are_refused_with_the_key_and_the_rule(section, key, value, needle):
    with pytest.raises(ConfigError) as e:
        config.validate(with_value(section, key, value), "exp.toml")
    assert needle in str(e.value)
    assert str(e.value).startswith("exp.toml: ")


def test_overrides_are_validated_like_the_file():
    with pytest.raises(ConfigError, match="network.timeout_s: Input should be a finite number"):
        config.load("label-digits", ["network.timeout_s=inf"])
    with pytest.raises(ConfigError, match="expected key=value"):
        config.load("label-digits", ["network.timeout_s"])


def test_a_model_that_cannot_take_the_data_is_refused_before_the_run():
    cfg = config.validate(with_value("train", "model", "cnn32"))
    with pytest.raises(ValueError, match=r"CNN32 needs input \(C, 32, 32\)"):
        hosting.check_model(cfg, hosting.build_partition(cfg))


def test_defaults_and_every_preset_still_validate():
    cfg = config.validate(BASE)
    assert cfg.network.hwm == 16 and cfg.network.max_abs == 1e4
    assert cfg.network.pool_size == cfg.peers - 1  # a small network: a socket to every other peer
    assert config.validate({**BASE, "peers": 34}).network.pool_size == 8  # bounded in larger ones
    assert config.validate({**BASE, "network": {"pool_size": 3}}).network.pool_size == 3
    assert cfg.policy.max_sample_ratio == 1.0
    for name in config.list_presets():
        config.load(name)
