"""app/server/main.py: `smollm3 serve` flags; bad ones are one line and exit 2, before any load."""

import socket

import pytest

from app.cli import main


@pytest.mark.parametrize("flags,message", [
    (["--port", "70000"], "argument --port: must be at most 65535, got 70000"),
    (["--max-queue", "0"], "argument --max-queue: must be at least 1, got 0"),
    (["--prompt", "hi"], "unrecognized arguments: --prompt hi"),
    (["--api-key", ""], "--api-key is empty"),
    (["--host", "256.1.1.1", "--port", "0"], "cannot listen on 256.1.1.1:0"),
])
def test_bad_flags_are_one_line(flags, message, capsys):
    assert main(["serve", *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("smollm3: error: ") and message in err and err.count("\n") == 1


def test_a_taken_port_is_one_line_before_the_model_loads(capsys, smollm2_gguf):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["serve", "--model-path", str(smollm2_gguf), "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert err == f"smollm3: error: cannot listen on 127.0.0.1:{port}: Address already in use\n"


def test_ctx_size_over_the_model_is_refused(capsys):
    from conftest import tiny_gguf

    assert main(["serve", "--model-path", str(tiny_gguf("Q8_0")), "--port", "0", "--ctx-size", "100000"]) == 2
    assert "--ctx-size 100000 is more than the model's context (4096 tokens)" in capsys.readouterr().err


def test_the_served_engine_keeps_no_spans():
    """A server lives for many requests: spans kept per token would be resident memory without end."""
    from conftest import tiny_gguf

    from app.server.main import build_serve_parser, check_serve_flags, load_served_engine

    args = build_serve_parser().parse_args(["--model-path", str(tiny_gguf("Q8_0")), "--ctx-size", "256"])
    check_serve_flags(args)
    engine = load_served_engine(args)
    for _ in range(3):
        list(engine.generate(engine.tokenizer.encode("Tell me one fact about owls."), 8))
    assert engine.stats.prompt_tokens > 0 and engine.tracer.events == []
