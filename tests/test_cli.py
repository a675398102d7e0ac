"""The command line: bad input is refused before anything starts, every command documents
its options, and `zmqgossip run` works end to end.

Most checks run the real console script (``.venv/bin/zmqgossip``, or ``python -m`` the
app when the script is not installed) in a subprocess; the option listing uses the Typer
app in-process. Experiments are tiny TOMLs in ``tmp_path`` (digits, 12 peers).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from _helpers import tiny_experiment, to_toml, toml_value, zmqgossip_cmd  # noqa: F401
import typer.main
from typer.testing import CliRunner

from zmqgossip import config, report
from zmqgossip.cli import app
from zmqgossip.net import free_tcp_ports

ROOT = Path(__file__).resolve().parent.parent
LAUNCH = ROOT / "launch"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

#: The keys of summary.json (``zmqgossip.metrics.summarize``).
SUMMARY_KEYS = {
    "name", "method", "schedule", "peers", "rounds", "seed", "clusters", "test_acc", "final_test_acc",
    "within_cluster_pull_fraction", "peer_rounds", "wall_s", "pulls_ok", "pulls_failed", "bytes_sent",
    "bytes_received", "failed_peers", "staleness",
}


# ------------------------------------------------------------------ helpers


def cli(*args: str, cwd: Path | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    """The real console script in a subprocess."""
    env = {**os.environ, "COLUMNS": "200", "PYTHONUNBUFFERED": "1"}
    return subprocess.run([*zmqgossip_cmd(), *args], capture_output=True, text=True, cwd=cwd, env=env,
                          timeout=timeout, check=False)


@dataclass
class Outcome:
    returncode: int
    stdout: str
    stderr: str


def invoke(*args: str, via: str, cwd: Path) -> Outcome:
    """``zmqgossip ARGS`` through the console script (``via="script"``) or the Typer app
    in this process (``via="app"``, no interpreter start: a fraction of a second)."""
    if via == "script":
        r = cli(*args, cwd=cwd)
        return Outcome(r.returncode, r.stdout, r.stderr)
    old = Path.cwd()
    os.chdir(cwd)
    try:
        r = CliRunner().invoke(app, list(args), env={"COLUMNS": "200"})
    finally:
        os.chdir(old)
    assert r.exception is None or isinstance(r.exception, SystemExit), repr(r.exception)
    return Outcome(r.exit_code, r.stdout, r.stderr)


def write_experiment(path: Path, **over: Any) -> Path:
    path.write_text(to_toml(tiny_experiment(**over)))
    return path


def write_roster(path: Path, experiment: str, hosts: list[dict[str, Any]], out: Path) -> Path:
    path.write_text(to_toml({"experiment": experiment, "out": str(out), "hosts": hosts}))
    return path


def assert_refused(res: Outcome, *needles: str) -> str:
    """Exit code 2 and exactly one line on stderr, starting with ``error:``, naming ``needles``."""
    err = res.stderr
    lines = err.strip().splitlines()
    assert res.returncode == 2, f"exit code {res.returncode}, stderr {err!r}"
    assert len(lines) == 1, f"expected one line on stderr, got {err!r}"
    assert lines[0].startswith("error: "), lines[0]
    assert "Traceback" not in err and "Traceback" not in res.stdout
    for n in needles:
        assert n in lines[0], f"{n!r} not in {lines[0]!r}"
    return lines[0]


# ------------------------------------------------------------------ bad input

# Every refusal is checked through the Typer app; the ones marked "script" also through
# the real console script (each of those costs an interpreter start, seconds here).
BAD_EXPERIMENTS = [
    ("unknown-preset", "script", ["run", "no-such-preset"], ["unknown experiment 'no-such-preset'", "label-digits"]),
    ("set-unknown-key", "app", ["run", "{exp}", "--set", "foo=1"], ["--set 'foo=1': foo", "unknown key"]),
    ("set-bad-list-item", "app", ["run", "{exp}", "--set", 'data.angles=["x"]'], ["--set 'data.angles=[\"x\"]': data.angles.0", "number"]),
    ("toml-unknown-key", "script", ["run", "{bad_key_exp}"], ["train.epoch", "unknown key"]),
    ("wrong-type", "script", ["run", "{exp}", "--set", "policy.tau=abc"], ["policy.tau", "number"]),
    ("bad-method", "app", ["run", "{exp}", "--method", "dac-foo"], ["method", "dac-foo"]),
    ("bad-schedule", "app", ["run", "{exp}", "--schedule", "sometimes"], ["schedule", "sometimes"]),
    ("missing-data-folder", "script", ["run", "{exp}", "--set", "data.dataset=cifar10", "--set", "data.root=/nonexistent"],
     ["/nonexistent", "does not exist"]),
    ("fractions-sum", "app", ["run", "{exp}", "--set", "data.fractions=[0.5, 0.4]"], ["data.fractions", "sum to 1"]),
    ("sequential-processes", "app", ["run", "{exp}", "--schedule", "sequential", "--processes", "2"],
     ["sequential", "processes"]),
    ("more-processes-than-peers", "app", ["run", "{exp}", "--processes", "13"], ["processes", "exceeds peers"]),
    ("processes-zero", "app", ["run", "{exp}", "--set", "compute.processes=0"], ["compute.processes"]),
    ("one-peer", "app", ["run", "{exp}", "--set", "peers=1"], ["peers"]),
    ("negative-lr", "app", ["run", "{exp}", "--set", "train.lr=-1"], ["train.lr"]),
    ("bad-transport", "app", ["run", "{exp}", "--set", "network.transport=udp"], ["network.transport", "udp"]),
    ("set-without-value", "app", ["run", "{exp}", "--set", "policy.tau"], ["expected key=value"]),
    ("preset-unknown-key", "app", ["run", "label-digits", "--set", "train.epochz=2"], ["train.epochz", "unknown key"]),
]
CASES = [pytest.param(args, needles, via, id=f"{name}-{via}")
         for name, script, args, needles in BAD_EXPERIMENTS
         for via in (["app", "script"] if script == "script" else ["app"])]


@pytest.mark.parametrize("args, needles, via", CASES)
def test_bad_experiment_input_is_one_error_line_and_exit_2(tmp_path, args, needles, via):
    exp = write_experiment(tmp_path / "exp.toml")
    bad_key_exp = write_experiment(tmp_path / "bad.toml", train={"epoch": 1})
    out = tmp_path / "run"
    argv = [a.format(exp=exp, bad_key_exp=bad_key_exp) for a in args] + ["--out", str(out), "-q"]
    res = invoke(*argv, via=via, cwd=tmp_path)
    print(assert_refused(res, *needles))
    assert not out.exists(), "a run directory was created for a refused run"
    assert not (tmp_path / "runs").exists()
    assert res.stdout == ""


def roster_hosts(ports: list[int], shares: list[list[int]], **change: Any) -> list[dict[str, Any]]:
    """Hosts a, b, c; ``change`` as ``{"1__address": None}`` (drop) or ``{"2__peers": [...]}``."""
    hosts = [{"name": n, "address": "127.0.0.1", "base_port": p, "peers": s}
             for n, p, s in zip("abc", ports, shares)]
    for k, v in change.items():
        i, key = k.split("__")
        if v is None:
            del hosts[int(i)][key]
        else:
            hosts[int(i)][key] = v
    return hosts


BAD_ROSTERS = [
    ("peer-twice", {"1__peers": [3, 4, 5, 6, 7, 8]}, ["peer 3 is named twice", "hosts a and b"]),
    ("no-address", {"1__address": None}, ["hosts.1.address", "Field required"]),
    ("no-base-port", {"2__base_port": None}, ["hosts.2.base_port", "Field required"]),
    ("peers-missing", {"2__peers": [8, 9, 10]}, ["0..11", "missing [11]"]),
    ("peers-unknown", {"2__peers": [8, 9, 10, 11, 12]}, ["0..11", "unknown [12]"]),
    ("host-twice", {"2__name": "a"}, ["host names appear twice", "'a'"]),
]
ROSTER_CASES = [pytest.param(change, needles, command, via, id=f"{name}-{command}-{via}")
                for name, change, needles in BAD_ROSTERS
                for command in ("run", "worker")
                for via in (["app", "script"] if (name, command) in {("peer-twice", "run"), ("no-address", "worker")}
                            else ["app"])]


@pytest.mark.parametrize("change, needles, command, via", ROSTER_CASES)
def test_bad_roster_is_one_error_line_and_exit_2(tmp_path, change, needles, command, via):
    write_experiment(tmp_path / "exp.toml")
    out = tmp_path / "roster-run"
    hosts = roster_hosts(free_tcp_ports(3), [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]], **change)
    roster = write_roster(tmp_path / "roster.toml", "exp.toml", hosts, out)
    argv = ["run", "--roster", str(roster), "-q"] if command == "run" else \
        ["worker", "--roster", str(roster), "--host", "b", "-q"]
    res = invoke(*argv, via=via, cwd=tmp_path)
    print(assert_refused(res, *needles))
    assert not out.exists()


@pytest.mark.parametrize(
    "case, needles",
    [("unknown-host", ["'zz'", "a, b, c"]), ("no-roster-file", ["does not exist"]), ("roster-bad-experiment", ["foo", "unknown key"]),
     ("run-nothing", ["EXPERIMENT", "--roster"])],
)
def test_other_refusals(tmp_path, case, needles):
    write_experiment(tmp_path / "exp.toml")
    write_experiment(tmp_path / "bad.toml", foo=1)
    out = tmp_path / "roster-run"
    hosts = roster_hosts(free_tcp_ports(3), [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]])
    experiment = "bad.toml" if case == "roster-bad-experiment" else "exp.toml"
    roster = write_roster(tmp_path / "roster.toml", experiment, hosts, out)
    argv = {
        "unknown-host": ["worker", "--roster", str(roster), "--host", "zz"],
        "no-roster-file": ["run", "--roster", str(tmp_path / "nope.toml")],
        "roster-bad-experiment": ["run", "--roster", str(roster)],
        "run-nothing": ["run"],
    }[case]
    res = invoke(*argv, "-q", via="app", cwd=tmp_path)
    print(assert_refused(res, *needles))
    assert not out.exists() and not (tmp_path / "runs").exists()


# ------------------------------------------------------------------ presets and help


def test_presets_lists_every_launch_toml_one_line_each(tmp_path):
    res = cli("presets", cwd=tmp_path)  # from an empty folder: only the project's launch/
    assert res.returncode == 0, res.stderr
    lines = [ln for ln in res.stdout.splitlines() if ln.strip()]
    names = sorted(p.stem for p in LAUNCH.glob("*.toml"))
    assert len(names) >= 5
    assert [ln.split()[0] for ln in lines] == names
    for ln, name in zip(lines, names):
        raw, _ = config.load_raw(str(LAUNCH / f"{name}.toml"))
        assert raw.get("description"), f"preset {name} has no description"
        assert raw["description"] in ln
        assert "(invalid" not in ln
        config.load(name)  # every listed preset is a valid experiment


def _commands() -> dict[str, Any]:
    return dict(typer.main.get_command(app).commands)


def test_every_command_is_registered():
    assert {"run", "worker", "presets", "report", "compare"} <= set(_commands())


def test_the_command_line_loads_without_torch():
    """`zmqgossip --help`, `presets` and every command's --help answer without importing torch
    (its import is most of an interpreter's start-up): it loads inside the commands that need it."""
    code = "import sys, zmqgossip.cli; assert 'torch' not in sys.modules, 'the CLI imports torch'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


@pytest.mark.parametrize("command", sorted(_commands()))
def test_help_lists_every_option_with_a_description(command):
    res = CliRunner().invoke(app, [command, "--help"], env={"COLUMNS": "250", "TERMINAL_WIDTH": "250"})
    assert res.exit_code == 0, res.output
    text = " ".join(res.output.replace("│", " ").split())
    params = _commands()[command].params
    for p in params:
        help_text = " ".join((getattr(p, "help", None) or "").replace("\\[", "[").split())  # \[: Rich escape
        assert help_text, f"{command}: {p.name} has no description"
        assert help_text in text, f"{command}: description of {p.name} ({help_text!r}) not shown in --help"
        if p.param_type_name == "option":
            long = [o for o in p.opts if o.startswith("--")]
            assert long and all(o in text for o in long), f"{command}: option {p.opts} not in --help"


def test_top_level_help_lists_every_command():
    res = CliRunner().invoke(app, ["--help"], env={"COLUMNS": "250", "TERMINAL_WIDTH": "250"})
    assert res.exit_code == 0
    for name in _commands():
        assert re.search(rf"\b{re.escape(name)}\b", res.output), name


# ------------------------------------------------------------------ end to end


def test_run_end_to_end_prints_the_table_and_writes_the_run_directory(tmp_path):
    exp = write_experiment(tmp_path / "exp.toml")
    out = tmp_path / "out"
    res = cli("run", str(exp), "--out", str(out), "-q", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    print(res.stdout)
    # The table: both clusters, the total row, the summary lines.
    for needle in ("tiny · dac-var · async · 12 peers · 4 rounds", "classes 0,1,8,9", "classes 2,3,4,5,6,7",
                   "all", "mean test accuracy", "48 peer-rounds"):
        assert needle in res.stdout, needle
    assert f"run directory: {out}" in res.stderr
    assert "error" not in res.stderr.lower()

    summary = json.loads((out / "summary.json").read_text())
    assert SUMMARY_KEYS <= set(summary), SUMMARY_KEYS - set(summary)
    assert summary["name"] == "tiny" and summary["method"] == "dac-var" and summary["schedule"] == "async"
    assert summary["peers"] == 12 and summary["rounds"] == 4 and summary["seed"] == 0
    assert summary["failed_peers"] == [] and summary["peer_rounds"] == 48
    assert summary["pulls_ok"] == 48 * 3 and summary["pulls_failed"] == 0
    assert set(summary["test_acc"]["per_cluster"]) == {"0", "1"}
    assert all(0.0 <= a <= 1.0 for a in summary["test_acc"]["per_cluster"].values())
    assert {c["peers"] for c in summary["clusters"].values()} == {5, 7}
    for name in ("config.json", "clusters.json", "pulls.json"):
        assert (out / name).is_file(), name
    assert sorted(p.name for p in (out / "peers").glob("peer-*.json")) == sorted(f"peer-{i}.json" for i in range(12))

    plots = sorted(p.name for p in (out / "plots").glob("*.png"))
    assert set(report.PLOT_NAMES) <= set(plots), plots
    for name in plots:
        data = (out / "plots" / name).read_bytes()
        assert data.startswith(PNG_SIGNATURE) and len(data) > 1000, name

    # The same table again from the run directory.
    again = invoke("report", str(out), "--no-plots", via="app", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert "mean test accuracy" in again.stdout and "classes 0,1,8,9" in again.stdout
