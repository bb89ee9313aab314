"""Sampling parameters, shared by both backends (each samples on its own device)."""

from __future__ import annotations

from dataclasses import dataclass


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
