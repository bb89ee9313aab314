"""SmolLM3 / Llama on our C kernels, for a GGUF file whose weights they all multiply: the
embedding lookup in numpy, every layer in one C call (forward_layers: RMSNorm, the fused q/k/v,
RoPE on RoPE layers only, the KV cache write and causal attention, SwiGLU), then the final norm
and the output matmul. The weights are views of the mapped file, in their blocks; Q/K rows are
read where llama.cpp's permutation left them, in Hugging Face's order (RawTensor.row_runs).

The torch backend runs the same kernels in the same order on the CPU (backends/torch/
native_layers.py), so the logits are bitwise its; each row of a forward is computed as that row
decoded alone, so a prompt's logits do not depend on how it is split into forward passes.

Shapes: T tokens in a forward, C = hidden_size, KV key-value heads of D = head_dim each.
"""

from __future__ import annotations

import ctypes

import gguf.quants
import numpy as np

from .. import settings
from ..checkpoint import Checkpoint, RawTensor
from ..memory import return_freed_memory
from ..numbers import cache_capacity
from . import library
from .library import DecoderLayer, WeightParts


class NotNative(Exception):
    """A checkpoint these kernels cannot run whole; the message says what stops it."""


class NativeModel:
    def __init__(self, ckpt: Checkpoint, lib: ctypes.CDLL, threads: int):
        if ckpt.format != "gguf":
            raise NotNative(f"the native backend runs GGUF files; {ckpt.path.name} is a {ckpt.format} checkpoint")
        c = self.config = ckpt.config
        self.lib, self.threads = lib, threads
        self.dims = (c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim, c.intermediate_size)
        self.f16_cache = settings.kv_cache() == "f16"
        # The embedding's raw rows, looked up by id; also the output matrix when tied.
        self.embedding = ckpt.tensors["model.embed_tokens.weight"]
        self.weights: list[WeightParts] = []  # keeps every ctypes array the layers point into alive
        self.norms: list[np.ndarray] = []
        self.layers = (DecoderLayer * c.num_layers)()
        for i in range(c.num_layers):
            attn, mlp, norm = f"model.layers.{i}.self_attn.", f"model.layers.{i}.mlp.", f"model.layers.{i}."
            self.layers[i] = DecoderLayer(
                self._norm(ckpt, norm + "input_layernorm").ctypes.data,
                self._norm(ckpt, norm + "post_attention_layernorm").ctypes.data,
                self._linear(ckpt, attn + "q_proj", attn + "k_proj", attn + "v_proj"),
                self._linear(ckpt, attn + "o_proj"),
                self._linear(ckpt, mlp + "gate_proj", mlp + "up_proj"),
                self._linear(ckpt, mlp + "down_proj"),
                int(c.rope_layers[i]),
            )
        self.final_norm = self._norm(ckpt, "model.norm")
        head = ckpt.tensors["model.embed_tokens.weight" if c.tie_word_embeddings else "lm_head.weight"]
        self._check_native(head)
        self.head, self.head_type = WeightParts(head.row_runs()), int(head.ggml_type)
        self.capacity = 0
        self.k_caches: list[np.ndarray] = []
        self.v_caches: list[np.ndarray] = []

    def _check_native(self, raw: RawTensor) -> None:
        if not self.lib.gguf_matmul_supports(int(raw.ggml_type), raw.shape[1]):
            raise NotNative(f"{raw.name} is {raw.ggml_type.name}, which our C kernels do not multiply")

    def _linear(self, ckpt: Checkpoint, *names: str) -> library.LinearMap:
        """Projections of one input as one map: a segment per run of same-typed weights (a Q4_K_M
        file's Q6_K v beside Q4_K q and k), outputs side by side."""
        segments: list[tuple[int, list[np.ndarray]]] = []
        for name in names:
            raw = ckpt.tensors[name + ".weight"]
            self._check_native(raw)
            if segments and segments[-1][0] == int(raw.ggml_type):
                segments[-1][1].extend(raw.row_runs())
            else:
                segments.append((int(raw.ggml_type), raw.row_runs()))
        parts = [(type_id, WeightParts(runs)) for type_id, runs in segments]
        self.weights += [p for _, p in parts]
        return library.linear_map(parts)

    def _norm(self, ckpt: Checkpoint, name: str) -> np.ndarray:
        raw = ckpt.tensors[name + ".weight"]
        weight = np.array(gguf.quants.dequantize(raw.data, raw.ggml_type), dtype=np.float32).reshape(-1)
        ckpt.release(name + ".weight")  # copied: nothing reads its pages again
        self.norms.append(weight)
        return weight

    def ensure_capacity(self, needed: int, exact: bool = False) -> None:
        """Grow the KV cache (and the RoPE tables) to hold `needed` positions (see cache_capacity),
        keeping what it holds. Left unfilled: attention reads only the positions written, and
        zeroing would make every page resident before the first token."""
        if needed <= self.capacity:
            return
        capacity = cache_capacity(self.capacity, needed, self.config.context_length, exact)
        shape = (self.config.num_kv_heads, capacity, self.config.head_dim)
        dtype = np.float16 if self.f16_cache else np.float32
        grown = []
        for old in (self.k_caches, self.v_caches):
            new = [np.empty(shape, dtype) for _ in range(self.config.num_layers)]
            for n, o in zip(new, old):
                n[:, : self.capacity] = o
            grown.append(new)
        self.k_caches, self.v_caches = grown
        self.k_pointers = (ctypes.c_void_p * len(self.k_caches))(*[k.ctypes.data for k in self.k_caches])
        self.v_pointers = (ctypes.c_void_p * len(self.v_caches))(*[v.ctypes.data for v in self.v_caches])
        self.cos, self.signed_sin = self.config.rope_tables(capacity)
        self.capacity = capacity

    def forward(self, ids: list[int], pos: int, last_only: bool = False) -> np.ndarray:
        """float32 logits [T, vocab] (or [1, vocab]) for token ids at positions pos..pos+T-1, using
        and filling the KV cache."""
        T = len(ids)
        self.ensure_capacity(pos + T)
        x = self.embed(ids)  # (T, C)
        library.forward_layers(self.lib, self.layers, self.k_pointers, self.v_pointers, self.f16_cache, self.capacity,
                               x.ctypes.data, T, pos, self.dims, self.config.rms_norm_eps, self.cos[pos].ctypes.data,
                               self.signed_sin[pos].ctypes.data, self.threads)
        if last_only:
            x = x[-1:]
        h = np.empty_like(x)
        self.lib.rms_norm_f32(x.ctypes.data, self.final_norm.ctypes.data, h.ctypes.data, h.shape[0], h.shape[1],
                              self.config.rms_norm_eps)
        logits = library.gguf_matmul(self.lib, self.head_type, self.head, h, self.threads)
        if T > 1:
            # A prefill's temporaries are large and differ in size from one prompt to the next:
            # handed back now, they do not fragment the heap into growth over a long chat.
            return_freed_memory()
        return logits

    def embed(self, ids: list[int]) -> np.ndarray:
        """Rows `ids` of the embedding, dequantized: a lookup that touches only those rows."""
        rows = self.embedding.stored[ids]
        return np.ascontiguousarray(gguf.quants.dequantize(rows, self.embedding.ggml_type), dtype=np.float32)
