"""Runs on a real Ray cluster of two nodes on this machine, through the real command line.

The cluster (``ray.cluster_utils.Cluster``: a head and one more node, one CPU each, no
dashboard, every node at 127.0.0.1) lives for the module; each test is a driver of its
own (``zmqgossip run ... --ray ADDRESS``), as a user's would be. Models travel over the
workers' ZeroMQ sockets on tcp; Ray only places and watches the workers.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest

import conftest
from _helpers import default_sigint
from zmqgossip.metrics import RunDir

ray_cluster_utils = pytest.importorskip("ray.cluster_utils")  # `make test` installs zmqgossip[ray]

REPO = Path(__file__).resolve().parents[1]
LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}  # every node at 127.0.0.1


@pytest.fixture(scope="module")
def cluster(session_tmp):
    saved = {k: os.environ.get(k) for k in LOOPBACK_ENV}
    os.environ.update(LOOPBACK_ENV)
    me = psutil.Process()
    before = {c.pid for c in me.children()}
    c = ray_cluster_utils.Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 1, "include_dashboard": False, "node_ip_address": "127.0.0.1"},
    )
    owned: set[int] = set()
    try:
        c.add_node(num_cpus=1, node_ip_address="127.0.0.1")
        c.wait_for_nodes()
        owned = {p.pid for p in me.children()} - before
        conftest.FIXTURE_PIDS.update(owned)
        yield c
    finally:
        c.shutdown()
        conftest.FIXTURE_PIDS.difference_update(owned)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    # Nothing of the cluster outlives it: no process (its workers are our descendants).
    # multiprocessing's own helpers (a forkserver started after `import ray` has Ray's folders
    # in the sys.path on its command line) are not the cluster's.
    helpers = conftest.helper_pids() - owned
    left = [p for p in me.children(recursive=True)
            if p.pid not in helpers and (p.pid in owned or "ray" in " ".join(_cmdline(p)))]
    conftest.reap_children()
    assert not left, f"Ray processes left after the cluster's shutdown: {[(p.pid, _cmdline(p)[:2]) for p in left]}"


def _cmdline(p: psutil.Process) -> list[str]:
    try:
        return p.cmdline()
    except psutil.Error:
        return []


def cli(*args: str, cwd: Path) -> subprocess.Popen:
    env = {**os.environ, **LOOPBACK_ENV, "COLUMNS": "200", "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-c", "from zmqgossip.cli import app; app()", *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=default_sigint)


def run_cli(*args: str, cwd: Path, timeout: float = 240) -> tuple[int, str, str]:
    p = cli(*args, cwd=cwd)
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        out, err = p.communicate()
        raise AssertionError(f"`zmqgossip {' '.join(args)}` did not end in {timeout} s:\n{out[-3000:]}\n{err[-3000:]}")
    return p.returncode, out, err


def actor_pids() -> list[int]:
    """The worker actors' processes on this machine (Ray titles them ``ray::PeerWorker``)."""
    out = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if cmd.startswith("ray::PeerWorker"):
            out.append(p.info["pid"])
    return sorted(out)


def crossing_pulls(run_dir: Path, shares: list[list[int]]) -> int:
    """Successful pulls whose puller and pulled peer were hosted by different workers."""
    m = np.asarray(RunDir.reader(run_dir).pulls()["counts"])
    a, b = shares
    return int(m[np.ix_(a, b)].sum() + m[np.ix_(b, a)].sum())


def test_label_digits_runs_on_two_nodes_and_learns_as_a_local_run(cluster, tmp_path):
    run_dir = tmp_path / "run"
    code, out, err = run_cli("run", "label-digits", "--ray", cluster.address, "--workers", "2", "--out", str(run_dir),
                             "--quiet", "--no-report", cwd=tmp_path)
    assert code == 0, err[-3000:]
    s = json.loads((run_dir / "summary.json").read_text())
    workers = s["workers"]
    assert [w["state"] for w in workers] == ["done", "done"]
    assert len({w["node_id"] for w in workers}) == 2, workers  # one worker on each node
    assert {w["address"] for w in workers} == {"127.0.0.1"}
    assert s["ray"]["nodes"] == 2 and s["failed_peers"] == []
    endpoints = json.loads((run_dir / "endpoints.json").read_text())
    assert len(endpoints) == 20 and all(e.startswith("tcp://127.0.0.1:") for e in endpoints.values())
    shares = [w["peers"] for w in workers]
    assert crossing_pulls(run_dir, shares) > 0  # models crossed between the nodes
    assert s["within_cluster_pull_fraction"]["last_20pct"] >= 0.9
    assert s["peer_rounds"] == 20 * 30
    # Everything a report needs reached the driver's run directory (no shared folder is
    # assumed: the workers wrote into staging folders of their own).
    rd = RunDir.reader(run_dir)
    assert len(rd.results()) == 20 and all(len(rd.events(p)) == 30 for p in range(20))
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == sorted(f"peer-{p}.ckpt" for p in range(20))
    assert not list(Path(os.environ["TMPDIR"]).glob("zgray-*"))  # staging folders removed
    code, out, err = run_cli("report", str(run_dir), cwd=tmp_path)
    assert code == 0, err[-2000:]


def test_a_killed_actor_loses_its_peers_and_resume_completes_the_run(cluster, tmp_path):
    run_dir = tmp_path / "run"
    rd = RunDir.reader(run_dir)
    args = ["--set", "train.checkpoint_every=2", "--set", "train.checkpoint_min_s=0", "--set", "rounds=24",
            "--set", "network.timeout_s=2"]
    proc = cli("run", "label-digits", "--ray", cluster.address, "--workers", "2", "--out", str(run_dir), *args,
               "--quiet", "--no-report", cwd=tmp_path)
    try:
        # Worker 1 hosts peers 10..19: once the driver holds a checkpoint of each, kill its actor.
        victims = list(range(10, 20))
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            assert proc.poll() is None, proc.communicate()
            ckpts = [(run_dir / "checkpoints" / f"peer-{p}.ckpt").exists() for p in victims]
            if all(ckpts) and len(actor_pids()) == 2:
                break
            time.sleep(0.1)
        else:
            raise AssertionError("the driver got no checkpoints in time")
        # The actor that hosts peer 10 is the process listening on its endpoint's port.
        port = int(json.loads((run_dir / "endpoints.json").read_text())["10"].rsplit(":", 1)[1])
        victim = next(pid for pid in actor_pids()
                      if any(c.laddr.port == port for c in psutil.Process(pid).net_connections("tcp")))
        os.kill(victim, signal.SIGKILL)
        out, err = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err[-3000:]
    assert "died" in out + err
    s = json.loads((run_dir / "summary.json").read_text())
    assert [w["state"] for w in s["workers"]] == ["done", "died"]
    assert s["failed_peers"] == victims  # the others finished
    assert all(rd.results()[p]["status"] == "done" for p in range(10))

    code, out, err = run_cli("run", "--resume", str(run_dir), "--ray", cluster.address, "--workers", "2", "--quiet",
                             "--no-report", cwd=tmp_path)
    assert code == 0, err[-3000:]
    s = json.loads((run_dir / "summary.json").read_text())
    assert s["failed_peers"] == []
    assert sorted(map(int, s["resumed"])) == victims
    assert all(len(rd.events(p)) == 24 for p in range(20))


def test_stress_runs_over_ray_workers_without_failures(cluster, tmp_path):
    code, out, err = run_cli("stress", "--ray", cluster.address, "--workers", "2", "--peers", "40", "--payload-kb", "16",
                             "--pulls", "20", cwd=tmp_path)
    assert code == 0, err[-3000:]
    r = json.loads(out.strip().splitlines()[-1])["stress"]
    assert r["transport"] == "tcp" and r["processes"] == 2 and len(set(r["nodes"])) == 2
    assert r["ok"] == 40 * 20 and r["failed"] == 0


def test_a_sweep_hosts_each_run_on_the_cluster_and_ends_with_the_compare_table(cluster, tmp_path):
    root = tmp_path / "grid"
    small = ["--fix", "rounds=4", "--fix", "data.n_train=20", "--fix", "data.n_val=8", "--fix", "data.test_per_class=10"]
    code, out, err = run_cli("sweep", "label-digits", "--method", "dac-var,random", "--seed", "0", *small, "--ray",
                             cluster.address, "--workers", "2", "--parallel", "2", "--out", str(root), "-q", cwd=tmp_path)
    assert code == 0, err[-3000:]
    for name in ("dac-var-seed0", "random-seed0"):
        s = json.loads((root / name / "summary.json").read_text())
        assert s["failed_peers"] == [] and s["peer_rounds"] == 20 * 4
        assert s["ray"]["nodes"] == 2 and len({w["node_id"] for w in s["workers"]}) == 2
    assert "dac-var" in (root / "compare.md").read_text() and "Test accuracy" in out
    # Started again: nothing left to run.
    stamps = {n: (root / n / "summary.json").stat().st_mtime_ns for n in ("dac-var-seed0", "random-seed0")}
    code, out, err = run_cli("sweep", "label-digits", "--method", "dac-var,random", "--seed", "0", *small, "--ray",
                             cluster.address, "--workers", "2", "--out", str(root), cwd=tmp_path)
    assert code == 0 and "dac-var-seed0: done" not in err, err[-2000:]
    assert {n: (root / n / "summary.json").stat().st_mtime_ns for n in stamps} == stamps


def test_curve_run_on_ray_refuses_a_plaintext_client(cluster, tmp_path):
    import zmq

    run_dir = tmp_path / "run"
    proc = cli("run", "label-digits", "--ray", cluster.address, "--workers", "2", "--curve", "--set", "rounds=25",
               "--out", str(run_dir), "--quiet", "--no-report", cwd=tmp_path)
    ctx = zmq.Context()
    try:
        rd = RunDir.reader(run_dir)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not (run_dir / "events" / "peer-0.jsonl").exists():
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.1)
        endpoint = json.loads((run_dir / "endpoints.json").read_text())["0"]
        # A client without the run's keys: its handshake never completes, so no reply.
        s = ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        s.connect(endpoint)
        s.send_multipart([b"", b"hello"])
        assert s.poll(2000) == 0, "a plaintext client got an answer from a CURVE peer"
        s.close()
        out, err = proc.communicate(timeout=180)
    finally:
        ctx.term()
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    why = {p: (r["counters"]["pull_failures"], r["counters"]["refusals"]) for p, r in rd.results().items()
           if r["counters"]["pull_failures"] or r["counters"]["refusals"]}
    assert summary["failed_peers"] == [] and summary["pulls_failed"] == 0, why
    assert crossing_pulls(run_dir, [w["peers"] for w in summary["workers"]]) > 0
    assert summary["security"] == "curve" and len(rd.results()) == 20


@pytest.mark.parametrize("args, says", [
    (["--ray", "127.0.0.1:9"], "no Ray cluster answers at 127.0.0.1:9"),
    (["--ray", "local", "--workers", "21"], "--workers 21 is more than the 20 peers"),
    (["--workers", "2"], "go with --ray"),
    (["--ray", "local", "--processes", "2"], "leave out --roster and --processes"),
])
def test_bad_cluster_input_is_one_line_and_exit_2(args, says, tmp_path):
    assert_refused(["run", "label-digits", *args, "--out", str(tmp_path / "run"), "-q"], says, tmp_path)


def test_a_sweep_refuses_more_workers_than_peers_and_workers_without_ray(tmp_path):
    assert_refused(["sweep", "label-digits", "--seed", "0-1", "--ray", "local", "--workers", "21",
                    "--out", str(tmp_path / "g")], "--workers 21 is more than the 20 peers", tmp_path)
    assert_refused(["sweep", "label-digits", "--seed", "0-1", "--workers", "2", "--out", str(tmp_path / "g")],
                   "--workers goes with --ray", tmp_path)
    assert not (tmp_path / "g").exists()


def test_more_stress_workers_than_peers_is_refused(tmp_path):
    assert_refused(["stress", "--ray", "local", "--workers", "9", "--peers", "8"], "--workers 9 is more than the 8 peers",
                   tmp_path)


def assert_refused(args: list[str], says: str, cwd: Path, code: str = "from zmqgossip.cli import app; app()") -> None:
    p = subprocess.run([sys.executable, "-c", code, *args], cwd=cwd, capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=120)
    assert p.returncode == 2, p.stderr[-2000:]
    assert says in p.stderr and p.stderr.count("\n") <= 2, p.stderr
    assert "Traceback" not in p.stderr


def test_ctrl_c_on_the_driver_stops_every_actor_and_keeps_partial_results(cluster, tmp_path):
    run_dir = tmp_path / "run"
    proc = cli("run", "label-digits", "--ray", cluster.address, "--workers", "2", "--set", "rounds=200",
               "--out", str(run_dir), "--quiet", "--no-report", cwd=tmp_path)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            assert proc.poll() is None, proc.communicate()
            if all((run_dir / "events" / f"peer-{p}.jsonl").exists() for p in (0, 19)):
                break
            time.sleep(0.1)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 130, (out[-2000:], err[-3000:])
    assert "interrupted: partial results" in err
    results = RunDir.reader(run_dir).results()
    assert len(results) == 20 and {r["status"] for r in results.values()} == {"interrupted"}
    s = json.loads((run_dir / "summary.json").read_text())
    assert s["failed_peers"] == list(range(20)) and [w["state"] for w in s["workers"]] == ["stopped", "stopped"]
    deadline = time.monotonic() + 30
    while actor_pids() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert actor_pids() == []  # no actor outlives its driver


FAULTY = """
name = "faulty-on-ray"
method = "dac-var"
peers = 20
rounds = 10
[data]
dataset = "digits"
shift = "label"
groups = [[0, 1, 8, 9], [2, 3, 4, 5, 6, 7]]
fractions = [0.4, 0.6]
n_train = 50
n_val = 20
test_per_class = 30
[train]
model = "mlp"
test_every = 5
[network]
timeout_s = 1.0
[links.default]
loss = 0.05
latency = { dist = "constant", mean_ms = 5 }
[[links.scenario]]
at_s = 0.5
action = "partition"
groups = [[0, 1, 2, 3, 4, 5, 6, 7, 8, 9], [10, 11, 12, 13, 14, 15, 16, 17, 18, 19]]
[[links.scenario]]
at_s = 2.5
action = "heal"
"""


def test_link_emulation_and_a_scenario_apply_across_nodes(cluster, tmp_path):
    exp = tmp_path / "faulty.toml"
    exp.write_text(FAULTY)
    run_dir = tmp_path / "run"
    code, out, err = run_cli("run", str(exp), "--ray", cluster.address, "--workers", "2", "--out", str(run_dir),
                             "--quiet", "--no-report", cwd=tmp_path)
    assert code == 0, err[-3000:]
    s = json.loads((run_dir / "summary.json").read_text())
    assert s["failed_peers"] == [] and len({w["node_id"] for w in s["workers"]}) == 2
    links = s["links"]  # both workers' emulator logs reached the driver and were summed
    assert links["messages"] > 0 and links["dropped"] > 0 and links["partitioned"] > 0
    assert links["delay_p50_ms"] >= 5
    actions = [e["action"] for e in s["scenario"]]
    assert actions.count("partition") == 2 and actions.count("heal") == 2  # applied on each node
