"""Every benchmark's small variant runs to the end and prints its figures, and
docs/PERFORMANCE.md's script renders them.

The benchmarks are how speed is measured (ratios to a baseline taken in the same run);
these runs keep them working as the code changes. ``benchmarks/performance.py --quick``
runs each benchmark's ``--quick`` variant once for the whole module, as it does to
regenerate docs/PERFORMANCE.md; each test then checks that its benchmark finished and
ended with its JSON line of finite figures, never how fast anything was.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
PERFORMANCE = ROOT / "benchmarks" / "performance.py"

pytestmark = pytest.mark.timeout(3600)  # the first test waits for every quick benchmark


def _nonfinite(x: Any, path: str = "") -> list[str]:
    """Paths of the NaN or infinite numbers in a JSON value."""
    if isinstance(x, dict):
        return [p for k, v in x.items() for p in _nonfinite(v, f"{path}.{k}")]
    if isinstance(x, list):
        return [p for i, v in enumerate(x) for p in _nonfinite(v, f"{path}[{i}]")]
    return [path] if isinstance(x, float) and not math.isfinite(x) else []


@pytest.fixture(scope="module")
def quick(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One ``performance.py --quick`` run: its records by benchmark, the document, the paths."""
    out = tmp_path_factory.mktemp("performance")
    doc, lines = out / "PERFORMANCE.md", out / "lines.jsonl"
    proc = subprocess.run([sys.executable, str(PERFORMANCE), "--quick", "--doc", str(doc), "--lines", str(lines)],
                          capture_output=True, text=True, cwd=ROOT, timeout=3500)
    records = {r["benchmark"]: r for r in map(json.loads, lines.read_text().splitlines())}
    return {"proc": proc, "records": records, "doc": doc, "lines": lines, "out": out}


@pytest.fixture
def run_quick(quick: dict[str, Any]):
    """``run_quick(name)``: the JSON line benchmark ``name`` ended its --quick run with."""

    def line_of(name: str) -> dict[str, Any]:
        rec = quick["records"][name]
        assert "error" not in rec, rec["error"]
        line = rec["line"]
        assert line["benchmark"] == name and line["quick"] is True
        assert not _nonfinite(line), f"non-finite figures: {_nonfinite(line)}"
        return line

    return line_of


def test_wire_benchmark_compares_codec_with_memcpy(run_quick):
    line = run_quick("wire")
    for size in ("0.25MB", "10MB", "10 tensors", "100 tensors"):
        r = line[size]
        assert r["ratio_both_vs_memcpy"] > 0 and r["memcpy_GBps"] > 0
        assert r["both_us"] > 0 and r["both_dict_us"] > 0 and r["views_us"] > 0
    assert line["100 tensors"]["tensors"] == 100 and line["tensors_100_vs_10"] > 0


def test_transport_benchmark_measures_pulls_raw_and_the_asyncio_floor(run_quick):
    line = run_quick("transport")
    for kind in ("inproc", "ipc", "tcp"):
        for size in ("0.25MB", "10MB"):
            r = line[f"{kind}_1proc_{size}"]
            assert r["pull"]["n"] >= 5 and r["raw"]["n"] >= 5 and r["ratio"] > 0
    for kind in ("ipc", "tcp"):
        for size in ("0.25MB", "10MB"):
            r = line[f"{kind}_2proc_{size}"]
            assert r["ratio"] > 0 and r["floor_ratio"] > 0 and r["floor+_ratio"] > 0 and r["pull_vs_floor+"] > 0
            assert r["pull+v"]["n"] >= 5 and r["pull+v_ratio"] > 0


def test_stress_benchmark_reports_each_part(run_quick):
    line = run_quick("stress")
    for part in ("vs_raw", "emulator", "many", "dac"):
        assert line[part], part
    found = line["foundation"]  # the target's comparison: stress vs the foundation's raw limit
    assert found["stress_vs_foundation_raw"] > 0 and found["stress_links_on_vs_foundation_raw"] > 0


def test_peers_benchmark_runs_both_configs_and_their_floor_without_failed_pulls(run_quick):
    line = run_quick("peers")
    assert [c["config"] for c in line["configs"]] == ["mlp", "cnn"]
    for c in line["configs"]:
        assert c["ratio"] > 0 and c["pulls_failed"] == 0 and c["peer_rounds"] > 0
        assert c["target_allows_cpu_ms_per_round"] > 0 and math.isfinite(c["extra_cpu_ms_per_round"])
        floor = c["floor"]  # the same runner pulling nothing, against its own plain loop
        assert floor["method"] == "local" and floor["ratio"] > 0 and floor["peer_rounds"] == c["peer_rounds"]


def test_learning_benchmark_scores_mnist_with_the_background_step(run_quick):
    line = run_quick("learning")
    for r in line["results"]:
        assert r["score_ms"] > 0 and r["train_ms"] > 0
        assert 0.3 < r["windows_computed"] < 0.6  # about half of MNIST's windows are background


def test_reference_benchmark_splits_a_cold_run_into_start_rounds_and_end(run_quick):
    line = run_quick("reference")
    assert [r["schedule"] for r in line["runs"]] == ["sequential", "async"]
    assert len(line["cold_runs"]) == 3
    for c in line["cold_runs"]:
        assert c["start_s"] + c["rounds_s"] + c["end_s"] == pytest.approx(c["wall_s"], abs=0.01)
        assert 0 < c["warmup_s"] < c["start_s"] and 0 < c["final_eval_s"] < c["end_s"]  # the protocol's parts
        assert c["ours_s"] == pytest.approx(c["outside_s"] - c["warmup_s"] - c["final_eval_s"], abs=0.01)
        assert 0 < c["import_s"] < c["start_s"] and c["plots_s"] > 0  # parts of ours, measured apart


def test_processes_benchmark_finishes_with_its_figures(run_quick):
    line = run_quick("processes")
    assert len(line) > 3


def test_fuzz_benchmark_floods_a_plain_and_a_curve_peer_from_two_processes(run_quick):
    line = run_quick("fuzz")
    assert line["flooders"] == 2 and set(line["variants"]) == {"plain", "curve"}
    assert line["floor"] is True  # performance.py runs it with the neighbour's floor
    for r in line["variants"].values():
        assert r["crashes"] == 0 and r["rss_growth_mb"] < 50
        assert all(p["pulls_ok"] > 0 and p["pulls_failed"] == 0 for p in r["phases"].values())  # honest: always served
        assert r["phases"]["flood"]["rounds_per_s"] > 0  # the victim trains through the flood
        floor = r["floor"]  # the same flood against the peer beside the one pulled
        assert floor["crashes"] == 0 and floor["p99_ratio_flood_vs_no_flood"] > 0 and floor["fuzz_msgs_per_s"] > 0
    plain, curve = line["variants"]["plain"], line["variants"]["curve"]
    assert plain["flooder_sent"] > 10_000 and plain["refusals"]["shed"] > 0 and plain["refusals"]["garbage"] > 0
    # With CURVE nothing the flooders sent reached Python: only refused handshakes were counted.
    assert curve["connections"] > 24 and curve["refusals"]["auth"] > 0
    assert set(curve["refusals"]) <= {"auth", "handshake"}


def test_sweep_benchmark_times_a_sweep_and_the_same_runs_one_by_one(run_quick):
    line = run_quick("sweep")
    assert line["runs"] == 2 and line["sweep_wall_s"] > 0 and line["separate_wall_s"] > 0
    assert line["cold_rounds_s_median"] > 0 and line["cold_start_s_median"] > 0 and line["cold_end_s_median"] > 0


def test_cluster_benchmark_runs_the_same_run_on_processes_and_on_ray_nodes(run_quick):
    line = run_quick("cluster")
    assert line["ray"]["steady_rate"] > 0 and line["processes"]["steady_rate"] > 0
    assert [r["nodes"] for r in line["runs"]["ray"]] == [2]  # one actor on each node
    assert line["scale"]["failed_peers"] == 0 and line["scale"]["nodes"] == 2 and len(line["scale"]["rss_mb"]) == 2
    assert line["stress"]["failed"] == 0 and line["stress"]["nodes"] == 2


def test_the_performance_document_has_a_row_per_figure_of_every_benchmark(quick):
    assert quick["proc"].returncode == 0, quick["proc"].stderr[-3000:]
    summary = json.loads(quick["proc"].stdout.strip().splitlines()[-1])
    assert summary["bench"] == "performance" and summary["quick"] is True and summary["failed"] == []
    text = quick["doc"].read_text()
    assert "**Quick figures**" in text and "python benchmarks/performance.py --quick" in text
    rows = [r for r in text.splitlines() if r.startswith("| ") and "`python benchmarks/bench_" in r]
    for name in quick["records"]:
        # the benchmark's own options (performance.OPTIONS) come before --quick
        assert any(re.search(rf"`python benchmarks/bench_{name}\.py( --[\w-]+)* --quick`", r) for r in rows), name
    assert len(rows) == summary["rows"]
    for r in rows:
        cells = [c.strip() for c in r.strip("|").split("|")]
        assert len(cells) == 8, r
        ratio = cells[3].split()[0]
        assert ratio == "–" or math.isfinite(float(ratio.replace(",", ""))), r
        assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d UTC", cells[6]), r
    # The same lines render the same document without running anything again.
    again = quick["out"] / "again.md"
    proc = subprocess.run([sys.executable, str(PERFORMANCE), "--reuse", str(quick["lines"]), "--doc", str(again)],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert again.read_text() == text
