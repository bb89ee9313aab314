"""The harness's own packages: pip-installed into bench/.deps, never into the project's venv.

- llama-cpp-python 0.3.36 (the peer, and the quantizer that makes the 3B files). It builds
  llama.cpp from source, minutes on 2 cores, so the harness starts it first and does other
  work meanwhile.
- accelerate, which transformers requires to load a GGUF file.

Each lands in its own directory; a process that imports one gets it on PYTHONPATH through
`env_with`. The project's venv supplies their other dependencies (numpy, jinja2, torch...).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
DEPS_DIR = BENCH / ".deps"

# name -> (pip requirements installed with --no-deps, a file that exists once installed)
PACKAGES = {
    "llamacpp": (["llama-cpp-python==0.3.36", "diskcache"], "llama_cpp/lib/libllama.so"),
    "accelerate": (["accelerate==1.15.0"], "accelerate/__init__.py"),
}


def target(name: str) -> Path:
    return DEPS_DIR / f"{name}-{PACKAGES[name][0][0].split('==')[1]}"


def installed(name: str) -> bool:
    return (target(name) / PACKAGES[name][1]).exists()


# x86 features llama.cpp's CMake can be told one by one: (flag in /proc/cpuinfo, GGML option)
X86_FEATURES = [("avx", "AVX"), ("avx2", "AVX2"), ("fma", "FMA"), ("f16c", "F16C"), ("bmi2", "BMI2"),
                ("avx_vnni", "AVX_VNNI"), ("avx512f", "AVX512"), ("avx512vbmi", "AVX512_VBMI"),
                ("avx512_vnni", "AVX512_VNNI"), ("avx512_bf16", "AVX512_BF16")]


def llamacpp_cmake_args() -> str | None:
    """On a CPU with AMX, llama.cpp 0.3.36 built with -march=native segfaults in llama_decode
    (measured: a Sapphire Rapids-class Xeon, any model and thread count), so its features are
    named one by one without AMX; elsewhere None: the native build."""
    try:
        flags = set(next(line for line in open("/proc/cpuinfo") if line.startswith("flags")).split())
    except (OSError, StopIteration):
        return None
    if "amx_int8" not in flags:
        return None
    on = [f"-DGGML_{option}=ON" for feature, option in X86_FEATURES if feature in flags]
    return " ".join(["-DGGML_NATIVE=OFF", *on, "-DGGML_AMX_TILE=OFF", "-DGGML_AMX_INT8=OFF", "-DGGML_AMX_BF16=OFF"])


def start_install(name: str) -> subprocess.Popen | None:
    """Start pip for `name` in the background; None when it is already there."""
    if installed(name):
        return None
    DEPS_DIR.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "--no-cache-dir", "--upgrade", "--target",
           str(target(name)), *PACKAGES[name][0]]
    env = dict(os.environ)
    if name == "llamacpp" and (cmake_args := llamacpp_cmake_args()):
        env["CMAKE_ARGS"] = cmake_args
    return subprocess.Popen(cmd, stdout=open(target(name).with_suffix(".log"), "w"), stderr=subprocess.STDOUT, env=env)


def wait_install(name: str, proc: subprocess.Popen | None) -> None:
    if proc is not None and proc.wait() != 0 or not installed(name):
        raise RuntimeError(f"installing {' '.join(PACKAGES[name][0])} failed; see {target(name).with_suffix('.log')}")


def env_with(*names: str) -> dict:
    """os.environ with the checkout and the named packages on PYTHONPATH."""
    env = dict(os.environ)
    paths = [str(target(n)) for n in names] + [str(ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
    env["PYTHONPATH"] = os.pathsep.join(paths)
    return env


if __name__ == "__main__":  # python bench/deps.py [llamacpp accelerate]: install, print where
    for name in sys.argv[1:] or list(PACKAGES):
        wait_install(name, start_install(name))
        print(target(name))
