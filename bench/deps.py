"""The harness's own llama-cpp-python: pip-installed into bench/.deps, never into the project's venv.

It builds llama.cpp from source (minutes on 2 cores), so `start_install` runs pip in the
background and the harness does other work (the SmolLM2 fetch, our engine's runs) meanwhile.
Processes that import it get the directory on PYTHONPATH through `llamacpp_env`.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

VERSION = "0.3.36"
BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
DEPS = BENCH / ".deps" / f"llama-cpp-python-{VERSION}"
LOG = BENCH / ".deps" / f"llama-cpp-python-{VERSION}.log"


def installed() -> bool:
    return (DEPS / "llama_cpp" / "__init__.py").exists() and any((DEPS / "llama_cpp" / "lib").glob("libllama*"))


def start_install() -> subprocess.Popen | None:
    """Start `pip install llama-cpp-python==VERSION` into DEPS unless it is there; None when it is."""
    if installed():
        return None
    DEPS.parent.mkdir(parents=True, exist_ok=True)
    # numpy, jinja2 and typing-extensions come from the venv; diskcache is the one missing runtime dep.
    cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "--upgrade", "--target", str(DEPS),
           f"llama-cpp-python=={VERSION}", "diskcache"]
    return subprocess.Popen(cmd, stdout=open(LOG, "w"), stderr=subprocess.STDOUT)


def wait_install(proc: subprocess.Popen | None) -> None:
    if proc is not None and proc.wait() != 0:
        raise RuntimeError(f"installing llama-cpp-python=={VERSION} failed; see {LOG}")
    if not installed():
        raise RuntimeError(f"llama-cpp-python=={VERSION} is not in {DEPS}; see {LOG}")


def llamacpp_env() -> dict:
    env = dict(os.environ)
    paths = [str(DEPS), str(ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
    env["PYTHONPATH"] = os.pathsep.join(paths)
    return env


if __name__ == "__main__":  # python bench/llamacpp.py: install (or check) and say where
    wait_install(start_install())
    print(DEPS)
