"""Serving an app in-process for tests, and an engine that says what the test scripts.

ScriptedEngine is the tiny SmolLM3 fixture (real tokenizer, real template, real forward passes
and KV cache) whose sampler reads from a script instead of the logits: one script per
`generate` call, so a test decides exactly what the "model" writes.
"""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager

import uvicorn

from app.server.app import ServerConfig, create_app
from app.server.main import listen
from backends import SamplingParams, load_chat_template, load_tokenizer
from backends.checkpoint import open_checkpoint
from backends.torch.engine import TorchEngine
from conftest import tiny_gguf


class ScriptedEngine(TorchEngine):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.scripts: list[list[int]] = []
        self.prompts: list[list[int]] = []  # what each generate call was asked to continue
        self.sampled = 0  # sample() calls, over all generations
        self.delay_s = 0.0  # per sampled token: a slow "model" for queue and disconnect tests
        self.compute = True  # False: no forward passes at all (the fuzz test's fast engine)
        self.fail = False  # True: sample() raises, as a backend failure would
        self._script: list[int] = []
        # No speculation: without compute there are no logits rows to verify drafts on, and the
        # queue and disconnect tests count one sample() per forward.
        self.rows_exact = False

    def say(self, *texts: str) -> None:
        """Scripts for the next generate calls, one text each (an EOS follows each)."""
        self.scripts = [self.tokenizer.encode(t) for t in texts]

    def generate(self, prompt_ids, max_new_tokens, sampling=SamplingParams(), split_prompt=False):
        self._script = self.scripts.pop(0) if self.scripts else []
        self.prompts.append(list(prompt_ids))
        return super().generate(prompt_ids, max_new_tokens, sampling, split_prompt)

    def forward(self, ids, pos, last_only):
        return super().forward(ids, pos, last_only) if self.compute else None

    def sample(self, logits, history, params):
        self.sampled += 1
        if self.fail:
            raise RuntimeError("the backend failed")
        if self.delay_s:
            time.sleep(self.delay_s)
        return self._script.pop(0) if self._script else self.tokenizer.eos_ids[0]

    def prompt_text(self, i: int = -1) -> str:
        return self.tokenizer.decode(self.prompts[i])


def scripted_engine() -> ScriptedEngine:
    ckpt = open_checkpoint(tiny_gguf("Q8_0"))
    tokenizer = load_tokenizer(ckpt)
    return ScriptedEngine(ckpt, tokenizer, load_chat_template(ckpt, tokenizer), device="cpu")


def config_for(engine, **kw) -> ServerConfig:
    kw.setdefault("ctx_size", engine.config.context_length)
    return ServerConfig(model_id="tiny-smollm3", defaults=SamplingParams(temperature=0.0), **kw)


@contextmanager
def serving(app):
    """The app on 127.0.0.1, a free port, in a thread: yields the base URL."""
    sock = listen("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


def serve_engine(engine, log=None, **config):
    return serving(create_app(engine, config_for(engine, **config), log=log or (lambda line: None)))
