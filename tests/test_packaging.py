"""pyproject.toml: a built wheel ships every file the app reads at run time, not only the .py files.

The editable install of setup.sh reads from the checkout, so a missing data file shows only in a
normal install (`pip install .`): the chat then fails at start on its stylesheet. .ci/run also
installs the wheel into a fresh venv and runs the app from there (scripts/check_install.sh).
"""

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("app", "backends", "assets")


def tree_files() -> list[str]:
    """The files a clean checkout has: tracked, plus new ones git does not ignore."""
    out = subprocess.run(["git", "-C", str(ROOT), "ls-files", "--cached", "--others", "--exclude-standard"],
                         capture_output=True, text=True, timeout=60)
    if out.returncode != 0:
        pytest.skip("not a git checkout")
    return [f for f in out.stdout.splitlines() if (ROOT / f).is_file()]


@pytest.fixture(scope="module")
def wheel_and_tree(tmp_path_factory):
    src = tmp_path_factory.mktemp("src")
    for name in tree_files():
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, src / name)
    # A chat template file as the assets folder holds them, so that the rule for assets/** is
    # checked even on a tree that has none yet.
    (src / "assets" / "templates").mkdir(parents=True, exist_ok=True)
    (src / "assets" / "templates" / "probe.jinja").write_text("{{ messages }}\n")
    out = tmp_path_factory.mktemp("wheel")
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                        "--no-index", "-w", str(out), str(src)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    (wheel,) = out.glob("smollm3-*.whl")
    files = [p.relative_to(src).as_posix() for p in src.rglob("*") if p.is_file()]
    return wheel, files


def test_the_wheel_ships_every_file_of_the_packages(wheel_and_tree):
    wheel, files = wheel_and_tree
    shipped = set(zipfile.ZipFile(wheel).namelist())
    wanted = {f for f in files if f.split("/")[0] in PACKAGES}
    missing = sorted(wanted - shipped)
    assert not missing, f"not in the wheel: {missing}"
    assert {"app/tui/chat.tcss", "assets/templates/probe.jinja", "backends/native/cpu_kernels.c"} <= shipped


def test_the_wheel_declares_the_command_and_an_spdx_license(wheel_and_tree):
    wheel, _ = wheel_and_tree
    z = zipfile.ZipFile(wheel)
    info = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
    metadata = z.read(info).decode()
    assert "License-Expression: Apache-2.0" in metadata
    entry_points = z.read(info.replace("METADATA", "entry_points.txt")).decode()
    assert "smollm3 = app.cli:entry_point" in entry_points


def test_the_smollm2_model_is_cached_with_the_apps_other_caches(tmp_path):
    """scripts/fetch_smollm2.py (setup.sh, the tests): ~/.cache/smollm3/models, as XDG says."""
    code = "import fetch_smollm2; print(fetch_smollm2.CACHE_DIR)"
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "XDG_CACHE_HOME": str(tmp_path / "xdg")}
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT / "scripts", env=env, capture_output=True, text=True,
                       timeout=60)
    assert r.stdout.strip() == str(tmp_path / "xdg" / "smollm3" / "models"), r.stderr
