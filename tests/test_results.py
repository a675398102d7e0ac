"""The results script (docs/RESULTS.md) end to end on its --quick variant: real runs of
every schedule and network condition, tables, plots and the paper-scale cost table."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_results_quick_writes_every_section_from_real_runs(tmp_path):
    out, doc = tmp_path / "runs", tmp_path / "docs" / "RESULTS.md"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "results.py"), "--quick", "--out", str(out), "--doc", str(doc)],
        capture_output=True, text=True, cwd=ROOT, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = json.loads(proc.stdout.strip().splitlines()[-1])
    assert line["bench"] == "results" and line["quick"] is True and line["run_minutes"] > 0
    text = doc.read_text()
    for cond in ("sequential", "async", "async+network"):
        assert f": {cond}\n" in text
    # Every table row comes from a run directory with a summary, and names its method.
    rows = re.findall(r"^\| (local|random|dac-var) \|", text, flags=re.M)
    assert rows.count("dac-var") >= 6 and rows.count("local") == 2  # local: sequential only
    summaries = sorted(out.glob("*/summary.json"))
    assert len(summaries) == 3 + 2 + 2
    net = json.loads((out / "s0-async+network-dac-var-seed0" / "summary.json").read_text())
    assert [e["action"] for e in net["scenario"]] == ["partition", "heal"]
    assert net["links"]["dropped"] > 0 and net["failed_peers"] == []
    # Every image the document shows exists.
    for img in re.findall(r"\]\(img/([^)]+)\)", text):
        assert (doc.parent / "img" / img).is_file(), img
    assert "paper-covariate-cifar10" in text and "h |" in text
    # The churn section: a run without churn and one with 20% of the peers killed.
    assert "## Churn" in text and re.search(r"^\| dac-plus \| [0-9.]+ \| [0-9.]+ \|", text, flags=re.M)
    assert (out / "churn" / "dac-plus-seed0" / "summary.json").is_file()
    assert (out / "churn" / "dac-plus-churn-seed0" / "summary.json").is_file()
    # --reuse renders again from the same runs without running them.
    before = {p: p.stat().st_mtime for p in summaries}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "results.py"), "--quick", "--reuse", "--out", str(out), "--doc", str(doc)],
        capture_output=True, text=True, cwd=ROOT, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert {p: p.stat().st_mtime for p in summaries} == before
    assert "(reusing finished runs)" in doc.read_text()
