"""Dequantize GGML tensor types with torch ops: one table row per type.

Weights stay in memory as raw GGUF block bytes (a uint8 tensor [rows, row_bytes], often a
view of the memory-mapped file) and are dequantized one layer at a time for a matmul.
Block layouts are llama.cpp's: the `block_*` structs in ggml/src/ggml-common.h and
`dequantize_row_*` in ggml/src/ggml-quants.c. gguf-py's numpy `gguf.quants.dequantize`
implements the same and is what tests/test_quants.py compares against, bit for bit.

Measured on the 2-core dev CPU (torch 2.13, 2 threads, float32 out, median): a [1536, 576]
Q4_1 tensor (SmolLM2-135M's MLP) in 0.5 ms, a [11008, 2048] Q4_K tensor (SmolLM3-3B's MLP)
in 55-65 ms, of which about 35 ms is the first touch of the fresh 90 MB output. With
another process busy on the second core, 2-thread medians went up to 5x worse.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, NamedTuple

import gguf.quants
import torch
from gguf import GGMLQuantizationType

from .errors import CheckpointError, UnsupportedTensorType


# Weights decoded at a time (16 MB of float32): a slice this small reuses freed buffers
# instead of first-touching fresh pages, which is most of the cost (see above), and a 3B
# model's embedding never has a whole float copy.
SLICE_ELEMS = 1 << 22


def rows_per_slice(row_elems: int, multiple: int = 1) -> int:
    """Rows of `row_elems` weights to work on at a time: about SLICE_ELEMS weights, in whole
    `multiple`s of rows (a kernel layout's row blocks), at least one."""
    return max(multiple, SLICE_ELEMS // row_elems // multiple * multiple)


@dataclass(frozen=True)
class GGMLFormat:
    ggml_type: GGMLQuantizationType
    block_elems: int  # weights per block (1 for F32/F16/BF16)
    block_bytes: int  # bytes per block
    dequantize: Callable[[torch.Tensor], torch.Tensor]  # uint8 [rows, row_bytes] -> float32 [rows, row_elems]
    affine: Callable[[torch.Tensor], "Affine"] | None = None  # blocks -> Affine; None for float types


def _f16(blocks: torch.Tensor, start: int) -> torch.Tensor:
    """The f16 field at byte `start` of each block, as float32 [n, 1]."""
    # A byte slice is strided; viewing bytes as f16 needs them contiguous.
    return blocks[:, start : start + 2].contiguous().view(torch.float16).float()


def _split_bits(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Split bytes into 8 // bits fields, lowest bits first: [..., k] -> [..., 8 // bits, k].

    Shifts and masks int64 words where k allows (the mask repeated in every byte): eight
    bytes per element op is faster than uint8 ops on these short rows, and byte order does
    not matter."""
    words = x.clone(memory_format=torch.contiguous_format)  # x is a strided slice; int64 needs an aligned start
    if x.shape[-1] % 8 == 0:
        words = words.view(torch.int64)
    mask = int.from_bytes(bytes([(1 << bits) - 1]) * words.element_size(), "little")
    fields = [(words >> shift) & mask for shift in range(0, 8, bits)]
    return torch.cat(fields, dim=-1).view(torch.uint8).unflatten(-1, (8 // bits, -1))


def _k_scales(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K/Q5_K's 8 scales and 8 mins, 6 bits each, packed in 12 bytes (get_scale_min_k4):
    sub-blocks 0-3 in the low 6 bits of bytes 0-3 (scales) and 4-7 (mins); sub-blocks 4-7
    take their low 4 bits from the nibbles of bytes 8-11 and their top 2 bits from the top
    bits of bytes 0-3 (scales) and 4-7 (mins)."""
    sc, mn, lo = scales[:, 0:4], scales[:, 4:8], scales[:, 8:12]
    return (
        torch.cat((sc & 63, (lo & 15) | ((sc >> 2) & 48)), dim=-1),
        torch.cat((mn & 63, (lo >> 4) | ((mn >> 2) & 48)), dim=-1),
    )


class Affine(NamedTuple):
    """n blocks of weights as scale * (q - zero) + offset per group: q [n, groups, group_size]
    (integer codes), scale and offset float32 [n, groups, 1]. Every GGML type is one of these,
    which is what lets a backend repack a type into its own kernel's layout."""

    q: torch.Tensor
    scale: torch.Tensor
    zero: int = 0
    offset: torch.Tensor | None = None

    def dequantize(self) -> torch.Tensor:
        """float32 [n, groups * group_size], in gguf-py's order of operations (so results are
        bit-equal), on one fresh float32 tensor: first-touching that output is most of the cost
        (about 35 of 50 ms for 22.5M weights), so the integer work before it stays in uint8 and
        the float work happens in place."""
        w = self.q.to(torch.float32, memory_format=torch.contiguous_format)
        if self.zero:
            w.sub_(self.zero)
        w.mul_(self.scale)
        if self.offset is not None:
            w.add_(self.offset)
        return w.reshape(w.shape[0], -1)


# Each function below maps blocks (uint8 [n, block_bytes]) to their Affine form.


def _q8_0(b: torch.Tensor) -> torch.Tensor:  # d, int8 qs[32]
    return Affine(b[:, 2:].view(torch.int8).unsqueeze(1), _f16(b, 0).unsqueeze(-1))


def _q4_0(b: torch.Tensor) -> torch.Tensor:  # d, qs[16]; weight j is the low nibble of qs[j], j+16 the high
    return Affine(_split_bits(b[:, 2:], 4).reshape(-1, 1, 32), _f16(b, 0).unsqueeze(-1), zero=8)


def _q4_1(b: torch.Tensor) -> torch.Tensor:  # d, m, qs[16]
    return Affine(_split_bits(b[:, 4:], 4).reshape(-1, 1, 32), _f16(b, 0).unsqueeze(-1), offset=_f16(b, 2).unsqueeze(-1))


def _q5(b: torch.Tensor, qh_at: int) -> torch.Tensor:
    """Q5_0/Q5_1's 5-bit values: 4 low bits as in Q4_0, bit 4 of weight j is bit j of the u32 qh."""
    # Byte i of qh holds the bits of weights 8i..8i+7: expand each byte into 8 bytes of 0/1
    # through a 256-entry table (ggml's table_b2b), read as int64 so one lookup gives 8 weights.
    arange = torch.arange(256, device=b.device)
    bytes_of_bits = ((arange.unsqueeze(-1) >> arange[:8]) & 1).to(torch.uint8)
    qh = bytes_of_bits.view(torch.int64).squeeze(-1)[b[:, qh_at : qh_at + 4].long()].view(torch.uint8)
    return _split_bits(b[:, qh_at + 4 :], 4).reshape(-1, 32) | (qh << 4)


def _q5_0(b: torch.Tensor) -> torch.Tensor:  # d, qh[4], qs[16]
    return Affine(_q5(b, 2).unsqueeze(1), _f16(b, 0).unsqueeze(-1), zero=16)


def _q5_1(b: torch.Tensor) -> torch.Tensor:  # d, m, qh[4], qs[16]
    return Affine(_q5(b, 4).unsqueeze(1), _f16(b, 0).unsqueeze(-1), offset=_f16(b, 2).unsqueeze(-1))


def _q2_k(b: torch.Tensor) -> torch.Tensor:  # scales[16] (low nibble scale, high min), qs[64], d, dmin
    scales = b[:, :16]
    q = _split_bits(b[:, 16:80].reshape(-1, 2, 32), 2).reshape(-1, 16, 16)
    d = _f16(b, 80) * (scales & 15)
    m = _f16(b, 82) * (scales >> 4)
    return Affine(q, d.unsqueeze(-1), offset=-m.unsqueeze(-1))


def _q3_k(b: torch.Tensor) -> torch.Tensor:  # hmask[32], qs[64], scales[12], d
    # 16 6-bit scales: low 4 bits are the nibbles of bytes 0-7, top 2 bits the pairs of bytes 8-11.
    scales = _split_bits(b[:, 96:104], 4).reshape(-1, 16) | (_split_bits(b[:, 104:108], 2).reshape(-1, 16) << 4)
    d = _f16(b, 108) * (scales.view(torch.int8) - 32)
    low = _split_bits(b[:, 32:96].reshape(-1, 2, 32), 2).reshape(-1, 16, 16)
    high = _split_bits(b[:, :32], 1).reshape(-1, 16, 16)
    # A clear hmask bit subtracts 4 (llama.cpp: `(hm[l] & m) ? 0 : 4`).
    return Affine(low | (high << 2), d.unsqueeze(-1), zero=4)


def _q4_k(b: torch.Tensor) -> torch.Tensor:  # d, dmin, scales[12], qs[128]: 8 sub-blocks of 32
    sc, mn = _k_scales(b[:, 4:16])
    q = _split_bits(b[:, 16:].reshape(-1, 4, 32), 4).reshape(-1, 8, 32)
    return Affine(q, (_f16(b, 0) * sc).unsqueeze(-1), offset=-(_f16(b, 2) * mn).unsqueeze(-1))


def _q5_k(b: torch.Tensor) -> torch.Tensor:  # d, dmin, scales[12], qh[32], qs[128]
    sc, mn = _k_scales(b[:, 4:16])
    # Bit 4 of sub-block s's weight l is bit s of qh[l].
    q = _split_bits(b[:, 48:].reshape(-1, 4, 32), 4).reshape(-1, 8, 32) | (_split_bits(b[:, 16:48], 1) << 4)
    return Affine(q, (_f16(b, 0) * sc).unsqueeze(-1), offset=-(_f16(b, 2) * mn).unsqueeze(-1))


def _q6_k(b: torch.Tensor) -> torch.Tensor:  # ql[128], qh[64], int8 scales[16], d: 16 sub-blocks of 16
    low = _split_bits(b[:, :128].reshape(-1, 2, 64), 4).reshape(-1, 16, 16)
    high = _split_bits(b[:, 128:192].reshape(-1, 2, 32), 2).reshape(-1, 16, 16)
    d = _f16(b, 208) * b[:, 192:208].view(torch.int8)
    return Affine(low | (high << 4), d.unsqueeze(-1), zero=32)


def _gguf_py(ggml_type: GGMLQuantizationType):
    """The IQ types (codebooks and sign grids, no Affine form): gguf-py's numpy dequantizer, exact
    and slow; backends dequantize these per matmul, where the faster kernels do not take them."""

    def blocks_to_float(blocks: torch.Tensor) -> torch.Tensor:
        values = gguf.quants.dequantize(blocks.cpu().numpy(), ggml_type)
        return torch.from_numpy(values).to(blocks.device)

    return blocks_to_float


def _format(ggml_type: GGMLQuantizationType, block_elems: int, block_bytes: int, blocks_fn, affine: bool = True) -> GGMLFormat:
    """blocks_fn maps blocks to their Affine form (quantized types) or straight to float32 (float
    types, and the quantized types without an Affine form: affine=False)."""
    affine = blocks_fn if block_elems > 1 and affine else None

    def dequantize_rows(raw: torch.Tensor) -> torch.Tensor:
        blocks = _whole_blocks(raw, ggml_type, block_bytes)
        weights = affine(blocks).dequantize() if affine else blocks_fn(blocks)
        return weights.reshape(*raw.shape[:-1], -1)

    return GGMLFormat(ggml_type, block_elems, block_bytes, dequantize_rows, affine)


def _whole_blocks(raw: torch.Tensor, ggml_type: GGMLQuantizationType, block_bytes: int) -> torch.Tensor:
    if raw.shape[-1] % block_bytes:
        raise CheckpointError(f"{ggml_type.name} rows of {raw.shape[-1]} bytes are not whole {block_bytes}-byte blocks")
    return raw.reshape(-1, block_bytes)


_T = GGMLQuantizationType
GGML_FORMATS: dict[GGMLQuantizationType, GGMLFormat] = {
    f.ggml_type: f
    for f in (
        _format(_T.F32, 1, 4, lambda b: b.view(torch.float32)),
        _format(_T.F16, 1, 2, lambda b: b.view(torch.float16).float()),
        _format(_T.BF16, 1, 2, lambda b: b.view(torch.bfloat16).float()),
        _format(_T.Q8_0, 32, 34, _q8_0),
        _format(_T.Q4_0, 32, 18, _q4_0),
        _format(_T.Q4_1, 32, 20, _q4_1),
        _format(_T.Q5_0, 32, 22, _q5_0),
        _format(_T.Q5_1, 32, 24, _q5_1),
        _format(_T.Q2_K, 256, 84, _q2_k),
        _format(_T.Q3_K, 256, 110, _q3_k),
        _format(_T.Q4_K, 256, 144, _q4_k),
        _format(_T.Q5_K, 256, 176, _q5_k),
        _format(_T.Q6_K, 256, 210, _q6_k),
        *(
            _format(t, *gguf.GGML_QUANT_SIZES[t], _gguf_py(t), affine=False)
            for t in (_T.IQ1_S, _T.IQ1_M, _T.IQ2_XXS, _T.IQ2_XS, _T.IQ2_S, _T.IQ3_XXS, _T.IQ3_S, _T.IQ4_NL, _T.IQ4_XS)
        ),
    )
}


def ggml_format(ggml_type: GGMLQuantizationType | int, tensor_name: str) -> GGMLFormat:
    """The table row for `ggml_type`, or UnsupportedTensorType naming the tensor and its type."""
    try:
        ggml_type = GGMLQuantizationType(ggml_type)
    except ValueError:  # a type id newer than the installed gguf package, or garbage
        pass
    fmt = GGML_FORMATS.get(ggml_type)
    if fmt is None:
        name = getattr(ggml_type, "name", str(ggml_type))
        supported = ", ".join(t.name for t in GGML_FORMATS)
        raise UnsupportedTensorType(
            f"tensor '{tensor_name}' has GGML type {name}, which smollm3 does not support (supported: {supported})"
        )
    return fmt


def dequantize(raw: torch.Tensor, ggml_type: GGMLQuantizationType | int, out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 [rows, row_bytes] (any device; read-only views are fine) -> [rows, row_elems] in out_dtype.

    F32 to float32 returns a view of `raw`, not a copy."""
    return ggml_format(ggml_type, "<unnamed>").dequantize(raw).to(out_dtype)


def affine_rows(raw: torch.Tensor, ggml_type: GGMLQuantizationType | int, tensor_name: str) -> Affine:
    """A quantized tensor's rows uint8 [rows, row_bytes] as one Affine over whole rows:
    q [rows, groups, group_size], scale/offset [rows, groups, 1]."""
    fmt = ggml_format(ggml_type, tensor_name)
    if fmt.affine is None:
        raise ValueError(f"tensor '{tensor_name}' is {fmt.ggml_type.name}, not a quantized type")
    a = fmt.affine(_whole_blocks(raw, fmt.ggml_type, fmt.block_bytes))
    rows = raw.shape[0]
    offset = None if a.offset is None else a.offset.reshape(rows, -1, 1)
    return Affine(a.q.reshape(rows, -1, a.q.shape[-1]), a.scale.reshape(rows, -1, 1), a.zero, offset)
