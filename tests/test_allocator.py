"""The process memory settings zmqgossip applies at import, and the user's way out."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest

PROBE = "import json, os, zmqgossip; print(json.dumps({**zmqgossip.MEMORY, 'thp': os.environ.get('THP_MEM_ALLOC_ENABLE')}))"


def probe(**env: str) -> dict:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "THP_MEM"))}
    out = subprocess.run([sys.executable, "-c", PROBE], env={**clean, **env}, capture_output=True, text=True,
                         timeout=120, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="only glibc's allocator is tuned")
def test_import_keeps_message_buffers_in_the_heap_and_big_tensors_on_huge_pages():
    assert probe() == {"torch_thp": True, "malloc": True, "thp": "1"}


def test_settings_the_user_made_in_the_environment_win():
    got = probe(MALLOC_TRIM_THRESHOLD_="131072", THP_MEM_ALLOC_ENABLE="0")
    assert got == {"torch_thp": False, "malloc": False, "thp": "0"}


STRESS = (
    "import asyncio, resource, zmqgossip\n"
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
    # message is a fresh mapping, ~64 page faults; in a tuned process it is reused memory.
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
