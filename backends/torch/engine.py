"""The torch backend: devices, dtypes, and sampling on the device."""

from __future__ import annotations

import numpy as np
import torch

from ..checkpoint import Checkpoint
from ..engine import Engine, EngineInfo, dtype_name
from ..errors import BackendUnavailable
from ..sampling import SamplingParams
from .loader import load_model

TORCH_DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}


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


def pick_dtype(dtype: str, device: torch.device) -> str:
    # auto: bf16 halves memory traffic on GPUs; on CPU f32 is both faster and exact.
    return dtype_name(dtype, auto="f32" if device.type == "cpu" else "bf16")


class TorchEngine(Engine):
    def __init__(self, ckpt: Checkpoint, tokenizer, chat_template, device: str | None = None, dtype: str = "auto"):
        dev = pick_device(device)
        name = pick_dtype(dtype, dev)
        info = EngineInfo("torch", str(dev), name, ckpt.path.name, ckpt.weight_type)
        super().__init__(ckpt, tokenizer, chat_template, info)
        self.model = load_model(ckpt, TORCH_DTYPES[name], dev)
        self.device = dev
        self.generator = torch.Generator(device=dev)

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
