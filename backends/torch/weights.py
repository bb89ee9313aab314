"""torch modules over checkpoint tensors: one handler per way of holding a weight.

- `DenseLinear`: float weights (safetensors), in the compute dtype.
- `Int4Linear`: the types with groups of 32 on torch's int4 weight-only matmul
  (`_weight_int4pack_mm*`, no compiler needed): Q4_0, Q4_1, Q4_K as one plane of 4-bit codes,
  Q8_0 and Q5_x as two planes (high and low nibbles) that sum to the weights. The codes map
  exactly (w = (q - 8) * scale + zero per group of 32); scales, zeros, activations and outputs
  are bf16, the kernel's dtype (at most 0.26% of max|w| for Q4_K's scales).
- `GroupedLinear`: the group-16 types (Q6_K, Q3_K, Q2_K) as int8 codes with a float scale (and
  offset) per group, exact. Decoding one token runs a fused, compiled dequantize-and-reduce
  that reads each weight byte once; longer inputs dequantize row slices into a GEMM.
- `NativeLinear`: the raw blocks on the CPU, multiplied by our C kernel (native.py): no repacking,
  no second copy, the file's bytes per weight. Activations are int8 per block, as in llama.cpp.
- `GGMLLinear`: the raw blocks, dequantized per call. The reference path, and the fallback
  where the others are unavailable (`SMOLLM3_KERNELS=reference`).

Decode is memory-bound (every weight is read once per token) and prefill compute-bound, so
the fast handlers keep bytes per weight near the file's and prefill on the best GEMM at hand.
"""

from __future__ import annotations

import functools
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType
from torch import nn

from .. import settings
from ..checkpoint import RawTensor, concat_rows
from ..quants import Affine, affine_rows, dequantize, ggml_format, rows_per_slice
from . import native

DENSE_TYPES = (GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16)


def _mapped_tensor(data: np.ndarray) -> torch.Tensor:
    with warnings.catch_warnings():
        # The mmap is read-only; we never write through this tensor.
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(data) if data.size else torch.zeros(data.shape, dtype=torch.uint8)


def raw_to_torch(raw: RawTensor, device: torch.device) -> torch.Tensor:
    data = _mapped_tensor(raw.data)
    return data.to(device) if device.type != "cpu" else data


def dense(raw: RawTensor, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A float tensor in `dtype`, copied out of the mapped file (never a view of it)."""
    data = raw_to_torch(raw, device)
    weight = dequantize(data, raw.ggml_type, dtype).reshape(raw.shape)
    return weight.clone() if weight.data_ptr() == data.data_ptr() else weight.contiguous()


def _sliced_linear(x: torch.Tensor, out_features: int, in_features: int, weight_rows) -> torch.Tensor:
    """x @ W^T with W produced `rows_per_slice` rows at a time by weight_rows(start, end)."""
    step = rows_per_slice(in_features)
    if out_features <= step:
        return F.linear(x, weight_rows(0, out_features))
    return torch.cat([F.linear(x, weight_rows(i, min(i + step, out_features))) for i in range(0, out_features, step)], -1)


class DenseLinear(nn.Module):
    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.out_features, self.in_features = weight.shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)

    def rows(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return self.weight[ids].to(dtype)


class GGMLLinear(nn.Module):
    """y = x W^T with W kept as GGML blocks [out_features, row_bytes]."""

    def __init__(self, raw: RawTensor, device: torch.device):
        super().__init__()
        ggml_format(raw.ggml_type, raw.name)  # fail at load, naming the tensor, not at the first matmul
        self.ggml_type = raw.ggml_type
        self.out_features, self.in_features = raw.shape
        self.register_buffer("blocks", raw_to_torch(raw, device), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _sliced_linear(
            x, self.out_features, self.in_features, lambda i, j: dequantize(self.blocks[i:j], self.ggml_type, x.dtype)
        )

    def rows(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Dequantized rows `ids` of W: an embedding lookup that touches only those rows."""
        return dequantize(self.blocks[ids], self.ggml_type, dtype)

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, {self.ggml_type.name}"


class NativeLinear(nn.Module):
    """The raw blocks, as views of the mapped file (fused projections as their parts, where they
    lie), multiplied by the C kernels; row lookups (embeddings) dequantize as GGMLLinear does."""

    def __init__(self, raws: list[RawTensor], device: torch.device):
        super().__init__()
        self.ggml_type, self.type_id = raws[0].ggml_type, int(raws[0].ggml_type)
        self.in_features, self.out_features = raws[0].shape[1], sum(raw.shape[0] for raw in raws)
        runs = [run for raw in raws for run in raw.row_runs()]  # Q/K rows read where they lie, in HF order
        for i, run in enumerate(runs):
            self.register_buffer(f"blocks{i}", _mapped_tensor(run), persistent=False)
        self.weight = native.WeightParts([getattr(self, f"blocks{i}") for i in range(len(runs))])
        self.lib = native.library()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, in_features], as every handler here takes it. Prefill and decode both quantize
        activations to int8 per block, as llama.cpp does, so a prompt gives the same answer
        however it is split. A bf16 GEMM is faster where the CPU has AMX, but it changes the real model's
        greedy answers (rounding weights and outputs to bf16 is coarser than int8 activations
        on the exact weights)."""
        y = native.gguf_matmul(self.lib, self.type_id, self.weight, x)
        return y if x.dtype == torch.float32 else y.to(x.dtype)

    def rows(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Dequantized rows `ids` of W: an embedding lookup that touches only those rows."""
        blocks = self.weight.blocks[0] if len(self.weight.blocks) == 1 else torch.cat(self.weight.blocks)
        return dequantize(blocks[ids], self.ggml_type, dtype)

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, {self.ggml_type.name} in {len(self.weight.blocks)} part(s), native"


class FusedLinear(nn.Module):
    """Linear maps of one input (q, k, v; gate, up) held in parts of different types (a
    Q4_K_M file's Q6_K attn_v beside Q4_K q and k): one matmul per part, outputs side by side."""

    def __init__(self, parts: list[nn.Module]):
        super().__init__()
        self.parts = nn.ModuleList(parts)
        self.out_features = sum(part.out_features for part in parts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([part(x) for part in self.parts], -1)

    def extra_repr(self) -> str:
        return f"{len(self.parts)} parts, {self.out_features} outputs"


# --- grouped int8: any quantized GGML type, exact ---


def grouped_gemv(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor | None) -> torch.Tensor:
    """x [T, K] @ (scale * q + offset)^T, as per-group partial dots, for torch.compile to fuse
    into one pass over q: q int8 [N, G, g]; scale, offset float32 [N, G, 1]."""
    T = x.shape[0]
    N, G, g = q.shape
    xg = x.float().view(T, 1, G, g)
    partial = (q.to(torch.float32) * xg).sum(-1, keepdim=True)  # [T, N, G, 1]
    y = (partial * scale.float()).sum((-1, -2))
    if offset is not None:  # sum_j (s q_j + o) x_j = s (q . x) + o sum_j x_j
        y = y + xg.sum(-1).view(T, G) @ offset.float().view(N, G).t()
    return y.to(x.dtype)


@functools.cache
def compiled_gemv():
    """The fused kernel, or None where torch.compile cannot build one (no C++ compiler...)."""
    if not settings.compile_kernels():
        return None
    import torch._dynamo

    # One compiled variant per weight shape (a model has a handful): lift the default cap of 8.
    torch._dynamo.config.recompile_limit = 64
    fn = torch.compile(grouped_gemv, dynamic=False)
    try:
        x = torch.randn(1, 64)
        q = torch.randint(-8, 8, (4, 2, 32), dtype=torch.int8)
        s, o = torch.rand(4, 2, 1), torch.rand(4, 2, 1)
        if not torch.allclose(fn(x, q, s, o), grouped_gemv(x, q, s, o), atol=1e-4):
            return None
    except Exception:  # no compiler, unsupported platform: the GEMM path still works
        return None
    return fn


def _narrowest_exact(values: torch.Tensor) -> torch.Tensor:
    """float16 where that holds the values exactly (Q8_0's and Q4_0's scales are f16 in the file):
    decode reads every byte of the weight each token, so smaller scales are faster scales."""
    half = values.half()
    return (half if torch.equal(half.float(), values) else values).contiguous()


class GroupedLinear(nn.Module):
    def __init__(self, raw: RawTensor, device: torch.device):
        super().__init__()
        self.ggml_type = raw.ggml_type
        self.out_features, self.in_features = raw.shape
        blocks = raw_to_torch(raw, device)
        # A few thousand rows at a time: the unpacking temporaries stay in cache instead of
        # first-touching fresh memory (a 128k-row embedding repacks several times faster).
        step = rows_per_slice(self.in_features)
        q = scale = offset = None
        for start in range(0, self.out_features, step):
            a = affine_rows(blocks[start : start + step], raw.ggml_type, raw.name)
            if q is None:
                groups, size = a.q.shape[1:]
                q = torch.empty(self.out_features, groups, size, dtype=torch.int8, device=device)
                scale = torch.empty(self.out_features, groups, 1, device=device)
                offset = None if a.offset is None else torch.empty_like(scale)
            # Codes as int8 with the zero point folded in: every GGML code is below 128 and
            # |q - zero| <= 128, so the uint8 codes are reinterpreted, not converted.
            rows = q[start : start + step]
            rows.copy_(a.q.view(torch.int8) if a.q.dtype == torch.uint8 else a.q)
            if a.zero:
                rows.sub_(a.zero)
            scale[start : start + step] = a.scale
            if offset is not None:
                offset[start : start + step] = a.offset
        self.register_buffer("q", q, persistent=False)
        self.register_buffer("scale", _narrowest_exact(scale), persistent=False)
        self.register_buffer("offset", None if offset is None else _narrowest_exact(offset), persistent=False)

    def weight_rows(self, start: int, end: int, dtype: torch.dtype) -> torch.Tensor:
        offset = None if self.offset is None else self.offset[start:end]
        return Affine(self.q[start:end], self.scale[start:end], 0, offset).dequantize().to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gemv = compiled_gemv() if x.shape[0] == 1 else None
        if gemv is not None:
            return gemv(x, self.q, self.scale, self.offset)
        return _sliced_linear(x, self.out_features, self.in_features, lambda i, j: self.weight_rows(i, j, x.dtype))

    def rows(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        offset = None if self.offset is None else self.offset[ids]
        return Affine(self.q[ids], self.scale[ids], 0, offset).dequantize().to(dtype)

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, {self.ggml_type.name} as int8 groups of {self.q.shape[-1]}"


# --- int4: Q4_0, Q4_1, Q4_K ---

INT4_GROUP = 32


def int4_pack(q: torch.Tensor, device: torch.device) -> torch.Tensor:
    """uint8 codes 0..15 [N, K] in the layout of the device's int4 kernel."""
    if device.type == "cpu":
        if q.shape[0] % 64 == 0 and cpu_int4_layout_is_blocked():
            return _pack_cpu_blocked(q)
        return torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 1)
    pairs = (q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8)
    return torch.ops.aten._convert_weight_to_int4pack(pairs.to(device), 8)


def _pack_cpu_blocked(q: torch.Tensor) -> torch.Tensor:
    # torch's CPU layout for N % 64 == 0: per block of 64 rows and per k, 32 bytes whose low
    # nibbles are rows 0-31 and high nibbles rows 32-63. Writing it directly is 5x faster than
    # _convert_weight_to_int4pack_for_cpu (which wants int32 codes), and load time is repacking.
    N, K = q.shape
    blocks = q.view(N // 64, 2, 32, K)
    return (blocks[:, 0] | (blocks[:, 1] << 4)).transpose(1, 2).contiguous().view(N, K // 2)


@functools.cache
def cpu_int4_layout_is_blocked() -> bool:
    """Whether this torch's CPU int4 packing is the layout _pack_cpu_blocked writes (checked, not assumed)."""
    q = torch.randint(0, 16, (128, 64), dtype=torch.uint8)
    return torch.equal(_pack_cpu_blocked(q), torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 1))


def int4_mm(x: torch.Tensor, packed: torch.Tensor, scales_and_zeros: torch.Tensor) -> torch.Tensor:
    if x.device.type == "cpu":
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, INT4_GROUP, scales_and_zeros)
    return torch.ops.aten._weight_int4pack_mm(x, packed, INT4_GROUP, scales_and_zeros)


def int4_planes(a: Affine, split: bool) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Codes [N, K] and scales_and_zeros [N, K/32, 2] planes with w = (q - 8) * scale + zero,
    summing to the weights exactly. Codes of up to 8 bits (Q8_0, Q5_x) split into two 4-bit
    planes: with c = q - zero = 16 h + l, w = 16 s h + o (+) s l."""
    offset = a.offset if a.offset is not None else torch.zeros_like(a.scale)
    if not split:
        return [(a.q.reshape(a.q.shape[0], -1), torch.cat((a.scale, offset + (8 - a.zero) * a.scale), -1))]
    c = a.q.to(torch.int16) - a.zero
    high = ((c >> 4) + 8).to(torch.uint8).reshape(c.shape[0], -1)  # arithmetic shift: -8..7
    low = (c & 15).to(torch.uint8).reshape(c.shape[0], -1)
    return [(high, torch.cat((16 * a.scale, offset), -1)), (low, torch.cat((a.scale, 8 * a.scale), -1))]


@functools.cache
def int4_works(device_type: str) -> bool:
    """Whether this torch and device run the int4 kernel correctly (checked once, on real numbers)."""
    try:
        device = torch.device(device_type)
        q = torch.randint(0, 16, (64, 128), dtype=torch.uint8)
        scale, zero = torch.rand(64, 4, 1) / 8, torch.randn(64, 4, 1) / 8
        a = Affine(q.view(64, 4, 32), scale, 0, zero)
        ((codes, sz),) = int4_planes(a, split=False)
        x = torch.randn(2, 128, dtype=torch.bfloat16)
        sz = sz.transpose(0, 1).to(torch.bfloat16).contiguous().to(device)
        got = int4_mm(x.to(device), int4_pack(codes, device), sz).float().cpu()
        want = x.float() @ a.dequantize().t()
        return bool(torch.allclose(got, want, atol=0.05 * float(want.abs().max())))
    except Exception:  # op missing on this build or GPU generation (CUDA needs sm80+)
        return False


# GGML types whose groups are 32 wide, as the int4 kernel's: 4-bit codes in one plane, wider in two.
INT4_ONE_PLANE = (GGMLQuantizationType.Q4_0, GGMLQuantizationType.Q4_1, GGMLQuantizationType.Q4_K)
INT4_TWO_PLANES = (
    GGMLQuantizationType.Q8_0,
    GGMLQuantizationType.Q5_0,
    GGMLQuantizationType.Q5_1,
    GGMLQuantizationType.Q5_K,
)


class Int4Linear(nn.Module):
    """Weights as one or two planes of torch's int4 matmul, stacked by rows and run as one call."""

    def __init__(self, raw: RawTensor, device: torch.device):
        super().__init__()
        self.ggml_type = raw.ggml_type
        self.out_features, self.in_features = raw.shape
        split = raw.ggml_type in INT4_TWO_PLANES
        blocks = raw_to_torch(raw, torch.device("cpu"))
        step = rows_per_slice(self.in_features, multiple=64)  # whole 64-row blocks of the layout
        planes: list[list[tuple[torch.Tensor, torch.Tensor]]] = [[], []] if split else [[]]
        for start in range(0, self.out_features, step):  # slices keep the unpacking temporaries small
            for plane, (codes, sz) in zip(planes, int4_planes(affine_rows(blocks[start : start + step], raw.ggml_type, raw.name), split)):
                plane.append((int4_pack(codes, device), sz.to(torch.bfloat16)))
        self.planes = len(planes)
        packed = [p for plane in planes for p, _ in plane]
        scales = [sz for plane in planes for _, sz in plane]
        self.register_buffer("packed", torch.cat(packed), persistent=False)
        self.register_buffer("scales_and_zeros", torch.cat(scales).transpose(0, 1).contiguous().to(device), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = int4_mm(x.to(torch.bfloat16), self.packed, self.scales_and_zeros)
        if self.planes == 2:
            y = y[:, : self.out_features].float() + y[:, self.out_features :].float()
        return y.to(x.dtype)

    def rows(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Dequantized rows (an embedding lookup), read out of the CPU kernel's blocked layout."""
        w = self._plane_rows(ids)
        if self.planes == 2:
            w = w + self._plane_rows(ids + self.out_features)
        return w.to(dtype)

    def _plane_rows(self, rows: torch.Tensor) -> torch.Tensor:
        layout = self.packed.view(-1, self.in_features, 32)  # see _pack_cpu_blocked
        block, within = rows // 64, rows % 64
        pairs = layout[block, :, within % 32]  # [R, K]
        codes = torch.where((within < 32).unsqueeze(-1), pairs & 15, pairs >> 4).float()
        sz = self.scales_and_zeros[:, rows].float().repeat_interleave(INT4_GROUP, dim=0)  # [K, R, 2]
        return (codes - 8) * sz[..., 0].t() + sz[..., 1].t()

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, {self.ggml_type.name} as {self.planes} int4 plane(s)"


def linear(raws: list[RawTensor], dtype: torch.dtype, device: torch.device, keep_blocks: bool, embedding: bool = False) -> nn.Module:
    """The handler for one weight, given as its row blocks (several for fused projections of one
    type). GGUF weights stay quantized (F16 too: no float copy); safetensors become `dtype`. An
    embedding needs row lookups, which int4 packing lacks."""
    first = raws[0]
    if keep_blocks and settings.kernels() == "fast" and device.type == "cpu" and native.supports(first.ggml_type, first.shape[1]):
        return NativeLinear(raws, device)
    raw = concat_rows(raws)
    if not keep_blocks and raw.ggml_type in DENSE_TYPES:
        return DenseLinear(dense(raw, dtype, device))
    fmt = ggml_format(raw.ggml_type, raw.name)  # unsupported types fail here, naming the tensor
    if settings.kernels() != "fast" or raw.ggml_type in DENSE_TYPES or fmt.affine is None:  # (IQ types: per matmul)
        return GGMLLinear(raw, device)
    rows_readable = device.type == "cpu" and raw.shape[0] % 64 == 0 and cpu_int4_layout_is_blocked()
    if raw.ggml_type in INT4_ONE_PLANE + INT4_TWO_PLANES and (rows_readable or not embedding) and int4_works(device.type):
        try:
            return Int4Linear(raw, device)
        except RuntimeError:  # a shape this build's int4 packing rejects (CUDA tiles): stay exact instead
            pass
    return GroupedLinear(raw, device)


def weight_bytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()] if t is not None)
