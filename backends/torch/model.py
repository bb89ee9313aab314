"""SmolLM3 / Llama in torch: RMSNorm, GQA attention with RoPE on RoPE layers only, SwiGLU.

SmolLM3 is Llama with NoPE layers (`config.rope_layers`); SmolLM2 is the same code with
RoPE on every layer. Q/K rows are in Hugging Face order (the checkpoint reader undoes
llama.cpp's permutation), so RoPE rotates the two halves of each head (`rotate_half`).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..checkpoint import Checkpoint, RawTensor
from ..config import ModelConfig
from . import native
from .weights import dense, linear, return_freed_memory


# Inputs of fewer rows (decoded tokens, speculative drafts: backends/speculative.py) take the
# decode's C kernels row by row, so each row's logits are bitwise those of the row decoded
# alone: the int8 activation rounding turns a 1e-7 difference in attention into ~0.5 in logits.
ROWS_AS_DECODED = 16


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
        if x.device.type == "cpu" and x.dtype == torch.float32 and (lib := native.library()) is not None:
            return native.rms_norm(lib, x, self.weight, self.eps)
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


class Projections(nn.Module):
    """Linear maps of one input (q, k, v; gate, up) as one matmul per run of same-typed weights:
    fewer, larger kernel calls, which is most of a small model's decode time."""

    def __init__(self, raws: list[RawTensor], make: Callable[[list[RawTensor]], nn.Module]):
        super().__init__()
        runs: list[list[RawTensor]] = []
        for raw in raws:
            if runs and runs[-1][0].ggml_type == raw.ggml_type:
                runs[-1].append(raw)
            else:
                runs.append([raw])
        self.parts = nn.ModuleList(make(run) for run in runs)
        self.splits = [[raw.shape[0] for raw in run] for run in runs]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [y for part, split in zip(self.parts, self.splits) for y in part(x).split(split, -1)]


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer: int, qkv: Projections, o_proj: nn.Module):
        super().__init__()
        self.qkv, self.o_proj = qkv, o_proj
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_heads, config.num_kv_heads, config.head_dim
        self.use_rope = config.rope_layers[layer]

    def forward(self, x, pos: int, cos, sin, cache: KVCache, mask) -> torch.Tensor:
        T = x.shape[0]
        q, k, v = self.qkv(x)
        if T < ROWS_AS_DECODED and cache.k.device.type == "cpu" and cache.k.dtype == torch.float32 and (lib := native.library()):
            # a decoded token (or a speculative draft's few, row by row): RoPE, cache write and
            # attention in one C call (a dozen torch ops cost ~45 us a layer, as much as a small
            # model's matmuls)
            rows = []
            for t in range(T):
                rotate = (cos[t : t + 1], sin[t : t + 1]) if self.use_rope else (None, None)
                rows.append(native.attend_one(lib, q[t : t + 1], k[t : t + 1], v[t : t + 1], cache.k, cache.v, pos + t, self.num_heads, *rotate))
            return self.o_proj(rows[0] if T == 1 else torch.cat(rows))
        q = q.view(T, self.num_heads, self.head_dim).transpose(0, 1).unsqueeze(0)
        k = k.view(T, self.num_kv_heads, self.head_dim).transpose(0, 1).unsqueeze(0)
        v = v.view(T, self.num_kv_heads, self.head_dim).transpose(0, 1).unsqueeze(0)
        if self.use_rope:
            q = apply_rope(q, cos, sin)
            k = apply_rope(k, cos, sin)
        k, v = cache.update(pos, k, v)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None and T > 1, enable_gqa=True
        )
        return self.o_proj(out.squeeze(0).transpose(0, 1).reshape(T, -1))


class MLP(nn.Module):
    def __init__(self, gate_up: Projections, down_proj: nn.Module):
        super().__init__()
        self.gate_up, self.down_proj = gate_up, down_proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] < ROWS_AS_DECODED and len(self.gate_up.parts) == 1 and x.device.type == "cpu" and x.dtype == torch.float32 and (lib := native.library()):
            # a decoded token: one call, not three ops (a prompt's rows: torch's threaded, vectorized ops)
            return self.down_proj(native.silu_mul(lib, self.gate_up.parts[0](x)))
        gate, up = self.gate_up(x)
        return self.down_proj(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, attention: Attention, mlp: MLP, input_layernorm: RMSNorm, post_attention_layernorm: RMSNorm):
        super().__init__()
        self.self_attn, self.mlp = attention, mlp
        self.input_layernorm, self.post_attention_layernorm = input_layernorm, post_attention_layernorm

    def forward(self, x, pos, cos, sin, cache, mask):
        h = x + self.self_attn(self.input_layernorm(x), pos, cos, sin, cache, mask)
        return h + self.mlp(self.post_attention_layernorm(h))


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig, ckpt: Checkpoint, dtype: torch.dtype, device: torch.device):
        super().__init__()
        self.config, self.dtype, self.device = config, dtype, device
        keep_blocks = ckpt.format == "gguf"
        tensors = ckpt.tensors

        def make(raws: list[RawTensor], embedding: bool = False) -> nn.Module:
            return linear(raws, dtype, device, keep_blocks, embedding)

        def lin(*names: str) -> nn.Module:
            raws = [tensors[name + ".weight"] for name in names]
            module = Projections(raws, make) if len(names) > 1 else make(raws, names[0] == "model.embed_tokens")
            module_maps_file = any(ckpt.maps(b.data_ptr()) for b in module.buffers() if b is not None and b.numel())
            for name, raw in zip(names, raws):
                # Pages of the file nothing reads again can go: those the module copied, and
                # those of tensors the checkpoint reader already copied (Q/K, un-permuted).
                if not (module_maps_file and raw.data.size and ckpt.maps(raw.data.ctypes.data)):
                    ckpt.release(name + ".weight")
            return module

        def norm(name: str) -> RMSNorm:
            module = RMSNorm(dense(tensors[name + ".weight"], dtype, device), config.rms_norm_eps)
            ckpt.release(name + ".weight")
            return module

        self.embed_tokens = lin("model.embed_tokens")
        self.layers = nn.ModuleList()
        for i in range(config.num_layers):
            attn, mlp = f"model.layers.{i}.self_attn.", f"model.layers.{i}.mlp."
            self.layers.append(
                Block(
                    Attention(config, i, lin(attn + "q_proj", attn + "k_proj", attn + "v_proj"), lin(attn + "o_proj")),
                    MLP(lin(mlp + "gate_proj", mlp + "up_proj"), lin(mlp + "down_proj")),
                    norm(f"model.layers.{i}.input_layernorm"),
                    norm(f"model.layers.{i}.post_attention_layernorm"),
                )
            )
            return_freed_memory()
        self.norm = norm("model.norm")
        self.lm_head = self.embed_tokens if config.tie_word_embeddings else lin("lm_head")

        inv_freq, self.rope_scale = config.rope_inv_freq()
        self.register_buffer("inv_freq", torch.from_numpy(inv_freq).to(device), persistent=False)
        self.caches = nn.ModuleList()
        self.capacity = 0

    def ensure_capacity(self, needed: int, exact: bool = False) -> None:
        """Grow the KV cache (and the RoPE table) to hold `needed` positions, keeping what it holds.
        Growth doubles, in steps of 256, so a long generation reallocates a handful of times;
        `exact` (a generation that knows its length) grows to `needed` in steps of 64 only."""
        if needed <= self.capacity:
            return
        step = 64 if exact else 256
        capacity = needed if exact else min(max(needed, 2 * self.capacity, 256), self.config.context_length)
        capacity = min(-(-capacity // step) * step, max(self.config.context_length, needed))
        old = list(self.caches)
        self.caches = nn.ModuleList(KVCache(self.config, capacity, self.dtype, self.device) for _ in self.layers)
        for new, prev in zip(self.caches, old):
            new.k[:, :, : self.capacity] = prev.k
            new.v[:, :, : self.capacity] = prev.v
        self.capacity = capacity
        positions = torch.arange(capacity, device=self.device, dtype=torch.float32)
        freqs = torch.outer(positions, self.inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        self.cos = (emb.cos() * self.rope_scale).to(self.dtype)
        sin = emb.sin() * self.rope_scale
        half = self.config.head_dim // 2
        self.sin = torch.cat((-sin[:, :half], sin[:, half:]), dim=-1).to(self.dtype)  # see apply_rope

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, pos: int, last_only: bool = False) -> torch.Tensor:
        """Logits for `tokens` ([T] ids at positions pos..pos+T-1), using and filling the KV cache."""
        T = tokens.shape[0]
        self.ensure_capacity(pos + T)
        x = self.embed_tokens.rows(tokens, self.dtype)
        cos, sin = self.cos[pos : pos + T], self.sin[pos : pos + T]
        mask = None
        if T > 1 and pos > 0:  # a chunk after cached positions: causal over the chunk, all of the past
            mask = torch.ones(T, pos + T, dtype=torch.bool, device=self.device).tril(diagonal=pos)
        for layer, cache in zip(self.layers, self.caches):
            x = layer(x, pos, cos, sin, cache, mask)
        if last_only:
            x = x[-1:]
        logits = self.lm_head(self.norm(x)).float()
        if T > 1 and self.device.type == "cpu":
            # A prefill's temporaries are large and differ in size from one prompt to the next:
            # handed back now, they do not fragment the heap into growth over a long chat.
            return_freed_memory()
        return logits
