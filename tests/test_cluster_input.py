"""What the command line says when a Ray cluster cannot be used: one line, exit 2.

Apart from test_cluster.py, whose cluster would be found by ``--ray auto`` (Ray looks
for a running cluster among the machine's processes).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
pytest.importorskip("ray")


def refused(args: list[str], cwd: Path, code: str = "from zmqgossip.cli import app; app()") -> str:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    p = subprocess.run([sys.executable, "-c", code, *args], cwd=cwd, capture_output=True, text=True,
                       env={**env, "PYTHONPATH": str(REPO)}, timeout=120)
    assert p.returncode == 2, p.stderr[-2000:]
    assert p.stderr.count("\n") <= 2 and "Traceback" not in p.stderr, p.stderr
    return p.stderr


@pytest.mark.parametrize("command", [["run", "label-digits"], ["stress", "--peers", "8"]])
def test_ray_auto_without_a_cluster_names_ray_start_and_local(command, tmp_path):
    err = refused([*command, "--ray", "auto"], tmp_path)
    assert "ray start --head" in err and "--ray local" in err


def test_ray_not_installed_names_the_extra(tmp_path):
    code = ("import sys; sys.modules['ray'] = None\n"  # as if Ray were not installed
            "from zmqgossip.cli import app; app()")
    for command in (["run", "label-digits"], ["stress", "--peers", "8"]):
        err = refused([*command, "--ray", "auto"], tmp_path, code)
        assert "pip install 'zmqgossip[ray]'" in err
