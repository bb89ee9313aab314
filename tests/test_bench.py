"""`smollm3 bench` (app/bench.py) and the pieces of the bench/ harness that need no llama.cpp.

Fast: the tiny fixture model, one short run per process, torch.compile off.
"""

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from app.bench import (
    PROMPT_TEXT, BenchError, bench_main, format_table, parse_lengths, prompt_ids_for, rss_mb, summarize,
)
from backends.tokenizer import tokenizer_from_gguf
from conftest import SMOLLM3_META, tiny_gguf

BENCH = Path(__file__).resolve().parent.parent / "bench"
sys.path.insert(0, str(BENCH))
import make_models  # noqa: E402


def test_parse_lengths_sorts_and_dedups():
    assert parse_lengths("512,32, 128,32") == [32, 128, 512]
    for bad in ("", "0,4", "a,4"):
        with pytest.raises(BenchError):
            parse_lengths(bad)


def test_prompt_ids_repeat_the_paragraph_to_the_exact_length(smollm2_gguf):
    ids = prompt_ids_for(str(smollm2_gguf), 300)
    from backends import load_tokenizer
    from backends.checkpoint import open_checkpoint

    paragraph = load_tokenizer(open_checkpoint(smollm2_gguf)).encode(PROMPT_TEXT)
    assert len(ids) == 300
    assert ids[: len(paragraph)] == paragraph
    assert ids[len(paragraph) : 2 * len(paragraph)] == paragraph[: 300 - len(paragraph)]


def test_rss_reads_this_process():
    current, peak = rss_mb()
    assert 10 < current <= peak < 64 * 1024


def _sample(p, load, first, ttft, decode, rss, first_len=32):
    """A made-up Sample dict; decode 0: a cold-only process (load and the first token on first_len)."""
    return {"prompt_len": p, "first_token_len": first_len, "load_s": load, "first_token_s": first, "ttft_s": ttft,
            "prefill_tok_s": p / ttft, "decode_tok_s": decode, "decode_steps": 31 if decode else 0, "peak_rss_mb": rss,
            "import_s": 1.0, "loadavg": [0.5, 0.5, 0.5], "others_cores": 0.1, "load_others_cores": 0.0,
            "best_prefill_tok_s": p / ttft * 1.1, "best_decode_tok_s": decode * 1.1, "engine_info": {"engine": "x"}}


def test_summary_takes_medians_across_processes_and_the_largest_rss():
    s = summarize([_sample(32, 1.0, 0.5, 0.2, 10.0, 300), _sample(128, 3.0, 0.7, 0.8, 9.0, 350),
                   _sample(512, 2.0, 0.6, 3.2, 8.0, 500)])
    assert s["load_s"] == 2.0
    assert s["load_first_token_s"] == pytest.approx(2.6)
    assert s["peak_rss_mb"] == 500
    assert s["tests"][128]["prefill_tok_s"] == pytest.approx(160.0)
    table = format_table([("m", "e", s)]).splitlines()
    assert len(table) == 5
    assert table[2].split("|")[1:-1] == [" m ", " e ", " 2.00 ", " 2.60 ", " 32 ", " 0.200 ", " 160.0 ", " 53.3 ",
                                         " 10.00 ", " 300 ", " 0.10 "]


def test_summary_keeps_cold_first_tokens_per_prompt_and_load_first_token_on_the_shortest():
    samples = [_sample(32, 1.0, 0.4, 0.2, 10.0, 300, first_len=32), _sample(128, 3.0, 1.6, 0.8, 9.0, 350, first_len=128),
               _sample(32, 2.0, 0.8, 0.8, 0.0, 250, first_len=32), _sample(32, 1.5, 0.5, 0.5, 0.0, 250, first_len=32),
               _sample(128, 1.0, 1.0, 1.0, 0.0, 250, first_len=128)]
    s = summarize(samples)
    assert sorted(s["tests"]) == [32, 128]  # the cold-only processes have no warm runs
    assert s["tests"][32]["decode_tok_s"] == 10.0
    assert s["cold"][32] == {"ttft_s": 0.5, "prefill_tok_s": 64.0, "runs": 3}
    assert s["cold"][128]["ttft_s"] == pytest.approx(1.3) and s["cold"][128]["runs"] == 2
    assert s["load_first_token_s"] == pytest.approx(2.0)  # median of 1.4, 2.8, 2.0: the 32-token processes only
    assert s["load_s"] == 1.5
    assert s["peak_rss_mb"] == 350
    row = format_table([("m", "e", s)]).splitlines()[3].split("|")[1:-1]
    assert row[4:8] == [" 128 ", " 0.800 ", " 160.0 ", f" {128 / 1.3:.1f} "]


def test_bench_command_measures_each_prompt_length_in_its_own_process(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SMOLLM3_COMPILE", "0")  # compiling the decode kernel would dominate a smoke test
    out = tmp_path / "bench.json"
    rc = bench_main(["--model-path", str(tiny_gguf("Q8_0")), "-p", "8,4", "-n", "3", "-r", "2", "-t", "1",
                     "--json", str(out)])
    assert rc == 0
    report = json.loads(out.read_text())
    samples = report["samples"]
    assert [s["prompt_len"] for s in samples] == [4, 8]
    for s in samples:
        assert s["decode_steps"] == 2 and 2 <= len(s["ttft_all"]) <= 4  # contended runs are repeated
        assert len(s["others_cores_all"]) == len(s["ttft_all"]) and s["others_cores"] >= 0
        assert s["load_s"] > 0 and s["ttft_s"] > 0 and s["decode_tok_s"] > 0
        assert s["peak_rss_mb"] >= s["rss_after_load_mb"] > 0
        assert s["engine_info"]["weight_type"] == "Q8_0" and s["engine_info"]["threads"] == 1
    out, err = capsys.readouterr()
    assert out.startswith("tiny-smollm3-Q8_0.gguf: Q8_0, ") and "on native cpu f32 with 1 threads" in out
    assert max(len(line) for line in out.splitlines()) <= 100
    rows = [line.split("|")[1:-1] for line in out.splitlines() if line.startswith("| ")][1:]
    assert [int(r[0]) for r in rows] == [4, 8]
    assert [float(r[3]) for r in rows] == [pytest.approx(s["decode_tok_s"], abs=0.01) for s in samples]
    # progress: each measurement as it ends, the load and every timed run of each process
    assert err.count("bench:   load ") == 2
    assert err.count("bench:   run ") == sum(len(s["ttft_all"]) for s in samples)


def test_bench_command_errors_are_one_line(capsys):
    assert bench_main(["--model-path", "/nonexistent.gguf"]) == 2
    assert capsys.readouterr().err.strip() == "smollm3 bench: error: no such file or directory: /nonexistent.gguf"
    assert bench_main(["--model-path", str(tiny_gguf("Q8_0")), "-p", "x"]) == 2
    capsys.readouterr()
    for bad, why in ((["-n", "1"], "argument -n/--n-gen: must be at least 2, got 1"),
                     (["-t", "0"], "argument -t/--threads: must be at least 1, got 0"),
                     (["--timeout", "nan"], "argument --timeout: must be a finite number, got nan"),
                     (["-r", "x"], "argument -r/--repetitions: expected an integer, got 'x'"),
                     ([], "the following arguments are required: --model-path")):
        args = ["--model-path", str(tiny_gguf("Q8_0")), *bad] if bad else []
        assert bench_main(args) == 2
        assert capsys.readouterr().err == f"smollm3 bench: error: {why} (see smollm3 bench --help)\n"


def test_3b_plan_has_the_real_parameter_count():
    cfg = json.loads((SMOLLM3_META / "config.json").read_text())
    plan = make_models.tensor_plan(cfg)
    assert len(plan) == 2 + 9 * 36
    params = sum(int(np.prod(shape)) for _, shape, _ in plan)
    assert params == 3_075_098_624  # SmolLM3-3B with tied embeddings
    assert all(dtype == np.float32 for name, shape, dtype in plan if len(shape) == 1)


def test_generated_gguf_loads_in_our_reader_with_a_padded_real_vocabulary(tmp_path, smollm2_gguf):
    import backends

    cfg = json.loads((SMOLLM3_META / "config.json").read_text())
    cfg.update(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
               num_hidden_layers=4, vocab_size=49152 + 100)
    path = tmp_path / "small.gguf"
    make_models.write_f16(path, smollm2_gguf, cfg)
    engine = backends.load(path, backend="torch")
    assert engine.config.architecture == "smollm3"
    assert engine.config.rope_layers == (True, True, True, False)
    assert engine.config.vocab_size == 49152 + 100
    assert engine.tokenizer.encode("The war of nature") == [504, 1913, 282, 2177]  # SmolLM2's own ids
    assert engine.tokenizer.token_to_id("<|reserved_99|>") == 49152 + 99
    logits = engine.logits([504, 1913, 282, 2177])
    assert logits.shape == (4, 49152 + 100) and np.isfinite(logits).all()
    # seeded: the same bytes every time
    again = tmp_path / "again.gguf"
    make_models.write_f16(again, smollm2_gguf, cfg)
    assert again.read_bytes() == path.read_bytes()


def test_padded_tokenizer_keeps_smollm2_ids(smollm2_gguf):
    fields = make_models.padded_tokenizer(smollm2_gguf, 128256)
    assert len(fields["tokenizer.ggml.tokens"]) == len(fields["tokenizer.ggml.token_type"]) == 128256
    paragraph = tokenizer_from_gguf(fields).encode(PROMPT_TEXT)
    assert paragraph == prompt_ids_for(str(smollm2_gguf), len(paragraph))
