"""Our C kernels for the CPU (cpu_kernels.c): matmul and dequantization on GGUF blocks, RMSNorm,
SwiGLU, attention, and every layer of a model in one call; built once per machine, loaded with
ctypes. Nothing here imports torch: the native backend runs on this and numpy alone, and the
torch backend's CPU path (backends/torch/native.py) calls the same library.

Built with the system C compiler into the user cache (keyed by the source, the compiler and the
CPU, since it is compiled for this CPU's instruction set). Where torch was imported first, the
library's OpenMP calls run on torch's runtime and threads. Where there is no compiler,
`library()` is None: the native backend cannot run, and torch's kernels run instead.
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

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from .. import settings

SOURCE = Path(__file__).with_name("cpu_kernels.c")
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


def default_threads() -> int:
    """OMP_NUM_THREADS where set, else one thread per physical core this process may run on:
    the kernels stream memory, which a core's second hardware thread does not add to (torch's
    own default, for the same reason)."""
    try:
        if (value := int(os.environ.get("OMP_NUM_THREADS", "0"))) > 0:
            return value
    except ValueError:
        pass
    cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else range(os.cpu_count() or 1)
    cores = set()
    for cpu in cpus:
        try:
            cores.add(Path(f"/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list").read_text().strip())
        except OSError:
            cores.add(str(cpu))
    return max(1, len(cores))


def activation_block(ggml_type: GGMLQuantizationType) -> int:
    """Values per int8 activation block: the weight's block (a K-quant's super-block, else 32)."""
    return GGML_QUANT_SIZES[ggml_type][0]


def supports(ggml_type: GGMLQuantizationType, in_features: int) -> bool:
    lib = library()
    return lib is not None and bool(lib.gguf_matmul_supports(int(ggml_type), in_features))


class WeightParts:
    """One weight's rows as one or more arrays of GGUF blocks [rows, row_bytes] (numpy, or
    anything with numpy's array interface), each row contiguous but rows any stride apart (fused
    projections, and Q/K rows in Hugging Face's order, read where they lie in the file), with the
    pointer, row-count and stride arrays the C side takes, built once."""

    def __init__(self, blocks: list):
        views = [np.asarray(b) for b in blocks]
        assert all(v.dtype == np.uint8 and v.ndim == 2 and v.strides[1] == 1 for v in views)
        self.blocks = blocks  # keeps the memory alive
        self.rows = sum(v.shape[0] for v in views)
        self.c_pointers = (ctypes.c_void_p * len(views))(*[v.ctypes.data for v in views])
        self.c_rows = (ctypes.c_int * len(views))(*[v.shape[0] for v in views])
        self.c_strides = (ctypes.c_long * len(views))(*[v.strides[0] for v in views])


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


# Prompt rows per forward where every layer runs here: the layers' temporaries for 128 rows of a
# 3B model are 17 MB (512: 70 MB, on top of the mapped weights at the peak), and the tiles are as
# fast from 128 rows on.
PREFILL_ROWS = 128


def forward_layers(lib: ctypes.CDLL, layers, k_pointers, v_pointers, f16_cache: bool, capacity: int, x: int, rows: int,
                   pos: int, dims: tuple[int, ...], eps: float, cos: int, signed_sin: int, threads: int) -> None:
    """`rows` float32 hidden states at address x (positions pos..pos+rows-1) through every layer
    in place (cpu_kernels.c's forward_layers), filling the caches; cos and signed_sin point at
    the RoPE tables' row pos; dims are (C, H, KV, D, F)."""
    status = lib.forward_layers(layers, len(layers), k_pointers, v_pointers, int(f16_cache), capacity, x, rows, pos,
                                *dims, eps, cos, signed_sin, threads)
    if status == -2:
        raise MemoryError(f"the layers' scratch for {rows} rows")
    if status:
        raise RuntimeError(f"forward_layers failed ({status}) for {rows} rows at position {pos}")


def gguf_matmul(lib: ctypes.CDLL, ggml_type: int, weight: WeightParts, x: np.ndarray, threads: int) -> np.ndarray:
    """x [M, K] float32 @ W^T for W [N, K] held as GGUF blocks; float32 [M, N]. Row m of the result
    is bitwise what x[m] alone gives, whatever M and the thread count."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    M, K = x.shape
    y = np.empty((M, weight.rows), dtype=np.float32)
    status = lib.gguf_matmul(ggml_type, len(weight.blocks), weight.c_pointers, weight.c_rows, weight.c_strides,
                             x.ctypes.data, y.ctypes.data, M, K, threads)
    if status:
        raise RuntimeError(f"gguf_matmul failed ({status}) for type {ggml_type}, K={K}")
    return y
