"""Every SMOLLM3_* environment setting, read here and nowhere else.

Each is read when asked for, not at import, so a test (or a caller) that sets one before
loading a model gets it. A value that cannot be read is a `SettingError` naming the
setting, one line at the CLI like any other bad input.

| setting                  | default | what it does                                              |
|--------------------------|---------|-----------------------------------------------------------|
| SMOLLM3_KERNELS          | fast    | `reference`: torch dequantizes every weight per matmul    |
|                          |         | (slow, simplest: what the fast kernels are checked with)  |
| SMOLLM3_NATIVE           | 1       | `0`: never build or load our C kernels (torch's run)      |
| SMOLLM3_AMX              | 1       | `0`: prompts take the C kernels' vector dots, not the     |
|                          |         | CPU's AMX tiles (where the CPU and Linux have them)       |
| SMOLLM3_COMPILE          | 1       | `0`: no torch.compile'd decode kernel for group-16 types  |
| SMOLLM3_KV_CACHE         | f16     | the native CPU path's KV cache: `f16` (half the memory,   |
|                          |         | as llama.cpp) or `f32` (the default with reference kernels)|
| SMOLLM3_SPECULATE        | auto    | prompt-lookup drafts (speculative.py): `0` off, `1` on,    |
|                          |         | `auto` where a batch's rows are bitwise decoded rows      |
| SMOLLM3_TOKENIZER_CACHE  | 1       | `0`: build a GGUF's tokenizer afresh, never cache it      |
| SMOLLM3_DATA_DIR         | (none)  | where the chat TUI keeps its database                     |
| SMOLLM3_DEBUG            | (off)   | any value: an internal error shows its traceback          |
| SMOLLM3_MODELS_CACHE     | (none)  | where set-up and the tests keep the SmolLM2 test model    |
|                          |         | (default: $XDG_CACHE_HOME or ~/.cache, then smollm3/models)|
| SMOLLM3_API_KEY          | (none)  | `smollm3 serve`: the key every request must bear          |
"""

from __future__ import annotations

import os
from pathlib import Path

from .errors import SmolLMError

KERNEL_MODES = ("fast", "reference")


class SettingError(SmolLMError):
    """An SMOLLM3_* environment variable holds a value we cannot use."""


def _flag(name: str, default: bool) -> bool:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    if value not in ("0", "1"):
        raise SettingError(f"{name}={value!r}: use 0 or 1")
    return value == "1"


def kernels() -> str:
    """SMOLLM3_KERNELS: 'fast' or 'reference'."""
    mode = os.environ.get("SMOLLM3_KERNELS") or "fast"
    if mode not in KERNEL_MODES:
        raise SettingError(f"SMOLLM3_KERNELS={mode!r}: use {' or '.join(KERNEL_MODES)}")
    return mode


def native_kernels() -> bool:
    """SMOLLM3_NATIVE: whether our C kernels may be built and used."""
    return _flag("SMOLLM3_NATIVE", True)


def amx() -> bool:
    """SMOLLM3_AMX: whether a prompt's rows may go through AMX's tiles (else the vector dots take
    them, as on CPUs without AMX); the same results either way."""
    return _flag("SMOLLM3_AMX", True)


def compile_kernels() -> bool:
    """SMOLLM3_COMPILE: whether torch.compile may build the group-16 decode kernel."""
    return _flag("SMOLLM3_COMPILE", True)


def kv_cache() -> str:
    """SMOLLM3_KV_CACHE: 'f16' or 'f32'; f32 by default with reference kernels, which are exact."""
    value = os.environ.get("SMOLLM3_KV_CACHE") or ("f32" if kernels() == "reference" else "f16")
    if value not in ("f16", "f32"):
        raise SettingError(f"SMOLLM3_KV_CACHE={value!r}: use f16 or f32")
    return value


def speculate() -> str:
    """SMOLLM3_SPECULATE: 'auto', '0' or '1'."""
    value = os.environ.get("SMOLLM3_SPECULATE") or "auto"
    if value not in ("auto", "0", "1"):
        raise SettingError(f"SMOLLM3_SPECULATE={value!r}: use auto, 0 or 1")
    return value


def tokenizer_cache() -> bool:
    """SMOLLM3_TOKENIZER_CACHE: whether a GGUF's built tokenizer is cached on disk."""
    return _flag("SMOLLM3_TOKENIZER_CACHE", True)


def data_dir() -> Path | None:
    """SMOLLM3_DATA_DIR, where set: the chat TUI's data directory."""
    value = os.environ.get("SMOLLM3_DATA_DIR")
    return Path(value).expanduser() if value else None


def debug() -> bool:
    """SMOLLM3_DEBUG: any non-empty value shows internal errors' tracebacks."""
    return bool(os.environ.get("SMOLLM3_DEBUG"))


def models_cache_dir() -> Path:
    """SMOLLM3_MODELS_CACHE, else the user cache's smollm3/models: the SmolLM2 test model's home."""
    value = os.environ.get("SMOLLM3_MODELS_CACHE")
    if value:
        return Path(value).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "smollm3" / "models"


def api_key() -> str | None:
    """SMOLLM3_API_KEY: the key `smollm3 serve` requires when --api-key is not given."""
    return os.environ.get("SMOLLM3_API_KEY") or None
