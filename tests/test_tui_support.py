"""Helpers for the TUI tests (no tests here): a scripted engine, a spy, waiting on the app."""

from __future__ import annotations

import dataclasses
import time

import backends
from backends.engine import Engine, EngineInfo, GenerationStats
from backends.tracing import NullTracer
from conftest import tiny_gguf

_TINY = {}


def tiny_engine() -> Engine:
    """The tiny random SmolLM3 (F16: the fastest on a CPU), loaded once per test process."""
    if "engine" not in _TINY:
        _TINY["engine"] = backends.load(tiny_gguf("F16"))
    return _TINY["engine"]


class ScriptedEngine(Engine):
    """The shared generation loop (KV prefix bookkeeping, EOS, context, stats) over a model that
    "generates" the given texts, one per call, with the real tiny tokenizer and SmolLM3 template.
    Timings are fixed, so that status lines are the same on every run."""

    def __init__(self, scripts: list[str], delay: float = 0.0, context_length: int = 4096):
        real = tiny_engine()
        self.config = dataclasses.replace(real.config, context_length=context_length)
        self.tokenizer = real.tokenizer
        self.chat_template = real.chat_template
        self.info = EngineInfo("torch", "cpu", "f32", "SmolLM3-3B-Q4_K_M.gguf", "Q4_K")
        self.tracer = NullTracer()
        self.stats = GenerationStats()
        self.cached_ids: list[int] = []
        self.scripts = list(scripts)
        self.delay = delay
        self.prompts: list[list[int]] = []
        self._script: list[int] = []

    def forward(self, ids, pos, last_only):
        if self.delay:
            time.sleep(self.delay)
        return None

    def sample(self, logits, history, params) -> int:
        i = len(history)
        return self._script[i] if i < len(self._script) else self.tokenizer.eos_ids[0]

    def reset_rng(self, seed) -> None:
        pass

    def generate(self, prompt_ids, max_new_tokens, sampling=backends.SamplingParams(), split_prompt=False, prefill_progress=None):
        self.prompts.append(list(prompt_ids))
        text = self.scripts.pop(0) if len(self.scripts) > 1 else self.scripts[0]
        self._script = self.tokenizer.encode(text)
        try:
            yield from super().generate(prompt_ids, max_new_tokens, sampling, split_prompt, prefill_progress)
        finally:
            self.stats.prefill_s = self.stats.prefilled_tokens / 250
            self.stats.decode_s = self.stats.decode_steps / 25

    def prompt_text(self, i: int = -1) -> str:
        return self.tokenizer.decode(self.prompts[i])


class GenerateSpy:
    """Records what a real engine is asked to generate from."""

    def __init__(self, engine: Engine, monkeypatch):
        self.engine = engine
        self.calls: list[tuple[list[int], int, backends.SamplingParams]] = []
        real = engine.generate

        def generate(prompt_ids, max_new_tokens, sampling=backends.SamplingParams(), split_prompt=False, prefill_progress=None):
            self.calls.append((list(prompt_ids), max_new_tokens, sampling))
            return real(prompt_ids, max_new_tokens, sampling, split_prompt, prefill_progress)

        monkeypatch.setattr(engine, "generate", generate)

    def prompt_text(self, i: int = -1) -> str:
        return self.engine.tokenizer.decode(self.calls[i][0])


async def wait_for(pilot, condition, timeout: float = 60.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        if pilot.app._exception is not None:
            raise pilot.app._exception
        await pilot.pause(0.02)


async def ready(pilot) -> None:
    """Wait for the engine to load and the loading screen to go."""
    from app.tui.widgets import LoadingPanel

    app = pilot.app
    await wait_for(pilot, lambda: app.chat.engine is not None and not app.query_one(LoadingPanel).display, what="the engine")
    await pilot.pause()


async def send(pilot, text: str, wait: bool = True, timeout: float = 120.0) -> None:
    app = pilot.app
    prompt = app.chat.query_prompt()
    prompt.focus()
    prompt.load_text(text)
    await pilot.press("enter")
    if wait:
        await settle(pilot, timeout)


async def settle(pilot, timeout: float = 120.0) -> None:
    app = pilot.app
    await pilot.pause()
    await wait_for(pilot, lambda: not app.chat.generating, timeout, what="the answer")
    await pilot.pause()


def answers(app) -> list:
    from app.tui.widgets import AssistantMessage

    return list(app.query(AssistantMessage))


async def thinking_folds_when_the_answer_starts(pilot, app):
    """The first answer's thinking block is open while it streams and folds once the answer
    starts; the settled answer widget."""
    await wait_for(pilot, lambda: answers(app) and answers(app)[0].thinking_block is not None, what="the thinking block")
    block = answers(app)[0].thinking_block
    assert not block.collapsed and block.title == "Thinking…"
    await wait_for(pilot, lambda: answers(app)[0].answer_text.strip(), what="the answer")
    assert block.collapsed and block.title == "Thought"
    await settle(pilot)
    return answers(app)[0]
