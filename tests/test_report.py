"""Tables and plots from real run directories (tiny real runs, no fabricated events)."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from matplotlib._pylab_helpers import Gcf
from matplotlib.image import imread
from rich.console import Console
from typer.testing import CliRunner

from zmqgossip import config, hosting, report
from zmqgossip.cli import app
from zmqgossip.metrics import RunDir

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
ALL_PLOTS = set(report.PLOT_NAMES)
CLUSTER_NAMES = ["classes 0,1,8,9", "classes 2,3,4,5,6,7"]


def tiny(method: str, seed: int = 0, **over) -> config.ExperimentConfig:
    raw = {
        "name": "tiny", "method": method, "seed": seed, "peers": 12, "rounds": 6, "schedule": "sequential",
        "data": {"dataset": "digits", "shift": "label", "n_train": 30, "n_val": 15, "test_per_class": 20},
        "train": {"epochs": 1, "lr": 3e-3, "test_every": 2},
        "policy": {"n": 3},
    }
    raw.update(over)
    return config.validate(raw)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """Real runs: DAC-var with seeds 0, 1, 2 and random gossip (about 10 s together)."""
    root = tmp_path_factory.mktemp("runs")
    out = {}
    t = time.perf_counter()
    for key, method, seed in [("dac", "dac-var", 0), ("dac1", "dac-var", 1), ("dac2", "dac-var", 2), ("random", "random", 0)]:
        out[key] = root / key
        hosting.run_experiment(tiny(method, seed), out[key])
    print(f"fixture runs: {time.perf_counter() - t:.1f} s")
    return out


def copy_run(src: Path, dst: Path, **changes) -> Path:
    """A copy of a real run with some top-level config/summary fields changed (label tests)."""
    shutil.copytree(src, dst)
    for name in ("config.json", "summary.json"):
        p = dst / name
        d = json.loads(p.read_text())
        d.update(changes)
        p.write_text(json.dumps(d))
    return dst


def check_png(p: Path) -> None:
    assert p.is_file() and p.stat().st_size > 1000, p
    with open(p, "rb") as f:
        assert f.read(8) == PNG_SIGNATURE, p
    img = imread(p)
    assert img.ndim >= 2 and img.shape[0] > 100 and img.shape[1] > 100, (p, img.shape)
    assert np.ptp(img) > 0, f"{p} is blank"


def md_rows(md: str) -> list[list[str]]:
    """The cells of a Markdown table's lines (header, separator, body)."""
    return [[c.strip() for c in line.strip().strip("|").split(" | ")] for line in md.splitlines() if line.startswith("|")]


# --------------------------------------------------------------------------- plots


def test_write_plots_dac_writes_every_png(runs):
    figs_before = Gcf.get_num_fig_managers()
    paths = report.write_plots(runs["dac"])
    assert {p.name for p in paths} == ALL_PLOTS
    assert all(p.parent == runs["dac"] / "plots" for p in paths)
    for p in paths:
        check_png(p)
    assert Gcf.get_num_fig_managers() == figs_before  # no figure left open


def test_write_plots_random_has_no_weights(runs):
    plots = runs["random"] / "plots"
    plots.mkdir(exist_ok=True)
    (plots / "weights.png").write_bytes(b"stale")  # from an earlier report: must not survive
    paths = report.write_plots(runs["random"])
    assert {p.name for p in paths} == ALL_PLOTS - {"weights.png"}
    assert not (plots / "weights.png").exists()
    for p in paths:
        check_png(p)


def test_heatmap_is_block_diagonal_for_dac(runs):
    dac_tail = report.block_diagonal_share(runs["dac"], tail=True)
    rnd_tail = report.block_diagonal_share(runs["random"], tail=True)
    assert dac_tail > 0.7, dac_tail
    assert dac_tail > rnd_tail + 0.15, (dac_tail, rnd_tail)
    # The share is the mass in the diagonal blocks of the matrix the heatmap draws.
    clusters, _ = report.load_clusters(runs["dac"])
    order, bounds = report.cluster_order(clusters)
    m = report.pull_counts(runs["dac"], tail=True)[np.ix_(order, order)]
    edges = [0, *bounds, len(order)]
    diag = sum(m[a:b, a:b].sum() for a, b in zip(edges[:-1], edges[1:]))
    assert diag / m.sum() == pytest.approx(dac_tail)
    # ... and the same figure summary.json reports.
    s = RunDir(runs["dac"]).summary()
    assert dac_tail == pytest.approx(s["within_cluster_pull_fraction"]["last_20pct"])
    assert report.block_diagonal_share(runs["dac"]) == pytest.approx(s["within_cluster_pull_fraction"]["all"])


def test_load_events(runs):
    ev = report.load_events(runs["dac"])
    assert sorted(ev) == list(range(12))
    for pid, evs in ev.items():
        assert [e.step for e in evs] == list(range(6))
        assert all(e.peer == pid for e in evs)


def test_plot_compare(runs, tmp_path):
    out = report.plot_compare([runs["dac"], runs["dac1"], runs["random"]], tmp_path / "sub" / "cmp.png")
    check_png(Path(out))


# --------------------------------------------------------------------------- tables


def test_summary_table_renders(runs):
    s = RunDir(runs["dac"]).summary()
    console = Console(record=True, width=160)
    console.print(report.summary_table(s))
    text = console.export_text()
    for name in CLUSTER_NAMES:
        assert name in text
    assert f"{100 * s['test_acc']['mean']:.1f}%" in text
    assert f"pulls {s['pulls_ok']} ok / {s['pulls_failed']} failed" in text


def test_summary_table_handles_none():
    """What the local method (no pulls) and a partial run (no wall time) leave empty."""
    s = {
        "name": "x", "method": "local", "schedule": "sequential", "peers": 3, "rounds": 2, "seed": 0,
        "clusters": {"0": {"name": "a", "peers": 2}, "1": {"name": "b", "peers": 1}},
        "test_acc": {"mean": 0.5, "per_cluster": {"0": 0.5, "1": None}},
        "final_test_acc": {"mean": None, "per_cluster": {"0": None, "1": None}},
        "within_cluster_pull_fraction": {"all": None, "last_20pct": None, "per_cluster": {"0": {"all": None, "last_20pct": None}, "1": None}},
        "peer_rounds": 5, "wall_s": None, "pulls_ok": 0, "pulls_failed": 0, "bytes_sent": 0,
        "failed_peers": [2], "staleness": {"age_s_p50": None, "age_s_p99": None, "lag_p50": None, "lag_p99": None},
    }
    console = Console(record=True, width=160)
    console.print(report.summary_table(s))
    text = console.export_text()
    assert "50.0%" in text and report.DASH in text and "did not finish: 2" in text
    console.print(report.summary_table({}))  # nothing at all: still renders


def test_compare_markdown_one_row_per_method(runs):
    md = report.compare_markdown([runs["dac"], runs["random"]])
    rows = md_rows(md)
    header, body = rows[0], rows[2:]
    assert header[1:3] == CLUSTER_NAMES and "mean" in header
    assert [r[0] for r in body] == ["dac-var", "random"]
    assert all(len(r) == len(header) for r in body)
    s = RunDir(runs["random"]).summary()
    assert body[1][1] == f"{100 * s['test_acc']['per_cluster']['0']:.1f}"
    assert body[1][-1] == f"{100 * s['within_cluster_pull_fraction']['last_20pct']:.1f}"


def test_compare_aggregates_seeds(runs):
    dirs = [runs["dac"], runs["random"], runs["dac1"], runs["dac2"]]
    body = md_rows(report.compare_markdown(dirs))[2:]
    assert len(body) == 2
    dac = body[0]
    assert dac[0] == "dac-var [3 seeds]" and body[1][0] == "random"
    sums = [RunDir(runs[k]).summary() for k in ("dac", "dac1", "dac2")]
    for col, key in ((1, "0"), (2, "1")):
        v = [100 * s["test_acc"]["per_cluster"][key] for s in sums]
        assert dac[col] == f"{np.mean(v):.1f} ± {np.std(v, ddof=1):.1f}"
    v = [100 * s["test_acc"]["mean"] for s in sums]
    assert dac[3] == f"{np.mean(v):.1f} ± {np.std(v, ddof=1):.1f}"
    assert "±" not in " ".join(body[1])  # one run: a plain value
    console = Console(record=True, width=200)
    console.print(report.compare_table(dirs))
    text = console.export_text()
    assert "dac-var [3 seeds]" in text and all(n in text for n in CLUSTER_NAMES)


def test_compare_labels_tell_runs_of_one_method_apart(runs, tmp_path):
    other = copy_run(runs["dac"], tmp_path / "async", schedule="async")
    named = copy_run(runs["dac"], tmp_path / "named", name="other")
    labels = [r[0] for r in md_rows(report.compare_markdown([runs["dac"], other, named, runs["random"]]))[2:]]
    assert labels[-1] == "random"
    assert len(set(labels)) == 4
    assert labels[0].startswith("dac-var (") and "sequential" in labels[0] and "tiny" in labels[0]
    assert "async" in labels[1] and "other" in labels[2]


# --------------------------------------------------------------------------- CLI


def invoke(*args: str):
    return CliRunner().invoke(app, list(args), env={"COLUMNS": "200"})


def test_cli_report(runs):
    res = invoke("report", str(runs["dac"]))
    assert res.exit_code == 0, res.output
    for name in CLUSTER_NAMES:
        assert name in res.output
    for name in ALL_PLOTS:
        assert name in res.output


def test_cli_compare_markdown(runs):
    res = invoke("compare", str(runs["dac"]), str(runs["random"]), "--markdown")
    assert res.exit_code == 0, res.output
    rows = md_rows(res.stdout)
    assert rows[0][1:3] == CLUSTER_NAMES
    assert [r[0] for r in rows[2:]] == ["dac-var", "random"]


def test_cli_compare_table_and_plot(runs, tmp_path):
    res = invoke("compare", str(runs["dac"]), str(runs["random"]), "--plot", str(tmp_path / "cmp.png"))
    assert res.exit_code == 0, res.output
    assert "dac-var" in res.stdout and "random" in res.stdout and CLUSTER_NAMES[0] in res.stdout
    check_png(tmp_path / "cmp.png")


def test_cli_report_nonexistent():
    res = invoke("report", "/nonexistent")
    assert res.exit_code == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "/nonexistent" in lines[0]
