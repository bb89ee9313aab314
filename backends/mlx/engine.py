"""The MLX backend: mlx-lm's Llama and SmolLM3 models over our checkpoint tensors, with
mlx-lm's KV cache and sampling functions.

GGUF weights stay quantized (see weights.py for which types map exactly); safetensors
weights load in the compute dtype, or quantized at load with `quantize=4|8`.
"""

from __future__ import annotations

import json
import secrets

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.models import llama, smollm3
from mlx_lm.models.cache import make_prompt_cache, trim_prompt_cache
from mlx_lm.sample_utils import apply_top_k, apply_top_p, make_repetition_penalty
from mlx_lm.utils import infer_quant_config

from ..checkpoint import Checkpoint
from ..config import ModelConfig
from ..engine import Engine, EngineInfo, dtype_name
from ..errors import BackendUnavailable, CheckpointError
from ..sampling import SamplingParams, sample_token
from .weights import one_torch_thread, tensor_arrays

MLX_DTYPES = {"f32": mx.float32, "f16": mx.float16, "bf16": mx.bfloat16}
QUANTIZE_GROUP = 64  # mlx-lm's default group for quantizing float checkpoints at load


def pick_dtype(dtype: str) -> str:
    # auto: on the CPU f32 is exact (and what the tests hold to); on Metal bf16 halves the
    # bytes read per token and keeps f32's range, as the torch backend does on GPUs.
    return dtype_name(dtype, auto="f32" if mx.default_device() == mx.cpu else "bf16")


def build_model(config: ModelConfig) -> nn.Module:
    """mlx-lm's module tree for `config`, NoPE layers exactly as config.rope_layers says."""
    args = dict(
        model_type=config.architecture,
        hidden_size=config.hidden_size,
        num_hidden_layers=config.num_layers,
        intermediate_size=config.intermediate_size,
        num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_kv_heads,
        head_dim=config.head_dim,
        rms_norm_eps=config.rms_norm_eps,
        vocab_size=config.vocab_size,
        max_position_embeddings=config.context_length,
        rope_theta=config.rope_theta,
        rope_scaling=yarn_defaults_explicit(config),
        tie_word_embeddings=config.tie_word_embeddings,
    )
    if config.architecture == "smollm3":
        model = smollm3.Model(smollm3.ModelArgs(**args, no_rope_layers=[int(r) for r in config.rope_layers]))
    else:  # llama (SmolLM2): config.rope_layers is all True
        model = llama.Model(llama.ModelArgs(**args))
    check_rope(model, config)
    return model


def yarn_defaults_explicit(config: ModelConfig) -> dict | None:
    """rope_scaling with YaRN's defaults as backends/config.py takes them (mlx-lm's differ:
    original context 4096, factor required)."""
    scaling = dict(config.rope_scaling or {}) or None
    if scaling and (scaling.get("rope_type") or scaling.get("type")) == "yarn":
        original = scaling.get("original_max_position_embeddings") or config.context_length
        factor = scaling.get("factor") or config.context_length / original
        scaling |= {"original_max_position_embeddings": original, "factor": factor}
    return scaling


def check_rope(model: nn.Module, config: ModelConfig) -> None:
    """mlx-lm builds RoPE (and YaRN) from rope_scaling itself: make sure it rotates by our config's
    frequencies and scale. At position 1 a unit vector turns by exactly inv_freq, so a probe
    reads both back for any rope module."""
    inv_freq, attention_factor = config.rope_inv_freq()
    half = config.head_dim // 2
    probe = mx.concatenate([mx.ones((1, 1, 1, half)), mx.zeros((1, 1, 1, half))], axis=-1)
    for layer, uses_rope in zip(model.layers, config.rope_layers):
        if not uses_rope:
            continue
        out = np.array(layer.self_attn.rope(probe, offset=1)).reshape(2, half)
        angle, scale = np.arctan2(out[1], out[0]), np.hypot(out[0], out[1])
        if not (np.allclose(angle, inv_freq, rtol=1e-5, atol=0) and np.allclose(scale, attention_factor, rtol=1e-5)):
            raise CheckpointError(f"mlx-lm computes rope scaling {config.rope_scaling} differently from this config")
        return  # every RoPE layer shares the same arguments


def load_checkpoint_weights(model: nn.Module, ckpt: Checkpoint, dtype: mx.Dtype) -> None:
    """Each tensor as MLX arrays, the file's pages released as we go; then each module takes
    the quantized class its tensors need: a GGML type's bits (group 32), or, in an MLX
    checkpoint (weight packed as U32 beside .scales and .biases), what mlx-lm reads there."""
    weights: dict[str, mx.array] = {}
    from_gguf: dict[str, dict | bool] = {}  # module path -> to_quantized() arguments
    with one_torch_thread():
        for name, raw in model.sanitize(dict(ckpt.tensors)).items():
            arrays, from_gguf[name.removesuffix(".weight")] = tensor_arrays(name, raw, dtype)
            weights.update(arrays)
            ckpt.release(name)
    per_module = mlx_quantization(ckpt)

    def quantization(path: str, module: nn.Module) -> dict | bool:
        if f"{path}.scales" in weights and not from_gguf.get(path):
            return per_module.get(path) or infer_quant_config(path, module, weights)
        return from_gguf.get(path, False)

    nn.quantize(model, class_predicate=quantization)
    model.load_weights(list(weights.items()))  # strict: every parameter, each with its shape


def mlx_quantization(ckpt: Checkpoint) -> dict:
    """config.json's `quantization` in an MLX checkpoint: per-module entries, where present."""
    if ckpt.hf_dir is None:
        return {}
    config = json.loads((ckpt.hf_dir / "config.json").read_text())
    return {k: v for k, v in (config.get("quantization") or {}).items() if isinstance(v, dict)}


def quantize_float_layers(model: nn.Module, bits: int) -> None:
    """Quantize the layers still in floats (all of a safetensors checkpoint) to `bits`, group 64."""

    def still_float(_, m):
        return isinstance(m, (nn.Linear, nn.Embedding)) and m.weight.shape[-1] % QUANTIZE_GROUP == 0

    nn.quantize(model, QUANTIZE_GROUP, bits, class_predicate=still_float)


class MLXEngine(Engine):
    reads_tokens_late = True  # a sampled token feeds the next forward as a lazy array

    def __init__(self, ckpt: Checkpoint, tokenizer, chat_template, dtype: str = "auto", quantize: int | None = None):
        name = pick_dtype(dtype)
        mx_dtype = MLX_DTYPES[name]
        if quantize not in (None, 2, 3, 4, 5, 6, 8):
            raise BackendUnavailable(f"cannot quantize to {quantize} bits (MLX supports 2, 3, 4, 5, 6 and 8)")
        info = EngineInfo("mlx", str(mx.default_device()), name, ckpt.path.name, ckpt.weight_type)
        super().__init__(ckpt, tokenizer, chat_template, info)
        self.model = build_model(ckpt.config)
        load_checkpoint_weights(self.model, ckpt, mx_dtype)
        if quantize is not None:
            quantize_float_layers(self.model, quantize)
        mx.eval(self.model.parameters())
        self.cache = make_prompt_cache(self.model)
        self.sampler = MLXSampler()
        # On the CPU a few rows' logits equal each row's alone, bit for bit (tests/test_speculative.py);
        # Metal multiplies one row and several with different kernels.
        self.rows_exact = mx.default_device() == mx.cpu

    def logits_of(self, tokens: mx.array, pos: int, last_only: bool) -> mx.array:
        """The forward's graph for tokens [1, n] from pos, not yet computed."""
        cached = self.cache[0].offset
        if pos > cached:
            raise ValueError(f"forward from position {pos}, but the KV cache holds only {cached} tokens")
        trim_prompt_cache(self.cache, cached - pos)  # the shared prefill reuses a prefix: drop the rest
        hidden = self.model.model(tokens, cache=self.cache)
        if last_only:
            hidden = hidden[:, -1:]
        if self.config.tie_word_embeddings:
            return self.model.model.embed_tokens.as_linear(hidden)[0]
        return self.model.lm_head(hidden)[0]

    def forward(self, ids: list[int], pos: int, last_only: bool) -> mx.array:
        logits = self.logits_of(mx.array(ids)[None], pos, last_only)
        mx.eval(logits)  # MLX is lazy: compute here, so that timings and trace spans are the forward's
        return logits

    def forward_queued(self, sampled: mx.array, pos: int) -> mx.array:
        logits = self.logits_of(sampled.reshape(1, 1), pos, last_only=True)
        # Started, not left lazy: the cache it writes may be read on another thread (the TUI's
        # next turn), where MLX refuses a lazy array made on this one, but not a started one
        mx.async_eval(logits)
        return logits

    def to_numpy(self, logits: mx.array) -> np.ndarray:
        return np.array(logits.astype(mx.float32))

    def reset_rng(self, seed: int | None) -> None:
        self.sampler.seed(seed)

    def sample_later(self, logits: mx.array, history: list[int], params: SamplingParams) -> mx.array:
        sampled = sample_token(logits[-1:].astype(mx.float32), history, params, self.sampler)
        mx.async_eval(sampled)  # started before the next forward is queued behind it, so read first
        return sampled

    def read_token(self, sampled: mx.array) -> int:
        return int(sampled.item())

    def sample(self, logits: mx.array, history: list[int], params: SamplingParams) -> int:
        return self.read_token(self.sample_later(logits, history, params))


class MLXSampler:
    """sample_token's steps (backends/sampling.py) with mlx-lm's functions, which work on
    log-probabilities: the temperature step returns those. The token comes out as a scalar array,
    computed and read when the engine reads it (MLXEngine.read_token)."""

    def __init__(self):
        self.seed(0)

    def seed(self, seed: int | None) -> None:
        self.key = mx.random.key(secrets.randbits(63) if seed is None else seed)
        # Evaluated here: MLX streams are per thread (MLX >= 0.31.2), and the TUI loads and
        # generates on different worker threads, so no lazy array may cross between them.
        mx.eval(self.key)

    def penalize(self, logits: mx.array, recent: list[int], penalty: float) -> mx.array:
        return make_repetition_penalty(penalty, len(recent))(mx.array(recent), logits)

    def argmax(self, logits: mx.array) -> mx.array:
        return mx.argmax(logits, axis=-1)[0]

    def temperature(self, logits: mx.array, temperature: float) -> mx.array:
        return nn.log_softmax(logits / temperature, axis=-1)

    def top_k(self, logprobs: mx.array, k: int) -> mx.array:
        return apply_top_k(logprobs, k)

    def top_p(self, logprobs: mx.array, p: float) -> mx.array:
        return apply_top_p(logprobs, p)  # renormalizes over what top-k kept

    def draw(self, logprobs: mx.array) -> mx.array:
        self.key, key = mx.random.split(self.key)
        return mx.random.categorical(logprobs, key=key)[0]
