"""Generation on the real SmolLM2-135M-Instruct Q4_1 GGUF, and memory while generating."""

import json
import subprocess
import sys
import textwrap

import pytest

import backends
from backends.sampling import GREEDY, SamplingParams
from backends.torch.weights import weight_bytes
from conftest import FIXTURES, tiny_gguf

CASES = json.loads((FIXTURES / "smollm2-135m-greedy.json").read_text())
FOLLOW = 16


@pytest.fixture(scope="module")
def smollm2(smollm2_gguf):
    return backends.load(smollm2_gguf, backend="torch")


def follows(ours: list[int], reference: list[int], n: int) -> bool:
    """Our first n tokens equal the reference's (a reference that ends at EOS ends the comparison)."""
    return ours[:n] == reference[:n] or (len(ours) < n and reference[: len(ours) + 1][:-1] == ours)


def test_greedy_follows_a_reference_on_the_prompts_where_the_references_agree(smollm2):
    # Prompts 0, 3 and 4 reach near-ties early: the exact reference leads by 0.08, 0.035 and
    # 0.026 at its first step off our tokens (smollm2-135m-agreed.json), which int8 activations
    # (ours and llama.cpp's) turn either way. Prompt 2, where the two references share 39+
    # tokens, must follow; prompt 1 up to its step 6, where the exact reference leads by 0.22
    # only (under test_torch_native.LEAD: the float16 KV cache, as llama.cpp's, turns it here).
    # tests/test_torch_native.py holds more such prompts on every path.
    eos = smollm2.eos_ids
    followed, generated = [], []
    for case in CASES:
        ours = list(smollm2.generate(case["prompt_ids"], FOLLOW, GREEDY))
        if smollm2.stats.stop_reason == "eos":
            ours = ours + [next(iter(eos & set(case["transformers_f32"] + case["llamacpp"])), -1)]
        generated.append(ours)
        followed.append(follows(ours, case["llamacpp"], FOLLOW) or follows(ours, case["transformers_f32"], FOLLOW))
    assert followed[2] and follows(generated[1], CASES[1]["transformers_f32"], 6) and sum(followed) >= 2, followed


def test_prompt_ids_render_and_tokenize_like_llamacpp(smollm2):
    for case in CASES:
        text = smollm2.chat_template.render([{"role": "user", "content": case["prompt"]}], add_generation_prompt=True)
        assert smollm2.tokenizer.encode(text) == case["prompt_ids"]


def test_seeded_sampling_is_reproducible(smollm2):
    ids = CASES[2]["prompt_ids"]
    params = SamplingParams(temperature=0.9, top_p=0.95, top_k=40, seed=7)
    first = list(smollm2.generate(ids, 8, params))
    assert list(smollm2.generate(ids, 8, params)) == first
    other = [list(smollm2.generate(ids, 8, SamplingParams(temperature=1.5, seed=s))) for s in range(3)]
    assert len({tuple(o) for o in other}) > 1  # a different seed samples differently


def test_generation_stops_at_max_new_tokens_and_reports_stats(smollm2):
    out = list(smollm2.generate(CASES[1]["prompt_ids"], 5, GREEDY))
    s = smollm2.stats
    assert len(out) == 5 == s.generated_tokens and s.stop_reason == "length"
    assert s.prompt_tokens == len(CASES[1]["prompt_ids"]) and s.prefill_s > 0 and s.decode_steps == 4


@pytest.mark.parametrize("qtype", ["Q4_K_M", "Q8_0"])
def test_quantized_weights_stay_quantized(qtype):
    engine = backends.load(tiny_gguf(qtype), backend="torch")
    size = tiny_gguf(qtype).stat().st_size
    # Int4 packs as the file does; other types hold one int8 code a weight (Q6_K's 6.6 bits
    # become 8, plus f32 scales): measured 1.22x the Q4_K_M file, 1.04x Q8_0, never f32's 4 bytes.
    assert weight_bytes(engine.model) < 1.3 * size


MEASURE = textwrap.dedent(
    """
    import json, sys
    import torch  # the runtime and its kernel compiler are not what we measure
    import backends, backends.torch.engine
    from backends.torch.weights import compiled_gemv, int4_works
    compiled_gemv(), int4_works("cpu")
    from backends.sampling import GREEDY
    def status_mb(field):
        with open("/proc/self/status") as f:
            return next(int(l.split()[1]) for l in f if l.startswith(field)) / 1024
    before = status_mb("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:  # the peak from here on: not the warm-up's compiles
        f.write("5")
    engine = backends.load(sys.argv[1], backend="torch")
    list(engine.generate(engine.tokenizer.encode("Hello, my name is"), 8, GREEDY))
    peak = status_mb("VmHWM")
    print(json.dumps({"before": before, "peak": peak}))
    """
)


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc")
def test_peak_rss_shows_no_upfront_dequantization(smollm2_gguf):
    """SmolLM2-135M as f32 would be ~540 MB; generating must stay near the 98 MB file plus working memory."""
    out = subprocess.run([sys.executable, "-c", MEASURE, str(smollm2_gguf)], capture_output=True, text=True, check=True)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    file_mb = smollm2_gguf.stat().st_size / 2**20
    grown = r["peak"] - r["before"]
    f32_mb = 134.5e6 * 4 / 2**20
    assert grown < file_mb + 250 < f32_mb, r
