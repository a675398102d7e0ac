"""Every benchmark's small variant runs to the end and prints its figures.

The benchmarks are how speed is measured (ratios to a baseline taken in the same run);
these runs keep them working as the code changes. They check that each one finishes and
ends with its JSON line of finite figures, never how fast anything was.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _nonfinite(x: Any, path: str = "") -> list[str]:
    """Paths of the NaN or infinite numbers in a JSON value."""
    if isinstance(x, dict):
        return [p for k, v in x.items() for p in _nonfinite(v, f"{path}.{k}")]
    if isinstance(x, list):
        return [p for i, v in enumerate(x) for p in _nonfinite(v, f"{path}[{i}]")]
    return [path] if isinstance(x, float) and not math.isfinite(x) else []


def run_quick(name: str, *args: str) -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / f"bench_{name}.py"), "--quick", *args],
        capture_output=True, text=True, cwd=ROOT, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    line = json.loads(proc.stdout.strip().splitlines()[-1])
    assert line["benchmark"] == name and line["quick"] is True
    assert not _nonfinite(line), f"non-finite figures: {_nonfinite(line)}"
    return line


def test_wire_benchmark_compares_codec_with_memcpy():
    line = run_quick("wire")
    for size in ("0.25MB", "10MB"):
        assert line[size]["ratio_both_vs_memcpy"] > 0 and line[size]["memcpy_GBps"] > 0


def test_transport_benchmark_measures_pulls_raw_and_the_asyncio_floor():
    line = run_quick("transport")
    for kind in ("inproc", "ipc", "tcp"):
        for size in ("0.25MB", "10MB"):
            r = line[f"{kind}_1proc_{size}"]
            assert r["pull"]["n"] >= 5 and r["raw"]["n"] >= 5 and r["ratio"] > 0
    for kind in ("ipc", "tcp"):
        for size in ("0.25MB", "10MB"):
            r = line[f"{kind}_2proc_{size}"]
            assert r["ratio"] > 0 and r["floor_ratio"] > 0 and r["floor+_ratio"] > 0 and r["pull_vs_floor+"] > 0


def test_stress_benchmark_reports_each_part():
    line = run_quick("stress")
    for part in ("vs_raw", "emulator", "many", "dac"):
        assert line[part], part
    found = line["foundation"]  # the target's comparison: stress vs the foundation's raw limit
    assert found["stress_vs_foundation_raw"] > 0 and found["stress_links_on_vs_foundation_raw"] > 0


def test_peers_benchmark_runs_both_configs_without_failed_pulls():
    line = run_quick("peers")
    assert [c["config"] for c in line["configs"]] == ["mlp", "cnn"]
    for c in line["configs"]:
        assert c["ratio"] > 0 and c["pulls_failed"] == 0 and c["peer_rounds"] > 0
        assert c["target_allows_cpu_ms_per_round"] > 0 and math.isfinite(c["extra_cpu_ms_per_round"])


def test_learning_benchmark_scores_mnist_with_the_background_step():
    line = run_quick("learning")
    for r in line["results"]:
        assert r["score_ms"] > 0 and r["train_ms"] > 0
        assert 0.3 < r["windows_computed"] < 0.6  # about half of MNIST's windows are background


@pytest.mark.parametrize("name", ["processes", "reference", "fuzz"])
def test_other_benchmarks_finish_with_their_figures(name):
    line = run_quick(name)
    assert len(line) > 3
