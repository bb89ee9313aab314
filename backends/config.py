"""The model configuration every backend builds from, read from a HF config.json or GGUF metadata.

SmolLM3 and SmolLM2 (Llama) differ only in which layers apply RoPE: that rule lives here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from .errors import CheckpointError
from .gguf_file import shown

SUPPORTED_ARCHITECTURES = ("smollm3", "llama")
NOPE_INTERVAL = 4
MAX_LAYERS = 512  # llama.cpp's LLAMA_MAX_LAYERS: more is a corrupt count, not a model


def _check_sizes(where: str, num_layers: int, num_heads: int, hidden: int) -> None:
    """Before anything is sized by them (a corrupt layer count of 2^31 would build 2^31 flags)."""
    if not 0 < num_layers <= MAX_LAYERS or num_heads <= 0 or hidden <= 0:
        raise CheckpointError(f"{where}: {num_layers} layers of {num_heads} heads, hidden size {hidden}: corrupt")


def smollm3_rope_layers(num_layers: int, interval: int = NOPE_INTERVAL) -> tuple[bool, ...]:
    """Layer i applies RoPE unless (i + 1) % interval == 0, as transformers' default and llama.cpp do."""
    return tuple((i + 1) % interval != 0 for i in range(num_layers))


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    context_length: int
    tie_word_embeddings: bool
    rope_layers: tuple[bool, ...]  # rope_layers[i]: layer i applies rotary embeddings
    rope_scaling: dict | None = None  # {"rope_type": "yarn", "factor": ..., ...} or None
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = field(default_factory=tuple)

    def __post_init__(self):
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise CheckpointError(
                f"unknown architecture '{self.architecture}' (supported: {', '.join(SUPPORTED_ARCHITECTURES)})"
            )
        if min(self.vocab_size, self.hidden_size, self.num_layers, self.num_heads, self.num_kv_heads) <= 0:
            raise CheckpointError("model config has a non-positive dimension")
        if self.num_heads % self.num_kv_heads or self.head_dim % 2:
            raise CheckpointError(
                f"model config is inconsistent: {self.num_heads} heads, {self.num_kv_heads} KV heads, "
                f"head_dim {self.head_dim}"
            )
        if len(self.rope_layers) != self.num_layers:
            raise CheckpointError("model config: no_rope_layers does not have one entry per layer")

    def rope_inv_freq(self) -> tuple[np.ndarray, float]:
        """Inverse frequencies [head_dim/2] and the cos/sin scale (YaRN's attention factor, else 1)."""
        dim = self.head_dim
        inv_freq = 1.0 / self.rope_theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
        scaling = self.rope_scaling or {}
        kind = scaling.get("rope_type") or scaling.get("type") or "default"
        if kind == "default":
            return inv_freq.astype(np.float32), 1.0
        if kind == "linear":
            return (inv_freq / scaling["factor"]).astype(np.float32), 1.0
        if kind == "yarn":
            return _yarn(inv_freq, dim, self.rope_theta, scaling, self.context_length)
        raise CheckpointError(f"unsupported rope scaling type '{kind}' (supported: default, linear, yarn)")

    def rope_tables(self, positions: int) -> tuple[np.ndarray, np.ndarray]:
        """cos and signed sin, float32 [positions, head_dim], for RoPE on each head's two halves:
        x * cos + roll(x, head_dim / 2) * signed_sin is Hugging Face's x * cos + rotate_half(x) *
        sin, with signed_sin = (-sin, sin). In float32, as transformers computes them."""
        inv_freq, scale = self.rope_inv_freq()
        angles = np.outer(np.arange(positions, dtype=np.float32), inv_freq)  # (positions, hs / 2)
        cos, sin = np.cos(angles) * np.float32(scale), np.sin(angles) * np.float32(scale)
        return np.concatenate([cos, cos], -1), np.concatenate([-sin, sin], -1)


def _yarn(inv_freq: np.ndarray, dim: int, base: float, scaling: dict, context_length: int):
    # YaRN (arXiv 2309.00071) exactly as transformers' _compute_yarn_parameters computes it.
    original = scaling.get("original_max_position_embeddings") or context_length
    factor = scaling.get("factor") or context_length / original
    attention_factor = scaling.get("attention_factor")
    if attention_factor is None:
        mscale, mscale_all_dim = scaling.get("mscale"), scaling.get("mscale_all_dim")

        def get_mscale(scale, m=1.0):
            return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

        if mscale and mscale_all_dim:
            attention_factor = get_mscale(factor, mscale) / get_mscale(factor, mscale_all_dim)
        else:
            attention_factor = get_mscale(factor)
    beta_fast = scaling.get("beta_fast") or 32
    beta_slow = scaling.get("beta_slow") or 1

    def correction_dim(rotations):
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1)
    extrapolation = 1 - ramp
    inv = (inv_freq / factor) * (1 - extrapolation) + inv_freq * extrapolation
    return inv.astype(np.float32), float(attention_factor)


def _as_ids(value) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, (list, tuple)):
        return tuple(int(v) for v in value)
    return (int(value),)


def config_from_hf(cfg: dict) -> ModelConfig:
    """From a transformers config.json (SmolLM3ForCausalLM or LlamaForCausalLM)."""
    arch = cfg.get("model_type", "")
    try:
        num_layers = int(cfg["num_hidden_layers"])
        num_heads = int(cfg["num_attention_heads"])
        hidden = int(cfg["hidden_size"])
        _check_sizes("config.json", num_layers, num_heads, hidden)
        # transformers 5 moves rope_theta/rope_scaling into rope_parameters; older configs keep both on top.
        rope_params = dict(cfg.get("rope_parameters") or {})
        rope_scaling = cfg.get("rope_scaling") or None
        theta = rope_params.get("rope_theta", cfg.get("rope_theta", 10000.0))
        if rope_params.get("rope_type", "default") != "default":
            rope_scaling = rope_params
        if arch == "smollm3":
            flags = cfg.get("no_rope_layers")
            rope_layers = (
                tuple(bool(f) for f in flags)
                if flags is not None
                else smollm3_rope_layers(num_layers, int(cfg.get("no_rope_layer_interval", NOPE_INTERVAL)))
            )
        else:
            rope_layers = (True,) * num_layers
        return ModelConfig(
            architecture=arch,
            vocab_size=int(cfg["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(cfg["intermediate_size"]),
            num_layers=num_layers,
            num_heads=num_heads,
            num_kv_heads=int(cfg.get("num_key_value_heads") or num_heads),
            head_dim=int(cfg.get("head_dim") or hidden // num_heads),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=float(theta),
            context_length=int(cfg.get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            rope_layers=rope_layers,
            rope_scaling=rope_scaling,
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=_as_ids(cfg.get("eos_token_id")),
        )
    except (KeyError, TypeError, ValueError, OverflowError) as e:
        raise CheckpointError(f"config.json is missing or has a bad value for {e}") from None


def config_from_gguf(metadata: dict, has_output_tensor: bool) -> ModelConfig:
    """From GGUF metadata as llama.cpp's converter writes it (keys prefixed by the architecture)."""
    arch = metadata.get("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise CheckpointError(
            f"unknown architecture {shown(str(arch))} in GGUF (supported: {', '.join(SUPPORTED_ARCHITECTURES)})"
        )

    def key(name, default=None):
        value = metadata.get(f"{arch}.{name}", default)
        if value is None:
            raise CheckpointError(f"GGUF metadata lacks '{arch}.{name}'")
        return value

    try:
        num_layers = int(key("block_count"))
        num_heads = int(key("attention.head_count"))
        hidden = int(key("embedding_length"))
        _check_sizes("GGUF metadata", num_layers, num_heads, hidden)
        vocab = metadata.get(f"{arch}.vocab_size") or len(metadata.get("tokenizer.ggml.tokens") or ())
        head_dim = int(metadata.get(f"{arch}.attention.key_length") or hidden // num_heads)
        scaling = None
        if metadata.get(f"{arch}.rope.scaling.type") == "yarn":
            scaling = {
                "rope_type": "yarn",
                "factor": float(key("rope.scaling.factor")),
                "original_max_position_embeddings": int(key("rope.scaling.original_context_length")),
            }
        return ModelConfig(
            architecture=arch,
            vocab_size=int(vocab),
            hidden_size=hidden,
            intermediate_size=int(key("feed_forward_length")),
            num_layers=num_layers,
            num_heads=num_heads,
            num_kv_heads=int(key("attention.head_count_kv", num_heads)),
            head_dim=head_dim,
            rms_norm_eps=float(key("attention.layer_norm_rms_epsilon", 1e-5)),
            rope_theta=float(key("rope.freq_base", 10000.0)),
            context_length=int(key("context_length", 2048)),
            tie_word_embeddings=not has_output_tensor,
            # No GGUF key records NoPE layers: llama.cpp hard-codes the rule for smollm3.
            rope_layers=smollm3_rope_layers(num_layers) if arch == "smollm3" else (True,) * num_layers,
            rope_scaling=scaling,
            bos_token_id=metadata.get("tokenizer.ggml.bos_token_id"),
            eos_token_ids=_as_ids(metadata.get("tokenizer.ggml.eos_token_id")),
        )
    except (TypeError, ValueError, OverflowError) as e:
        raise CheckpointError(f"GGUF metadata has a bad value: {e}") from None
