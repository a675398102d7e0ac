"""The built wheel works like any installed package, away from the repository.

The wheel is built from this checkout (``pip wheel --no-deps``) and installed into a
fresh virtual environment that sees nothing of the checkout. Its dependencies are the
ones this test runs with (the same torch wheel and the rest, reached through a ``.pth``
line to this interpreter's site-packages: nothing is downloaded, and ``pip check`` says
whether they satisfy the wheel's requirements). From a folder outside the repository,
the installed command lists the presets the wheel carries and runs one.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = sorted(p.stem for p in (ROOT / "launch").glob("*.toml"))


def sh(*cmd: str | Path, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{cmd}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The bin/ folder of a fresh venv with the wheel of this checkout installed."""
    base = tmp_path_factory.mktemp("wheel")
    sh(sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", base / "dist", ROOT, cwd=base)
    (wheel,) = (base / "dist").glob("zmqgossip-*.whl")
    env_dir = base / "venv"
    venv.EnvBuilder(with_pip=False, system_site_packages=False).create(env_dir)
    python = env_dir / "bin" / "python"
    # Installed before the dependencies are visible, so pip meets no other zmqgossip.
    sh(sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index", "-q", wheel, cwd=base)
    site = Path(sh(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])", cwd=base).stdout.strip())
    ours = dict.fromkeys([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]])
    (site / "project-dependencies.pth").write_text("".join(f"{p}\n" for p in ours))
    sh(sys.executable, "-m", "pip", "--python", python, "check", cwd=base)
    return env_dir / "bin"


def test_the_wheel_carries_every_preset_of_launch(installed: Path, tmp_path: Path) -> None:
    listed = sh(installed / "zmqgossip", "presets", cwd=tmp_path).stdout
    assert SHIPPED and all(name in listed for name in SHIPPED), listed
    probe = ("import json, zmqgossip; from zmqgossip import config; "
             "names = list(config.list_presets()); [config.load(n) for n in names]; "
             "print(json.dumps({'file': zmqgossip.__file__, 'presets': names}))")
    got = json.loads(sh(installed / "python", "-c", probe, cwd=tmp_path).stdout.strip().splitlines()[-1])
    assert got["presets"] == SHIPPED  # every one of them validates, too
    assert Path(got["file"]).is_relative_to(installed.parent), got["file"]  # the wheel's code, not the checkout's


def test_the_installed_command_runs_a_preset_outside_the_repository(installed: Path, tmp_path: Path) -> None:
    sh(installed / "zmqgossip", "run", "label-digits", "--set", "rounds=2", "--out", "run", "--quiet", "--no-report",
       cwd=tmp_path)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["peer_rounds"] == 20 * 2 and summary["failed_peers"] == []
