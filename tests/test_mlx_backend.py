"""The MLX backend (backends/mlx): weights repacked bit for bit, logits against every fixture,
greedy parity with torch on SmolLM2, quantized memory, KV prefix reuse, sampling, the CLI."""

import dataclasses
import json
import subprocess
import sys

import numpy as np
import pytest

mx = pytest.importorskip("mlx.core")
pytest.importorskip("mlx_lm")

import mlx.nn as nn  # noqa: E402
from gguf import GGMLQuantizationType as T  # noqa: E402
from gguf.quants import dequantize as gguf_dequantize  # noqa: E402
from mlx.utils import tree_flatten  # noqa: E402

import backends  # noqa: E402
from backends.checkpoint import RawTensor, open_checkpoint  # noqa: E402
from backends.config import config_from_hf  # noqa: E402
from backends.errors import BackendUnavailable, CheckpointError  # noqa: E402
from backends.mlx import weights  # noqa: E402
from backends.mlx.engine import MLXEngine, build_model  # noqa: E402
from backends import quants  # noqa: E402
from backends.quants import GGML_FORMATS  # noqa: E402
from backends.sampling import GREEDY, SamplingParams  # noqa: E402
from conftest import FIXTURES, SMOLLM3_META, TINY, TINY_HF, tiny_gguf  # noqa: E402

TOLERANCE = 2e-3  # as tests/test_torch_model.py holds the torch backend; measured 2.5e-5 to 3.0e-5 in f32
PROMPT = np.load(TINY / "prompt_ids.npy").tolist()
CASES = json.loads((FIXTURES / "smollm2-135m-greedy.json").read_text())
FOLLOW = 16

# The f16 fields (d, dmin) of each block type, at these byte offsets; every other byte of a
# block is any bit pattern, so random bytes with sane f16 fields are valid blocks.
F16_FIELDS = {
    T.Q4_0: (0,), T.Q4_1: (0, 2), T.Q5_0: (0,), T.Q5_1: (0, 2), T.Q8_0: (0,),
    T.Q2_K: (80, 82), T.Q3_K: (108,), T.Q4_K: (0, 2), T.Q5_K: (0, 2), T.Q6_K: (208,),
}  # fmt: skip


def random_blocks(ggml_type: T, rows: int = 64, cols: int = 1024, seed: int = 0) -> RawTensor:
    fmt = GGML_FORMATS[ggml_type]
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, (rows * cols // fmt.block_elems, fmt.block_bytes), dtype=np.uint8)
    for at in F16_FIELDS[ggml_type]:
        blocks[:, at : at + 2] = rng.uniform(1e-3, 1e-2, (len(blocks), 1)).astype(np.float16).view(np.uint8)
    return RawTensor("w", ggml_type, (rows, cols), blocks.reshape(rows, -1))


def mlx_dequantized(raw: RawTensor) -> np.ndarray:
    w, s, b = weights.quantized_arrays(raw, mx.float32)
    return np.array(mx.dequantize(w, s, b, group_size=weights.GROUP, bits=weights.MLX_FORMS[raw.ggml_type].bits))


def max_error(engine, reference_file: str) -> float:
    return float(np.abs(engine.logits(PROMPT) - np.load(TINY / reference_file)).max())


# --- weights ---


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
def test_pack_bits_packs_as_mx_quantize(bits):
    w = mx.array(np.random.default_rng(bits).standard_normal((8, 128)).astype(np.float32))
    packed, scales, biases = mx.quantize(w, group_size=32, bits=bits)
    codes = mx.round((w.reshape(8, 4, 32) - biases[..., None]) / scales[..., None]).reshape(8, 128)
    codes = np.clip(np.array(codes), 0, 2**bits - 1).astype(np.uint8)
    assert np.array_equal(weights.pack_bits(codes, bits), np.array(packed))


@pytest.mark.parametrize("ggml_type", [t for t, f in weights.MLX_FORMS.items() if f.exact], ids=lambda t: t.name)
def test_exact_types_dequantize_as_gguf_py(ggml_type, monkeypatch):
    monkeypatch.setattr(quants, "SLICE_ELEMS", 3000)  # repacked 2 rows at a time
    raw = random_blocks(ggml_type)
    ref = gguf_dequantize(raw.data, ggml_type).reshape(raw.shape)
    # MLX computes scale * q + bias, gguf-py d * (q - zero): the same value up to float32 rounding.
    assert np.abs(mlx_dequantized(raw) - ref).max() <= 1e-6 * np.abs(ref).max()


@pytest.mark.parametrize("ggml_type", [t for t, f in weights.MLX_FORMS.items() if not f.exact], ids=lambda t: t.name)
def test_group_of_16_types_requantize_within_half_a_step_of_8_bits(ggml_type, monkeypatch):
    """Re-quantizing to 8 bits, group 32, moves a weight by at most (max - min) / 510 of its group:
    for Q6_K about 1/8 of its own step d*|sc|. Measured: 0.39% of the group's max|w|."""
    raw = random_blocks(ggml_type)
    ref = gguf_dequantize(raw.data, ggml_type).reshape(raw.shape)
    groups = ref.reshape(raw.shape[0], -1, 32)
    err = np.abs(mlx_dequantized(raw) - ref).reshape(groups.shape)
    half_step = (groups.max(-1, keepdims=True) - groups.min(-1, keepdims=True)) / 510
    assert (err <= half_step * (1 + 1e-4) + 1e-7).all()
    assert (err.max(-1) / np.abs(groups).max(-1)).max() < 0.004


def test_unknown_ggml_type_is_named():
    raw = RawTensor("model.layers.0.mlp.up_proj.weight", T.TQ2_0, (32, 256), np.zeros((32, 66), np.uint8))
    with pytest.raises(CheckpointError, match="up_proj.*TQ2_0"):
        weights.holds_quantized(raw)


# --- logits against the fixtures ---


def test_hf_checkpoint_matches_transformers():
    engine = backends.load(TINY_HF, backend="mlx", dtype="f32")
    assert engine.info.backend == "mlx" and engine.info.dtype == "f32" and engine.info.weight_type == "BF16"
    assert max_error(engine, "logits_transformers.npy") < TOLERANCE


@pytest.mark.parametrize("qtype", ["F16", "Q8_0"])
def test_exactly_mapped_gguf_matches_dequantized_reference(qtype):
    engine = backends.load(tiny_gguf(qtype), backend="mlx")
    assert max_error(engine, f"logits_dequant_{qtype}.npy") < TOLERANCE


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1", "Q4_K_M"])
def test_4_bit_types_are_exact_with_q6_k_held_dense(qtype, monkeypatch):
    """These files also hold Q6_K (the tied embedding; in Q4_K_M some attn_v and ffn_down too):
    kept dense, every other tensor's mapping shows itself exact."""
    monkeypatch.delitem(weights.MLX_FORMS, T.Q6_K)
    engine = backends.load(tiny_gguf(qtype), backend="mlx")
    assert max_error(engine, f"logits_dequant_{qtype}.npy") < TOLERANCE


# Q6_K re-quantized to 8 bits (the default) on these random-weight models: measured max-abs
# 0.264 (Q4_0), 0.274 (Q4_1), 0.240 (Q4_K_M) against the exact reference, logits up to 6.3 in
# size; the tied embedding (Q6_K in all three) is also the output projection. llama.cpp's own
# logits are further off (0.37, 0.34, 0.67). Re-quantizing to 6 bits measured 0.79 (Q4_0), 0.88 (Q4_K_M).
Q6_K_BOUND = 0.35


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1", "Q4_K_M"])
def test_files_with_q6_k_stay_within_the_stated_bound_and_closer_than_llamacpp(qtype):
    engine = backends.load(tiny_gguf(qtype), backend="mlx")
    reference = np.load(TINY / f"logits_dequant_{qtype}.npy")
    llamacpp = float(np.abs(np.load(TINY / f"logits_llamacpp_{qtype}.npy") - reference).max())
    assert max_error(engine, f"logits_dequant_{qtype}.npy") < min(Q6_K_BOUND, llamacpp)


def test_decode_steps_match_the_full_forward():
    engine = backends.load(tiny_gguf("Q8_0"), backend="mlx")
    reference = np.load(TINY / "logits_dequant_Q8_0.npy")
    engine.prefill(PROMPT[:30])
    for pos in range(30, len(PROMPT)):
        step = engine.to_numpy(engine.forward([PROMPT[pos]], pos, last_only=True))[-1]
        assert float(np.abs(step - reference[pos]).max()) < TOLERANCE


@pytest.mark.parametrize("dtype, bound", [("bf16", 0.35), ("f16", 0.05)])
def test_half_precision_dtypes(dtype, bound):
    """Activations in half precision: measured max-abs 0.274 (bf16) and 0.034 (f16) against
    transformers in f32; the torch backend measures 0.239 and 0.029."""
    engine = backends.load(TINY_HF, backend="mlx", dtype=dtype)
    assert engine.info.dtype == dtype
    assert max_error(engine, "logits_transformers.npy") < bound


# --- the model mlx-lm builds ---


def test_nope_layers_follow_the_config_not_mlx_lm_defaults():
    ckpt = open_checkpoint(TINY_HF)
    flags = (True, False) * (ckpt.config.num_layers // 2)  # not the every-4th default
    model = build_model(dataclasses.replace(ckpt.config, rope_layers=flags))
    from mlx_lm.models.smollm3 import NoPE

    assert [not isinstance(layer.self_attn.rope, NoPE) for layer in model.layers] == list(flags)


def test_yarn_as_mlx_lm_computes_it_matches_the_config():
    config = open_checkpoint(TINY_HF).config
    yarn = {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 2048}
    build_model(dataclasses.replace(config, rope_scaling=yarn))  # check_rope raises on a mismatch
    build_model(dataclasses.replace(config, rope_scaling={"rope_type": "yarn", "factor": 4.0}))  # our defaults
    # SmolLM3-3B's 128k setting (facts.md): factor 2 over its 65536 positions
    real = config_from_hf(json.loads((SMOLLM3_META / "config.json").read_text()))
    build_model(dataclasses.replace(real, rope_scaling=yarn | {"original_max_position_embeddings": 65536}))
    with pytest.raises(CheckpointError, match="rope scaling"):  # mlx-lm ignores attention_factor
        build_model(dataclasses.replace(config, rope_scaling=yarn | {"attention_factor": 1.5}))


def test_q4_k_m_holds_quantized_weights_near_the_file_size():
    engine = backends.load(tiny_gguf("Q4_K_M"), backend="mlx", dtype="f16")
    layer = engine.model.layers[0]
    assert isinstance(layer.mlp.gate_proj, nn.QuantizedLinear) and layer.mlp.gate_proj.bits == 4  # Q4_K
    assert layer.mlp.gate_proj.group_size == 32 and layer.mlp.gate_proj.weight.dtype == mx.uint32
    assert isinstance(engine.model.model.embed_tokens, nn.QuantizedEmbedding)  # Q6_K, also the output
    assert engine.model.model.embed_tokens.bits == 8
    params = sum(v.nbytes for _, v in tree_flatten(engine.model.parameters()))
    n_weights = sum(np.prod(t.shape) for t in open_checkpoint(tiny_gguf("Q4_K_M")).tensors.values())
    # 4 bits + f16 scale and bias = 5 bits a weight where Q4_K has 4.5; Q6_K's 6.56 become 9:
    # measured 1.16x the file, 0.77 bytes a weight (float16 would be 2).
    assert params < 1.25 * tiny_gguf("Q4_K_M").stat().st_size
    assert params < 0.85 * n_weights


def test_quantize_at_load():
    engine = MLXEngine(open_checkpoint(TINY_HF), None, None, dtype="f32", quantize=8)
    proj = engine.model.layers[0].self_attn.q_proj
    assert isinstance(proj, nn.QuantizedLinear) and (proj.bits, proj.group_size) == (8, 64)
    # Measured 0.402 (4 bits: 5.6) on this random-weight model, whose logits swing with any
    # 8-bit rounding: llama.cpp's own Q8_0 logits are 0.43 off the exact reference.
    assert max_error(engine, "logits_transformers.npy") < 0.5
    with pytest.raises(BackendUnavailable, match="7 bits"):
        MLXEngine(open_checkpoint(TINY_HF), None, None, quantize=7)


def test_mlx_checkpoint_loads_as_mlx_lm_loads_it(tmp_path):
    """An mlx-community-style checkpoint (U32 packed weights, .scales/.biases, config.json
    `quantization`), made by mlx_lm.convert; the torch backend says to use MLX for it."""
    import mlx_lm

    mlx_lm.convert(str(TINY_HF), mlx_path=str(tmp_path / "q4"), quantize=True, q_bits=4, q_group_size=64)
    with pytest.raises(CheckpointError, match="--backend mlx"):
        backends.load(tmp_path / "q4", backend="torch")
    engine = backends.load(tmp_path / "q4", backend="mlx", dtype="bf16")
    assert (engine.model.layers[0].mlp.up_proj.bits, engine.model.model.embed_tokens.group_size) == (4, 64)

    # mlx-lm 0.32 reads only a top-level rope_theta, not transformers 5's rope_parameters
    # (it would rotate by 10000 instead of 1e5): give it one, then it must agree bit for bit.
    config = json.loads((tmp_path / "q4" / "config.json").read_text())
    (tmp_path / "q4" / "config.json").write_text(json.dumps(config | {"rope_theta": engine.config.rope_theta}))
    reference, _ = mlx_lm.load(str(tmp_path / "q4"))
    ours, theirs = dict(tree_flatten(engine.model.parameters())), dict(tree_flatten(reference.parameters()))
    assert ours.keys() == theirs.keys() and all(mx.array_equal(ours[k], theirs[k]).item() for k in ours)
    expected = np.array(reference(mx.array(PROMPT)[None])[0].astype(mx.float32))
    assert np.array_equal(engine.logits(PROMPT), expected)


# --- generation ---


def test_prefix_reuse_gives_the_logits_of_a_fresh_run():
    engine = backends.load(tiny_gguf("Q8_0"), backend="mlx")
    other = PROMPT[:20] + PROMPT[30:38] + PROMPT[20:25]
    fresh = engine.logits(other)[-1]
    engine.prefill(PROMPT)
    reused = engine.to_numpy(engine.prefill(other))[-1]
    assert engine.stats.prefilled_tokens == len(other) - 20 and engine.cached_ids == other
    assert np.abs(reused - fresh).max() < 1e-4
    engine.prefill(PROMPT)
    split = engine.to_numpy(engine.prefill(other, split_prompt=True))[-1]
    assert np.abs(split - fresh).max() < 1e-4


def test_generates_on_threads_other_than_the_loading_one():
    """As the TUI does: load on one worker thread, generate on others (MLX streams are per thread)."""
    from concurrent.futures import ThreadPoolExecutor

    params = SamplingParams(temperature=1.0, seed=3)
    engine = ThreadPoolExecutor(1).submit(backends.load, tiny_gguf("Q4_K_M"), backend="mlx").result()
    runs = [ThreadPoolExecutor(1).submit(lambda: list(engine.generate(PROMPT, 6, params))).result() for _ in range(2)]
    assert runs[0] == runs[1] == list(engine.generate(PROMPT, 6, params))


def test_seeded_sampling_is_reproducible():
    engine = backends.load(tiny_gguf("Q8_0"), backend="mlx")
    params = SamplingParams(temperature=1.0, top_k=50, top_p=0.9, seed=7)
    first = list(engine.generate(PROMPT, 12, params))
    assert list(engine.generate(PROMPT, 12, params)) == first
    assert list(engine.generate(PROMPT, 12, dataclasses.replace(params, seed=8))) != first


# --- tokens read late: each forward queued before the token it feeds is read (as on Metal) ---

SAMPLED = SamplingParams(temperature=1.0, top_k=50, top_p=0.9, repeat_penalty=1.3, seed=5)


def plain_run(engine, prompt, n, params, late: bool, monkeypatch) -> tuple[list[int], tuple, list[int]]:
    """Tokens, stats and the positions of the queued forwards of a generation without drafts,
    each token read late (the default on MLX) or waited for."""
    monkeypatch.setenv("SMOLLM3_SPECULATE", "0")  # on Metal it is off: its rows are not exact
    monkeypatch.setattr(engine, "reads_tokens_late", late)
    queued, forward_queued = [], type(engine).forward_queued

    def counted(sampled, pos):
        queued.append(pos)
        return forward_queued(engine, sampled, pos)

    monkeypatch.setattr(engine, "forward_queued", counted)
    tokens = list(engine.generate(prompt, n, params))
    s = engine.stats
    return tokens, (s.generated_tokens, s.decode_steps, s.stop_reason, list(engine.cached_ids)), queued


@pytest.mark.parametrize("params", [GREEDY, SAMPLED], ids=["greedy", "sampled"])
def test_tokens_read_late_are_the_tokens_waited_for(params, monkeypatch):
    engine = backends.load(tiny_gguf("Q4_K_M"), backend="mlx")
    waited, waited_stats, none = plain_run(engine, PROMPT, 24, params, False, monkeypatch)
    late, late_stats, queued = plain_run(engine, PROMPT, 24, params, True, monkeypatch)
    assert late == waited and late_stats == waited_stats and not none
    assert len(set(waited)) > 3  # the run means something: not one token over and over
    assert queued == list(range(len(PROMPT), len(PROMPT) + 23))  # every decoding forward queued


def test_a_forward_queued_for_eos_leaves_the_next_turn_as_it_was(monkeypatch):
    """The token read late is EOS: its forward, queued already, wrote a cache position past the
    conversation, which the next turn's prefill overwrites."""
    engine = backends.load(tiny_gguf("Q4_K_M"), backend="mlx")
    tokens, _, _ = plain_run(engine, PROMPT, 12, GREEDY, False, monkeypatch)
    stop = tokens[4]
    engine.config = dataclasses.replace(engine.config, eos_token_ids=(stop,))
    next_turn = PROMPT + tokens[: tokens.index(stop)] + [stop] + PROMPT[:7]
    turns = {}
    for late in (False, True):
        out, (_, _, reason, cached), queued = plain_run(engine, PROMPT, 12, GREEDY, late, monkeypatch)
        assert out == tokens[: tokens.index(stop)] and reason == "eos"
        assert engine.cache[0].offset == len(cached) + late and len(queued) == (len(out) + 1 if late else 0)
        turns[late] = engine.to_numpy(engine.prefill(next_turn)), engine.stats.prefilled_tokens
    assert np.array_equal(turns[True][0], turns[False][0]) and turns[True][1] == turns[False][1]


def test_no_forward_is_queued_past_the_context(monkeypatch):
    engine = backends.load(tiny_gguf("Q4_K_M"), backend="mlx")
    engine.config = dataclasses.replace(engine.config, context_length=len(PROMPT) + 5)
    waited, waited_stats, _ = plain_run(engine, PROMPT, 12, GREEDY, False, monkeypatch)
    late, late_stats, queued = plain_run(engine, PROMPT, 12, GREEDY, True, monkeypatch)
    assert late == waited and late_stats == waited_stats and waited_stats[2] == "context"
    assert max(queued) < engine.config.context_length - 1


def test_a_generation_stopped_with_a_forward_queued_goes_on_from_another_thread(monkeypatch):
    """As the TUI's stop button and next turn: the forward queued for the token after the last
    one read has been started, so its cache is no lazy array of this thread's stream, which MLX
    would refuse on another."""
    from concurrent.futures import ThreadPoolExecutor

    engine = backends.load(tiny_gguf("Q4_K_M"), backend="mlx")
    want, _, _ = plain_run(engine, PROMPT[:30], 8, SAMPLED, False, monkeypatch)
    monkeypatch.setattr(engine, "reads_tokens_late", True)
    monkeypatch.setenv("SMOLLM3_SPECULATE", "0")
    stopped = engine.generate(PROMPT, 12, SAMPLED)
    assert [next(stopped) for _ in range(3)]
    stopped.close()
    assert engine.cache[0].offset == len(engine.cached_ids) + 1  # the forward queued for the 4th token
    again = ThreadPoolExecutor(1).submit(lambda: list(engine.generate(PROMPT[:30], 8, SAMPLED))).result()
    assert again == want


@pytest.fixture(scope="module")
def smollm2_mlx(smollm2_gguf):
    return backends.load(smollm2_gguf, backend="mlx")


def test_smollm2_greedy_parity_with_torch(smollm2_gguf, smollm2_mlx, monkeypatch):
    """MLX's 16 greedy tokens on each of the five prompts are torch's (exact reference kernels)
    greedy choices too: torch's argmax after every prefix of prompt + MLX's tokens (+ EOS if it
    stopped there) is the next of them, which is the same as torch generating them, in one
    forward pass instead of 16 (its reference kernels decode at under 1 token/s here). Both
    also follow transformers on the exactly dequantized weights."""
    monkeypatch.setenv("SMOLLM3_KERNELS", "reference")
    torch_engine = backends.load(smollm2_gguf, backend="torch", dtype="f32")
    (eos,) = smollm2_mlx.eos_ids
    for case in CASES:
        prompt = case["prompt_ids"]
        ours = list(smollm2_mlx.generate(prompt, FOLLOW, GREEDY))
        if smollm2_mlx.stats.stop_reason == "eos":
            ours.append(eos)
        torch_choices = torch_engine.logits(prompt + ours[:-1]).argmax(-1)[len(prompt) - 1 :]
        assert torch_choices.tolist() == ours, case["prompt"]
        assert ours == case["transformers_f32"][: len(ours)], case["prompt"]


def test_smollm2_holds_q4_1_at_the_file_size(smollm2_gguf, smollm2_mlx):
    """Q4_1 is 20 bytes per 32 weights; MLX 4 bits with f32 scale and bias 24 (measured 1.17x the
    file; with f16 scales, as on Metal, 1.00x)."""
    params = sum(v.nbytes for _, v in tree_flatten(smollm2_mlx.model.parameters()))
    assert params < 1.25 * smollm2_gguf.stat().st_size


def test_cli_answers_paris_on_mlx(smollm2_gguf):
    r = subprocess.run(
        [sys.executable, "-m", "app", "--backend", "mlx", "--model-path", str(smollm2_gguf),
         "--temperature", "0", "--prompt", "Name the capital of France."],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout and "Traceback" not in r.stderr
