"""The torch backend: devices, dtypes, and sampling on the device."""

from __future__ import annotations

import numpy as np
import torch
from gguf import GGMLQuantizationType

from ..checkpoint import Checkpoint
from ..engine import Engine, EngineInfo
from ..errors import BackendUnavailable, CheckpointError
from ..sampling import SamplingParams
from .model import Transformer
from .weights import NativeLinear

DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}


def pick_device(device: str | None) -> torch.device:
    if device in (None, "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise BackendUnavailable(f"unknown device '{device}' (use cpu, cuda, cuda:N or mps)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise BackendUnavailable("--device cuda: this torch has no CUDA or no GPU is visible")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise BackendUnavailable("--device mps: MPS is not available on this machine")
    return dev


def pick_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        # bf16 halves memory traffic on GPUs; on CPU f32 is both faster and exact.
        return torch.float32 if device.type == "cpu" else torch.bfloat16
    if dtype not in DTYPES:
        raise BackendUnavailable(f"unknown dtype '{dtype}' (use auto, f32, f16 or bf16)")
    return DTYPES[dtype]


class TorchEngine(Engine):
    def __init__(self, ckpt: Checkpoint, tokenizer, chat_template, device: str | None = None, dtype: str = "auto"):
        if any(t.ggml_type == GGMLQuantizationType.I32 for t in ckpt.tensors.values()):
            raise CheckpointError(f"{ckpt.path.name} is an MLX-quantized checkpoint: run it with --backend mlx")
        dev = pick_device(device)
        torch_dtype = pick_dtype(dtype, dev)
        name = {v: k for k, v in DTYPES.items()}[torch_dtype]
        info = EngineInfo("torch", str(dev), name, ckpt.path.name, ckpt.weight_type)
        super().__init__(ckpt, tokenizer, chat_template, info)
        self.model = Transformer(ckpt.config, ckpt, torch_dtype, dev)
        self.device = dev
        self.generator = torch.Generator(device=dev)
        # Only the native kernels take a few rows row by row as they take one (model.ROWS_AS_DECODED);
        # every weight handler (weights.linear) has rows().
        handlers = [m for m in self.model.modules() if hasattr(m, "rows")]
        self.rows_exact = dev.type == "cpu" and torch_dtype == torch.float32 and all(isinstance(m, NativeLinear) for m in handlers)

    def forward(self, ids: list[int], pos: int, last_only: bool) -> torch.Tensor:
        tokens = torch.tensor(ids, dtype=torch.long, device=self.device)
        return self.model(tokens, pos, last_only=last_only)

    def to_numpy(self, logits: torch.Tensor) -> np.ndarray:
        return logits.float().cpu().numpy()

    def reserve(self, positions: int) -> None:
        # At its size: doubling would hold up to twice the cache (3B, 544 positions: +75 MB)
        self.model.ensure_capacity(positions, exact=True)

    def reset_rng(self, seed: int | None) -> None:
        if seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(seed)

    def sample(self, logits: torch.Tensor, history: list[int], params: SamplingParams) -> int:
        logits = logits[-1].float()
        if params.repeat_penalty != 1.0 and params.repeat_last_n > 0 and history:
            # As llama.cpp and candle: divide positive logits, multiply negative ones.
            recent = torch.tensor(history[-params.repeat_last_n :], device=logits.device).unique()
            values = logits[recent]
            logits = logits.clone()
            logits[recent] = torch.where(values > 0, values / params.repeat_penalty, values * params.repeat_penalty)
        if params.greedy:
            return int(logits.argmax())
        logits = logits / params.temperature
        if params.top_k is not None and params.top_k < logits.shape[-1]:
            kth = torch.topk(logits, params.top_k).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if params.top_p is not None and params.top_p < 1.0:
            sorted_logits, order = torch.sort(logits, descending=True)
            probs = sorted_logits.softmax(-1)
            # Drop a token when the tokens before it already cover top_p; the first always stays.
            drop = probs.cumsum(-1) - probs >= params.top_p
            logits = logits.index_put((order[drop],), torch.tensor(float("-inf"), device=logits.device))
        probs = logits.softmax(-1)
        return int(torch.multinomial(probs, 1, generator=self.generator))
