"""The model's layers with part of their maths in our C kernels (native.py), for float32 on
the CPU. `layers_for` picks them, or torch's, once, when the model is built.

One decoded token's attention and SwiGLU are a dozen small ops in torch whose per-op cost is as
much as a small model's matmuls (~45 us a layer); and with the matmuls (cpu_kernels.c) every
kernel here computes a row of a prompt with the operations it takes for that row decoded alone,
so a prompt's logits are bitwise the same however it is split into forward passes (a chat's
cache history, the server's, --split-prompt, speculative drafts): the int8 activation rounding
would turn a 1e-7 difference into ~0.5 in logits and flip near-ties."""

from __future__ import annotations

from dataclasses import replace

import torch

from .. import settings
from . import native
from .model import MLP, TORCH_LAYERS, Attention, Layers, RMSNorm

class NativeRMSNorm(RMSNorm):
    def __init__(self, dim: int, eps: float):
        super().__init__(dim, eps)
        self.lib = native.library()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return native.rms_norm(self.lib, x, self.weight, self.eps)


class NativeAttention(Attention):
    """RoPE, the cache write and causal attention in one C call for all T rows, each row computed
    exactly as when it is decoded alone (attend_f32), so a prompt's logits do not depend on how
    it is split into forward passes (a chat's cache history, --split-prompt, drafts)."""

    def __init__(self, config, layer: int):
        super().__init__(config, layer)
        self.lib = native.library()

    def forward(self, x, pos: int, cos, sin, cache, mask) -> torch.Tensor:
        qkv = self.qkv(x)  # (T, (nh + 2 nkv) * hs)
        rotate = (cos, sin) if self.use_rope else (None, None)
        y = native.attend(self.lib, qkv, cache.k, cache.v, pos, self.num_heads, *rotate)  # (T, nh * hs)
        return self.o_proj(y)  # (T, C)


class NativeMLP(MLP):
    """silu(gate) * up in one C call (not three ops for a decoded token), for every row count, so
    that with the matmuls' rows (cpu_kernels.c) a prompt row's MLP is bitwise the row's alone."""

    def __init__(self, config):
        super().__init__(config)
        self.lib = native.library()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(native.silu_mul(self.lib, self.gate_up(x)))  # (T, 2F) -> (T, F) -> (T, C)


# float16 keys and values, as llama.cpp keeps them: half the memory of a long context, and the
# logits move less than llama.cpp's own activation rounding moves them (tests bound it).
NATIVE_LAYERS = Layers(norm=NativeRMSNorm, attention=NativeAttention, mlp=NativeMLP, cache_dtype=torch.float16)


def layers_for(device: torch.device, dtype: torch.dtype) -> Layers:
    """Our kernels where they apply (float32 on the CPU, with the library built), torch's elsewhere."""
    if device.type == "cpu" and dtype == torch.float32 and native.library() is not None:
        return NATIVE_LAYERS if settings.kv_cache() == "f16" else replace(NATIVE_LAYERS, cache_dtype=torch.float32)
    return TORCH_LAYERS
