"""The torch backend: devices, dtypes, and sampling on the device."""

from __future__ import annotations

import os

import numpy as np
import torch

from ..checkpoint import Checkpoint
from ..engine import Engine, EngineInfo, dtype_name
from ..errors import BackendUnavailable
from ..memory import release_library_pages
from ..sampling import SamplingParams, sample_token
from . import native
from .loader import load_model
from .weights import NativeLinear

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
        # Before the first forward reads the weights: the peak is torch's pages plus the weights.
        # (Not before the load too: its torch ops would read their code back from the disk.)
        release_library_pages(os.path.dirname(torch.__file__))
        self.device = dev
        self.sampler = TorchSampler(dev)
        # Only the native kernels compute each row of a forward as that row alone (native_layers.py);
        # every weight handler (weights.linear) has rows().
        handlers = [m for m in self.model.modules() if hasattr(m, "rows")]
        self.rows_exact = dev.type == "cpu" and name == "f32" and all(isinstance(m, NativeLinear) for m in handlers)
        if self.rows_exact:
            self.prefill_chunk = native.PREFILL_ROWS

    def forward(self, ids: list[int], pos: int, last_only: bool) -> torch.Tensor:
        tokens = torch.tensor(ids, dtype=torch.long, device=self.device)
        return self.model(tokens, pos, last_only=last_only)

    def to_numpy(self, logits: torch.Tensor) -> np.ndarray:
        return logits.float().cpu().numpy()

    def reserve(self, positions: int) -> None:
        # At its size: doubling would hold up to twice the cache (3B, 544 positions: +75 MB)
        self.model.ensure_capacity(positions, exact=True)

    def reset_rng(self, seed: int | None) -> None:
        self.sampler.seed(seed)

    def sample(self, logits: torch.Tensor, history: list[int], params: SamplingParams) -> int:
        return sample_token(logits[-1].float(), history, params, self.sampler)


class TorchSampler:
    """sample_token's steps (backends/sampling.py) on torch tensors, on the model's device."""

    def __init__(self, device: torch.device):
        self.generator = torch.Generator(device=device)

    def seed(self, seed: int | None) -> None:
        if seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(seed)

    def penalize(self, logits: torch.Tensor, recent: list[int], penalty: float) -> torch.Tensor:
        ids = torch.tensor(recent, device=logits.device).unique()
        values = logits[ids]
        logits = logits.clone()
        logits[ids] = torch.where(values > 0, values / penalty, values * penalty)
        return logits

    def argmax(self, logits: torch.Tensor) -> int:
        return int(logits.argmax())

    def temperature(self, logits: torch.Tensor, temperature: float) -> torch.Tensor:
        return logits / temperature

    def top_k(self, logits: torch.Tensor, k: int) -> torch.Tensor:
        kth = torch.topk(logits, k).values[-1]
        return logits.masked_fill(logits < kth, float("-inf"))

    def top_p(self, logits: torch.Tensor, p: float) -> torch.Tensor:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs >= p  # the tokens before it already cover p
        return logits.index_put((order[drop],), torch.tensor(float("-inf"), device=logits.device))

    def draw(self, logits: torch.Tensor) -> int:
        return int(torch.multinomial(logits.softmax(-1), 1, generator=self.generator))
