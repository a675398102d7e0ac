"""The conftest's machinery: its reaper stops what a failed test left running (processes
started by subprocess and by multiprocessing) and reaps the ones that had already exited;
its tier tables name only test modules and tests that exist."""

from __future__ import annotations

import multiprocessing
import re
import subprocess
import sys
import time
from pathlib import Path

import psutil
from conftest import MODULE_TIERS, TEST_TIERS, TIERS, helper_pids, reap_children


def _sleep() -> None:
    time.sleep(60)


def test_reap_children_stops_every_kind_of_child_and_keeps_none_as_a_zombie():
    stray = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    done = subprocess.Popen([sys.executable, "-c", "pass"])
    worker = multiprocessing.get_context("spawn").Process(target=_sleep, daemon=True)
    worker.start()
    deadline = time.monotonic() + 30
    while psutil.Process(done.pid).status() != psutil.STATUS_ZOMBIE and time.monotonic() < deadline:
        time.sleep(0.05)
    stopped = reap_children(grace_s=5.0)
    assert stray.pid in stopped and worker.pid in stopped and done.pid not in stopped
    assert not worker.is_alive() and worker.exitcode is not None
    assert [c.pid for c in psutil.Process().children() if c.pid not in helper_pids()] == []  # but the resource tracker
    assert not psutil.pid_exists(stray.pid) and not psutil.pid_exists(done.pid)  # reaped, not zombies


def test_every_test_module_has_a_tier_and_every_named_test_exists():
    here = Path(__file__).resolve().parent
    tests = {f.stem: set(re.findall(r"^(?:async )?def (test_\w+)", f.read_text(), re.M)) for f in here.glob("test_*.py")}
    assert set(tests) == set(MODULE_TIERS)
    for key, tier in TEST_TIERS.items():
        module, name = key.split("::")
        assert name in tests.get(module, set()), key
        assert tier in TIERS and tier != MODULE_TIERS[module], key
    assert set(MODULE_TIERS.values()) <= set(TIERS)
