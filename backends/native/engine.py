"""The native backend: a GGUF file on our C kernels and numpy, on the CPU, without torch.

What torch's CPU path computes for such a file (its kernels are these: backends/torch/native.py),
without torch in the process: `import torch` alone is ~1 s and ~210 MiB resident (its Python
modules and operator tables), more than this backend's whole runtime past the mapped weights.
"""

from __future__ import annotations

import numpy as np

from .. import settings
from ..checkpoint import Checkpoint
from ..engine import Engine, EngineInfo
from ..memory import return_freed_memory
from ..sampling import SamplingParams, sample_token
from . import library
from .model import NativeModel, NotNative


def native_model(ckpt: Checkpoint) -> NativeModel:
    """The checkpoint on our kernels, or NotNative saying why it cannot run here."""
    if settings.kernels() == "reference":
        raise NotNative("SMOLLM3_KERNELS=reference runs torch's reference kernels")
    if (lib := library.library()) is None:
        raise NotNative("our C kernels are not built here (no C compiler with OpenMP found, or SMOLLM3_NATIVE=0)")
    return NativeModel(ckpt, lib, library.default_threads())


class NativeEngine(Engine):
    # Every row of a forward is that row decoded alone (model.py): speculation is exact here.
    rows_exact = True
    prefill_chunk = library.PREFILL_ROWS

    def __init__(self, ckpt: Checkpoint, tokenizer, chat_template, model: NativeModel):
        info = EngineInfo("native", "cpu", "f32", ckpt.path.name, ckpt.weight_type, {"threads": model.threads})
        super().__init__(ckpt, tokenizer, chat_template, info)
        self.model = model
        self.sampler = NumpySampler()
        # The tokenizer's build leaves ~15 MiB of freed heap (3B vocabulary) that would
        # otherwise stay resident beside the weights for the whole session.
        return_freed_memory()

    def forward(self, ids: list[int], pos: int, last_only: bool) -> np.ndarray:
        return self.model.forward(ids, pos, last_only)

    def to_numpy(self, logits: np.ndarray) -> np.ndarray:
        return logits

    def reserve(self, positions: int) -> None:
        # At its size: doubling would hold up to twice the cache (3B, 544 positions: +75 MB)
        self.model.ensure_capacity(positions, exact=True)

    def reset_rng(self, seed: int | None) -> None:
        self.sampler.seed(seed)

    def sample(self, logits: np.ndarray, history: list[int], params: SamplingParams) -> int:
        return sample_token(logits[-1], history, params, self.sampler)


class NumpySampler:
    """sample_token's steps (backends/sampling.py) on a numpy row of logits."""

    def __init__(self):
        self.rng = np.random.default_rng()

    def seed(self, seed: int | None) -> None:
        self.rng = np.random.default_rng(seed)

    def penalize(self, logits: np.ndarray, recent: list[int], penalty: float) -> np.ndarray:
        ids = np.unique(np.asarray(recent))
        values = logits[ids]
        logits = logits.copy()
        logits[ids] = np.where(values > 0, values / penalty, values * penalty)
        return logits

    def argmax(self, logits: np.ndarray) -> int:
        return int(np.argmax(logits))

    def temperature(self, logits: np.ndarray, temperature: float) -> np.ndarray:
        return logits / np.float32(temperature)

    def top_k(self, logits: np.ndarray, k: int) -> np.ndarray:
        kth = np.partition(logits, -k)[-k]
        return np.where(logits < kth, -np.inf, logits).astype(logits.dtype)

    def top_p(self, logits: np.ndarray, p: float) -> np.ndarray:
        order = np.argsort(-logits, kind="stable")
        probs = _softmax(logits[order])
        drop = np.cumsum(probs) - probs >= p  # the tokens before it already cover p
        logits = logits.copy()
        logits[order[drop]] = -np.inf
        return logits

    def draw(self, logits: np.ndarray) -> int:
        cumulative = np.cumsum(_softmax(logits))
        return int(min(np.searchsorted(cumulative, self.rng.random() * cumulative[-1], side="right"), len(logits) - 1))


def _softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits.astype(np.float64) - logits.max())
    return e / e.sum()
