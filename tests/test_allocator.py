"""The process memory settings: untouched by importing zmqgossip, applied where peers
are hosted, and the user's way out."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest

GLIBC = platform.libc_ver()[0] == "glibc"

# Run in a fresh interpreter: the environment, and whether glibc serves a 4 MiB buffer
# from a fresh mapping (its default) or from the heap (tuned), before and after STEP.
PROBE = """
import ctypes, json, os, sys
before = dict(os.environ)
exec(sys.argv[1])
libc = ctypes.CDLL("libc.so.6")
class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]
libc.mallinfo2.restype = MallInfo2
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
mapped = libc.mallinfo2().hblks
buf = libc.malloc(4 << 20)
mapped = libc.mallinfo2().hblks > mapped
libc.free(buf)
changed = {k: os.environ.get(k) for k in set(before) | set(os.environ) if before.get(k) != os.environ.get(k)}
print(json.dumps({"env_changed": changed, "mmap": mapped, "out": globals().get("out")}))
"""


def probe(step: str = "", **env: str) -> dict:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "THP_MEM"))}
    out = subprocess.run([sys.executable, "-c", PROBE, step], env={**clean, **env}, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not GLIBC, reason="reads glibc's allocator")
def test_importing_zmqgossip_leaves_the_environment_and_the_allocator_as_they_were():
    plain = probe()
    assert plain == {"env_changed": {}, "mmap": True, "out": None}  # glibc's default, the control
    for step in ("import zmqgossip", "import zmqgossip.cli, zmqgossip.config, zmqgossip.wire"):
        assert probe(step) == plain, step


@pytest.mark.skipif(not GLIBC, reason="reads glibc's allocator")
def test_tuning_for_hosting_keeps_message_buffers_in_the_heap_and_big_tensors_on_huge_pages():
    got = probe("from zmqgossip.allocator import tune_for_hosting; out = tune_for_hosting()")
    assert got == {"env_changed": {"THP_MEM_ALLOC_ENABLE": "1"}, "mmap": False, "out": {"torch_thp": True, "malloc": True}}


@pytest.mark.skipif(not GLIBC, reason="reads glibc's allocator")
def test_hosting_peers_tunes_the_process(tmp_path):
    run = (f"from zmqgossip import config, hosting; "
           f"cfg = config.load('label-digits', ['peers=6', 'rounds=1', 'data.n_train=20', 'train.epochs=1']); "
           f"out = hosting.run_experiment(cfg, {str(tmp_path / 'run')!r})['peer_rounds']")
    got = probe(run)
    assert got["out"] == 6 and not got["mmap"] and got["env_changed"].get("THP_MEM_ALLOC_ENABLE") == "1"


def test_settings_the_user_made_in_the_environment_win():
    got = probe("from zmqgossip.allocator import tune_for_hosting; out = tune_for_hosting()",
                MALLOC_TRIM_THRESHOLD_="131072", THP_MEM_ALLOC_ENABLE="0")
    assert got["env_changed"] == {} and got["out"] == {"torch_thp": False, "malloc": False}


STRESS = (
    "import asyncio, resource\n"
    "from zmqgossip import net as tp, stress\n"
    "cfg = stress.StressConfig(peers=4, payload_kb=256, pulls=100, fanout=2, warmup_rounds=2)\n"
    "r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
    "r = asyncio.run(stress.host_share(cfg, list(range(4)), tp.make_directory('inproc', range(4))))\n"
    "print(r['ok'], resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0)\n"
)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's behaviour")
def test_concurrent_pulls_reuse_message_memory_instead_of_faulting_in_fresh_pages():
    # What the setting is for: 400 pulls of 256 KiB by 4 peers at once. With glibc's
    # thresholds (pinned here through its environment variables) each received or copied
    # message is a fresh mapping, ~64 page faults; hosting tunes the process (host_share
    # does, nothing else here), after which it is reused memory.
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "THP_MEM"))}

    def faults(**env: str) -> int:
        out = subprocess.run([sys.executable, "-c", STRESS], env={**clean, **env}, capture_output=True, text=True,
                             timeout=300, check=True)
        ok, n = out.stdout.strip().splitlines()[-1].split()
        assert int(ok) == 400
        return int(n)

    tuned = faults()
    untuned = faults(MALLOC_MMAP_THRESHOLD_="131072", MALLOC_TRIM_THRESHOLD_="131072")
    assert untuned > 400 * 30, untuned  # a fresh mapping per message
    assert tuned < untuned / 10, (tuned, untuned)
