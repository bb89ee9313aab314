"""SmolLM3 / Llama in torch: RMSNorm, GQA attention with RoPE on RoPE layers only, SwiGLU.

Built from the config alone (`Transformer(config, dtype, device)`), with every weight a
placeholder on the meta device; `loader.py` puts the checkpoint's weights in. SmolLM3 is
Llama with NoPE layers (`config.rope_layers`); SmolLM2 is the same code with RoPE on every
layer. Q/K rows are in Hugging Face order (the checkpoint reader undoes llama.cpp's
permutation), so RoPE rotates the two halves of each head (`rotate_half`).

Shapes: T tokens in a forward (one sequence), C = hidden_size, nh / nkv query / key-value
heads of hs = head_dim each, F = intermediate_size.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from ..numbers import cache_capacity
from ..memory import return_freed_memory

META = torch.device("meta")


class KVCache(nn.Module):
    """Preallocated keys and values for one layer: (1, nkv, capacity, hs), in the model's dtype or
    the one its attention reads (Layers.cache_dtype). Left unfilled: attention reads only the
    positions written, and zeroing would make every page resident (47 MiB on the 135M model at a
    1,000-token reply, 153 MiB on the 3B) before the first token."""

    def __init__(self, config: ModelConfig, capacity: int, dtype: torch.dtype, device: torch.device):
        super().__init__()
        shape = (1, config.num_kv_heads, capacity, config.head_dim)
        self.register_buffer("k", torch.empty(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.empty(shape, dtype=dtype, device=device), persistent=False)

    def update(self, pos: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        end = pos + k.shape[2]
        self.k[:, :, pos:end] = k
        self.v[:, :, pos:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(dim, device=META), requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalized in f32 as transformers does, then scaled in the compute dtype. Spelled out:
        # F.rms_norm runs as a chain of composite ops on the CPU (measured 39 us vs 12 us here
        # for one 576-wide token, 2 per layer per token).
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """HF's x * cos + rotate_half(x) * sin, where rotate_half(x) = (-x2, x1): rolling x by half
    a head gives (x2, x1), and the sign lives in signed_sin = (-sin, sin). Fewer ops per token."""
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * signed_sin


def linear_slot(in_features: int, out_features: int) -> nn.Module:
    """Where a weight goes: shapes only, no memory, until the loader swaps in its handler."""
    return nn.Linear(in_features, out_features, bias=False, device=META)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_heads, config.num_kv_heads, config.head_dim
        self.sizes = [self.num_heads * self.head_dim] + [self.num_kv_heads * self.head_dim] * 2
        # q, k and v of one input in one matmul: fewer, larger kernel calls are most of a
        # small model's decode time.
        self.qkv = linear_slot(config.hidden_size, sum(self.sizes))
        self.o_proj = linear_slot(self.sizes[0], config.hidden_size)
        self.use_rope = config.rope_layers[layer]

    def forward(self, x, pos: int, cos, sin, cache: KVCache, mask) -> torch.Tensor:
        T = x.shape[0]
        q, k, v = self.qkv(x).split(self.sizes, -1)  # (T, nh * hs), (T, nkv * hs) x2
        q = q.view(T, self.num_heads, self.head_dim).transpose(0, 1).unsqueeze(0)  # (1, nh, T, hs)
        k = k.view(T, self.num_kv_heads, self.head_dim).transpose(0, 1).unsqueeze(0)  # (1, nkv, T, hs)
        v = v.view(T, self.num_kv_heads, self.head_dim).transpose(0, 1).unsqueeze(0)  # (1, nkv, T, hs)
        if self.use_rope:
            q = apply_rope(q, cos, sin)
            k = apply_rope(k, cos, sin)
        k, v = cache.update(pos, k, v)  # (1, nkv, pos + T, hs)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None and T > 1, enable_gqa=True
        )  # (1, nh, T, hs)
        return self.o_proj(y.squeeze(0).transpose(0, 1).reshape(T, -1))  # (T, C)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """SwiGLU's silu(gate) * up, for (T, 2F) holding [gate | up]."""
    gate, up = gate_up.chunk(2, -1)  # (T, F) x2
    return F.silu(gate) * up


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.gate_up = linear_slot(config.hidden_size, 2 * config.intermediate_size)
        self.down_proj = linear_slot(config.intermediate_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(silu_mul(self.gate_up(x)))  # (T, C) -> (T, 2F) -> (T, F) -> (T, C)


@dataclass(frozen=True)
class Layers:
    """The module classes a model is built from: torch's, or versions that run some of the
    maths in other kernels (native_layers.py), chosen once when the model is built."""

    norm: type[RMSNorm] = RMSNorm
    attention: type[Attention] = Attention
    mlp: type[MLP] = MLP
    cache_dtype: torch.dtype | None = None  # the KV cache's, where not the model's


TORCH_LAYERS = Layers()


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer: int, layers: Layers):
        super().__init__()
        self.self_attn, self.mlp = layers.attention(config, layer), layers.mlp(config)
        self.input_layernorm = layers.norm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = layers.norm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x, pos, cos, sin, cache, mask):
        h = x + self.self_attn(self.input_layernorm(x), pos, cos, sin, cache, mask)
        return h + self.mlp(self.post_attention_layernorm(h))


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig, dtype: torch.dtype, device: torch.device, layers: Layers = TORCH_LAYERS):
        super().__init__()
        self.config, self.dtype, self.device = config, dtype, device
        self.cache_dtype = layers.cache_dtype or dtype
        # The embedding's (vocab, C) matrix, looked up by rows; also the output head when tied.
        self.embed_tokens = linear_slot(config.hidden_size, config.vocab_size)
        self.layers = nn.ModuleList(Block(config, i, layers) for i in range(config.num_layers))
        self.norm = layers.norm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = self.embed_tokens if config.tie_word_embeddings else linear_slot(config.hidden_size, config.vocab_size)

        self.caches = nn.ModuleList()
        self.capacity = 0
        # Every layer in one call, where the layers offer it (native_layers.py); set once the
        # weights are in.
        self.layer_stack = None

    def ensure_capacity(self, needed: int, exact: bool = False) -> None:
        """Grow the KV cache (and the RoPE table) to hold `needed` positions (see cache_capacity),
        keeping what it holds."""
        if needed <= self.capacity:
            return
        capacity = cache_capacity(self.capacity, needed, self.config.context_length, exact)
        old = list(self.caches)
        self.caches = nn.ModuleList(KVCache(self.config, capacity, self.cache_dtype, self.device) for _ in self.layers)
        for new, prev in zip(self.caches, old):
            new.k[:, :, : self.capacity] = prev.k
            new.v[:, :, : self.capacity] = prev.v
        self.capacity = capacity
        cos, signed_sin = self.config.rope_tables(capacity)  # (capacity, hs) each: see apply_rope
        self.cos = torch.from_numpy(cos).to(self.device, self.dtype)
        self.sin = torch.from_numpy(signed_sin).to(self.device, self.dtype)

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, pos: int, last_only: bool = False) -> torch.Tensor:
        """Logits (T, vocab) for `tokens` ((T,) ids at positions pos..pos+T-1), using and filling the KV cache."""
        T = tokens.shape[0]
        self.ensure_capacity(pos + T)
        x = self.embed_tokens.rows(tokens, self.dtype)  # (T, C)
        cos, sin = self.cos[pos : pos + T], self.sin[pos : pos + T]  # (T, hs)
        if self.layer_stack is not None:
            x = self.layer_stack(x, pos)
        else:
            mask = None
            if T > 1 and pos > 0:  # a chunk after cached positions: causal over the chunk, all of the past
                mask = torch.ones(T, pos + T, dtype=torch.bool, device=self.device).tril(diagonal=pos)
            for layer, cache in zip(self.layers, self.caches):
                x = layer(x, pos, cos, sin, cache, mask)
        if last_only:
            x = x[-1:]
        logits = self.lm_head(self.norm(x)).float()  # (T, vocab)
        if T > 1 and self.device.type == "cpu":
            # A prefill's temporaries are large and differ in size from one prompt to the next:
            # handed back now, they do not fragment the heap into growth over a long chat.
            return_freed_memory()
        return logits
