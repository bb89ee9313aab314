"""Every SMOLLM3_* setting is read in backends/settings.py: defaults, values, and bad values as one-line errors."""

import re
import subprocess
from pathlib import Path

import pytest

from backends import settings
from backends.errors import SmolLMError

ROOT = Path(__file__).resolve().parent.parent


def test_defaults(monkeypatch):
    for name in ("KERNELS", "NATIVE", "AMX", "COMPILE", "TOKENIZER_CACHE", "DATA_DIR", "DEBUG", "KV_CACHE"):
        monkeypatch.delenv(f"SMOLLM3_{name}", raising=False)
    assert settings.kernels() == "fast" and settings.kv_cache() == "f16"
    assert settings.native_kernels() and settings.amx() and settings.compile_kernels() and settings.tokenizer_cache()
    assert settings.data_dir() is None and not settings.debug()


def test_values(monkeypatch, tmp_path):
    monkeypatch.setenv("SMOLLM3_KERNELS", "reference")
    monkeypatch.setenv("SMOLLM3_NATIVE", "0")
    monkeypatch.setenv("SMOLLM3_DATA_DIR", str(tmp_path))
    assert settings.kernels() == "reference" and not settings.native_kernels()
    assert settings.data_dir() == tmp_path
    assert settings.kv_cache() == "f32"  # the reference kernels are exact: so is their cache
    monkeypatch.setenv("SMOLLM3_KV_CACHE", "f16")
    assert settings.kv_cache() == "f16"


@pytest.mark.parametrize(
    "name, value, read",
    [
        ("SMOLLM3_KERNELS", "fastest", settings.kernels),
        ("SMOLLM3_NATIVE", "off", settings.native_kernels),
        ("SMOLLM3_AMX", "yes", settings.amx),
        ("SMOLLM3_TOKENIZER_CACHE", "yes", settings.tokenizer_cache),
        ("SMOLLM3_KV_CACHE", "bf16", settings.kv_cache),
    ],
)
def test_bad_value_names_the_setting(monkeypatch, name, value, read):
    monkeypatch.setenv(name, value)
    with pytest.raises(SmolLMError, match=f"^{name}="):
        read()


def test_read_nowhere_else():
    """The one place: no other module of the project (the C kernels included) reads an SMOLLM3_ variable."""
    files = subprocess.run(["git", "ls-files", "*.py", "*.c"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    reads = re.compile(r"environ(?:\.get\(|\[)\s*[\"']SMOLLM3_\w*[\"']\)?(?!\]\s*=)|getenv\(\s*[\"']SMOLLM3_")
    readers = {f for f in files if reads.search((ROOT / f).read_text()) and not f.startswith("tests/")}
    assert readers <= {"backends/settings.py"}
