"""backends/remote against a real peer: mlx_lm.server (MLX on the CPU) serving the tiny SmolLM3 fixture.

The fakes in fake_servers.py follow the peers' docs; this checks one peer's actual wire format
(its keepalive comments, models listed without an owner, usage chunk) and that the remote answer
is token for token the one mlx_lm generates in-process from the same prompt.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest

from backends.remote import RemoteEngine
from backends.sampling import GREEDY
from tests.fake_servers import free_port, server_process

pytest.importorskip("mlx_lm")
pytest.importorskip("mlx.core")

CHECKPOINT = Path(__file__).parent / "fixtures" / "tiny-smollm3" / "hf"
HELLO = [{"role": "user", "content": "Hi"}]


@pytest.fixture(scope="module")
def mlx_server(tmp_path_factory):
    port = free_port()
    # mlx_lm.server lists the models of the HF cache on GET /v1/models and fails when the
    # cache directory does not exist; an empty one keeps the listing to the served model.
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path_factory.mktemp("hf-cache"))}
    command = [sys.executable, "-m", "mlx_lm.server", "--model", str(CHECKPOINT), "--host", "127.0.0.1",
               "--port", str(port)]
    with server_process(command, f"http://127.0.0.1:{port}/v1", "mlx_lm.server", 120, env=env) as url:
        yield url


def mlx_lm_greedy(thinking: bool, max_tokens: int) -> tuple[str, int]:
    """mlx_lm's own greedy answer to HELLO, and its prompt's length in tokens."""
    from mlx_lm import generate, load
    from mlx_lm.sample_utils import make_sampler

    model, tokenizer = load(str(CHECKPOINT))
    prompt = tokenizer.apply_chat_template(HELLO, add_generation_prompt=True, enable_thinking=thinking)
    return generate(model, tokenizer, prompt, max_tokens=max_tokens, sampler=make_sampler(0.0)), len(prompt)


def test_probe_finds_mlx_lm_and_its_model(mlx_server):
    engine = RemoteEngine(mlx_server)
    assert engine.dialect.name == "mlx-lm"
    assert engine.model == str(CHECKPOINT.resolve())


@pytest.mark.parametrize("thinking", [False, True])
def test_greedy_answer_is_mlx_lms_own(mlx_server, thinking):
    engine = RemoteEngine(mlx_server)
    remote = "".join(engine.chat(HELLO, max_tokens=12, sampling=GREEDY, thinking=thinking))
    local, prompt_tokens = mlx_lm_greedy(thinking, 12)
    assert remote == local
    stats = engine.stats
    assert (stats.counted_by, stats.prompt_tokens, stats.generated_tokens) == ("server", prompt_tokens, 12)
    assert stats.stop_reason == "length"


def test_stop_then_ask_again(mlx_server):
    engine = RemoteEngine(mlx_server)
    received = []
    for piece in engine.chat(HELLO, max_tokens=2000, sampling=GREEDY, should_stop=lambda: len(received) >= 3):
        received.append(piece)
    assert len(received) == 3 and engine.stats.stop_reason == "stopped"
    started = time.perf_counter()
    assert "".join(engine.chat(HELLO, max_tokens=4, sampling=GREEDY, thinking=False))
    assert time.perf_counter() - started < 30
