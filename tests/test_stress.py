"""`zmqgossip stress`: real peers, real sockets, random payloads; the command and the engine."""

from __future__ import annotations

import csv
import json
import resource
import time

import pytest
from typer.testing import CliRunner

from zmqgossip.cli import app
from zmqgossip.stress import StressConfig, run_stress

cli = CliRunner()

KEYS = {"pulls_per_s", "gb_per_s", "latency_ms", "ok", "failed", "timeouts", "failures", "refusals",
        "sockets_peak", "sockets_per_peer", "fds_used", "fds_per_peer", "rss_mb", "rss_mb_max", "links", "wall_s"}


@pytest.fixture(autouse=True)
def keep_fd_limit():
    """The preflight raises this process's descriptor limit: put it back."""
    before = resource.getrlimit(resource.RLIMIT_NOFILE)
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, before)


def invoke(*args: str) -> tuple[int, str, str]:
    r = cli.invoke(app, ["stress", *args])
    return r.exit_code, r.stdout, r.stderr


def json_line(stdout: str) -> dict:
    lines = [ln for ln in stdout.splitlines() if ln.startswith("{")]
    assert len(lines) == 1, stdout
    return json.loads(lines[0])


def check_clean(r: dict, peers: int, pulls: int) -> None:
    assert KEYS <= set(r)
    assert r["peers"] == peers
    assert r["ok"] == peers * pulls and r["failed"] == 0 and r["timeouts"] == 0
    assert r["failures"] == {} and r["refusals"] == {}
    assert r["pulls_per_s"] > 0 and r["gb_per_s"] > 0
    lat = r["latency_ms"]
    assert 0 < lat["p50"] <= lat["p90"] <= lat["p99"]
    assert 0 < r["sockets_peak"] <= r["budget"]["sockets"] and r["sockets_per_peer"] <= 2 + r["pool_size"]
    assert 0 < r["fds_used"] <= r["budget"]["fds"]
    assert all(x > 10 for x in r["rss_mb"])


@pytest.mark.parametrize("transport", ["inproc", "ipc", "tcp"])
def test_asyncio_stress_completes_without_failures(transport):
    code, out, err = invoke("--peers", "8", "--payload-kb", "64", "--pulls", "6", "--fanout", "3",
                            "--transport", transport)
    assert code == 0, err
    r = json_line(out)["stress"]
    check_clean(r, 8, 6)
    assert r["transport"] == transport and r["mode"] == "asyncio" and len(r["rss_mb"]) == 1
    assert r["bytes"] >= 8 * 6 * 64 * 1024
    assert "pulls/s" in out and "p99" in out  # the table


@pytest.mark.parametrize("transport", ["ipc", "tcp"])
def test_processes_stress_completes_without_failures(transport):
    code, out, err = invoke("--peers", "9", "--payload-kb", "16", "--pulls", "5", "--mode", "processes",
                            "--processes", "2", "--transport", transport)
    assert code == 0, err
    r = json_line(out)["stress"]
    check_clean(r, 9, 5)
    assert r["mode"] == "processes" and r["processes"] == 2 and len(r["rss_mb"]) == 2


def test_duration_mode_and_link_flags():
    """Pull for a duration over links with 15 ms of latency each way: every pull takes >= 30 ms."""
    code, out, err = invoke("--peers", "6", "--payload-kb", "4", "--duration", "1", "--latency-ms", "15",
                            "--bandwidth-mbps", "1000")
    assert code == 0, err
    r = json_line(out)["stress"]
    assert r["failed"] == 0 and r["ok"] > 6
    assert r["latency_ms"]["p50"] >= 30 and r["emulator"] is True
    assert 0.9 <= r["wall_s"] <= 2.0
    ln = r["links"]
    assert ln["delivered"] == ln["messages"] >= 2 * r["ok"] and ln["delay_p50_ms"] >= 15


def test_links_file_and_loss(tmp_path):
    f = tmp_path / "lossy.toml"
    f.write_text('[links.default]\nloss = 0.25\n[links.default.latency]\ndist = "uniform"\nlow_ms = 1\nhigh_ms = 3\n')
    code, out, err = invoke("--peers", "10", "--payload-kb", "1", "--pulls", "20", "--links", str(f), "--timeout", "0.2")
    assert code == 0, err
    r = json_line(out)["stress"]
    assert r["ok"] + r["failed"] == 200 and r["failures"] == {"timeout": r["timeouts"]}
    # A pull survives when its request and its reply do: 0.75^2 ~ 56%.
    assert 0.4 <= r["ok"] / 200 <= 0.72
    assert r["refusals"].get("link_drop", 0) > 0  # replies lost on the way back
    assert r["links"]["dropped"] / r["links"]["messages"] == pytest.approx(0.25, abs=0.08)


def test_emulator_on_with_ideal_links_records_zero_delays():
    r = run_stress(StressConfig(peers=4, payload_kb=8, pulls=10, emulator="on"))
    assert r["failed"] == 0 and r["links"]["messages"] == 2 * r["ok"] and r["links"]["delay_p99_ms"] == 0.0
    r = run_stress(StressConfig(peers=4, payload_kb=8, pulls=10))
    assert r["links"] is None and r["emulator"] is False


def test_sweep_writes_csv_and_png(tmp_path):
    out_dir = tmp_path / "sweep"
    code, out, err = invoke("--sweep-peers", "4,12", "--sweep-payload-kb", "1,32", "--pulls", "4", "--out", str(out_dir))
    assert code == 0, err
    figures = json_line(out)
    assert len(figures["sweep"]) == 4 and all(r["failed"] == 0 for r in figures["sweep"])
    with open(out_dir / "sweep.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(int(r["peers"]), float(r["payload_kb"])) for r in rows] == [(4, 1.0), (12, 1.0), (4, 32.0), (12, 32.0)]
    assert all(float(r["pulls_per_s"]) > 0 and r["latency_p99_ms"] for r in rows)
    png = (out_dir / "sweep.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert figures["csv"] == str(out_dir / "sweep.csv") and figures["png"] == str(out_dir / "sweep.png")


def test_a_thousand_stress_peers_in_one_process():
    t0 = time.perf_counter()
    r = run_stress(StressConfig(peers=1000, payload_kb=1, pulls=4, fanout=2, network={"pool_size": 4}))
    took = time.perf_counter() - t0
    print(f"1,000 peers x 4 pulls: {took:.1f} s, {r['pulls_per_s']:.0f} pulls/s, p99 {r['latency_ms']['p99']:.0f} ms, "
          f"sockets {r['sockets_peak']}, fds {r['fds_used']}, RSS {r['rss_mb_max']:.0f} MB")
    assert took < 30
    check_clean(r, 1000, 4)
    assert r["sockets_per_peer"] <= 1 + 4 + 1


@pytest.mark.parametrize("mode", ["asyncio", "processes"])
def test_impossible_peer_counts_fail_with_the_preflight_message(mode):
    t0 = time.perf_counter()
    code, _, err = invoke("--peers", "5000000", "--payload-kb", "1", "--mode", mode)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    assert "file descriptors" in lines[0] and "ulimit -n" in lines[0]
    assert time.perf_counter() - t0 < 20  # nothing was started


def test_sweep_with_an_impossible_corner_fails_before_running(tmp_path):
    code, _, err = invoke("--sweep-peers", "4,5000000", "--pulls", "2", "--out", str(tmp_path / "s"))
    assert code == 2 and "file descriptors" in err
    assert not (tmp_path / "s" / "sweep.csv").exists()


@pytest.mark.parametrize("args, words", [
    (["--peers", "1"], "peers"),
    (["--peers", "5", "--fanout", "5"], "fanout"),
    (["--mode", "processes", "--transport", "inproc"], "inproc"),
    (["--mode", "threads"], "mode"),
    (["--transport", "udp"], "transport"),
    (["--pulls", "3", "--duration", "2"], "not both"),
    (["--payload-kb", "0"], "payload_kb"),
    (["--loss", "1.5"], "loss"),
    (["--emulator", "off", "--latency-ms", "5"], "emulator"),
    (["--sweep-peers", "10,x"], "--sweep-peers"),
    (["--sweep-payload-kb", "-1"], "--sweep-payload-kb"),
    (["--links", "/nonexistent/links.toml"], "--links"),
])
def test_bad_options_give_one_error_line_and_exit_2(args, words):
    code, out, err = invoke(*args)
    assert code == 2, (out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and words in lines[0], err


def test_links_file_without_a_links_table(tmp_path):
    f = tmp_path / "x.toml"
    f.write_text("peers = 3\n")
    code, _, err = invoke("--links", str(f))
    assert code == 2 and err.strip() == f"error: --links {f}: no [links] table"
    f.write_text('[links.default]\nlatency = "fast"\n')
    code, _, err = invoke("--links", str(f))
    assert code == 2 and err.startswith("error: links.default.latency")
