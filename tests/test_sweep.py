"""`zmqgossip sweep`: a grid of real runs on warm worker processes, the same runs as
`zmqgossip run` makes one by one, continued after an interruption."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from _helpers import zmqgossip_cmd

SMALL = ["--fix", "schedule=sequential", "--fix", "rounds=2", "--fix", "peers=6", "--fix", "data.n_train=20",
         "--fix", "data.n_val=8", "--fix", "data.test_per_class=10", "--fix", "train.epochs=1"]


def cli(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "200"}
    return subprocess.run([*zmqgossip_cmd(), *args], capture_output=True, text=True, timeout=timeout, env=env)


def _figures(run_dir: Path) -> dict:
    s = json.loads((run_dir / "summary.json").read_text())
    keep = ("test_acc", "final_test_acc", "within_cluster_pull_fraction", "peer_rounds", "pulls_ok", "bytes_sent",
            "method", "seed")
    return {k: s[k] for k in keep} | {"pulls": json.loads((run_dir / "pulls.json").read_text())}


@pytest.fixture(scope="module")
def swept(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    root = tmp_path_factory.mktemp("sweep") / "grid"
    p = cli("sweep", "label-digits", "--method", "dac-var,random", "--seed", "0-1", *SMALL, "--parallel", "2",
            "--out", str(root), "-q")
    assert p.returncode == 0, p.stderr[-3000:]
    return root, p


def test_a_sweep_makes_one_run_directory_per_grid_point_and_the_compare_table(swept):
    root, p = swept
    names = sorted(d.name for d in root.iterdir() if d.is_dir())
    assert names == ["dac-var-seed0", "dac-var-seed1", "random-seed0", "random-seed1"]
    for n in names:
        s = json.loads((root / n / "summary.json").read_text())
        assert s["failed_peers"] == [] and s["peer_rounds"] == 12
        assert s["method"] == n.split("-seed")[0] and s["seed"] == int(n[-1])
    md = (root / "compare.md").read_text()
    assert "dac-var" in md and "random" in md and "±" in md  # mean ± std over the two seeds
    assert (root / "compare.png").read_bytes()[:4] == b"\x89PNG"
    assert "Test accuracy" in p.stdout


def test_sequential_runs_of_a_sweep_equal_separate_runs(swept, tmp_path):
    root, _ = swept
    for method, seed in (("dac-var", 1), ("random", 0)):
        alone = tmp_path / f"{method}-{seed}"
        fixed = [x for x in SMALL if x != "--fix"]
        sets = [a for kv in fixed for a in ("--set", kv)]
        p = cli("run", "label-digits", "--method", method, "--seed", str(seed), *sets, "--out", str(alone), "-q",
                "--no-report")
        assert p.returncode == 0, p.stderr[-2000:]
        assert _figures(alone) == _figures(root / f"{method}-seed{seed}")


def test_an_interrupted_sweep_started_again_runs_only_what_is_missing(swept):
    root, _ = swept
    keep = {n: (root / n / "summary.json").stat().st_mtime_ns for n in ("dac-var-seed0", "random-seed0", "random-seed1")}
    # As a sweep stopped during dac-var-seed1 leaves it: events, no summary.
    before = _figures(root / "dac-var-seed1")
    (root / "dac-var-seed1" / "summary.json").unlink()
    p = cli("sweep", "label-digits", "--method", "dac-var,random", "--seed", "0-1", *SMALL, "--parallel", "2",
            "--out", str(root))
    assert p.returncode == 0, p.stderr[-3000:]
    assert {n: (root / n / "summary.json").stat().st_mtime_ns for n in keep} == keep
    assert "dac-var-seed1: done" in p.stderr and "random-seed0: done" not in p.stderr
    assert _figures(root / "dac-var-seed1") == before  # run again from its start: the same run


@pytest.mark.parametrize("args, says", [
    (["--seed", "3-1"], "empty"),
    (["--seed", "0-x"], "range"),
    (["--method", "dac-var,nope"], "nope"),
    (["--method", "dac-var,"], "comma-separated"),
    (["--set", "policy.tau"], "key=value"),
    (["--set", "policy.tau=10,-1"], "tau"),
])
def test_a_bad_grid_is_one_line_and_exit_2(tmp_path, args, says):
    p = cli("sweep", "label-digits", *args, "--out", str(tmp_path / "g"), timeout=120)
    assert p.returncode == 2, (p.stdout, p.stderr)
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and says in lines[0], p.stderr
    assert not (tmp_path / "g").exists()
