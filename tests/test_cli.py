"""The `smollm3` command: one-shot answers, statistics, and one-line errors with exit code 2."""

import os
import re
import subprocess
import sys

import numpy as np
import pytest
from gguf import GGUFWriter

import app.cli
from app.cli import main
from conftest import TINY_HF, tiny_gguf


def run_cli(*args, timeout=300, **kwargs):
    kwargs.setdefault("stdin", subprocess.DEVNULL)
    return subprocess.run([sys.executable, "-m", "app", *args], capture_output=True, text=True, timeout=timeout,
                          **kwargs)


def stats(err: str) -> tuple[int, int]:
    """(prompt tokens, generated tokens) from the statistics lines."""
    prompt = re.search(r"(\d+) prompt tokens processed", err)
    generated = re.search(r"(\d+) tokens generated", err)
    return int(prompt.group(1)) if prompt else 0, int(generated.group(1))


def test_answers_paris_on_smollm2(smollm2_gguf):
    r = run_cli("--model-path", str(smollm2_gguf), "--temperature", "0", "--prompt", "Name the capital of France.")
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout
    assert "prompt tokens processed" in r.stderr and "tokens generated" in r.stderr
    assert "Traceback" not in r.stderr


def test_tiny_model_streams_and_reports(capsys):
    assert main(["--model-path", str(tiny_gguf("Q4_K_M")), "--prompt", "Hello", "-n", "6", "--temperature", "0"]) == 0
    out, err = capsys.readouterr()
    assert out.endswith("\n") and "6 tokens generated" in err


def test_thinking_and_raw_prompt_modes(capsys):
    base = ["--model-path", str(TINY_HF), "--prompt", "Hi", "-n", "3"]
    assert main(base + ["--thinking"]) == 0
    assert main(base + ["--no-chat-template"]) == 0
    err = capsys.readouterr().err
    assert err.count("tokens generated") == 2


def test_tracing_writes_a_chrome_trace(tmp_path, monkeypatch, capsys):
    import json

    monkeypatch.chdir(tmp_path)
    assert main(["--model-path", str(tiny_gguf("Q8_0")), "--prompt", "Hi", "-n", "4", "--tracing"]) == 0
    (trace,) = tmp_path.glob("trace-*.json")
    names = [e["name"] for e in json.loads(trace.read_text())["traceEvents"]]
    assert names[0] == "load" and "prefill" in names and names.count("decode") == 3


def test_without_tracing_no_span_is_kept(monkeypatch):
    """A span is ~600 bytes and a token makes two: a chat of hours must not keep them."""
    tracers = []
    load_engine = app.cli.load_engine
    monkeypatch.setattr(app.cli, "load_engine", lambda args, tracer, **kw: (tracers.append(tracer), load_engine(args, tracer, **kw))[1])
    assert main(["--model-path", str(tiny_gguf("Q8_0")), "--prompt", "Hi", "-n", "4"]) == 0
    assert len(tracers) == 1 and tracers[0].events == []


def _gguf_with_arch(path, arch):
    w = GGUFWriter(str(path), arch)
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((8, 4), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _truncated(tmp_path):
    data = tiny_gguf("Q4_0").read_bytes()
    path = tmp_path / "truncated.gguf"
    path.write_bytes(data[: len(data) // 2])
    return path


BAD = {
    "missing file": lambda tmp: ["--model-path", str(tmp / "nope.gguf"), "--prompt", "x"],
    "not a GGUF": lambda tmp: ["--model-path", str(_write(tmp / "x.gguf", b"hello world" * 10)), "--prompt", "x"],
    "truncated": lambda tmp: ["--model-path", str(_truncated(tmp)), "--prompt", "x"],
    "unknown architecture": lambda tmp: ["--model-path", str(_gguf_with_arch(tmp / "a.gguf", "gpt2")), "--prompt", "x"],
    "pickle": lambda tmp: ["--model-path", str(_write(tmp / "pytorch_model.bin", b"\x80\x04")), "--prompt", "x"],
    "quantization with path": lambda tmp: ["--model-path", str(tiny_gguf("F16")), "--quantization", "q8_0", "--prompt", "x"],
    "model with path": lambda tmp: ["--model-path", str(tiny_gguf("F16")), "--model", "3b", "--prompt", "x"],
    "device with mlx": lambda tmp: ["--model-path", str(tiny_gguf("F16")), "--backend", "mlx", "--device", "cpu",
                                    "--prompt", "x"],
    "system without template": lambda tmp: ["--model-path", str(tiny_gguf("F16")), "--no-chat-template",
                                            "--system", "Be brief.", "--prompt", "x"],
    "ctx-size over the model's": lambda tmp: ["--model-path", str(tiny_gguf("Q8_0")), "--ctx-size", "1000000",
                                              "--prompt", "x"],
    "thinking without template": lambda tmp: ["--model-path", str(tiny_gguf("F16")), "--no-chat-template", "--thinking", "--prompt", "x"],
    "bad top-p": lambda tmp: ["--model-path", str(tiny_gguf("F16")), "--top-p", "1.5", "--prompt", "x"],
    "unknown flag": lambda tmp: ["--frobnicate"],
    "bad choice": lambda tmp: ["--quantization", "q3"],
    "no quantized base": lambda tmp: ["--model", "3b-base", "--prompt", "x"],
    "prompt too long": lambda tmp: ["--model-path", str(tiny_gguf("Q4_0")), "--no-chat-template", "--prompt", "a " * 5000],
}


def _write(path, data):
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_gives_one_line_and_exit_2(case, tmp_path, capsys):
    assert main(BAD[case](tmp_path)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("smollm3: error: "), err
    assert "Traceback" not in err[0]


def test_bad_input_through_a_real_process(tmp_path):
    r = run_cli("--model-path", str(_truncated(tmp_path)), "--prompt", "x")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr


# Each is refused before anything loads: the model path does not exist, and the error names the flag.
BAD_NUMBERS = [
    ("--temperature", "nan", "finite"), ("--temperature", "inf", "finite"), ("--temperature", "-1", "at least 0"),
    ("--top-p", "0", "more than 0"), ("--top-p", "1.5", "at most 1"), ("--top-p", "nan", "finite"),
    ("--top-k", "0", "at least 1"), ("--top-k", "2.5", "an integer"), ("--repeat-penalty", "0", "more than 0"),
    ("--repeat-penalty", "1e999", "finite"), ("--repeat-last-n", "-1", "at least 0"), ("-n", "0", "at least 1"),
    ("--seed", "-1", "at least 0"), ("--ctx-size", "0", "at least 1"), ("--temperature", "hot", "a number"),
]


@pytest.mark.parametrize("flag, value, why", BAD_NUMBERS)
def test_numeric_flags_are_checked_before_loading(flag, value, why, capsys):
    assert main(["--model-path", "/nonexistent/model.gguf", flag, value, "--prompt", "x"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"smollm3: error: argument {flag}") and why in line, line


def test_version_and_bench_in_help(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and re.fullmatch(r"smollm3 \S+\n", capsys.readouterr().out)
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "smollm3 bench" in capsys.readouterr().out


QUESTION = "Name the capital of France."


def test_piped_input_is_the_prompt(smollm2_gguf):
    base = ["--model-path", str(smollm2_gguf), "--temperature", "0", "-n", "12"]
    direct = run_cli(*base, "--prompt", QUESTION, timeout=120)
    piped = run_cli(*base, input=QUESTION + "\n", stdin=None, timeout=120)  # the newline echo adds is dropped
    dash = run_cli(*base, "--prompt", "-", input=QUESTION, stdin=None, timeout=120)
    assert "Paris" in direct.stdout, direct.stderr
    for r in (piped, dash):
        assert r.returncode == 0, r.stderr
        assert r.stdout == direct.stdout and stats(r.stderr) == stats(direct.stderr)


def test_empty_piped_input_is_one_line():
    r = run_cli("--model-path", str(tiny_gguf("Q8_0")), input="\n", stdin=None, timeout=120)
    assert r.returncode == 2 and r.stderr == "smollm3: error: no prompt: standard input was empty\n"


def test_no_chat_without_a_terminal():
    """stdin a terminal, stdout redirected: one line and exit 2, no escape codes, no hang."""
    master, slave = os.openpty()
    try:
        r = run_cli("--model-path", str(tiny_gguf("Q8_0")), stdin=slave, timeout=60)
    finally:
        os.close(slave)
        os.close(master)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr == ("smollm3: error: the chat needs a terminal, and standard output is not one; "
                        "give --prompt TEXT, or pipe a prompt in\n")


def test_system_prompt_reaches_the_template(capsys):
    from backends import load

    engine = load(TINY_HF)
    system = "You are a pirate."

    def prompt_tokens(turns):
        return len(engine.tokenizer.encode(engine.chat_template.render(turns, add_generation_prompt=True,
                                                                        enable_thinking=False)))

    base = ["--model-path", str(TINY_HF), "--prompt", "Hi", "-n", "1", "--temperature", "0"]
    assert main(base + ["--system", system]) == 0
    assert main(base) == 0
    with_system, without = map(int, re.findall(r"(\d+) prompt tokens processed", capsys.readouterr().err))
    assert with_system == prompt_tokens([{"role": "system", "content": system}, {"role": "user", "content": "Hi"}])
    assert without == prompt_tokens([{"role": "user", "content": "Hi"}])
    assert with_system != without  # the custom instructions replace the default persona


def test_thinking_on_a_model_without_it_says_so_once(smollm2_gguf):
    r = run_cli("--model-path", str(smollm2_gguf), "--thinking", "--temperature", "0", "-n", "4", "--prompt", "Hi",
                timeout=120)
    assert r.returncode == 0, r.stderr
    note = "smollm3: note: SmolLM2-135M-Instruct.Q4_1.gguf has no thinking mode; --thinking does nothing\n"
    assert r.stderr.startswith(note) and r.stderr.count("no thinking mode") == 1


def test_thinking_on_smollm3_says_nothing(capsys):
    assert main(["--model-path", str(TINY_HF), "--thinking", "--prompt", "Hi", "-n", "2"]) == 0
    assert "thinking mode" not in capsys.readouterr().err


def test_an_answer_of_no_tokens_says_the_model_ended_at_once(smollm2_gguf):
    # SmolLM2 ends its turn right after this answer: greedy, the first token is <|im_end|>.
    raw = "<|im_start|>user\nSay only OK.<|im_end|>\n<|im_start|>assistant\nOK."
    r = run_cli("--model-path", str(smollm2_gguf), "--no-chat-template", "--temperature", "0", "-n", "10",
                "--prompt", raw, timeout=120)
    assert r.returncode == 0 and r.stdout == "\n", r.stderr
    assert stats(r.stderr)[1] == 0
    assert r.stderr.splitlines()[-1] == ("smollm3: the model ended its answer at once: its first token was "
                                         "end-of-text (without the chat template an instruct model often does)")


def test_ctx_size_limits_the_context(capsys):
    args = ["--model-path", str(tiny_gguf("Q8_0")), "--no-chat-template", "--prompt", "Hello world", "-n", "100",
            "--temperature", "0", "--repeat-penalty", "1"]
    assert main(args + ["--ctx-size", "12"]) == 0
    err = capsys.readouterr().err
    prompt, generated = stats(err)
    assert prompt + generated == 12 and "smollm3: stopped: the context is full" in err
    assert main(args + ["--ctx-size", "2", "--prompt", "Hello world again"]) == 2
    assert "the model's context is 2" in capsys.readouterr().err


def test_default_context_is_capped_by_free_memory(monkeypatch):
    from backends import load

    engine = load(tiny_gguf("Q8_0"))
    c = engine.config
    per_token = 2 * c.num_layers * c.num_kv_heads * c.head_dim * 4  # f32 keys and values
    monkeypatch.setattr(app.cli, "free_memory_bytes", lambda device: 2 * 300 * per_token)
    assert app.cli.context_for_memory(engine) == 300
    monkeypatch.setattr(app.cli, "free_memory_bytes", lambda device: 2 * 10**9 * per_token)
    assert app.cli.context_for_memory(engine) == 10**9  # load_engine takes the smaller of this and the model's
    args = app.cli.build_parser().parse_args(["--model-path", str(tiny_gguf("Q8_0"))])
    app.cli.check_flags(args)
    monkeypatch.setattr(app.cli, "free_memory_bytes", lambda device: 2 * 300 * per_token)
    loaded, _ = app.cli.load_engine(args, app.cli.Tracer())
    assert loaded.config.context_length == 300


# --- --endpoint: a remote OpenAI-compatible server (fakes from tests/fake_servers.py) ---


@pytest.fixture
def fake_server(monkeypatch):
    from tests.fake_servers import FakePeer, ServerThread

    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    servers = []

    def start(kind="vllm", **kwargs):
        peer = FakePeer(kind, **kwargs)
        servers.append(ServerThread(peer.app()).start())
        return peer, servers[-1].url + "/v1"

    yield start
    for server in servers:
        server.stop()


def test_endpoint_streams_the_answer_with_the_servers_counts(fake_server, capsys):
    from tests.fake_servers import Script

    peer, url = fake_server("vllm", script=Script(reasoning=["Let me", " think."]))
    assert main(["--endpoint", url, "--prompt", "Hi", "--temperature", "0", "--thinking", "-n", "50"]) == 0
    out, err = capsys.readouterr()
    assert out == "<think>Let me think.</think>Hello, world!\n"  # not a terminal: the text as is
    assert stats(err) == (21, 6) and "counted here" not in err
    (body,) = peer.requests
    # A SmolLM3 also gets the portable /think flag, for servers that drop chat_template_kwargs.
    assert body["messages"] == [{"role": "system", "content": "/think"}, {"role": "user", "content": "Hi"}]
    assert body["max_tokens"] == 50 and body["temperature"] == 0
    assert body["chat_template_kwargs"] == {"enable_thinking": True}


def test_endpoint_without_usage_says_counted_here(fake_server, capsys):
    from tests.fake_servers import Script

    _, url = fake_server("openai", script=Script(send_usage=False))
    assert main(["--endpoint", url, "--prompt", "Hi", "--system", "Be brief."]) == 0
    out, err = capsys.readouterr()
    assert out == "Hello, world!\n"
    assert re.search(r"^   4 tokens generated: [\d.]+ token/s \(counted here\)$", err, re.M), err


def test_endpoint_errors_are_one_line_and_exit_2(fake_server, capsys):
    from tests.fake_servers import free_port

    _, url = fake_server("vllm", api_key="sk-right")
    cases = {
        "unreachable": ["--endpoint", f"http://127.0.0.1:{free_port()}/v1"],
        "401": ["--endpoint", url, "--api-key", "sk-wrong"],
        "404 model": ["--endpoint", url, "--api-key", "sk-right", "--served-model", "nope"],
    }
    expected = {"unreachable": "cannot reach 127.0.0.1", "401": "refused the request (401)",
                "404 model": "does not serve the model 'nope' (404)"}
    for case, argv in cases.items():
        assert main([*argv, "--prompt", "Hi"]) == 2, case
        out, err = capsys.readouterr()
        (line,) = err.splitlines()
        assert out == "" and line.startswith("smollm3: error: ") and expected[case] in line, (case, line)


def test_a_stream_cut_keeps_the_partial_answer_then_one_line(fake_server, capsys):
    from tests.fake_servers import Script

    _, url = fake_server("sglang", script=Script(cut_after=2))
    assert main(["--endpoint", url, "--prompt", "Hi"]) == 2
    out, err = capsys.readouterr()
    assert out == "Hello,\n"
    (line,) = err.splitlines()
    assert line.startswith("smollm3: error: ") and "mid-answer" in line, line


@pytest.mark.parametrize("argv, flag", [
    (["--model-path", "m.gguf"], "--model-path"), (["--quantization", "q4_0"], "--quantization"),
    (["--device", "cpu"], "--device"), (["--dtype", "f16"], "--dtype"), (["--model", "3b"], "--model"),
    (["--backend", "torch"], "--backend torch"), (["--no-chat-template"], "--no-chat-template"),
])
def test_local_model_flags_with_endpoint_are_errors(argv, flag, capsys):
    # Refused before any connection: the endpoint's port is closed.
    assert main(["--endpoint", "http://127.0.0.1:9/v1", *argv, "--prompt", "Hi"]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("smollm3: error: ") and flag in line, line


@pytest.mark.parametrize("argv, says", [
    (["--backend", "remote"], "--backend remote needs --endpoint"),
    (["--served-model", "x"], "--served-model applies to a remote server: add --endpoint"),
    (["--dialect", "vllm"], "--dialect applies to a remote server: add --endpoint"),
])
def test_remote_flags_without_endpoint_are_errors(argv, says, capsys):
    assert main([*argv, "--prompt", "Hi"]) == 2
    assert capsys.readouterr().err == f"smollm3: error: {says} URL\n"


def test_endpoint_reads_a_piped_prompt(fake_server):
    peer, url = fake_server("llama-server")
    r = run_cli("--endpoint", url, input="Hi there\n", stdin=None, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout == "Hello, world!\n" and stats(r.stderr) == (21, 4)
    assert peer.requests[0]["messages"][-1] == {"role": "user", "content": "Hi there"}


def test_given_flags_are_told_from_defaults():
    from app.cli import given_flags

    assert given_flags(["--temp", "0", "-n5", "--top-k=3"]) >= {"temperature", "sample_len", "top_k"}
    assert not given_flags([]) & {"temperature", "sample_len", "top_k", "top_p"}
    assert "top_p" not in given_flags(["--temperature", "0.8"])  # equal to the default, still given
    assert "temperature" in given_flags(["--temperature", "0.8"])


def test_one_shot_imports_no_remote_or_chat_packages():
    """The one-shot path stays light: httpx (with rich, click, pygments) is for remote chats and
    Textual for the TUI; each costs start-up time and resident memory on every local run."""
    code = ("import sys, app.cli; heavy = {'httpx', 'rich', 'click', 'pygments', 'textual', 'transformers', "
            "'huggingface_hub', 'mlx'} & {m.split('.')[0] for m in sys.modules}; print(sorted(heavy))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"
