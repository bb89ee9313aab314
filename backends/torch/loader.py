"""The checkpoint's weights into a model built from its config (model.py), as gpt-fast's
`_load_model` and mlx-lm's `load_weights` do.

This is the one place that knows how a checkpoint holds its weights: GGUF weights stay in
their blocks (weights.py picks a handler per type), safetensors become the compute dtype;
fused projections (q/k/v, gate/up) become one handler per run of same-typed parts; and the
file's pages that nothing reads again are released as each weight is placed.
"""

from __future__ import annotations

import torch
from torch import nn

from ..checkpoint import Checkpoint, RawTensor
from ..errors import CheckpointError
from ..memory import return_freed_memory
from .model import Transformer
from .native_layers import NativeLayerStack, layers_for
from .weights import FusedLinear, dense, linear


def load_model(ckpt: Checkpoint, dtype: torch.dtype, device: torch.device) -> Transformer:
    if ckpt.is_mlx_quantized:
        raise CheckpointError(f"{ckpt.path.name} is an MLX-quantized checkpoint: run it with --backend mlx")
    model = Transformer(ckpt.config, dtype, device, layers_for(device, dtype))
    load_weights(model, ckpt)
    model.layer_stack = NativeLayerStack.of(model)
    return model


def load_weights(model: Transformer, ckpt: Checkpoint) -> None:
    """Every placeholder of `model` replaced by its checkpoint weight, layer by layer."""
    load = WeightLoader(ckpt, model.dtype, model.device)
    model.embed_tokens = load.linear("model.embed_tokens", embedding=True)
    for i, layer in enumerate(model.layers):
        attn, mlp = f"model.layers.{i}.self_attn.", f"model.layers.{i}.mlp."
        layer.self_attn.qkv = load.linear(attn + "q_proj", attn + "k_proj", attn + "v_proj")
        layer.self_attn.o_proj = load.linear(attn + "o_proj")
        layer.mlp.gate_up = load.linear(mlp + "gate_proj", mlp + "up_proj")
        layer.mlp.down_proj = load.linear(mlp + "down_proj")
        load.norm(layer.input_layernorm, f"model.layers.{i}.input_layernorm")
        load.norm(layer.post_attention_layernorm, f"model.layers.{i}.post_attention_layernorm")
        return_freed_memory()
    load.norm(model.norm, "model.norm")
    model.lm_head = model.embed_tokens if model.config.tie_word_embeddings else load.linear("lm_head")


class WeightLoader:
    def __init__(self, ckpt: Checkpoint, dtype: torch.dtype, device: torch.device):
        self.ckpt, self.dtype, self.device = ckpt, dtype, device
        self.keep_blocks = ckpt.format == "gguf"

    def linear(self, *names: str, embedding: bool = False) -> nn.Module:
        """The handler for weights `names` (several: projections of one input, stacked by rows)."""
        raws = [self.ckpt.tensors[name + ".weight"] for name in names]
        runs: list[list[RawTensor]] = []  # one matmul per run of same-typed parts
        for raw in raws:
            if runs and runs[-1][0].ggml_type == raw.ggml_type:
                runs[-1].append(raw)
            else:
                runs.append([raw])
        parts = [linear(run, self.dtype, self.device, self.keep_blocks, embedding) for run in runs]
        module = parts[0] if len(parts) == 1 else FusedLinear(parts)
        module_maps_file = any(self.ckpt.maps(b.data_ptr()) for b in module.buffers() if b is not None and b.numel())
        for name, raw in zip(names, raws):
            # Pages of the file nothing reads again can go: those of tensors the module copied.
            if not (module_maps_file and raw.stored.size and self.ckpt.maps(raw.stored.ctypes.data)):
                self.ckpt.release(name + ".weight")
        return module

    def norm(self, module: nn.Module, name: str) -> None:
        module.weight = nn.Parameter(dense(self.ckpt.tensors[name + ".weight"], self.dtype, self.device), requires_grad=False)
        self.ckpt.release(name + ".weight")
