"""SmolLM3 / Llama in torch: RMSNorm, GQA attention with RoPE on RoPE layers only, SwiGLU.

SmolLM3 is Llama with NoPE layers (`config.rope_layers`); SmolLM2 is the same code with
RoPE on every layer. Q/K rows are in Hugging Face order (the checkpoint reader undoes
llama.cpp's permutation), so RoPE rotates the two halves of each head (`rotate_half`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..checkpoint import Checkpoint
from ..config import ModelConfig
from .weights import GGMLLinear, dense, linear, return_freed_memory


class KVCache(nn.Module):
    """Preallocated keys and values for one layer: [1, kv_heads, capacity, head_dim]."""

    def __init__(self, config: ModelConfig, capacity: int, dtype: torch.dtype, device: torch.device):
        super().__init__()
        shape = (1, config.num_kv_heads, capacity, config.head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, pos: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        end = pos + k.shape[2]
        self.k[:, :, pos:end] = k
        self.v[:, :, pos:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]


class RMSNorm(nn.Module):
    def __init__(self, weight: torch.Tensor, eps: float):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # In f32 as transformers does, then back to the compute dtype.
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer: int, modules: dict[str, nn.Module]):
        super().__init__()
        self.q_proj, self.k_proj = modules["q_proj"], modules["k_proj"]
        self.v_proj, self.o_proj = modules["v_proj"], modules["o_proj"]
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_heads, config.num_kv_heads, config.head_dim
        self.use_rope = config.rope_layers[layer]

    def forward(self, x, pos: int, cos, sin, cache: KVCache, mask) -> torch.Tensor:
        T = x.shape[0]
        q = self.q_proj(x).view(T, self.num_heads, self.head_dim).transpose(0, 1).unsqueeze(0)
        k = self.k_proj(x).view(T, self.num_kv_heads, self.head_dim).transpose(0, 1).unsqueeze(0)
        v = self.v_proj(x).view(T, self.num_kv_heads, self.head_dim).transpose(0, 1).unsqueeze(0)
        if self.use_rope:
            q = q * cos + rotate_half(q) * sin
            k = k * cos + rotate_half(k) * sin
        k, v = cache.update(pos, k, v)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None and T > 1, enable_gqa=True
        )
        return self.o_proj(out.squeeze(0).transpose(0, 1).reshape(T, -1))


class MLP(nn.Module):
    def __init__(self, modules: dict[str, nn.Module]):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = modules["gate_proj"], modules["up_proj"], modules["down_proj"]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer: int, attention: Attention, mlp: MLP, norms):
        super().__init__()
        self.input_layernorm, self.post_attention_layernorm = norms
        self.self_attn, self.mlp = attention, mlp

    def forward(self, x, pos, cos, sin, cache, mask):
        h = x + self.self_attn(self.input_layernorm(x), pos, cos, sin, cache, mask)
        return h + self.mlp(self.post_attention_layernorm(h))


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig, ckpt: Checkpoint, dtype: torch.dtype, device: torch.device):
        super().__init__()
        self.config, self.dtype, self.device = config, dtype, device
        keep_blocks = ckpt.format == "gguf"
        tensors = ckpt.tensors

        def lin(name, embedding=False):
            module = linear(tensors[name + ".weight"], dtype, device, keep_blocks, embedding)
            if not isinstance(module, GGMLLinear):  # the rest hold copies: the file's pages can go
                ckpt.release(name + ".weight")
            return module

        def norm(name):
            module = RMSNorm(dense(tensors[name + ".weight"], dtype, device), config.rms_norm_eps)
            ckpt.release(name + ".weight")
            return module

        self.embed_tokens = lin("model.embed_tokens", embedding=True)
        self.layers = nn.ModuleList()
        for i in range(config.num_layers):
            p = f"model.layers.{i}."
            attention = Attention(config, i, {n: lin(p + "self_attn." + n) for n in ("q_proj", "k_proj", "v_proj", "o_proj")})
            mlp = MLP({n: lin(p + "mlp." + n) for n in ("gate_proj", "up_proj", "down_proj")})
            norms = (norm(p + "input_layernorm"), norm(p + "post_attention_layernorm"))
            self.layers.append(Block(config, i, attention, mlp, norms))
            return_freed_memory()
        self.norm = norm("model.norm")
        self.lm_head = self.embed_tokens if config.tie_word_embeddings else lin("lm_head")

        inv_freq, self.rope_scale = config.rope_inv_freq()
        self.register_buffer("inv_freq", torch.from_numpy(inv_freq).to(device), persistent=False)
        self.caches = nn.ModuleList()
        self.capacity = 0

    def ensure_capacity(self, capacity: int) -> None:
        """Grow the KV cache to hold `capacity` positions, keeping what it holds."""
        if capacity <= self.capacity:
            return
        old = list(self.caches)
        self.caches = nn.ModuleList(KVCache(self.config, capacity, self.dtype, self.device) for _ in self.layers)
        for new, prev in zip(self.caches, old):
            new.k[:, :, : self.capacity] = prev.k
            new.v[:, :, : self.capacity] = prev.v
        self.capacity = capacity

    def rope(self, pos: int, T: int) -> tuple[torch.Tensor, torch.Tensor]:
        positions = torch.arange(pos, pos + T, device=self.device, dtype=torch.float32)
        freqs = torch.outer(positions, self.inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * self.rope_scale).to(self.dtype), (emb.sin() * self.rope_scale).to(self.dtype)

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, pos: int, last_only: bool = False) -> torch.Tensor:
        """Logits for `tokens` ([T] ids at positions pos..pos+T-1), using and filling the KV cache."""
        T = tokens.shape[0]
        self.ensure_capacity(pos + T)
        x = self.embed_tokens.rows(tokens, self.dtype)
        cos, sin = self.rope(pos, T)
        mask = None
        if T > 1 and pos > 0:  # a chunk after cached positions: causal over the chunk, all of the past
            mask = torch.ones(T, pos + T, dtype=torch.bool, device=self.device).tril(diagonal=pos)
        for layer, cache in zip(self.layers, self.caches):
            x = layer(x, pos, cos, sin, cache, mask)
        if last_only:
            x = x[-1:]
        return self.lm_head(self.norm(x)).float()
