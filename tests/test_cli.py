"""The `smollm3` command: one-shot answers, statistics, and one-line errors with exit code 2."""

import subprocess
import sys

import numpy as np
import pytest
from gguf import GGUFWriter

from app.cli import main
from conftest import TINY_HF, tiny_gguf


def run_cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "app", *args], capture_output=True, text=True, timeout=timeout)


def test_answers_paris_on_smollm2(smollm2_gguf):
    r = run_cli("--model-path", str(smollm2_gguf), "--temperature", "0", "--prompt", "What is the capital of France?")
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
