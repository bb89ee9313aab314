"""Sampling: the parameters, and the order of the steps, shared by every backend.

`sample_token` is the contract: each backend supplies its array operations (`SamplerOps`)
and samples on its own device, in this order:

1. repeat penalty: each distinct token among the last `repeat_last_n` generated tokens has a
   positive logit divided by `repeat_penalty` and a negative one multiplied (llama.cpp's and
   candle's rule), so it can fall out of the top-k that follows;
2. greedy (temperature <= 0): the argmax of the penalized logits, and nothing else applies;
3. temperature: logits divided by it;
4. top-k: all but the k highest set to -inf;
5. top-p: of what top-k kept (renormalized), the highest tokens up to the first whose
   cumulative probability reaches top_p (so the most likely one always stays);
6. a draw from the softmax of what remains, with the engine's seeded generator.

This is llama.cpp's sampler chain order and mlx-lm's `make_sampler` order.
tests/test_sampling.py runs one seeded check of it on every backend (native, torch, MLX).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.8  # <= 0 means greedy
    top_p: float | None = None
    top_k: int | None = None
    repeat_penalty: float = 1.1  # 1.0 disables it
    repeat_last_n: int = 64
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0

    def validate(self) -> "SamplingParams":
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"--top-p must be in (0, 1], got {self.top_p}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"--top-k must be at least 1, got {self.top_k}")
        if self.repeat_penalty <= 0:
            raise ValueError(f"--repeat-penalty must be positive, got {self.repeat_penalty}")
        if self.repeat_last_n < 0:
            raise ValueError(f"--repeat-last-n must be 0 or more, got {self.repeat_last_n}")
        return self


GREEDY = SamplingParams(temperature=0.0, repeat_penalty=1.0)


class SamplerOps(Protocol):
    """One backend's operations on a row of logits (its own array type), for `sample_token`. The
    token comes out as an int, or where the backend reads it later (Engine.reads_tokens_late) as
    its own scalar."""

    def penalize(self, logits: Any, recent: list[int], penalty: float) -> Any: ...

    def argmax(self, logits: Any) -> Any: ...

    def temperature(self, logits: Any, temperature: float) -> Any: ...

    def top_k(self, logits: Any, k: int) -> Any: ...

    def top_p(self, logits: Any, p: float) -> Any: ...

    def draw(self, logits: Any) -> Any: ...


def sample_token(logits: Any, history: list[int], params: SamplingParams, ops: SamplerOps) -> Any:
    """The next token from one row of logits [vocab], in the order the module's docstring gives."""
    if params.repeat_penalty != 1.0 and params.repeat_last_n > 0 and history:
        logits = ops.penalize(logits, history[-params.repeat_last_n :], params.repeat_penalty)
    if params.greedy:
        return ops.argmax(logits)
    logits = ops.temperature(logits, params.temperature)
    if params.top_k is not None and params.top_k < logits.shape[-1]:
        logits = ops.top_k(logits, params.top_k)
    if params.top_p is not None and params.top_p < 1.0:
        logits = ops.top_p(logits, params.top_p)
    return ops.draw(logits)
