"""app/resolve.py: flags to a checkpoint in the Hugging Face cache, through a local fake Hub; and
the CLI end to end (download, then answer) in a subprocess pointed at that Hub."""

import os
import subprocess
import sys

import pytest
from huggingface_hub import constants

from app.cli import main
from app.resolve import MODELS, QUANTIZATIONS, quantizations_in, resolve
from backends.errors import ResolutionError
from conftest import TINY_HF, tiny_gguf
from fake_hub import FULL_REPO, GGUF_NAME, GGUF_REPO, FakeHub, point_huggingface_hub_at, smollm3_repos


@pytest.fixture
def hub(tmp_path, monkeypatch):
    with FakeHub(smollm3_repos()) as hub:
        hub.env_vars = point_huggingface_hub_at(hub, tmp_path / "hf", monkeypatch)
        yield hub


def run_cli(env_vars: dict, *args, timeout=300):
    env = {**os.environ, **env_vars}
    return subprocess.run(
        [sys.executable, "-m", "app", *args], capture_output=True, text=True, timeout=timeout, env=env
    )


def test_quantized_resolves_to_the_repos_gguf(hub):
    r = resolve("3b", "quantized", "q4_k_m", None)
    assert r.path.name == GGUF_NAME and r.path.read_bytes() == tiny_gguf("Q4_K_M").read_bytes()
    assert r.description == f"{GGUF_REPO}/{GGUF_NAME}" and r.chat


def test_full_resolves_to_a_safetensors_directory(hub):
    r = resolve("3b", "full", "q8_0", None)
    assert sorted(p.name for p in r.path.iterdir()) == sorted(p.name for p in TINY_HF.iterdir())
    assert r.description == FULL_REPO


def test_wrong_quantization_lists_what_the_repo_has(hub):
    with pytest.raises(ResolutionError) as e:
        resolve("3b", "quantized", "f16", None)
    assert str(e.value) == (
        f"{GGUF_REPO} has no SmolLM3-3B-F16.gguf (--quantization f16); it offers --quantization q4_k_m or q8_0. "
        "Its GGUF files: SmolLM3-3B-Q4_K_M.gguf, SmolLM3-3B-Q8_0.gguf"
    )


def test_a_file_renamed_only_in_case_is_still_found(tmp_path, monkeypatch):
    with FakeHub({GGUF_REPO: {"SmolLM3-3B-f16.gguf": tiny_gguf("F16")}}) as hub:
        point_huggingface_hub_at(hub, tmp_path / "hf", monkeypatch)
        r = resolve("3b", "quantized", "f16", None)
        assert r.path.name == "SmolLM3-3B-f16.gguf" and r.description == f"{GGUF_REPO}/SmolLM3-3B-f16.gguf"


def test_repo_without_any_of_our_quantizations(tmp_path, monkeypatch):
    with FakeHub({GGUF_REPO: {"SmolLM3-3B-IQ2_XXS.gguf": b"GGUF", "README.md": b"hi"}}) as hub:
        point_huggingface_hub_at(hub, tmp_path / "hf", monkeypatch)
        expected = r"it offers no --quantization choice\. Its GGUF files: SmolLM3-3B-IQ2_XXS\.gguf$"
        with pytest.raises(ResolutionError, match=expected):
            resolve("3b", "quantized", "q8_0", None)


def test_quantizations_in_matches_each_models_spelling():
    bartowski = ["SmolLM2-135M-Instruct-Q4_K_M.gguf", "SmolLM2-135M-Instruct-f16.gguf", "README.md"]
    assert quantizations_in("smollm2-135m", bartowski) == ["q4_k_m", "f16"]
    assert quantizations_in("3b", []) == []
    assert set(MODELS["3b"].gguf_quant_names) == set(QUANTIZATIONS)


def test_base_model_has_no_gguf(hub):
    expected = (r"^no quantized GGUF of HuggingFaceTB/SmolLM3-3B-Base is published; "
                r"use --model-type full --model 3b-base")
    with pytest.raises(ResolutionError, match=expected):
        resolve("3b-base", "quantized", "q8_0", None)
    assert hub.requests == []


def test_server_error_is_not_taken_for_a_missing_file(hub):
    hub.fail(GGUF_NAME, 500)
    with pytest.raises(ResolutionError) as e:
        resolve("3b", "quantized", "q4_k_m", None)
    assert str(e.value) == (
        f"{GGUF_REPO}/{GGUF_NAME}: the Hub answered 500 Internal Server Error, and it is not in the Hugging Face cache "
        f"({constants.HF_HUB_CACHE})"
    )
    assert not [r for r in hub.requests if r.path.startswith("/api/")]  # no listing: the file may well exist


def test_missing_model_path():
    with pytest.raises(ResolutionError, match="^--model-path /nonexistent/x.gguf: no such file or directory$"):
        resolve("3b", "quantized", "q8_0", "/nonexistent/x.gguf")


def test_cli_errors_are_one_line_with_exit_2(hub, capsys):
    assert main(["--quantization", "f16", "--prompt", "hi"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"smollm3: error: {GGUF_REPO} has no SmolLM3-3B-F16.gguf")
    hub.fail(GGUF_NAME, 500)
    assert main(["--quantization", "q4_k_m", "--prompt", "hi"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith(
        f"smollm3: error: {GGUF_REPO}/{GGUF_NAME}: the Hub answered 500 Internal Server Error")


def test_cli_downloads_then_answers_then_works_offline(hub):
    r = run_cli(hub.env_vars, "--quantization", "q4_k_m", "--prompt", "hi", "-n", "3", "--temperature", "0")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() and "tokens generated" in r.stderr
    assert len(hub.requests_for(GGUF_NAME, "GET")) == 1

    before = len(hub.requests)
    offline = {**hub.env_vars, "HF_HUB_OFFLINE": "1"}
    again = run_cli(offline, "--quantization", "q4_k_m", "--prompt", "hi", "-n", "3", "--temperature", "0")
    assert again.returncode == 0, again.stderr
    assert again.stdout == r.stdout
    assert len(hub.requests) == before


def test_cli_offline_without_a_cache(hub):
    offline = {**hub.env_vars, "HF_HUB_OFFLINE": "1"}
    r = run_cli(offline, "--quantization", "q4_k_m", "--prompt", "hi", "-n", "3")
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        f"smollm3: error: {GGUF_REPO}/{GGUF_NAME} is not in the Hugging Face cache "
        f"({hub.env_vars['HF_HUB_CACHE']}) and "
        "HF_HUB_OFFLINE=1 forbids downloading it; run once without HF_HUB_OFFLINE to download it "
        f"(or `hf download {GGUF_REPO} {GGUF_NAME}` on a connected machine, then copy the cache over)"
    ]
    assert hub.requests == []


def test_cli_full_model_downloads_safetensors_and_answers(hub):
    r = run_cli(hub.env_vars, "--model-type", "full", "--prompt", "hi", "-n", "3", "--temperature", "0")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() and "tokens generated" in r.stderr
    downloaded = {r.path.rsplit("/", 1)[1] for r in hub.requests if r.method == "GET" and "/resolve/" in r.path}
    assert downloaded == {p.name for p in TINY_HF.iterdir()}
