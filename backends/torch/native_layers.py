"""The model's layers with part of their maths in our C kernels (native.py), for float32 on
the CPU. `layers_for` picks them, or torch's, once, when the model is built; where every layer
and weight is native, NativeLayerStack runs all the layers in one C call.

One decoded token's attention and SwiGLU are a dozen small ops in torch whose per-op cost is as
much as a small model's matmuls (~45 us a layer); and with the matmuls (cpu_kernels.c) every
kernel here computes a row of a prompt with the operations it takes for that row decoded alone,
so a prompt's logits are bitwise the same however it is split into forward passes (a chat's
cache history, the server's, --split-prompt, speculative drafts): the int8 activation rounding
would turn a 1e-7 difference into ~0.5 in logits and flip near-ties."""

from __future__ import annotations

import ctypes
from dataclasses import replace

import torch

from .. import settings
from . import native
from .model import MLP, TORCH_LAYERS, Attention, Layers, RMSNorm
from .weights import FusedLinear, NativeLinear

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


class NativeLayerStack:
    """Tokens through every layer in one C call (forward_layers), for a model whose layers are all
    native and whose weights are all in native blocks: the kernels the modules above call, in
    their order, so the hidden states are bitwise theirs; what it saves is the modules' Python
    and ctypes calls, ~150 us a layer (a 135M model decodes 1.7x faster; a speculative draft's
    verification costs what a decoded token does)."""

    def __init__(self, model, lib):
        c = model.config
        self.model, self.lib = model, lib
        self.dims = (c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim, c.intermediate_size)
        self.eps = c.rms_norm_eps
        self.layers = (native.DecoderLayer * len(model.layers))()
        for i, block in enumerate(model.layers):
            attn, mlp = block.self_attn, block.mlp
            self.layers[i] = native.DecoderLayer(
                block.input_layernorm.weight.data_ptr(), block.post_attention_layernorm.weight.data_ptr(),
                *(native.linear_map(_segments(m)) for m in (attn.qkv, attn.o_proj, mlp.gate_up, mlp.down_proj)),
                int(attn.use_rope),
            )
        self._caches = None

    @classmethod
    def of(cls, model) -> NativeLayerStack | None:
        """The stack for `model`, or None where a layer or weight is not native."""
        lib = native.library()
        blocks_native = all(isinstance(b.self_attn, NativeAttention) and isinstance(b.mlp, NativeMLP)
                            and isinstance(b.input_layernorm, NativeRMSNorm) for b in model.layers)
        try:
            return cls(model, lib) if lib is not None and blocks_native else None
        except NotNative:
            return None

    def __call__(self, x: torch.Tensor, pos: int) -> torch.Tensor:
        """x [T, C] float32 at positions pos..pos+T-1 (the caches hold them) -> [T, C]."""
        model = self.model
        if self._caches is not model.caches:  # grown: new buffers
            self._caches = model.caches
            self.k = (ctypes.c_void_p * len(model.caches))(*[c.k.data_ptr() for c in model.caches])
            self.v = (ctypes.c_void_p * len(model.caches))(*[c.v.data_ptr() for c in model.caches])
        x = x.contiguous().clone()
        native.forward_layers(self.lib, self.layers, self.k, self.v, model.cache_dtype == torch.float16, model.capacity,
                              x.data_ptr(), x.shape[0], pos, self.dims, self.eps, model.cos[pos].data_ptr(),
                              model.sin[pos].data_ptr(), torch.get_num_threads())
        return x


class NotNative(Exception):
    pass


def _segments(module) -> list[tuple[int, native.WeightParts]]:
    parts = module.parts if isinstance(module, FusedLinear) else [module]
    if not all(isinstance(p, NativeLinear) for p in parts):
        raise NotNative
    return [(p.type_id, p.weight) for p in parts]


# float16 keys and values, as llama.cpp keeps them: half the memory of a long context, and the
# logits move less than llama.cpp's own activation rounding moves them (tests bound it).
NATIVE_LAYERS = Layers(norm=NativeRMSNorm, attention=NativeAttention, mlp=NativeMLP, cache_dtype=torch.float16)


def layers_for(device: torch.device, dtype: torch.dtype) -> Layers:
    """Our kernels where they apply (float32 on the CPU, with the library built), torch's elsewhere."""
    if device.type == "cpu" and dtype == torch.float32 and native.library() is not None:
        return NATIVE_LAYERS if settings.kv_cache() == "f16" else replace(NATIVE_LAYERS, cache_dtype=torch.float32)
    return TORCH_LAYERS
