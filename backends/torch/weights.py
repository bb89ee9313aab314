"""torch modules over checkpoint tensors: dense weights, and GGML weights kept in their blocks.

A GGML weight is held as its raw uint8 blocks and dequantized for each matmul, a slice of
rows at a time, so the model never holds more than one slice of float weights at once.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType
from torch import nn

from ..checkpoint import RawTensor
from ..quants import dequantize, ggml_format

# Rows dequantized per slice: bounds the float temporary (e.g. 8192 x 2048 x 4 B = 64 MB
# for SmolLM3's 128k-row tied embedding) while keeping each GEMM large.
MAX_SLICE_ELEMS = 1 << 24
DENSE_TYPES = (GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16)


def raw_to_torch(raw: RawTensor, device: torch.device) -> torch.Tensor:
    with warnings.catch_warnings():
        # The mmap is read-only; we never write through this tensor.
        warnings.simplefilter("ignore", UserWarning)
        data = torch.from_numpy(raw.data) if raw.data.size else torch.zeros(raw.data.shape, dtype=torch.uint8)
    return data.to(device) if device.type != "cpu" else data


def dense(raw: RawTensor, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A float tensor in `dtype` (copied out of the mmap)."""
    data = raw_to_torch(raw, device)
    return dequantize(data, raw.ggml_type, dtype).reshape(raw.shape).contiguous()


class GGMLLinear(nn.Module):
    """y = x W^T with W kept as GGML blocks [out_features, row_bytes]."""

    def __init__(self, raw: RawTensor, device: torch.device):
        super().__init__()
        ggml_format(raw.ggml_type, raw.name)  # fail at load, naming the tensor, not at the first matmul
        self.ggml_type = raw.ggml_type
        self.out_features, self.in_features = raw.shape
        self.register_buffer("blocks", raw_to_torch(raw, device), persistent=False)
        self.rows_per_slice = max(1, MAX_SLICE_ELEMS // self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.out_features <= self.rows_per_slice:
            return F.linear(x, dequantize(self.blocks, self.ggml_type, x.dtype))
        parts = [
            F.linear(x, dequantize(self.blocks[i : i + self.rows_per_slice], self.ggml_type, x.dtype))
            for i in range(0, self.out_features, self.rows_per_slice)
        ]
        return torch.cat(parts, dim=-1)

    def rows(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Dequantized rows `ids` of W: an embedding lookup that touches only those rows."""
        return dequantize(self.blocks[ids], self.ggml_type, dtype)

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, {self.ggml_type.name}"


class DenseLinear(nn.Module):
    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.out_features, self.in_features = weight.shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)

    def rows(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return self.weight[ids].to(dtype)


def linear(raw: RawTensor, dtype: torch.dtype, device: torch.device, keep_blocks: bool) -> nn.Module:
    """GGUF weights stay in their blocks (F16 included: no float copy); safetensors become `dtype`."""
    if keep_blocks or raw.ggml_type not in DENSE_TYPES:
        return GGMLLinear(raw, device)
    return DenseLinear(dense(raw, dtype, device))


def weight_bytes(module: nn.Module) -> int:
    return sum(int(np.prod(t.shape)) * t.element_size() for t in [*module.parameters(), *module.buffers()])
