"""The torch backend's CPU kernels: our C library (backends/native/library.py builds and loads
it) called on torch tensors. RMSNorm, SwiGLU and attention here are the modules' of
native_layers.py; the matmul is NativeLinear's (weights.py).
"""

from __future__ import annotations

import ctypes

import torch

from ..native.library import (  # noqa: F401 (the torch backend's one door to the library)
    SOURCE,
    TYPES,
    PREFILL_ROWS,
    DecoderLayer,
    WeightParts,
    activation_block,
    build,
    compiler,
    forward_layers,
    library,
    linear_map,
    load,
    supports,
)


def gguf_matmul(
    lib: ctypes.CDLL, ggml_type: int, weight: WeightParts | torch.Tensor, x: torch.Tensor, threads: int | None = None
) -> torch.Tensor:
    """x [M, K] @ W^T for W [N, K] held as GGUF blocks (one tensor, or parts stacked by rows); float32 [M, N].
    Row m of the result is bitwise what x[m] alone gives, whatever M and the thread count."""
    if isinstance(weight, torch.Tensor):
        weight = WeightParts([weight])
    if x.dtype != torch.float32 or not x.is_contiguous():  # (tests, not calls: a decoded token pays per op)
        x = x.float().contiguous()
    M, K = x.shape
    y = torch.empty(M, weight.rows)
    status = lib.gguf_matmul(
        ggml_type, len(weight.blocks), weight.c_pointers, weight.c_rows, weight.c_strides, x.data_ptr(), y.data_ptr(), M, K,
        threads or torch.get_num_threads(),
    )
    if status:
        raise RuntimeError(f"gguf_matmul failed ({status}) for type {ggml_type}, K={K}")
    return y


def rms_norm(lib: ctypes.CDLL, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm of float32 rows on the CPU (see rms_norm_f32)."""
    x = x.contiguous()
    y = torch.empty_like(x)
    lib.rms_norm_f32(x.data_ptr(), weight.data_ptr(), y.data_ptr(), x.numel() // x.shape[-1], x.shape[-1], eps)
    return y


def attend(lib, qkv, k_cache, v_cache, pos: int, heads: int, cos, signed_sin) -> torch.Tensor:
    """Causal attention for T rows at positions pos..pos+T-1 (see attend_f32): qkv [T, (H + 2 KV) * D]
    the fused projection's rows (its q and k are rotated in place), caches [1, KV, capacity, D]
    float16 or float32, cos and signed_sin [T, D] or None (NoPE); returns [T, H * D]."""
    _, kv_heads, capacity, head_dim = k_cache.shape
    T, stride = qkv.shape
    assert qkv.dtype == torch.float32 and qkv.stride(1) == 1 and k_cache.dtype in (torch.float16, torch.float32)
    q = qkv.data_ptr()
    k = q + heads * head_dim * 4
    v = k + kv_heads * head_dim * 4
    out = torch.empty(T, heads * head_dim)
    rotate = cos is not None
    status = lib.attend_f32(
        q, k, v, qkv.stride(0), k_cache.data_ptr(), v_cache.data_ptr(), k_cache.dtype == torch.float16, capacity, pos, T,
        heads, kv_heads, head_dim, cos.data_ptr() if rotate else None, signed_sin.data_ptr() if rotate else None,
        out.data_ptr(), torch.get_num_threads(),
    )
    if status:
        raise MemoryError(f"attention scores for {pos + T} positions")
    return out


def silu_mul(lib: ctypes.CDLL, gate_up: torch.Tensor, threads: int | None = None) -> torch.Tensor:
    """silu(gate) * up for float32 rows [M, 2F] holding [gate | up]; returns [M, F], each row
    bitwise what it gives alone."""
    gate_up = gate_up.contiguous()
    M, F = gate_up.shape[0], gate_up.shape[1] // 2
    out = torch.empty(M, F)
    lib.silu_mul_f32(gate_up.data_ptr(), out.data_ptr(), M, F, threads or torch.get_num_threads())
    return out
