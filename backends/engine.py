"""The engine API every local backend implements, and the generation loop they share.

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
from . import speculative
from .errors import BackendUnavailable, ContextOverflow
from .sampling import SamplingParams
from .tokenizer import Tokenizer
from .tracing import NullTracer, Tracer

PREFILL_CHUNK = 512
DTYPES = ("f32", "f16", "bf16")  # compute dtypes by name; each backend maps them to its own


def dtype_name(requested: str, auto: str) -> str:
    """The compute dtype's name: `requested`, one of DTYPES, or for "auto" the backend's `auto`."""
    if requested == "auto":
        return auto
    if requested not in DTYPES:
        raise BackendUnavailable(f"unknown dtype '{requested}' (use auto, {', '.join(DTYPES[:-1])} or {DTYPES[-1]})")
    return requested


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    prefilled_tokens: int = 0  # prompt tokens actually computed (the rest came from the KV cache)
    prefill_s: float = 0.0
    generated_tokens: int = 0
    decode_steps: int = 0  # forward passes after the prefill
    decode_s: float = 0.0
    drafted_tokens: int = 0  # tokens fed as speculative drafts (backends/speculative.py)
    accepted_tokens: int = 0  # drafted tokens the samples confirmed: each a token without a forward of its own
    stop_reason: str = ""  # "eos" | "length" | "context" | "stopped"

    @property
    def prefill_tok_s(self) -> float:
        return self.prefilled_tokens / self.prefill_s if self.prefill_s else 0.0

    @property
    def decode_tok_s(self) -> float:
        # Each forward samples one token from its own input's row, plus one per accepted draft.
        return (self.decode_steps + self.accepted_tokens) / self.decode_s if self.decode_s else 0.0


@dataclass
class EngineInfo:
    backend: str
    device: str
    dtype: str
    checkpoint: str  # file or directory name
    weight_type: str  # e.g. "Q4_K", "BF16"
    extra: dict[str, Any] = field(default_factory=dict)


class Engine:
    # A backend sets this where a forward of a few rows gives each row bitwise the logits of
    # that row decoded alone: there speculation cannot change a single token (speculative.py).
    rows_exact = False
    # Prompt tokens a forward takes at most: bounds prefill memory (attention scores, activations)
    # on long prompts.
    prefill_chunk = PREFILL_CHUNK
    # A backend sets this where a forward can take a sampled token before it is read back (MLX's
    # lazy arrays): plain decoding then queues each token's forward before reading the token, so
    # the device computes it while Python reads, checks and yields that token and builds the next
    # step, as mlx-lm's generate_step does. Waiting for each token leaves a GPU idle for that
    # time: SmolLM2-135M's graph takes ~3 ms of Python a token to build.
    reads_tokens_late = False

    def __init__(self, ckpt: Checkpoint, tokenizer: Tokenizer, chat_template: ChatTemplate | None, info: EngineInfo):
        self.config: ModelConfig = ckpt.config
        self.tokenizer = tokenizer
        self.chat_template = chat_template
        self.info = info
        self.tracer: Tracer = NullTracer()
        self.stats = GenerationStats()
        self.cached_ids: list[int] = []  # tokens whose keys/values the cache holds, from position 0
        self.forward_costs = speculative.ForwardCosts()  # what a drafted row costs here, as timed

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

    def sample_later(self, logits: Any, history: list[int], params: SamplingParams) -> Any:
        """sample, the token left where it is computed (reads_tokens_late) until read_token."""
        return self.sample(logits, history, params)

    def read_token(self, sampled: Any) -> int:
        return sampled

    def forward_queued(self, sampled: Any, pos: int) -> Any:
        """(reads_tokens_late) forward([the sampled token], pos, last_only=True), started and not
        waited for. Where the token ends the generation (EOS, or the caller stops), the cache
        position it wrote lies past cached_ids, and the next forward overwrites it."""
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
        step = 1 if split_prompt else self.prefill_chunk
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
        """Yield generated token ids until an EOS id (not yielded), max_new_tokens, or a full context.

        With speculation (backends/speculative.py) each forward also feeds a draft of the tokens
        that may come next; `logits` then holds one row per token fed, and `unverified` the
        drafted tokens after the one the next row is sampled for."""
        self._check_fits(len(prompt_ids))
        self.reserve(min(len(prompt_ids) + max_new_tokens, self.config.context_length))
        self.stats = GenerationStats()
        self.reset_rng(sampling.seed)
        # The repeat penalty looks at generated tokens only: a prompt repeats its template's
        # markup and the user's words, which an answer should be free to use.
        history: list[int] = []
        eos = self.eos_ids
        lookup = speculative.PromptLookup(prompt_ids, eos) if speculative.enabled(self.rows_exact) else None
        unverified: list[int] = []
        fed: list[int] = []
        row = 0
        fed_at = None  # when the last decoding forward started, until its first row is sampled
        queued = None  # (reads_tokens_late) the logits of the forward queued for the token being read
        t0 = time.perf_counter()
        logits = self.prefill(prompt_ids, split_prompt, prefill_progress)
        self.stats.prefill_s = time.perf_counter() - t0
        self.stats.stop_reason = "length"
        t1 = time.perf_counter()
        try:
            for i in range(max_new_tokens):
                with self.tracer.span("sample"):
                    sampled = self.sample_later(logits[row : row + 1] if row or unverified else logits, history, sampling)
                # (the checks below that stop before the next forward, made before the token is read)
                if (self.reads_tokens_late and lookup is None and i + 1 < max_new_tokens
                        and len(self.cached_ids) + 1 < self.config.context_length):
                    with self.tracer.span("decode", pos=len(self.cached_ids), drafted=0):
                        queued = self.forward_queued(sampled, len(self.cached_ids))
                    with self.tracer.span("sample"):  # the wait for the token, the queued forward behind it
                        token = self.read_token(sampled)
                else:
                    token = self.read_token(sampled)
                if fed_at is not None:
                    self.forward_costs.record(len(fed), time.perf_counter() - fed_at)
                    fed_at = None
                if i == 0:
                    # Time to the first token belongs to the prefill.
                    self.stats.prefill_s = time.perf_counter() - t0
                    t1 = time.perf_counter()
                else:  # through the token's read (a queued forward is waited for there); every
                    # forward is followed by a read, so this is the only place decode time is kept
                    self.stats.decode_s = time.perf_counter() - t1
                known = len(self.cached_ids) - len(unverified)  # what plain decoding would have fed by now
                accepted = bool(unverified) and token == unverified[0]
                if accepted:  # its keys and values are in the cache already, and the next row's logits
                    unverified.pop(0)
                    self.stats.accepted_tokens += 1
                    row += 1
                else:
                    self._drop_unverified(unverified)
                if token in eos:
                    self.stats.stop_reason = "eos"
                    break
                self.stats.generated_tokens += 1
                history.append(token)
                if lookup is not None:
                    lookup.extend([token])
                yield token
                if known + 1 >= self.config.context_length:
                    self.stats.stop_reason = "context"
                    break
                if i + 1 == max_new_tokens or accepted:
                    continue
                # Drafts never reach past what the loop could take: max_new_tokens, or the context.
                room = min(max_new_tokens - i - 2, self.config.context_length - 2 - len(self.cached_ids))
                if lookup is not None:
                    lookup.verified(len(fed) - 1, row)  # the last forward's rows 0..row were sampled
                    unverified = lookup.draft(room, self.forward_costs)
                fed = [token] + unverified
                fed_at = time.perf_counter() if lookup is not None else None
                if queued is not None:
                    logits, queued = queued, None
                else:
                    with self.tracer.span("decode", pos=len(self.cached_ids), drafted=len(unverified)):
                        logits = self.forward(fed, len(self.cached_ids), last_only=not unverified)
                self.cached_ids.extend(fed)
                row = 0
                self.stats.drafted_tokens += len(unverified)
                self.stats.decode_steps += 1
        finally:
            self._drop_unverified(unverified)

    def _drop_unverified(self, unverified: list[int]) -> None:
        """Forget drafted tokens the samples did not confirm: the next forward overwrites their
        cache positions, and until then nothing reads past cached_ids."""
        if unverified:
            del self.cached_ids[-len(unverified) :]
            unverified.clear()
