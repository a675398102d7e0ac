"""Limits that hold: the socket and descriptor budget is applied before any socket
exists, a thousand peers fit in one process, and a limit that cannot be met is one
line that says what to raise (exit 2), never a traceback. Real commands, real sockets."""

from __future__ import annotations

import json
import os
import resource
import subprocess
from pathlib import Path

import pytest

from _helpers import zmqgossip_cmd
from zmqgossip.net import socket_budget


def _cli(args: list[str], *, nofile: int | None = None, cwd: Path | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    def limit() -> None:
        if nofile is not None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))

    env = {**os.environ, "COLUMNS": "200"}
    return subprocess.run(zmqgossip_cmd() + args, capture_output=True, text=True, timeout=timeout, preexec_fn=limit, env=env,
                          cwd=cwd)


def _one_line_error(p: subprocess.CompletedProcess) -> str:
    assert p.returncode == 2, (p.returncode, p.stdout[-2000:], p.stderr[-2000:])
    lines = [ln for ln in p.stderr.splitlines() if ln.strip() and not ln.startswith("run directory:")]
    assert len(lines) == 1, p.stderr
    assert "Traceback" not in p.stderr and lines[0].startswith("error: ")
    return lines[0]


def test_stress_with_a_thousand_peers_in_the_default_mode_completes_without_a_failed_pull():
    need = socket_budget(1000, 8, "inproc").fds
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard != resource.RLIM_INFINITY and hard < need:
        pytest.skip(f"this machine's hard descriptor limit ({hard}) is below what 1,000 peers need ({need})")
    p = _cli(["stress", "--peers", "1000", "--pulls", "4", "--payload-kb", "16"])
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads(p.stdout.strip().splitlines()[-1])["stress"]
    assert res["mode"] == "asyncio" and res["peers"] == 1000
    assert res["failed"] == 0 and res["ok"] == 4000


def test_stress_under_a_descriptor_limit_too_low_says_what_to_raise_in_one_line():
    line = _one_line_error(_cli(["stress", "--peers", "1000", "--pulls", "1"], nofile=256))
    assert "ulimit -n" in line and "1000 peers" in line


def test_a_learning_run_on_processes_under_a_too_low_limit_fails_before_any_worker_starts(tmp_path):
    out = tmp_path / "run"
    p = _cli(["run", "label-digits", "--set", "peers=200", "--set", "data.n_train=2", "--set", "data.n_val=1", "--processes", "2", "--out", str(out), "-q"], nofile=256)
    line = _one_line_error(p)
    assert "ulimit -n" in line and "100 peers" in line
    assert not any((out / "events").glob("*.jsonl")) if (out / "events").is_dir() else True


def test_a_learning_run_in_one_process_under_a_too_low_limit_fails_in_one_line(tmp_path):
    p = _cli(["run", "label-digits", "--set", "peers=200", "--set", "data.n_train=2", "--set", "data.n_val=1", "--out", str(tmp_path / "run"), "-q"], nofile=256)
    line = _one_line_error(p)
    assert "ulimit -n" in line and "200 peers" in line
