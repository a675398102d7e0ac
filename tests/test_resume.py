"""Crash and resume, end to end through the real command line.

``zmqgossip run EXP --processes 2`` (async, a checkpoint every 2 rounds); once every peer
has checkpointed, one worker process is killed with SIGKILL mid-run.  The other worker's
peers finish; the run ends with the killed peers failed.  ``zmqgossip run --resume RUN``
restarts them from their checkpoints and completes the run.  Every event line written
before the crash is still there, byte for byte, and no line is torn; summary.json names
the resumed peers and the step each resumed from; no peer is left failed.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from zmqgossip.checkpoint import load_checkpoint
from zmqgossip.metrics import RunDir

from _helpers import worker_pids

REPO = Path(__file__).resolve().parents[1]
ROUNDS = 12  # the kill must land between step 3 and the last round, on slow and fast hosts

EXPERIMENT = f"""
name = "crash"
method = "dac-var"
schedule = "async"
peers = 6
rounds = {ROUNDS}
seed = 0
[data]
dataset = "digits"
n_train = 150
n_val = 10
test_per_class = 10
[train]
model = "mlp"
epochs = 3  # 0.07-0.2 s a round on the hosts seen so far
test_every = 0
checkpoint_every = 2
checkpoint_min_s = 0  # every 2 rounds, however fast they are
[policy]
n = 2
[network]
timeout_s = 0.5
[compute]
processes = 2
"""


def cli(*args: str, cwd: Path) -> subprocess.Popen:
    env = {**os.environ, "COLUMNS": "200", "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-c", "from zmqgossip.cli import app; app()", *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def spawned_workers(parent: int) -> list[int]:
    """Pids of the worker processes ``parent`` started (not its resource tracker)."""
    return worker_pids(parent)


def lines_ok(path: Path) -> list[dict]:
    data = path.read_bytes()
    assert data.endswith(b"\n"), f"{path}: torn last line"
    return [json.loads(line) for line in data.split(b"\n")[:-1]]  # every line parses


def test_kill_9_a_worker_then_resume_completes_the_run(tmp_path):
    exp = tmp_path / "crash.toml"
    exp.write_text(EXPERIMENT)
    run_dir = tmp_path / "run"
    rd = RunDir(run_dir)
    t0 = time.monotonic()
    proc = cli("run", str(exp), "--out", str(run_dir), "--quiet", "--no-report", cwd=tmp_path)
    try:
        # Worker 0 (spawned first: the lower pid) hosts peers 0..2. Once each of them has a
        # checkpoint and has gone a round beyond it, kill that worker.
        deadline = time.monotonic() + 40
        workers: list[int] = []
        mine = [0, 1, 2]
        while time.monotonic() < deadline:
            assert proc.poll() is None, proc.communicate()
            ckpts = [rd.root / "checkpoints" / f"peer-{p}.ckpt" for p in mine]
            steps = [len(rd.events(p)) for p in mine]
            workers = spawned_workers(proc.pid)
            if all(c.exists() for c in ckpts) and min(steps) >= 3 and len(workers) == 2:
                assert max(steps) < ROUNDS - 1, f"too late to kill mid-run: {steps}"
                break
            time.sleep(0.05)
        else:
            raise AssertionError(f"no checkpoints in time: {steps}")
        victim = workers[0]
        os.kill(victim, signal.SIGKILL)
        time.sleep(0.2)  # a killed process writes nothing more
        # A survivor whose worker is still warming up may have logged nothing yet.
        before = {p: rd.events_path(p).read_bytes() if rd.events_path(p).exists() else b"" for p in range(6)}
        try:
            out, err = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            # Stuck: every surviving worker prints its threads' stacks (SIGUSR1), then fail with
            # them. The workers hold the parent's pipes: they go first, or reading would block.
            stuck = spawned_workers(proc.pid)
            for w in stuck:
                os.kill(w, signal.SIGUSR1)
            time.sleep(1.0)
            for w in [*stuck, proc.pid]:
                os.kill(w, signal.SIGKILL)
            out, err = proc.communicate(timeout=30)
            raise AssertionError(f"the survivors did not finish within 60 s of the kill:\n{out}\n{err[-6000:]}") from None
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    t_crash = time.monotonic() - t0
    assert proc.returncode == 0, err[-3000:]
    assert "died with exit code -9" in out + err

    summary = json.loads((run_dir / "summary.json").read_text())
    killed = [w for w in summary["workers"] if w["exitcode"] == -signal.SIGKILL]
    assert len(killed) == 1 and killed[0]["pid"] == victim
    dead = killed[0]["peers"]
    assert dead == mine
    survivors = [p for p in range(6) if p not in dead]
    assert summary["failed_peers"] == dead
    for p in survivors:  # the others finished every round
        r = rd.results()[p]
        assert r["status"] == "done" and r["steps"] == ROUNDS
    at_kill = {p: load_checkpoint(rd.checkpoint_path(p))[1]["step"] for p in dead}
    assert all(s % 2 == 0 and 2 <= s < ROUNDS for s in at_kill.values()), at_kill
    for p in dead:  # mid-run: killed before its last round
        assert len({e["step"] for e in lines_ok(rd.events_path(p))}) < ROUNDS

    t1 = time.monotonic()
    res = cli("run", "--resume", str(run_dir), "--quiet", "--no-report", cwd=tmp_path)
    out, err = res.communicate(timeout=60)
    t_resume = time.monotonic() - t1
    print(f"\ncrash run {t_crash:.1f}s, resume {t_resume:.1f}s; killed worker hosted peers {dead}, "
          f"checkpoints at steps {at_kill}")
    assert res.returncode == 0, err[-3000:]

    summary = json.loads((run_dir / "summary.json").read_text())
    print("summary after resume: failed_peers", summary["failed_peers"], "resumed", summary["resumed"])
    assert summary["failed_peers"] == []
    assert summary["resumed"] == {str(p): at_kill[p] for p in dead}
    results = rd.results()
    for p in range(6):
        assert results[p]["status"] == "done" and results[p]["steps"] == ROUNDS
        events = lines_ok(rd.events_path(p))  # no torn line, every line parses
        data = rd.events_path(p).read_bytes()
        assert data.startswith(before[p]), p  # every line written before the crash survives
        assert sorted({e["step"] for e in events}) == list(range(ROUNDS))
    for p in dead:
        assert results[p]["resumed_from"] == at_kill[p]
        # the resumed peer went on from its checkpoint: steps from there were logged again
        after = lines_ok(rd.events_path(p))[len(before[p].split(b"\n")) - 1:]
        assert after and after[0]["step"] == at_kill[p]
    assert summary["peer_rounds"] == 6 * ROUNDS
