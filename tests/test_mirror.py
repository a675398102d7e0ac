"""A worker's staging run directory reaches the driver's as it grows (no shared folder)."""

from __future__ import annotations

import os

import pytest

from zmqgossip.hosting.mirror import Change, Mirror, apply_changes, seed_files
from zmqgossip.metrics import Event, RunDir, write_json_atomic


def test_event_lines_travel_once_and_a_torn_line_waits_for_its_end(tmp_path):
    stage, driver = RunDir(tmp_path / "stage"), tmp_path / "driver"
    m = Mirror(stage.root)
    stage.append_event(3, Event(peer=3, step=0))
    apply_changes(driver, m.changes())
    with open(stage.events_path(3), "ab") as f:  # a line half written
        f.write(b'{"peer":3,"st')
    apply_changes(driver, m.changes())
    assert [e.step for e in RunDir.reader(driver).events(3)] == [0]
    with open(stage.events_path(3), "ab") as f:
        f.write(b'ep":1}\n')
    stage.append_event(3, Event(peer=3, step=2))
    apply_changes(driver, m.changes())
    assert (driver / "events" / "peer-3.jsonl").read_bytes() == stage.events_path(3).read_bytes()
    assert m.changes() == []  # nothing new, nothing sent


def test_whole_files_travel_when_they_change_and_temporaries_never(tmp_path):
    stage, driver = RunDir(tmp_path / "stage"), tmp_path / "driver"
    m = Mirror(stage.root)
    stage.write_result(1, {"peer": 1, "status": "running"})
    stage.checkpoint_path(1).write_bytes(b"ckpt-1")
    (stage.root / "checkpoints" / ".peer-1.ckpt.7.tmp").write_bytes(b"half")
    write_json_atomic(stage.root / "links-0.json", {"messages": 1})
    first = {c.path for c in m.changes()}
    assert first == {"peers/peer-1.json", "checkpoints/peer-1.ckpt", "links-0.json"}
    stage.write_result(1, {"peer": 1, "status": "done"})
    again = m.changes()
    assert [c.path for c in again] == ["peers/peer-1.json"]
    apply_changes(driver, again)
    assert RunDir.reader(driver).results()[1]["status"] == "done"


@pytest.mark.parametrize("path", ["../outside", "/etc/passwd", "events/../../x"])
def test_a_path_outside_the_run_directory_is_refused(tmp_path, path):
    with pytest.raises(ValueError, match="outside the run directory"):
        apply_changes(tmp_path / "driver", [Change(path, b"x", False)])
    assert not (tmp_path / "outside").exists()


def test_a_resumed_worker_gets_its_own_peers_checkpoints_and_results(tmp_path):
    run = RunDir(tmp_path / "run")
    write_json_atomic(run.root / "config.json", {"t0": 1.0})
    for p in range(4):
        run.checkpoint_path(p).write_bytes(os.urandom(16))
    run.write_result(2, {"peer": 2, "status": "done"})
    names = sorted(c.path for c in seed_files(run.root, [2, 3]))
    assert names == ["checkpoints/peer-2.ckpt", "checkpoints/peer-3.ckpt", "config.json", "peers/peer-2.json"]
