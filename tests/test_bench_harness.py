"""bench/run.py, bench/ceiling.py and bench/report.py on made-up measurements: the ceiling
maths, the duration estimate, merging runs, and the report's tables and targets."""

import argparse
import sys
from pathlib import Path

import pytest

from conftest import tiny_gguf
from test_bench import _sample

BENCH = Path(__file__).resolve().parent.parent / "bench"
sys.path.insert(0, str(BENCH))
import ceiling  # noqa: E402
import report  # noqa: E402
import run as harness  # noqa: E402

DIMS = {"layers": 2, "kv_heads": 1, "head_dim": 64}
MACHINE = {"cpu": "x", "cores": 2, "ram_gb": 24.0, "platform": "linux", "python": "3.11", "flags": ["avx2"]}


def test_a_decode_step_reads_the_embedding_table_only_when_it_is_the_output():
    tied = {"token_embd.weight": 1000, "blk.0.attn_q.weight": 300, "output_norm.weight": 4}
    assert ceiling.weight_bytes(tied) == 1304
    assert ceiling.weight_bytes({**tied, "output.weight": 900}) == 1204


def test_ceiling_is_bandwidth_over_weights_and_the_16_bit_cache():
    kv = ceiling.kv_bytes_per_position(DIMS)
    assert kv == 2 * 2 * 1 * 64 * 2  # keys and values, 2 layers, 1 head of 64, 2 bytes
    assert ceiling.ceiling_tok_s(40e9, 2 * 10**9, kv, 0) == pytest.approx(20.0)
    assert ceiling.ceiling_tok_s(40e9, 2 * 10**9, 10**5, 10**4) == pytest.approx(40e9 / 3e9)


def test_gguf_tensor_bytes_are_the_files_tensor_sizes():
    from backends.gguf_file import GGUFFile

    path = tiny_gguf("Q8_0")
    sizes = ceiling.gguf_tensor_bytes(str(path))
    assert sizes == {name: info.nbytes for name, info in GGUFFile(path).tensors.items()}


def _args(**kw):
    base = dict(reps=3, n_gen=32, cold_reps=2, long_models_list=[], spec_models_list=[], long_context=4096,
                spec_runs=1, spec_tokens=128)
    return argparse.Namespace(**{**base, **kw})


def test_estimate_grows_with_what_the_run_measures():
    lengths = [32, 128, 512]
    engines = ["ours", "llamacpp"]
    def total(models, **kw):
        parts = harness.estimate_s(models, lengths, engines, _args(**kw))
        return sum(v for k, v in parts.items() if k != "making files")  # the files may be made already, or not

    small = total({"135m": "full"})
    big = total({"135m": "full", "3b-q4km": "full"})
    reduced = total({"135m": "full", "3b-q2k": "reduced"})
    assert 15 < small < big
    assert small < reduced < big  # one prompt length of a smaller file
    long = total({"135m": "full", "3b-q4km": "full"}, long_models_list=["3b-q4km"])
    # the 4,096-token prefill at 250 GFLOP/s over 6.2 GFLOP per token, 1.5x for the attention, two engines
    assert long - big > 2 * 1.5 * 4096 / (250e9 / (2 * 3.08e9))


def _run():
    def pair(ours_decode, ours_rss):
        return [{"model": "3b-q4km", "engine": "ours",
                 "samples": [_sample(32, 0.4, 1.0, 0.6, ours_decode, ours_rss, 32),
                             _sample(512, 0.4, 10.0, 10.0, ours_decode * 0.9, ours_rss + 100, 512),
                             _sample(32, 0.4, 1.0, 1.0, 0.0, 1000, 32)]},
                {"model": "3b-q4km", "engine": "llamacpp",
                 "samples": [_sample(32, 2.5, 0.7, 0.7, 14.0, 3200, 32), _sample(512, 2.5, 11.0, 11.0, 14.0, 3300, 512)]}]

    long = {"context": 4096, "n_gen": 32, "load_s": 1.0, "prefill_s": 90.0, "prefill_tok_s": 45.5,
            "decode_tok_s": 9.0, "decode_all": [9.0, 8.8, 9.1], "peak_rss_mb": 2600, "others_cores": 0.0}
    tasks = {"summarize": {"prompt_len": 800, "identical": True, "plain": {"decode_tok_s": 10.0, "tokens": [5, 6, 7, 8]},
                           "speculative": {"decode_tok_s": 16.0, "accepted": 60, "drafted": 80}}}
    return {"argv": ["--models", "3b-q4km"], "started": "2026-12-01 23:00", "machine": MACHINE, "lengths": [32, 512],
            "n_gen": 32, "reps": 3, "cold_reps": 1, "threads": 2, "bandwidth": 40e9, "estimate_s": 600.0,
            "spec_tokens": 128, "spec_runs": 1, "wall_s": 660.0, "failures": [],
            "models": {"3b-q4km": {"file": "q.gguf", "size_mb": 1823.0, "dims": DIMS, "protocol": "full",
                                   "weight_bytes": 2 * 10**9}},
            "results": pair(16.8, 2300),
            "long": {"3b-q4km": {"ours": {**long}, "llamacpp": {**long, "decode_tok_s": 10.0, "prefill_s": 100.0}}},
            "speculative": {"3b-q4km": {"ours": {"tasks": tasks},
                                        "llamacpp": {"tasks": {"summarize": {"plain": {"decode_tok_s": 14.0,
                                                                                       "tokens": [5, 6, 9, 8]}}}}}}}


def test_complete_puts_targets_and_ceilings_on_each_model():
    run = _run()
    harness.complete(run)
    model = run["models"]["3b-q4km"]
    met = {t["metric"]: (t["met"], t["miss"]) for t in model["targets"]}
    assert met["decode tok/s, prompt 32"] == (True, "")  # 16.8 / 14 = 1.2
    assert met["decode tok/s, 4096-token context"] == (False, "10% short")
    assert met["peak RSS"] == (True, "")
    assert met["cold prefill tok/s, prompt 32"] == (False, "30% short")  # median cold 1.0 s against 0.7 s
    assert met["speculative / our plain, summarize"] == (True, "")  # 16 against 10
    assert met["speculative / llama.cpp plain, summarize"] == (True, "")  # 16 against 14
    top = 40e9 / (2e9 + ceiling.kv_bytes_per_position(DIMS) * 48)  # prompt 32 + 16: the mean context
    assert model["ceiling"]["ours"]["32"]["ceiling_tok_s"] == pytest.approx(top)
    assert model["ceiling"]["llamacpp"]["32"]["fraction"] == pytest.approx(14.0 / top)
    assert model["ceiling"]["ours"]["4096"]["decode_tok_s"] == 9.0


def test_report_shows_targets_ceilings_long_context_and_speculation():
    run = _run()
    harness.complete(run)
    text = report.report_markdown(run)
    assert "**18.6 GB/s**" not in text and "**40.0 GB/s**" in text
    assert "(11 min, estimated 10)" in text
    assert "| decode tok/s, 4096-token context | >= 1.00x | 0.90x (9.00 vs 10.00) | **no**: 10% short |" in text
    n = len(run["models"]["3b-q4km"]["targets"])
    assert f"of {n} targets met." in text
    assert "| 3b-q4km | 1907 | 4096 | " in text  # weights 2e9 bytes in MiB
    assert "| 3b-q4km | ours | 4096 | 90.0 | 45.5 | 9.00 (9.00, 8.80, 9.10) | 2600 | decode 0.90x, prefill 1.11x |" in text
    assert "| 3b-q4km | summarize | 800 | 10.00 | 16.00 | 14.00 | 1.60x | 1.14x | 60 / 80 | yes | 2 / 4 |" in text
    assert "Built natively" in text and "flags that matter here: avx2." in text
    amx = report.report_markdown({**run, "machine": {**MACHINE, "flags": ["avx512f", "amx_tile", "amx_int8"]}})
    assert "AMX off: llama.cpp runs here without its AMX kernels" in amx


def test_other_types_share_one_table_and_a_file_ours_cannot_run_misses_its_target():
    run = _run()
    run["models"]["3b-q4km"]["protocol"] = "reduced"
    iq = {"file": "iq.gguf", "size_mb": 1700.0, "dims": DIMS, "protocol": "reduced", "weight_bytes": 10**9}
    run["models"]["3b-iq4xs"] = iq
    run["results"].append({"model": "3b-iq4xs", "engine": "llamacpp", "samples": [_sample(32, 2.5, 0.7, 0.7, 14.0, 3000)]})
    harness.complete(run)
    text = report.report_markdown(run)
    assert "### 3b-q4km" not in text
    assert "| 3b-q4km | 1823 | 1.20x | 1.17x | **0.70x** | 0.44x | 0.73x |" in text  # prompt 32's figures
    assert "| 3b-iq4xs | 1700 | **ours failed** | **ours failed** |" in text
    assert "3b-iq4xs: runs on our engine" in text


def test_merge_replaces_only_the_remeasured_cells():
    def result(model, engine, samples):
        return {"model": model, "engine": engine, "samples": samples}

    old = {"argv": ["--models", "135m"], "n_gen": 32, "lengths": [32, 512], "machine": MACHINE, "wall_s": 60.0,
           "started": "2026-01-01 10:00", "reps": 3, "threads": 2, "bandwidth": 30e9,
           "models": {"135m": {"file": "f", "size_mb": 100.0, "dims": DIMS, "protocol": "full"}},
           "results": [result("135m", "ours", [_sample(32, 1.0, 0.5, 0.2, 12.0, 600), _sample(512, 1.0, 0.5, 9.0,
                                                                                                1.0, 700)]),
                       result("135m", "llamacpp", [_sample(32, 0.5, 0.2, 0.2, 10.0, 200),
                                                   _sample(512, 0.5, 0.2, 4.0, 10.0, 200)])]}
    new = {"argv": ["-p", "512"], "n_gen": 32, "lengths": [512], "machine": MACHINE,
           "models": {"135m": {"file": "f", "size_mb": 100.0, "dims": DIMS, "protocol": "full"}},
           "results": [result("135m", "ours", [_sample(512, 1.0, 0.5, 2.0, 11.0, 650)])]}
    run = harness.merge_runs(old, new)
    harness.complete(run)
    ours = next(r for r in run["results"] if r["engine"] == "ours")
    assert [s["ttft_s"] for s in ours["samples"]] == [0.2, 2.0]
    assert run["lengths"] == [32, 512] and run["argv"] == [["--models", "135m"], ["-p", "512"]]
    assert run["models"]["135m"]["ratios"]["prefill_tok_s@512"] == pytest.approx(2.0)
    assert run["bandwidth"] == 30e9
    assert "then `python bench/run.py -p 512`" in report.report_markdown({**run, "wall_s": 60.0})


def test_long_and_speculative_models_must_be_measured(capsys):
    with pytest.raises(harness.BenchError, match="not measured in this run: 3b-q8"):
        harness.main(["--models", "135m", "--reduced-models", "", "--long-models", "3b-q8"])
    with pytest.raises(harness.BenchError, match="unknown model or engine: 3b-q9"):
        harness.main(["--models", "3b-q9"])
