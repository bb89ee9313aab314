"""Our C kernels for the CPU (native/cpu_kernels.c): matmul and dequantization on GGUF blocks,
plus RMSNorm, SwiGLU and attention; built once per machine, loaded with ctypes.

Built with the system C compiler into the user cache (keyed by the source, the compiler and
the CPU, since it is compiled for this CPU's instruction set) and loaded after torch, so its
OpenMP calls run on torch's runtime and threads. Where there is no compiler, `library()` is
None and the torch kernels in weights.py run instead.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from .. import settings

SOURCE = Path(__file__).with_name("native") / "cpu_kernels.c"
# The types the C side's table holds (tests check the two agree; supports() asks the library).
TYPES = tuple(
    GGMLQuantizationType[name]
    for name in ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_NL", "IQ4_XS")
)


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "smollm3" / "kernels"


def _cpu_signature() -> str:
    try:  # -march=native code must not travel to another CPU through a shared home directory
        flags = [line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith(("flags", "model name"))]
        return "\n".join(flags[:2])
    except OSError:
        return platform.processor()


def build(compiler: str, scalar: bool = False) -> Path:
    """Compile (or find already compiled) the library; raises OSError/CalledProcessError on failure."""
    flags = ["-O3", "-fPIC", "-shared", "-fopenmp", "-std=c11"]
    flags += ["-DSMOLLM3_SCALAR"] if scalar else ["-march=native"]
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
    key = hashlib.sha256("\0".join([SOURCE.read_text(), version, " ".join(flags), _cpu_signature()]).encode()).hexdigest()[:16]
    target = cache_dir() / f"gguf_matmul-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:  # atomic: a half-written .so is never loaded
        out = Path(tmp) / target.name
        subprocess.run([compiler, *flags, str(SOURCE), "-o", str(out), "-lm"], check=True, capture_output=True, timeout=120)
        os.replace(out, target)
    return target


def load(path: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))
    lib.gguf_matmul.argtypes = [ctypes.c_int, ctypes.c_int] + [ctypes.c_void_p] * 5 + [ctypes.c_int] * 3
    lib.gguf_matmul.restype = ctypes.c_int
    lib.rms_norm_f32.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int] * 2 + [ctypes.c_float]
    lib.rms_norm_f32.restype = None
    pointers, ints = [ctypes.c_void_p] * 3, [ctypes.c_int] * 7
    lib.attend_f32.argtypes = pointers + [ctypes.c_long] + pointers[:2] + ints + pointers + [ctypes.c_int]
    lib.attend_f32.restype = ctypes.c_int
    lib.silu_mul_f32.argtypes = [ctypes.c_void_p] * 2 + [ctypes.c_int] * 3
    lib.silu_mul_f32.restype = None
    lib.forward_layers.argtypes = [ctypes.c_void_p, ctypes.c_int] + pointers[:2] + [ctypes.c_int] * 2 + [ctypes.c_void_p] \
        + [ctypes.c_int] * 7 + [ctypes.c_float] + pointers[:2] + [ctypes.c_int]
    lib.forward_layers.restype = ctypes.c_int
    lib.gguf_matmul_supports.argtypes = [ctypes.c_int, ctypes.c_int]
    lib.gguf_matmul_simd.restype = ctypes.c_int
    lib.gguf_matmul_amx.restype = ctypes.c_int
    lib.gguf_matmul_allow_amx.argtypes = [ctypes.c_int]
    lib.gguf_matmul_allow_amx.restype = None
    return lib


def compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")


def library() -> ctypes.CDLL | None:
    """The built library, or None (no C compiler or no OpenMP, or SMOLLM3_NATIVE=0), with
    SMOLLM3_AMX applied as it reads now."""
    if not settings.native_kernels():
        return None
    lib = _built_library()
    if lib is not None:
        lib.gguf_matmul_allow_amx(int(settings.amx()))
    return lib


@functools.cache
def _built_library() -> ctypes.CDLL | None:
    if (cc := compiler()) is None:
        return None
    try:
        return load(build(cc))
    except (OSError, subprocess.SubprocessError):
        return None


def activation_block(ggml_type: GGMLQuantizationType) -> int:
    """Values per int8 activation block: the weight's block (a K-quant's super-block, else 32)."""
    return GGML_QUANT_SIZES[ggml_type][0]


def supports(ggml_type: GGMLQuantizationType, in_features: int) -> bool:
    lib = library()
    return lib is not None and bool(lib.gguf_matmul_supports(int(ggml_type), in_features))


class WeightParts:
    """One weight's rows as one or more tensors of GGUF blocks [rows, row_bytes], each row
    contiguous but rows any stride apart (fused projections, and Q/K rows in Hugging Face's order,
    read where they lie in the file), with the pointer, row-count and stride arrays the C side
    takes, built once."""

    def __init__(self, blocks: list[torch.Tensor]):
        assert all(b.dtype == torch.uint8 and b.stride(-1) == 1 for b in blocks)
        self.blocks = blocks  # keeps the memory alive
        self.rows = sum(b.shape[0] for b in blocks)
        self.c_pointers = (ctypes.c_void_p * len(blocks))(*[b.data_ptr() for b in blocks])
        self.c_rows = (ctypes.c_int * len(blocks))(*[b.shape[0] for b in blocks])
        self.c_strides = (ctypes.c_long * len(blocks))(*[b.stride(0) for b in blocks])


class Segment(ctypes.Structure):
    _fields_ = [("type", ctypes.c_int), ("parts", ctypes.c_int), ("rows", ctypes.c_int), ("w", ctypes.c_void_p),
                ("part_rows", ctypes.c_void_p), ("part_stride", ctypes.c_void_p)]


class LinearMap(ctypes.Structure):
    _fields_ = [("segments", ctypes.c_int), ("seg", Segment * 3)]


class DecoderLayer(ctypes.Structure):
    """One layer's weights as forward_layers (cpu_kernels.c) takes them."""

    _fields_ = [("attn_norm", ctypes.c_void_p), ("ffn_norm", ctypes.c_void_p), ("qkv", LinearMap), ("o", LinearMap),
                ("gate_up", LinearMap), ("down", LinearMap), ("rope", ctypes.c_int)]


def linear_map(segments: list[tuple[int, WeightParts]]) -> LinearMap:
    """A linear map of one input as (GGML type id, weight) segments, outputs side by side."""
    if not 1 <= len(segments) <= 3:
        raise ValueError(f"a linear map of {len(segments)} segments")
    out = LinearMap(segments=len(segments))
    for i, (type_id, parts) in enumerate(segments):
        out.seg[i] = Segment(type_id, len(parts.blocks), parts.rows, ctypes.cast(parts.c_pointers, ctypes.c_void_p),
                             ctypes.cast(parts.c_rows, ctypes.c_void_p), ctypes.cast(parts.c_strides, ctypes.c_void_p))
    return out


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
