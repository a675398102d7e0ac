"""The run directory's event log: one line per update, on disk as soon as it is appended."""

from __future__ import annotations

import json
import os

import numpy as np

from zmqgossip.metrics import RunDir


def _open_fds() -> set[str]:
    out = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            out.add(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:
            pass
    return out


def test_an_appended_event_is_on_disk_at_once_one_json_line_each(tmp_path):
    rd = RunDir(tmp_path)
    rd.append_event(3, {"step": 0, "loss": [np.float32(0.5), 1.0], "n": np.int64(7)})
    path = rd.events_path(3)
    # Read through a separate descriptor while the writer's is still open: nothing waits in a buffer.
    assert path.read_text() == '{"step":0,"loss":[0.5,1.0],"n":7}\n'
    rd.append_event(3, {"step": 1})
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [0, 1]
    assert [e.step for e in rd.events(3)] == [0, 1]
    rd.close()


def test_event_files_kept_open_are_bounded_and_closed_with_the_run_dir(tmp_path):
    rd = RunDir(tmp_path)
    rd.OPEN_EVENT_FILES = 4
    for step in range(3):
        for peer in range(10):  # more writers than files kept open: the oldest are closed
            rd.append_event(peer, {"peer": peer, "step": step})
            mine = {p for p in _open_fds() if p.startswith(str(rd.events_dir))}
            assert len(mine) <= 4
    for peer in range(10):
        assert [e.step for e in rd.events(peer)] == [0, 1, 2]
    rd.close()
    assert not {p for p in _open_fds() if p.startswith(str(rd.events_dir))}
    rd.append_event(0, {"peer": 0, "step": 3})  # a closed run dir opens the file again
    assert [e.step for e in rd.events(0)] == [0, 1, 2, 3]
    rd.close()
