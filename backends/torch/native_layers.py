"""The model's layers with part of their maths in our C kernels (native.py), for float32 on
the CPU. `layers_for` picks them, or torch's, once, when the model is built.

Each runs the C kernel where it is faster and torch's maths elsewhere: one decoded token's
attention and SwiGLU are a dozen small ops in torch whose per-op cost is as much as a small
model's matmuls (~45 us a layer), while a prompt's rows are better served by torch's threaded,
vectorized ops."""

from __future__ import annotations

import torch

from . import native
from .model import MLP, TORCH_LAYERS, Attention, Layers, RMSNorm

# Inputs of fewer rows (a decoded token, a speculative draft's few: backends/speculative.py) take
# the decode's attention kernel row by row, so each row's logits are bitwise those of the row
# decoded alone: the int8 activation rounding turns a 1e-7 difference in attention into ~0.5 in
# logits. The matmuls (cpu_kernels.c) and NativeMLP give each row its own bits at any row count.
ROWS_AS_DECODED = 16


class NativeRMSNorm(RMSNorm):
    def __init__(self, dim: int, eps: float):
        super().__init__(dim, eps)
        self.lib = native.library()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return native.rms_norm(self.lib, x, self.weight, self.eps)


class NativeAttention(Attention):
    """A decoded token (or a draft's few, row by row): RoPE, the cache write and attention in
    one C call a row."""

    def __init__(self, config, layer: int):
        super().__init__(config, layer)
        self.lib = native.library()

    def forward(self, x, pos: int, cos, sin, cache, mask) -> torch.Tensor:
        T = x.shape[0]
        if T >= ROWS_AS_DECODED:
            return super().forward(x, pos, cos, sin, cache, mask)
        q, k, v = self.qkv(x).split(self.sizes, -1)  # (T, nh * hs), (T, nkv * hs) x2
        rows = []
        for t in range(T):  # q and k rotated in place
            rotate = (cos[t : t + 1], sin[t : t + 1]) if self.use_rope else (None, None)
            rows.append(native.attend_one(self.lib, q[t : t + 1], k[t : t + 1], v[t : t + 1], cache.k, cache.v,
                                          pos + t, self.num_heads, *rotate))  # (1, nh * hs)
        return self.o_proj(rows[0] if T == 1 else torch.cat(rows))  # (T, C)


class NativeMLP(MLP):
    """silu(gate) * up in one C call (not three ops for a decoded token), for every row count, so
    that with the matmuls' rows (cpu_kernels.c) a prompt row's MLP is bitwise the row's alone."""

    def __init__(self, config):
        super().__init__(config)
        self.lib = native.library()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(native.silu_mul(self.lib, self.gate_up(x)))  # (T, 2F) -> (T, F) -> (T, C)


NATIVE_LAYERS = Layers(norm=NativeRMSNorm, attention=NativeAttention, mlp=NativeMLP)


def layers_for(device: torch.device, dtype: torch.dtype) -> Layers:
    """Our kernels where they apply (float32 on the CPU, with the library built), torch's elsewhere."""
    if device.type == "cpu" and dtype == torch.float32 and native.library() is not None:
        return NATIVE_LAYERS
    return TORCH_LAYERS
