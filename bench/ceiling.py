"""The memory-bandwidth ceiling of decode: what a decode step must read, and how fast this
machine reads memory, measured in the same run as the engines.

A decode step multiplies one token by every weight matrix once and reads the whole KV cache
of the context; at batch 1 that is memory-bound, so bandwidth / bytes per token is an upper
bound on tokens/s that no kernel can pass without speculation (which confirms several tokens
per read of the weights).
"""

from __future__ import annotations

import subprocess
import sys

KV_BYTES = 2  # the ceiling's cache is 16-bit, as llama.cpp's: an engine holding f32 reads twice that

# A plain multithreaded sum over 2 GiB of f32: a streaming read, which is what decode's matmuls are.
BANDWIDTH_CODE = """
import sys, time, torch
torch.set_num_threads(int(sys.argv[1]))
x = torch.ones(2**29)
best = float("inf")
for _ in range(6):
    t0 = time.perf_counter()
    x.sum().item()
    best = min(best, time.perf_counter() - t0)
print(x.numel() * x.element_size() / best)
"""


def measure_bandwidth(threads: int, env: dict | None = None) -> float:
    """Bytes/s of the best of six torch sums over 2 GiB, with `threads` threads, in a fresh process."""
    out = subprocess.run([sys.executable, "-c", BANDWIDTH_CODE, str(threads)], capture_output=True, text=True,
                         check=True, timeout=300, env=env)
    return float(out.stdout.strip())


def weight_bytes(tensors: dict[str, int]) -> int:
    """Bytes of the file's tensors one decode step reads: every one of them once, except the token
    embedding table (one row of it is looked up), unless the model has no `output.weight` and the
    table is the output matrix too (tied embeddings, as SmolLM2 and SmolLM3)."""
    tied = "output.weight" not in tensors
    return sum(n for name, n in tensors.items() if name != "token_embd.weight" or tied)


def gguf_tensor_bytes(path: str) -> dict[str, int]:
    """{tensor name: bytes} of a GGUF file, any quant type (the gguf package knows them all)."""
    import gguf

    return {t.name: int(t.n_bytes) for t in gguf.GGUFReader(path).tensors}


def kv_bytes_per_position(dims: dict) -> int:
    return 2 * dims["layers"] * dims["kv_heads"] * dims["head_dim"] * KV_BYTES


def ceiling_tok_s(bandwidth: float, weights: int, kv_per_position: int, context: float) -> float:
    """Decode tokens/s if every byte a step reads came at `bandwidth`; context: the cache's
    length during the step (the mean over a run of decode steps)."""
    return bandwidth / (weights + kv_per_position * context)
