"""The torch model against the reference logits of every tiny-smollm3 fixture."""

import dataclasses

import numpy as np
import pytest

import backends
from backends.checkpoint import RawTensor, open_checkpoint
from backends.config import smollm3_rope_layers
from backends.torch import native
from backends.torch.engine import TorchEngine
from backends.torch.weights import NativeLinear
from conftest import GGUF_TYPES, TINY, TINY_HF, tiny_gguf

# Max-abs logit error in f32: a correct implementation lands near 1e-5 here; layout errors
# (RoPE on NoPE layers, Q/K left permuted) land over 100x this bound (tests below).
TOLERANCE = 2e-3
PROMPT = np.load(TINY / "prompt_ids.npy").tolist()
# The fast kernels quantize activations to int8 per block of 32 (256 for K-quants), as
# llama.cpp does, so they are as far from the exact logits as llama.cpp is: measured RMS 0.069
# (Q8_0), 0.065 (Q4_0), 0.068 (Q4_1), 0.100 (Q4_K_M) against llama.cpp's 0.066, 0.066, 0.068,
# 0.100, and max-abs 0.41, 0.34, 0.38, 0.56 against 0.43, 0.37, 0.34, 0.67 (these random tiny
# models have logits up to 6 and amplify rounding). Bound: llama.cpp's error plus 10% (RMS) and
# 25% (max-abs, one logit of 155k, which rounding luck decides).
INT8_ACTIVATION_FILES = ("Q8_0", "Q4_0", "Q4_1", "Q4_K_M")


def rms(a: np.ndarray) -> float:
    return float(np.sqrt((a.astype(np.float64) ** 2).mean()))


@pytest.fixture
def reference_kernels(monkeypatch):
    """Dequantize-per-call kernels: exact, the path the 2e-3 bar is for."""
    monkeypatch.setenv("SMOLLM3_KERNELS", "reference")


def max_error(engine, reference_file: str) -> float:
    return float(np.abs(engine.logits(PROMPT) - np.load(TINY / reference_file)).max())


def test_hf_checkpoint_matches_transformers(monkeypatch):
    monkeypatch.setenv("SMOLLM3_KV_CACHE", "f32")
    engine = backends.load(TINY_HF, backend="torch", dtype="f32")
    assert max_error(engine, "logits_transformers.npy") < TOLERANCE


def test_float16_kv_cache_is_within_llamacpps_own_error():
    """The native path's default float16 cache (llama.cpp's too) moves f32 logits by 0.0087 max,
    0.0014 RMS here; llama.cpp on the same weights (F16 file, transformers' logits) is off by
    0.021 max, 0.0029 RMS."""
    if native.library() is None:
        pytest.skip("no C compiler for the native kernels")
    import torch

    engine = backends.load(TINY_HF, backend="torch", dtype="f32")
    reference = np.load(TINY / "logits_transformers.npy")
    llamacpp_error = np.load(TINY / "logits_llamacpp_F16.npy") - reference
    error = engine.logits(PROMPT) - reference
    assert engine.model.caches[0].k.dtype == torch.float16
    assert 1e-4 < float(np.abs(error).max()) < float(np.abs(llamacpp_error).max())
    assert rms(error) < rms(llamacpp_error)


@pytest.mark.parametrize("qtype", GGUF_TYPES)
def test_gguf_matches_exact_dequantized_reference(qtype, reference_kernels):
    engine = backends.load(tiny_gguf(qtype), backend="torch")
    assert max_error(engine, f"logits_dequant_{qtype}.npy") < TOLERANCE


@pytest.mark.parametrize("kernels", ["native", "torch"])
@pytest.mark.parametrize("qtype", GGUF_TYPES)
def test_fast_kernels_are_exact_or_closer_than_llamacpp(qtype, kernels, monkeypatch):
    """Prefill and one-token decode on the default kernels: our C ones (native.py), and torch's
    int4/compiled ones, which run where no C compiler is (and on CUDA)."""
    if kernels == "torch":
        monkeypatch.setenv("SMOLLM3_NATIVE", "0")
    elif native.library() is None:
        pytest.skip("no C compiler for the native kernels")
    engine = backends.load(tiny_gguf(qtype), backend="torch")
    reference = np.load(TINY / f"logits_dequant_{qtype}.npy")
    llamacpp_error = np.load(TINY / f"logits_llamacpp_{qtype}.npy") - reference
    if qtype in INT8_ACTIVATION_FILES:
        max_bound, rms_bound = 1.25 * float(np.abs(llamacpp_error).max()), 1.1 * rms(llamacpp_error)
    elif kernels == "native":  # exact weights, a float16 KV cache as llama.cpp's: its error bounds ours
        max_bound, rms_bound = float(np.abs(llamacpp_error).max()), rms(llamacpp_error)
    else:
        max_bound, rms_bound = TOLERANCE, TOLERANCE
    error = engine.logits(PROMPT) - reference
    assert float(np.abs(error).max()) < max_bound and rms(error) < rms_bound
    engine.prefill(PROMPT[:30])
    steps = [engine.to_numpy(engine.forward([PROMPT[pos]], pos, last_only=True))[-1] for pos in range(30, len(PROMPT))]
    error = np.stack(steps) - reference[30:]
    assert float(np.abs(error).max()) < max_bound and rms(error) < 1.5 * rms_bound  # 8 rows: a noisier RMS


def _engine_from(ckpt):
    tok = backends.load_tokenizer(ckpt)
    return TorchEngine(ckpt, tok, None, device="cpu", dtype="f32")


def test_rope_on_nope_layers_fails_the_reference():
    ckpt = open_checkpoint(TINY_HF)
    assert ckpt.config.rope_layers == smollm3_rope_layers(8) == (True, True, True, False) * 2
    ckpt.config = dataclasses.replace(ckpt.config, rope_layers=(True,) * 8)
    assert max_error(_engine_from(ckpt), "logits_transformers.npy") > 100 * TOLERANCE


def test_missing_qk_unpermute_fails_the_reference(reference_kernels):
    ckpt = open_checkpoint(tiny_gguf("Q8_0"))
    c = ckpt.config
    for name, raw in list(ckpt.tensors.items()):
        n_head = c.num_heads if name.endswith("q_proj.weight") else c.num_kv_heads
        if name.endswith(("q_proj.weight", "k_proj.weight")):
            # Put rows back in llama.cpp's order, as a reader that forgot to un-permute would have them.
            permuted = raw.data.reshape(n_head, 2, c.head_dim // 2, -1).swapaxes(1, 2).reshape(raw.data.shape)
            ckpt.tensors[name] = RawTensor(name, raw.ggml_type, raw.shape, np.ascontiguousarray(permuted))
    assert max_error(_engine_from(ckpt), "logits_dequant_Q8_0.npy") > 100 * TOLERANCE


@pytest.mark.skipif(native.library() is None, reason="no C compiler")
def test_missing_qk_unpermute_fails_the_reference_on_the_native_kernels():
    """The native path reads Q/K rows in HF order where they lie in the file (no copy): the model's
    projections map the file, and a Q/K weight left in llama.cpp's order is caught."""
    ckpt = open_checkpoint(tiny_gguf("Q8_0"))
    engine = _engine_from(ckpt)
    qkv = engine.model.layers[0].self_attn.qkv
    assert isinstance(qkv, NativeLinear) and all(ckpt.maps(b.data_ptr()) for b in qkv.weight.blocks)
    right = max_error(engine, "logits_dequant_Q8_0.npy")
    assert right < 1.0  # int8 activations, as llama.cpp's (its logits are 0.35 off here)
    for name, raw in list(ckpt.tensors.items()):
        if raw.qk_heads:
            ckpt.tensors[name] = RawTensor(name, raw.ggml_type, raw.shape, raw.stored)
    assert max_error(_engine_from(ckpt), "logits_dequant_Q8_0.npy") > 10 * right


def test_llamacpp_second_opinion():
    # llama.cpp quantizes activations, so it is a loose check: it catches gross layout errors.
    engine = backends.load(tiny_gguf("Q4_K_M"), backend="torch")
    assert max_error(engine, "logits_llamacpp_Q4_K_M.npy") < 1.0


@pytest.mark.parametrize("split_prompt", [False, True])
def test_cached_prefill_and_decode_match_a_fresh_forward(split_prompt, reference_kernels):
    """Chunked/one-token prefill and decoding through the KV cache give the full forward's logits."""
    engine = backends.load(tiny_gguf("Q4_0"), backend="torch")
    full = engine.logits(PROMPT)
    engine.cached_ids = []
    last = engine.prefill(PROMPT[:30], split_prompt=split_prompt)
    np.testing.assert_allclose(engine.to_numpy(last)[-1], full[29], atol=1e-4)
    for pos in range(30, len(PROMPT)):
        step = engine.to_numpy(engine.forward([PROMPT[pos]], pos, last_only=True))
        np.testing.assert_allclose(step[-1], full[pos], atol=1e-4)


def test_prefill_reuses_the_common_prefix(reference_kernels):
    engine = backends.load(tiny_gguf("Q4_0"), backend="torch")
    full = engine.logits(PROMPT)
    changed = PROMPT[:20] + [7, 8, 9]
    last = engine.prefill(changed)
    assert engine.stats.prefilled_tokens == 3 and engine.cached_ids == changed
    fresh = engine.logits(changed)
    np.testing.assert_allclose(engine.to_numpy(last)[-1], fresh[-1], atol=1e-4)
    engine.prefill(PROMPT)
    assert engine.stats.prefilled_tokens == len(PROMPT) - 20
    assert full.shape == (len(PROMPT), 4096)


def test_yarn_inv_freq_matches_transformers():
    torch = pytest.importorskip("torch")
    from transformers import SmolLM3Config
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    scaling = {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 2048, "rope_theta": 5e6}
    hf = SmolLM3Config(
        hidden_size=256, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=8,
        max_position_embeddings=4096, rope_parameters=scaling,
    )
    expected, factor = ROPE_INIT_FUNCTIONS["yarn"](hf, torch.device("cpu"))
    ckpt = open_checkpoint(TINY_HF)
    config = dataclasses.replace(ckpt.config, rope_theta=5e6, context_length=4096, rope_scaling=scaling)
    inv_freq, scale = config.rope_inv_freq()
    np.testing.assert_allclose(inv_freq, expected.numpy(), rtol=1e-6)
    assert scale == pytest.approx(factor)


def test_model_is_built_from_the_config_alone_then_loaded():
    """gpt-fast's and mlx-lm's shape: modules from the config (placeholders, no memory), then
    the loader swaps in the checkpoint's weights, and it computes what the engine computes."""
    import torch

    from backends.torch.loader import load_weights
    from backends.torch.model import Transformer
    from backends.torch.native_layers import layers_for

    cpu = torch.device("cpu")
    ckpt = open_checkpoint(tiny_gguf("Q4_0"))
    model = Transformer(ckpt.config, torch.float32, cpu, layers_for(cpu, torch.float32))
    assert all(t.is_meta for t in model.parameters())
    load_weights(model, ckpt)
    assert not any(t.is_meta for t in [*model.parameters(), *model.buffers()])
    want = backends.load(tiny_gguf("Q4_0"), backend="torch").logits(PROMPT)
    np.testing.assert_array_equal(model(torch.tensor(PROMPT), 0).numpy(), want)


def test_kernels_are_chosen_once_when_the_model_is_built(monkeypatch):
    import torch

    from backends.torch.native_layers import NATIVE_LAYERS, layers_for
    from backends.torch.model import TORCH_LAYERS

    cpu = torch.device("cpu")
    assert layers_for(cpu, torch.bfloat16) is TORCH_LAYERS
    if native.library() is None:
        pytest.skip("no C compiler for the native kernels")
    assert layers_for(cpu, torch.float32) is NATIVE_LAYERS
    engine = backends.load(tiny_gguf("Q4_0"), backend="torch")
    assert type(engine.model.layers[0].mlp).__name__ == "NativeMLP"
    monkeypatch.setenv("SMOLLM3_NATIVE", "0")
    assert layers_for(cpu, torch.float32) is TORCH_LAYERS
    assert type(backends.load(tiny_gguf("Q4_0"), backend="torch").model.layers[0].mlp).__name__ == "MLP"


@pytest.mark.parametrize("qtype", ["Q4_K_M", "F16"])  # Q4_K_M: q/k/v and gate/up of mixed types
def test_native_layers_compute_torch_layers_maths(qtype, reference_kernels):
    """The same weights through NativeRMSNorm/NativeAttention/NativeMLP and through torch's
    modules: a prompt, then decoded tokens (the C kernels' path) give the same logits."""
    import torch

    from backends.torch.loader import load_weights
    from backends.torch.model import TORCH_LAYERS, Transformer
    from backends.torch.native_layers import NATIVE_LAYERS

    if native.library() is None:
        pytest.skip("no C compiler for the native kernels")
    logits = []
    for layers in (TORCH_LAYERS, dataclasses.replace(NATIVE_LAYERS, cache_dtype=torch.float32)):
        model = Transformer(open_checkpoint(tiny_gguf(qtype)).config, torch.float32, torch.device("cpu"), layers)
        load_weights(model, open_checkpoint(tiny_gguf(qtype)))
        steps = [model(torch.tensor(PROMPT[:30]), 0, last_only=True)]
        steps += [model(torch.tensor([PROMPT[pos]]), pos) for pos in range(30, len(PROMPT))]
        logits.append(torch.cat(steps).numpy())
    np.testing.assert_allclose(logits[1], logits[0], atol=1e-4)


@pytest.mark.skipif(native.library() is None, reason="no C compiler")
@pytest.mark.parametrize("qtype", ["Q4_K_M", "Q8_0"])  # Q4_K_M: q/k/v and gate/up of mixed types
def test_every_layer_in_one_call_is_bitwise_the_modules(qtype):
    from backends.torch.native_layers import NativeLayerStack

    engine = backends.load(tiny_gguf(qtype), backend="torch")
    stack = engine.model.layer_stack
    assert isinstance(stack, NativeLayerStack)
    ids = (PROMPT * 12)[:300]  # decoded past the cache's first growth (256 positions): new buffers to follow
    runs = []
    for engine.model.layer_stack in (stack, None):
        logits = [engine.forward(ids[:40], 0, last_only=False), engine.forward(ids[40:45], 40, last_only=False)]
        logits += [engine.forward([t], pos, last_only=True) for pos, t in enumerate(ids[45:], 45)]
        runs.append(np.concatenate([engine.to_numpy(x) for x in logits]))
    assert np.array_equal(runs[0], runs[1])
    # not where a weight is not in native blocks (F16 here), nor for safetensors' dense weights
    assert backends.load(tiny_gguf("F16"), backend="torch").model.layer_stack is None
    assert backends.load(TINY_HF, backend="torch").model.layer_stack is None


def _last_logits_in_chunks(engine, ids: list[int], chunks: list[int]) -> np.ndarray:
    """The last row's logits with the prompt fed in forward passes of these sizes."""
    engine.cached_ids, pos, logits = [], 0, None
    for size in chunks:
        logits = engine.forward(ids[pos : pos + size], pos, last_only=True)
        pos += size
    assert pos == len(ids)
    return engine.to_numpy(logits)[-1].copy()


CHUNKINGS = ([70], [1] * 70, [15, 16, 17, 22], [33, 1, 36], [2, 64, 4])


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0", "Q4_1", "Q4_K_M"])
def test_native_prefill_is_bitwise_independent_of_chunking(qtype):
    """A chat's or the server's KV cache history decides where a prompt's forward passes start;
    on the native kernels each row's logits are those of the row decoded alone, bit for bit,
    so greedy answers cannot depend on it."""
    engine = backends.load(tiny_gguf(qtype), backend="torch")
    ids = (PROMPT * 3)[:70]
    first = _last_logits_in_chunks(engine, ids, CHUNKINGS[0])
    for chunks in CHUNKINGS[1:]:
        assert np.array_equal(_last_logits_in_chunks(engine, ids, chunks), first), chunks


def test_native_prefill_is_bitwise_independent_of_chunking_on_the_real_smollm2(smollm2_gguf):
    engine = backends.load(smollm2_gguf, backend="torch")
    ids = engine.tokenizer.encode("The history of the printing press begins in China, where woodblock printing "
                                  "was used on cloth and later on paper. Movable type made of clay appeared in the "
                                  "eleventh century, and metal type followed in Korea. In Europe, Gutenberg")[:70]
    ids += [ids[-1]] * (70 - len(ids))
    first = _last_logits_in_chunks(engine, ids, CHUNKINGS[0])
    for chunks in CHUNKINGS[1:]:
        assert np.array_equal(_last_logits_in_chunks(engine, ids, chunks), first), chunks
