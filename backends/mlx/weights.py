"""Checkpoint tensors as MLX arrays: GGML blocks repacked into MLX's affine quantization.

MLX's quantized layers compute w = scale * q + bias per group of `group_size` weights along a
row, with q packed as a little-endian bit stream in uint32 words (element i of a row occupies
bits [i * bits, (i + 1) * bits); checked against mx.quantize / mx.dequantize in the tests).
Every GGML type is scale * (q - zero) + offset per block (`backends.quants.Affine`), so:

- Q4_0, Q4_1, Q4_K (4 bits), Q5_0, Q5_1, Q5_K (5 bits) and Q8_0 (8 bits, q + 128) map
  exactly onto MLX groups of 32: bias = offset - zero * scale.
- Q6_K, Q3_K and Q2_K have sub-blocks of 16, and MLX groups are 32, 64 or 128: their exactly
  dequantized weights are re-quantized to 8 bits, group 32, by each group's min and max. That
  moves a weight by at most (max - min) / 510; for Q6_K (step s = d*|sc|, range up to 63 s)
  about s/8, a quarter of Q6_K's own rounding (so, by that estimate, the RMS error versus the
  original weights grows by about 3%). Measured on random blocks: 0.39% of the group's max|w|.
  6 bits would be 4x that; a dense copy would be exact in f32 but 2-4 bytes a weight.
- F32, F16, BF16 become dense arrays in the compute dtype; an MLX checkpoint's packed U32
  weights (`RawTensor.is_mlx_packed`) stay as they are, beside their .scales and .biases.

Work goes in row slices, so a 3B model's embedding never has a full float32 copy.
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager
from dataclasses import dataclass

import mlx.core as mx
import numpy as np
import torch
from gguf import GGMLQuantizationType as T

from ..checkpoint import RawTensor
from ..errors import CheckpointError
from ..quants import affine_rows, dequantize, ggml_format, rows_per_slice

GROUP = 32  # every GGML block type is whole groups of 32 along a row
DENSE_TYPES = (T.F32, T.F16, T.BF16)


@dataclass(frozen=True)
class MLXForm:
    """How one GGML type is held in MLX: `bits` per weight in groups of 32; exact or re-quantized."""

    bits: int
    exact: bool


# Adding a GGML type is adding a row (and its Affine form in backends/quants.py).
MLX_FORMS: dict[T, MLXForm] = {
    T.Q4_0: MLXForm(4, True),
    T.Q4_1: MLXForm(4, True),
    T.Q4_K: MLXForm(4, True),
    T.Q5_0: MLXForm(5, True),
    T.Q5_1: MLXForm(5, True),
    T.Q5_K: MLXForm(5, True),
    T.Q8_0: MLXForm(8, True),
    T.Q6_K: MLXForm(8, False),
    T.Q3_K: MLXForm(8, False),
    T.Q2_K: MLXForm(8, False),
}


def pack_bits(q: np.ndarray, bits: int) -> np.ndarray:
    """Integer codes [rows, n] (each < 2**bits, n a multiple of 32) -> uint32 [rows, n * bits / 32],
    as mx.quantize packs them: a little-endian bit stream."""
    rows, n = q.shape
    if bits == 8:
        packed = q.astype(np.uint8, copy=False)
    elif bits == 4:
        pairs = q.astype(np.uint8, copy=False).reshape(rows, n // 2, 2)
        packed = pairs[..., 0] | (pairs[..., 1] << 4)
    else:  # 8 codes fill `bits` bytes exactly: build them in a uint64 and keep its low bytes
        eights = q.astype(np.uint64).reshape(rows, n // 8, 8) << (np.arange(8, dtype=np.uint64) * bits)
        packed = np.bitwise_or.reduce(eights, axis=-1).view(np.uint8).reshape(rows, n // 8, 8)[..., :bits]
    return np.ascontiguousarray(packed).reshape(rows, -1).view(np.uint32)


def requantize(w: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """float32 [rows, n] (overwritten) -> (packed, scale, bias) by each group's min and max, so
    that no weight moves more than half a step, (max - min) / (2**bits - 1) / 2. (mx.quantize
    keeps the larger-magnitude end exact instead and moves others by up to a whole step.)"""
    rows = w.shape[0]
    groups = w.reshape(rows, -1, GROUP)
    lo, hi = groups.min(-1, keepdims=True), groups.max(-1, keepdims=True)
    scale = (hi - lo) / (2**bits - 1)
    groups -= lo
    groups *= np.divide(1, scale, out=np.zeros_like(scale), where=scale > 0)
    q = np.rint(groups, out=groups).astype(np.uint8)  # within [0, 2**bits - 1] up to rounding
    return pack_bits(q.reshape(rows, -1), bits), scale.reshape(rows, -1), lo.reshape(rows, -1)


def _torch_rows(data: np.ndarray) -> torch.Tensor:
    with warnings.catch_warnings():  # the mapped file is read-only; nothing writes through this
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(np.ascontiguousarray(data))


def dense_array(raw: RawTensor, dtype: mx.Dtype) -> mx.array:
    data = np.ascontiguousarray(raw.data)
    if raw.is_mlx_packed:
        return mx.array(data.view(np.uint32)).reshape(raw.shape)
    if raw.ggml_type == T.BF16:  # numpy has no bfloat16: carry the bits
        arr = mx.array(data.view(np.uint16)).view(mx.bfloat16)
    elif raw.ggml_type in DENSE_TYPES:
        arr = mx.array(data.view(np.float32 if raw.ggml_type == T.F32 else np.float16))
    else:
        arr = mx.array(dequantize(_torch_rows(raw.data), raw.ggml_type).numpy())
    return arr.reshape(raw.shape).astype(dtype)


def quantized_arrays(raw: RawTensor, dtype: mx.Dtype) -> tuple[mx.array, mx.array, mx.array]:
    """(weight uint32, scales, biases) for an nn.QuantizedLinear/QuantizedEmbedding with group 32
    and MLX_FORMS[type].bits; scales and biases in `dtype`."""
    rows, cols = raw.shape if len(raw.shape) == 2 else (0, 1)
    if len(raw.shape) != 2 or cols % GROUP:
        raise CheckpointError(f"tensor '{raw.name}' of shape {raw.shape} cannot be held in groups of {GROUP}")
    bits = MLX_FORMS[raw.ggml_type].bits
    packed = np.empty((rows, cols * bits // 32), np.uint32)
    scale, bias = np.empty((rows, cols // GROUP), np.float32), np.empty((rows, cols // GROUP), np.float32)
    step = rows_per_slice(cols)
    for i in range(0, rows, step):
        packed[i : i + step], scale[i : i + step], bias[i : i + step] = _repack_rows(raw, raw.data[i : i + step])
    return mx.array(packed), mx.array(scale).astype(dtype), mx.array(bias).astype(dtype)


def _repack_rows(raw: RawTensor, data: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows of GGML blocks -> (packed codes, scale, bias) [rows, n * bits / 32], [rows, n / 32] x2."""
    form = MLX_FORMS[raw.ggml_type]
    if not form.exact:
        return requantize(dequantize(_torch_rows(data), raw.ggml_type).numpy(), form.bits)
    a = affine_rows(_torch_rows(data), raw.ggml_type, raw.name)
    if a.q.shape[-1] != GROUP:
        raise CheckpointError(f"tensor '{raw.name}': {raw.ggml_type.name} groups are not {GROUP} wide")
    q, scale, zero = a.q.numpy(), a.scale.numpy(), a.zero
    if q.dtype == np.int8:  # Q8_0: MLX codes are unsigned
        q, zero = (q.astype(np.int16) + 128).astype(np.uint8), zero + 128
    bias = -zero * scale if a.offset is None else a.offset.numpy() - zero * scale
    rows = len(data)
    return pack_bits(q.reshape(rows, -1), form.bits), scale.reshape(rows, -1), bias.reshape(rows, -1)


def holds_quantized(raw: RawTensor) -> bool:
    if raw.ggml_type in DENSE_TYPES or raw.is_mlx_packed:
        return False
    ggml_format(raw.ggml_type, raw.name)  # unknown types: UnsupportedTensorType naming the tensor
    return raw.ggml_type in MLX_FORMS and len(raw.shape) == 2


def tensor_arrays(name: str, raw: RawTensor, dtype: mx.Dtype) -> tuple[list[tuple[str, mx.array]], dict | bool]:
    """A checkpoint tensor as (parameter name, array) pairs, and the arguments nn.quantize
    gives its module (False: it stays dense). Evaluated now, so the file's pages can go."""
    if not holds_quantized(raw):
        arrays, quantization = [(name, dense_array(raw, dtype))], False
    else:
        module = name.removesuffix(".weight")
        parts = (name, f"{module}.scales", f"{module}.biases")
        arrays = list(zip(parts, quantized_arrays(raw, dtype)))
        quantization = {"group_size": GROUP, "bits": MLX_FORMS[raw.ggml_type].bits}
    mx.eval([a for _, a in arrays])
    return arrays, quantization


@contextmanager
def one_torch_thread():
    """Block decoding (backends/quants.py) runs in torch, tensor by tensor: a second thread
    gains little there, and on a busy 2-core CPU it made decoding SmolLM2's blocks 60x slower
    (measured: 70 ms instead of 1.1 ms for a [1536, 576] Q4_1 tensor)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
