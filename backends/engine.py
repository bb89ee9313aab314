"""The engine API both backends implement, and the generation loop they share.

A backend supplies `forward(ids, pos, last_only)` (logits, filling its KV cache from
`pos`) and `sample(logits, history, params)`; everything else (KV reuse by common prefix,
split prompts, stopping, statistics, tracing) is written once, here.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import numpy as np

from .chat_template import ChatTemplate
from .checkpoint import Checkpoint
from .config import ModelConfig
from .errors import ContextOverflow
from .sampling import SamplingParams
from .tokenizer import Tokenizer
from .tracing import NullTracer, Tracer

PREFILL_CHUNK = 512  # bounds prefill memory (attention scores, activations) on long prompts


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    prefilled_tokens: int = 0  # prompt tokens actually computed (the rest came from the KV cache)
    prefill_s: float = 0.0
    generated_tokens: int = 0
    decode_steps: int = 0  # forward passes after the prefill
    decode_s: float = 0.0
    stop_reason: str = ""  # "eos" | "length" | "context" | "stopped"

    @property
    def prefill_tok_s(self) -> float:
        return self.prefilled_tokens / self.prefill_s if self.prefill_s else 0.0

    @property
    def decode_tok_s(self) -> float:
        return self.decode_steps / self.decode_s if self.decode_s else 0.0


@dataclass
class EngineInfo:
    backend: str
    device: str
    dtype: str
    checkpoint: str  # file or directory name
    weight_type: str  # e.g. "Q4_K", "BF16"
    extra: dict[str, Any] = field(default_factory=dict)


class Engine:
    def __init__(self, ckpt: Checkpoint, tokenizer: Tokenizer, chat_template: ChatTemplate | None, info: EngineInfo):
        self.config: ModelConfig = ckpt.config
        self.tokenizer = tokenizer
        self.chat_template = chat_template
        self.info = info
        self.tracer: Tracer = NullTracer()
        self.stats = GenerationStats()
        self.cached_ids: list[int] = []  # tokens whose keys/values the cache holds, from position 0

    @property
    def eos_ids(self) -> set[int]:
        return set(self.tokenizer.eos_ids) | set(self.config.eos_token_ids)

    # --- implemented by each backend ---

    def forward(self, ids: list[int], pos: int, last_only: bool) -> Any:
        """Logits [len(ids), vocab] (or [1, vocab]) in the backend's array type."""
        raise NotImplementedError

    def sample(self, logits: Any, history: list[int], params: SamplingParams) -> int:
        raise NotImplementedError

    def to_numpy(self, logits: Any) -> np.ndarray:
        raise NotImplementedError

    def reserve(self, positions: int) -> None:
        """A generation will need this many cache positions: a backend may allocate them now
        (once, at their size) instead of growing its cache as tokens come."""

    def reset_rng(self, seed: int | None) -> None:
        raise NotImplementedError

    # --- shared ---

    def logits(self, token_ids: list[int]) -> np.ndarray:
        """float32 [len, vocab] logits of a fresh forward pass from position 0."""
        self._check_fits(len(token_ids))
        self.cached_ids = []
        out = self.to_numpy(self.forward(list(token_ids), 0, last_only=False))
        self.cached_ids = list(token_ids)
        return out

    def _check_fits(self, prompt_len: int) -> None:
        if prompt_len == 0:
            raise ContextOverflow("the prompt is empty")
        if prompt_len >= self.config.context_length:
            raise ContextOverflow(
                f"the prompt is {prompt_len} tokens, the model's context is {self.config.context_length}"
            )

    def prefill(
        self, prompt_ids: list[int], split_prompt: bool = False, progress: Callable[[int, int], None] | None = None
    ) -> Any:
        """Feed the prompt, reusing the KV cache for the longest common prefix; return the last logits.

        progress(done, total) is called before the first chunk and after each, with the prompt
        tokens computed so far."""
        reuse = 0
        for a, b in zip(self.cached_ids, prompt_ids[:-1]):  # always recompute the last token for its logits
            if a != b:
                break
            reuse += 1
        self.cached_ids = self.cached_ids[:reuse]
        todo = prompt_ids[reuse:]
        step = 1 if split_prompt else PREFILL_CHUNK
        logits = None
        with self.tracer.span("prefill", tokens=len(todo), reused=reuse):
            if progress is not None:
                progress(0, len(todo))
            for start in range(0, len(todo), step):
                chunk = todo[start : start + step]
                logits = self.forward(chunk, reuse + start, last_only=True)
                self.cached_ids.extend(chunk)
                if progress is not None:
                    progress(start + len(chunk), len(todo))
        self.stats.prompt_tokens = len(prompt_ids)
        self.stats.prefilled_tokens = len(todo)
        return logits

    def generate(
        self,
        prompt_ids: list[int],
        max_new_tokens: int,
        sampling: SamplingParams = SamplingParams(),
        split_prompt: bool = False,
        prefill_progress: Callable[[int, int], None] | None = None,
    ) -> Iterator[int]:
        """Yield generated token ids until an EOS id (not yielded), max_new_tokens, or a full context."""
        self._check_fits(len(prompt_ids))
        self.reserve(min(len(prompt_ids) + max_new_tokens, self.config.context_length))
        self.stats = GenerationStats()
        self.reset_rng(sampling.seed)
        history: list[int] = []  # the repeat penalty looks at generated tokens only, as the seed does
        eos = self.eos_ids
        t0 = time.perf_counter()
        logits = self.prefill(prompt_ids, split_prompt, prefill_progress)
        self.stats.prefill_s = time.perf_counter() - t0
        self.stats.stop_reason = "length"
        t1 = time.perf_counter()
        for i in range(max_new_tokens):
            with self.tracer.span("sample"):
                token = self.sample(logits, history, sampling)
            if i == 0:
                # Time to the first token belongs to the prefill.
                self.stats.prefill_s = time.perf_counter() - t0
                t1 = time.perf_counter()
            if token in eos:
                self.stats.stop_reason = "eos"
                break
            self.stats.generated_tokens += 1
            history.append(token)
            yield token
            if len(self.cached_ids) + 1 >= self.config.context_length:
                self.stats.stop_reason = "context"
                break
            if i + 1 == max_new_tokens:
                break
            with self.tracer.span("decode", pos=len(self.cached_ids)):
                logits = self.forward([token], len(self.cached_ids), last_only=True)
            self.cached_ids.append(token)
            self.stats.decode_steps += 1
            self.stats.decode_s = time.perf_counter() - t1
