"""Peers spread over worker processes and roster hosts: real processes, real sockets.

Every run goes through the real console script (``zmqgossip run`` / ``zmqgossip worker``)
in a subprocess, on tiny experiments written to ``tmp_path`` (bundled digits, 12 peers,
MLP, one local epoch). A worker start costs an interpreter, torch and its first optimizer,
which dominates these tests' durations.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import zmq

from _helpers import children, cmdline, default_sigint, tiny_experiment, worker_pids, to_toml, toml_value, with_overrides, zmqgossip_cmd  # noqa: F401

from zmqgossip.metrics import RunDir
from zmqgossip.hosting.liveness import GiveUp, wait_for
from zmqgossip.net import Transport, free_tcp_ports, ipc_dir, make_directory

RUN_TIMEOUT_S = 150  # a hung run fails the test instead of the suite


# ------------------------------------------------------------------ helpers


ENV = {**os.environ, "COLUMNS": "200", "PYTHONUNBUFFERED": "1"}


def cli(*args: str, cwd: Path, timeout: float = RUN_TIMEOUT_S) -> subprocess.CompletedProcess:
    return subprocess.run([*zmqgossip_cmd(), *args], capture_output=True, text=True, cwd=cwd, env=ENV,
                          timeout=timeout, check=False)


def popen(*args: str, cwd: Path, **kw: Any) -> subprocess.Popen:
    return subprocess.Popen([*zmqgossip_cmd(), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=cwd, env=ENV, preexec_fn=default_sigint, **kw)


def write_experiment(path: Path, **over: Any) -> Path:
    raw = with_overrides(tiny_experiment(name="procs", rounds=6, train={"test_every": 5}), over)
    path.write_text(to_toml(raw))
    return path


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port_blocks(sizes: list[int]) -> list[int]:
    """Base ports, one per size, each starting a run of that many free tcp ports (a roster
    host's peer k listens on base_port + k); candidates from ``free_tcp_ports``."""
    bases: list[int] = []
    taken: set[int] = set()
    for k in sizes:
        for _ in range(20):
            found = next((c for c in free_tcp_ports(8) if c + k <= 65535 and not taken & set(range(c, c + k))
                          and all(_bindable(p) for p in range(c, c + k))), None)
            if found is not None:
                bases.append(found)
                taken.update(range(found, found + k))
                break
        else:
            raise RuntimeError(f"no run of {k} free tcp ports")
    return bases


def write_roster(tmp_path: Path, shares: list[list[int]], out: Path) -> Path:
    bases = free_port_blocks([len(s) for s in shares])
    hosts = [{"name": name, "address": "127.0.0.1", "base_port": b, "peers": s}
             for name, b, s in zip("abcdefgh", bases, shares)]
    path = tmp_path / "roster.toml"
    path.write_text(to_toml({"experiment": "exp.toml", "out": str(out), "hosts": hosts}))
    return path


def worker_children(pid: int) -> list[int]:
    """The worker processes ``pid`` started (not the resource tracker)."""
    return worker_pids(pid)


def running(pid: int) -> bool:
    """Alive and not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


def event_lines(out: Path) -> dict[int, int]:
    counts = {}
    for p in (out / "events").glob("peer-*.jsonl"):
        try:
            counts[int(p.stem.split("-")[1])] = p.read_bytes().count(b"\n")
        except OSError:
            pass
    return counts


def wait_for_progress(proc: subprocess.Popen, out: Path, *, peers: int, steps: int, timeout: float = 90) -> None:
    """Until every peer has logged ``steps`` updates (the run is well under way)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        counts = event_lines(out)
        if len(counts) == peers and min(counts.values()) >= steps:
            return
        if proc.poll() is not None:
            o, e = proc.communicate()
            pytest.fail(f"run ended early (rc {proc.returncode}): {o[-2000:]} {e[-2000:]}")
        time.sleep(0.1)
    pytest.fail(f"no progress within {timeout}s: {event_lines(out)}")


def per_cluster(summary: dict, key: str = "test_acc") -> dict[str, float]:
    return {c: round(v, 3) for c, v in summary[key]["per_cluster"].items()}


# ------------------------------------------------------------------ processes vs one process


def test_two_processes_learn_like_one(tmp_path):
    """The same async experiment (label shift, 12 peers, 20 rounds) in one process and
    over two worker processes: all peers done, same work, per-cluster accuracies within a
    few points. Seen (best-val test accuracy, clusters {0,1,8,9} / {2..7}, 3 pairs):
    1 process 0.918/0.925, 0.922/0.929, 0.910/0.929; 2 processes 0.918/0.943,
    0.933/0.947, 0.932/0.944: at most 2.2 points apart. Asserted: within 6 points, and
    every cluster above 80% in both (so both actually learned)."""
    exp = write_experiment(tmp_path / "exp.toml", rounds=20)
    summaries = {}
    for n in (1, 2):
        out = tmp_path / f"p{n}"
        t = time.perf_counter()
        res = cli("run", str(exp), "--processes", str(n), "--out", str(out), "-q", "--no-report", cwd=tmp_path)
        assert res.returncode == 0, res.stderr[-3000:]
        s = summaries[n] = json.loads((out / "summary.json").read_text())
        print(f"{n} process(es): {time.perf_counter() - t:.1f} s, wall {s['wall_s']:.1f} s, "
              f"best-val {per_cluster(s)}, final {per_cluster(s, 'final_test_acc')}, "
              f"within {s['within_cluster_pull_fraction']['all']:.2f}")
        assert s["failed_peers"] == []
        assert s["peer_rounds"] == 12 * 20 and s["pulls_failed"] == 0
        assert all(r["status"] == "done" and r["steps"] == 20 for r in RunDir(out).results().values())
    assert summaries[2]["processes"] == 2 and [w["exitcode"] for w in summaries[2]["workers"]] == [0, 0]
    assert [w["peers"] for w in summaries[2]["workers"]] == [list(range(6)), list(range(6, 12))]
    cfg2 = json.loads((tmp_path / "p2" / "config.json").read_text())
    assert cfg2["network"]["transport"] == "ipc"
    a, b = per_cluster(summaries[1]), per_cluster(summaries[2])
    assert set(a) == set(b) == {"0", "1"}
    for c in a:
        assert a[c] > 0.8 and b[c] > 0.8, (a, b)
        assert abs(a[c] - b[c]) <= 0.06, (a, b)


def test_sequential_schedule_with_processes_is_refused(tmp_path):
    exp = write_experiment(tmp_path / "exp.toml")
    out = tmp_path / "out"
    res = cli("run", str(exp), "--schedule", "sequential", "--processes", "2", "--out", str(out), cwd=tmp_path)
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "sequential" in lines[0] and "processes" in lines[0]
    assert not out.exists()


# ------------------------------------------------------------------ rosters over loopback tcp


def test_roster_of_three_hosts_runs_as_local_workers(tmp_path):
    """``zmqgossip run --roster``: hosts a, b, c (4 peers each) as three local worker
    processes over loopback tcp, to completion."""
    write_experiment(tmp_path / "exp.toml")
    out = tmp_path / "three-hosts"
    roster = write_roster(tmp_path, [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]], out)
    t = time.perf_counter()
    res = cli("run", "--roster", str(roster), "-q", "--no-report", cwd=tmp_path)
    print(f"roster run: {time.perf_counter() - t:.1f} s")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "mean test accuracy" in res.stdout
    s = json.loads((out / "summary.json").read_text())
    assert s["failed_peers"] == [] and s["peer_rounds"] == 12 * 6 and s["pulls_failed"] == 0
    assert s["processes"] == 3 and [w["exitcode"] for w in s["workers"]] == [0, 0, 0]
    assert [w["peers"] for w in s["workers"]] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["network"]["transport"] == "tcp"
    # Pulls crossed hosts: every host pulled from another host's peers.
    counts = json.loads((out / "pulls.json").read_text())["counts"]
    cross = sum(counts[i][j] for i in range(12) for j in range(12) if i // 4 != j // 4)
    assert cross > 0


def test_three_worker_commands_share_one_run(tmp_path):
    """The multi-host path: three ``zmqgossip worker --roster FILE --host NAME`` started
    as separate OS processes (c a few seconds after a and b: the others wait for it),
    one shared out folder. All exit 0; the last to finish prints the table, and
    ``zmqgossip report`` shows every peer done."""
    write_experiment(tmp_path / "exp.toml")
    out = tmp_path / "shared"
    roster = write_roster(tmp_path, [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]], out)
    t = time.perf_counter()
    procs = {h: popen("worker", "--roster", str(roster), "--host", h, "-q", cwd=tmp_path) for h in "ab"}
    time.sleep(3.0)
    procs["c"] = popen("worker", "--roster", str(roster), "--host", "c", "-q", cwd=tmp_path)
    outputs = {}
    try:
        for h, p in procs.items():
            outputs[h] = p.communicate(timeout=RUN_TIMEOUT_S)
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
                p.wait()
    print(f"three workers: {time.perf_counter() - t:.1f} s")
    for h, p in procs.items():
        assert p.returncode == 0, (h, outputs[h][1][-3000:])
        assert f"host {h}: peers" in outputs[h][1]
    tables = [h for h, (o, _) in outputs.items() if "mean test accuracy" in o]
    assert tables, outputs
    rd = RunDir(out)
    results = rd.results()
    assert sorted(results) == list(range(12))
    assert all(r["status"] == "done" and r["steps"] == 6 for r in results.values())
    s = json.loads((out / "summary.json").read_text())
    assert s["failed_peers"] == [] and s["peer_rounds"] == 12 * 6
    rep = cli("report", str(out), "--no-plots", cwd=tmp_path)
    assert rep.returncode == 0, rep.stderr
    assert "mean test accuracy" in rep.stdout and "72 peer-rounds" in rep.stdout


# ------------------------------------------------------------------ faults


def test_a_killed_worker_is_reported_and_the_others_finish(tmp_path):
    """``run --processes 2`` with a 6 s budget; once every peer has done 2 updates one
    worker is killed with SIGKILL. The run still ends with exit 0, says the worker died
    with exit code -9, lists exactly that worker's peers as failed; the others are done
    and their later pulls of the dead peers failed by timeout (network.timeout_s 0.5)."""
    exp = write_experiment(tmp_path / "exp.toml", rounds=100_000, seconds=6.0, network={"timeout_s": 0.5})
    out = tmp_path / "out"
    t = time.perf_counter()
    proc = popen("run", str(exp), "--processes", "2", "--out", str(out), "-q", "--no-report", cwd=tmp_path)
    try:
        wait_for_progress(proc, out, peers=12, steps=2)
        workers = worker_children(proc.pid)
        assert len(workers) == 2, [(c, cmdline(c)) for c in children(proc.pid)]
        victim = workers[-1]
        kill_t = time.perf_counter()
        os.kill(victim, signal.SIGKILL)
        stdout, stderr = proc.communicate(timeout=RUN_TIMEOUT_S)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    print(f"killed worker {victim} at {kill_t - t:.1f} s; run ended at {time.perf_counter() - t:.1f} s")
    assert proc.returncode == 0, stderr[-3000:]
    said = stdout + stderr
    assert "exit code -9" in said, said[-3000:]
    s = json.loads((out / "summary.json").read_text())
    (dead,) = [w for w in s["workers"] if w["pid"] == victim]
    assert dead["exitcode"] == -9
    alive = [w for w in s["workers"] if w["pid"] != victim]
    assert [w["exitcode"] for w in alive] == [0]
    dead_peers = set(dead["peers"])
    assert s["failed_peers"] == sorted(dead_peers)
    rd = RunDir(out)
    results = rd.results()
    survivors = [p for p in range(12) if p not in dead_peers]
    assert all(results[p]["status"] == "done" for p in survivors)
    assert not dead_peers & set(results)  # killed before it could write anything
    # Pulls of the dead peers after the kill failed: by timeout when the request left before
    # the socket saw the peer go, else as unreachable (at once, once a socket knows it).
    reasons = [why for p in survivors for e in rd.events(p) for j, why in e.failed.items() if int(j) in dead_peers]
    print(f"failed pulls of the dead peers: {len(reasons)} ({sorted(set(reasons))}); "
          f"survivors' updates {sum(len(rd.events(p)) for p in survivors)}")
    assert reasons and set(reasons) <= {"timeout", "unreachable"}
    # The dead peers' updates before the kill are kept (events are flushed line by line).
    assert all(len(rd.events(p)) >= 2 for p in dead_peers)


def test_waiting_for_remote_peers_gives_up_on_a_cut_connection_but_not_on_a_silent_peer(actx, run_async):
    """A worker that is done waits for the others' peers (it keeps serving them). One whose
    connection was cut (its worker died) is given up after the rule's ``cut_s``, not
    after ``gone_after`` (3 pull timeouts in a run); one that is connected but silent (too
    busy to answer) is still waited for. Real ipc sockets in this process."""

    async def body():
        base = ipc_dir()
        d = make_directory("ipc", [0, 1, 2], base=base)
        me, dying = Transport(actx, 0, d), Transport(actx, 1, d)
        silent = actx.socket(zmq.ROUTER)  # bound and connected, never answers a ping
        silent.setsockopt(zmq.LINGER, 0)
        silent.bind(d[2])
        try:
            await me.start()
            await dying.start()
            assert await me.ping(1, timeout=5) is not None  # connected, then its process dies:
            await dying.close()
            gone = await asyncio.wait_for(wait_for(me, [1], "done", GiveUp(silent_s=3600, cut_s=0.5)), 30)
            assert gone == [1]
            with pytest.raises(asyncio.TimeoutError):  # silence is not a cut connection
                await asyncio.wait_for(wait_for(me, [2], "done", GiveUp(silent_s=3600, cut_s=0.5)), 3)
        finally:
            await me.close()
            silent.close(0)
            shutil.rmtree(base, ignore_errors=True)

    run_async(body(), 60)


def test_waiting_for_start_up_gives_up_on_a_peer_that_answered_then_died_but_not_on_one_not_up_yet(actx, run_async):
    """At start-up a worker waits for the others' peers to be ready. One that answered (up,
    still warming up) and then lost every connection (its worker was killed) is given up
    after the rule's ``cut_s``; one nobody has reached yet (its worker still starting,
    nothing bound) is still waited for. Real ipc sockets in this process."""

    async def body():
        base = ipc_dir()
        d = make_directory("ipc", [0, 1, 2], base=base)
        me, dying = Transport(actx, 0, d), Transport(actx, 1, d)
        try:
            await me.start()
            await dying.start()
            dying.status.update(ready=False)  # up, warming up
            waiting = asyncio.ensure_future(wait_for(me, [1], "ready", GiveUp(silent_s=3600, cut_s=0.5, cut_needs_answer=True)))
            await asyncio.sleep(0.5)  # it has answered "not ready" by now
            assert not waiting.done()
            await dying.close()
            assert await asyncio.wait_for(waiting, 30) == [1]
            with pytest.raises(asyncio.TimeoutError):  # peer 2: nothing bound yet, never answered
                await asyncio.wait_for(wait_for(me, [2], "ready", GiveUp(silent_s=3600, cut_s=0.5, cut_needs_answer=True)), 3)
        finally:
            await me.close()
            shutil.rmtree(base, ignore_errors=True)

    run_async(body(), 60)


@pytest.mark.parametrize("target", ["parent", "group"])
def test_ctrl_c_stops_the_run_and_keeps_partial_results(tmp_path, target):
    """SIGINT to ``zmqgossip run --processes 2`` mid-run (to the parent only, or to the
    whole process group as a terminal's Ctrl-C does): exit code 130 within a few seconds,
    no process left, every peer's result (interrupted or done) and a summary written. A
    SIGUSR1 to a worker before that prints its threads' stacks and stops nothing."""
    exp = write_experiment(tmp_path / "exp.toml", rounds=100_000, seconds=60.0)
    out = tmp_path / "out"
    proc = popen("run", str(exp), "--processes", "2", "--out", str(out), "-q", "--no-report", cwd=tmp_path,
                 start_new_session=True)
    try:
        wait_for_progress(proc, out, peers=12, steps=2)
        kids = children(proc.pid)
        workers = worker_children(proc.pid)
        assert len(workers) == 2
        os.kill(workers[0], signal.SIGUSR1)  # a worker prints its threads' stacks and goes on
        time.sleep(0.5)
        t = time.perf_counter()
        if target == "parent":
            os.kill(proc.pid, signal.SIGINT)
        else:
            os.killpg(proc.pid, signal.SIGINT)
        _, stderr = proc.communicate(timeout=60)
        took = time.perf_counter() - t
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    print(f"SIGINT to the {target}: exited {proc.returncode} after {took:.1f} s")
    assert proc.returncode == 130, stderr[-3000:]
    assert took < 15.0
    assert "interrupted" in stderr and str(out) in stderr
    assert "most recent call first" in stderr and "worker_main" in stderr  # the SIGUSR1 stacks
    deadline = time.monotonic() + 3.0
    while time.monotonic() < deadline and any(running(k) for k in kids):
        time.sleep(0.05)
    assert not [k for k in kids if running(k)], [(k, cmdline(k)) for k in kids if running(k)]
    rd = RunDir(out)
    results = rd.results()
    assert sorted(results) == list(range(12))
    assert {r["status"] for r in results.values()} <= {"interrupted", "done"}
    assert "interrupted" in {r["status"] for r in results.values()}
    s = json.loads((out / "summary.json").read_text())
    assert s["peer_rounds"] >= 24 and s["peer_rounds"] == sum(len(rd.events(p)) for p in range(12))
