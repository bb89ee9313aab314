"""backends/torch/native.py: the C matmul over GGUF blocks computes exactly
sum_j w_j * dequantized(int8 x)_j, on its SIMD builds (AVX-512, AVX2) and its scalar build, for
every type it takes, and gives each input row the bits it gets alone."""

import json
import subprocess
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T

import backends
from backends import settings
from backends.sampling import GREEDY
from backends.torch import native
from conftest import FIXTURES, tiny_gguf
from test_quants import F16_FIELDS

F16_FIELDS = {**F16_FIELDS, T.IQ4_NL: (0,), T.IQ4_XS: (0,)}


def random_rows(ggml_type: T, rows: int, blocks: int, rng: np.random.Generator) -> np.ndarray:
    """uint8 [rows, blocks * block_bytes]: random bytes with finite, moderate f16 scales."""
    block_bytes = gguf.GGML_QUANT_SIZES[ggml_type][1]
    raw = rng.integers(0, 256, (rows, blocks, block_bytes), dtype=np.uint8)
    for at in F16_FIELDS[ggml_type]:
        raw[..., at : at + 2] = rng.uniform(-2, 2, (rows, blocks, 1)).astype(np.float16).view(np.uint8)
    return raw.reshape(rows, -1)


def reference(raw: np.ndarray, ggml_type: T) -> torch.Tensor:
    """gguf-py's numpy dequantization (every type, IQ ones included), float64 [rows, K]."""
    return torch.from_numpy(gguf.quants.dequantize(raw, ggml_type).astype(np.float64))

pytestmark = pytest.mark.skipif(native.library() is None, reason="no C compiler to build the native kernels")


def build_without(name: str, without: list[str], tmp_path_factory):
    """The native build less some of this CPU's features (another CPU's build, tested here)."""
    out = tmp_path_factory.mktemp(name) / "cpu_kernels.so"
    flags = ["-O3", "-fPIC", "-shared", "-fopenmp", "-std=c11", "-march=native", *without]
    subprocess.run([native.compiler(), *flags, str(native.SOURCE), "-o", str(out), "-lm"], check=True, timeout=120)
    return native.load(out)


WITHOUT_AMX = ["-mno-amx-tile", "-mno-amx-int8", "-mno-amx-bf16"]


@pytest.fixture(scope="module", params=["simd", "scalar", "avx2", "avx_vnni", "avx512"])
def lib(request, tmp_path_factory):
    if request.param == "simd":
        return native.library()
    if request.param == "scalar":
        return native.load(native.build(native.compiler(), scalar=True))
    cpu = set(Path("/proc/cpuinfo").read_text().split()) if Path("/proc/cpuinfo").exists() else set()
    if request.param == "avx2":  # AVX2 alone (AMD's Zen 2/3...), which the native build replaces where the CPU has more
        if not {"avx512_vnni", "avx_vnni"} & cpu:
            pytest.skip("the native build is the AVX2 one here")
        return build_without("avx2", ["-mno-avx512f", "-mno-avxvnni"], tmp_path_factory)
    if request.param == "avx_vnni":  # AVX2 with 256-bit VNNI dots (Intel's Alder Lake on, without AVX-512)
        if "avx_vnni" not in cpu or "avx512_vnni" not in cpu:
            pytest.skip("no AVX-VNNI here, or the native build is the AVX-VNNI one")
        return build_without("avx-vnni", ["-mno-avx512f"], tmp_path_factory)
    # AVX-512 without AMX's tiles (AMD's, Intel's before Sapphire Rapids), where the native build takes AMX
    if "amx_int8" not in cpu:
        pytest.skip("the native build is the one without AMX here")
    return build_without("avx512", WITHOUT_AMX, tmp_path_factory)


def quantized_activations(x: torch.Tensor, block: int) -> torch.Tensor:
    """x as the kernel sees it: int8 codes per block with scale max|x| / 127, rounded half away
    from zero, times that scale."""
    blocks = x.view(x.shape[0], -1, block)
    d = blocks.abs().amax(-1, keepdim=True) / 127
    inverse = torch.where(d > 0, 1 / d, torch.zeros_like(d))
    scaled = blocks * inverse
    codes = torch.sign(scaled) * torch.floor(scaled.abs() + 0.5)
    return (codes.double() * d.double()).view_as(x)


@pytest.mark.parametrize("ggml_type", native.TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("M", [1, 3, 4, 7, 40])  # decode, a few rows in one call, DOT_ROWS rows a call and the rows left over
def test_matmul_is_the_exact_sum_over_int8_activations(lib, ggml_type, M):
    rng = np.random.default_rng(int(ggml_type) * 100 + M)
    block = native.activation_block(ggml_type)
    K, N = 2 * max(block, 256) + (32 if block == 32 else 0), 37  # N not a multiple of the rows per task
    raw = random_rows(ggml_type, N, K // block, rng)  # weight blocks are as long as activation blocks
    blocks = torch.from_numpy(raw)
    w = reference(raw, ggml_type).view(N, K)
    x = torch.from_numpy(rng.standard_normal((M, K)).astype(np.float32))
    got = native.gguf_matmul(lib, ggml_type, blocks, x).double()
    want = quantized_activations(x, block) @ w.t()
    scale = (x.double().abs() @ w.abs().t()).max()
    assert got.shape == (M, N)
    torch.testing.assert_close(got, want, rtol=0, atol=2e-6 * float(scale))
    # and what int8 activations cost against the float product (llama.cpp makes the same trade)
    exact = x.double() @ w.t()
    assert float((got - exact).norm() / exact.norm()) < 0.02
    # the same rows held in three parts (fused q, k, v where they lie in the file)
    parts = native.WeightParts([blocks[:10], blocks[10:30], blocks[30:]])
    assert torch.equal(native.gguf_matmul(lib, ggml_type, parts, x).double(), got)
    # and in runs of every other row (a GGUF's Q/K heads in HF order, read where they lie)
    order = torch.cat([torch.arange(0, N, 2), torch.arange(1, N, 2)])
    runs = native.WeightParts([blocks[0::2], blocks[1::2]])
    assert torch.equal(native.gguf_matmul(lib, ggml_type, runs, x).double(), got[:, order])


ROW_COUNTS = [1, 2, 3, 4, 5, 6, 7, 8, 9, 13, 16, 17, 100]  # every row count a call takes (1 to DOT_ROWS: 8 with AVX-512, else 4; the few-rows dots from 3 to 7 rows by type, the signed codes' on AVX2 alone from 6, 8 or 13, up to 9, 24 or 64 on AMX), and past it


@pytest.mark.parametrize("ggml_type", native.TYPES, ids=lambda t: t.name)
def test_every_row_is_bitwise_the_row_computed_alone(lib, ggml_type):
    """A prompt's rows give exactly what each gives decoded alone, for every row count and thread
    count, so an answer does not depend on how a prompt is split into forward passes (a chat's
    cached history, the server's batches): the real model's near-ties flip on a 1e-6 difference."""
    rng = np.random.default_rng(int(ggml_type))
    block = native.activation_block(ggml_type)
    # 32-value blocks: 7 and 9 blocks leave 3 and 1 after the blocks taken four at a time
    for K in [256, 512] + ([224, 288] if block == 32 else [768]):
        N = 37
        blocks = torch.from_numpy(random_rows(ggml_type, N, K // block, rng))
        x = torch.from_numpy(rng.standard_normal((max(ROW_COUNTS), K)).astype(np.float32))
        alone = torch.cat([native.gguf_matmul(lib, ggml_type, blocks, x[m : m + 1], threads=1) for m in range(len(x))])
        for threads in (1, 2):
            for M in ROW_COUNTS:
                got = native.gguf_matmul(lib, ggml_type, blocks, x[:M], threads=threads)
                assert torch.equal(got, alone[:M]), (K, threads, M, float((got - alone[:M]).abs().max()))


def test_prompts_take_the_amx_tiles_where_the_cpu_has_them():
    """Where the CPU has AMX (and Linux lists it, so grants it), a prompt's rows go through the tiles,
    which the tests above then hold to the decoded rows bit for bit."""
    cpu = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    if not all(flag in cpu for flag in ("amx_int8", "amx_tile", "avx512_vnni")):
        pytest.skip("no AMX here")
    if not settings.amx():
        pytest.skip("AMX turned off (SMOLLM3_AMX=0)")
    assert native.library().gguf_matmul_amx() == 1


WITHOUT_AMX_TYPES = [T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.IQ4_NL, T.IQ4_XS, T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K]


@pytest.fixture(scope="module")
def without_amx(tmp_path_factory):
    cpu = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    if "amx_int8" not in cpu or not native.library().gguf_matmul_amx():
        pytest.skip("no AMX here to compare with")
    return build_without("without-amx", WITHOUT_AMX, tmp_path_factory)


@pytest.mark.parametrize("ggml_type", WITHOUT_AMX_TYPES, ids=lambda t: t.name)
def test_without_amx_these_types_give_the_amx_bits(ggml_type, without_amx):
    """Without AMX these types' prompts take the few-rows dots at every length and their tokens
    the same steps: every row bitwise what an AMX machine computes, on its few-rows dots or its
    tiles, prompt or decoded token."""
    rng = np.random.default_rng(int(ggml_type) + 7)
    K = 512 + (32 if native.activation_block(ggml_type) == 32 else 0)
    blocks = torch.from_numpy(random_rows(ggml_type, 37, K // gguf.GGML_QUANT_SIZES[ggml_type][0], rng))
    x = torch.from_numpy(rng.standard_normal((65, K)).astype(np.float32))
    for M in (1, 5, 8, 12, 16, 24, 25, 33, 64, 65):  # AMX's tiles from 10, 25 or 65 rows by type
        assert torch.equal(native.gguf_matmul(without_amx, ggml_type, blocks, x[:M]), native.gguf_matmul(native.library(), ggml_type, blocks, x[:M]))


@pytest.fixture(scope="module")
def avx2_builds(tmp_path_factory):
    cpu = set(Path("/proc/cpuinfo").read_text().split()) if Path("/proc/cpuinfo").exists() else set()
    if "avx_vnni" not in cpu:
        pytest.skip("no AVX-VNNI here")
    return build_without("plain-avx2", ["-mno-avx512f", "-mno-avxvnni"], tmp_path_factory), build_without("vnni-avx2", ["-mno-avx512f"], tmp_path_factory)


@pytest.mark.parametrize("ggml_type", list(native.TYPES), ids=lambda t: t.name)
def test_the_avx2_builds_give_the_avx512_bits(ggml_type, avx2_builds):
    """Without AVX-512 (AMD's Zen 2/3, Intel's client chips) a prompt's rows take the few-rows dots
    on 256-bit registers, with or without AVX-VNNI's (the signed codes' without it: magnitudes
    against activations given their signs), and a token the same steps: every row, prompt or
    decoded token, bitwise what the AVX-512 and AMX machines compute (bar Q8_0 on AVX-512
    without AMX, which keeps its own 512-bit dots)."""
    avx2, vnni = avx2_builds
    cpu = Path("/proc/cpuinfo").read_text()
    wide = native.library() if "avx512_vnni" in cpu and not (ggml_type == T.Q8_0 and not native.library().gguf_matmul_amx()) else None
    rng = np.random.default_rng(int(ggml_type) + 11)
    K = 512 + (32 if native.activation_block(ggml_type) == 32 else 0)
    blocks = torch.from_numpy(random_rows(ggml_type, 37, K // gguf.GGML_QUANT_SIZES[ggml_type][0], rng))
    x = torch.from_numpy(rng.standard_normal((33, K)).astype(np.float32))
    for M in (1, 3, 4, 5, 6, 7, 8, 9, 12, 13, 16, 17, 24, 33):  # the few-rows dots from 3 to 13 rows on by type
        got = native.gguf_matmul(avx2, ggml_type, blocks, x[:M])
        assert torch.equal(native.gguf_matmul(vnni, ggml_type, blocks, x[:M]), got), M
        if wide is not None:
            assert torch.equal(native.gguf_matmul(wide, ggml_type, blocks, x[:M]), got), M


def test_smollm3_amx_0_keeps_the_vector_dots(monkeypatch):
    rng = np.random.default_rng(5)
    inputs = {t: (torch.from_numpy(random_rows(t, 37, 512 // gguf.GGML_QUANT_SIZES[t][0], rng)),
                  torch.from_numpy(rng.standard_normal((70, 512)).astype(np.float32))) for t in (T.Q4_1, T.Q4_K)}
    with_amx = {t: native.gguf_matmul(native.library(), t, blocks, x) for t, (blocks, x) in inputs.items()}
    monkeypatch.setenv("SMOLLM3_AMX", "0")
    assert native.library().gguf_matmul_amx() == 0
    # a prompt past the tiles' rows takes the few-rows dots, with the tiles' bits
    for t, (blocks, x) in inputs.items():
        assert torch.equal(native.gguf_matmul(native.library(), t, blocks, x), with_amx[t])
    monkeypatch.delenv("SMOLLM3_AMX")
    native.library()  # the setting back as the other tests have it


@pytest.mark.parametrize("ggml_type", native.TYPES, ids=lambda t: t.name)
def test_the_largest_codes_against_the_largest_activations(lib, ggml_type):
    """Every code and scale at its largest magnitude (Q8_0's -127, the IQ4 levels' -127 and
    IQ4_XS's scale -32: bytes all zero; the others' bytes all ones) against activations that
    quantize to 127 throughout: the int16 sums some paths keep before widening are at their
    largest, and stay exact, at every row count a path takes."""
    block = native.activation_block(ggml_type)
    K, N = 2 * max(block, 256) + (32 if block == 32 else 0), 20
    fill = {T.Q8_0: 0x81, T.IQ4_NL: 0x00, T.IQ4_XS: 0x00}.get(ggml_type, 0xFF)
    raw = np.full((N, K // block, gguf.GGML_QUANT_SIZES[ggml_type][1]), fill, np.uint8)
    for at in F16_FIELDS[ggml_type]:
        raw[..., at : at + 2] = np.array([1.0], np.float16).view(np.uint8)
    raw = raw.reshape(N, -1)
    w = reference(raw, ggml_type).view(N, K)
    for M in (1, 4, 13, 40):
        x = torch.ones(M, K)
        got = native.gguf_matmul(lib, ggml_type, torch.from_numpy(raw), x).double()
        torch.testing.assert_close(got, x.double() @ w.t(), rtol=1e-6, atol=0)


def test_zero_activations_give_zero():
    raw = random_rows(T.Q4_K, 8, 1, np.random.default_rng(0))
    y = native.gguf_matmul(native.library(), T.Q4_K, torch.from_numpy(raw), torch.zeros(2, 256))
    assert torch.equal(y, torch.zeros(2, 8))


def test_rejects_a_row_length_the_type_cannot_hold():
    raw = random_rows(T.Q4_K, 4, 1, np.random.default_rng(0))
    with pytest.raises(RuntimeError, match="gguf_matmul failed"):
        native.gguf_matmul(native.library(), T.Q4_K, torch.from_numpy(raw), torch.zeros(1, 288))
    assert not native.supports(T.Q4_K, 288) and native.supports(T.Q4_K, 512)
    # the library's table and TYPES agree; other types (IQ2...) go to weights.py's torch kernels
    assert [t for t in T if native.supports(t, 512)] == list(native.TYPES)


def test_the_simd_build_is_the_one_loaded_on_x86():
    if not torch.backends.cpu.get_cpu_capability().startswith("AVX"):
        pytest.skip("not an AVX2 machine")
    assert native.library().gguf_matmul_simd() == 1


@pytest.mark.parametrize("rope", [True, False], ids=["rope", "nope"])
@pytest.mark.parametrize("pos", [0, 37, 3000])  # 3000: long enough for the threaded path
def test_attend_is_rope_cache_write_and_sdpa(rope, pos):
    """One decoded token with a float32 cache (tests/test_torch_native_attention.py: prompts, float16)."""
    from backends.torch.model import apply_rope

    H, KV, D, capacity = 8, 2, 64, 3072
    g = torch.Generator().manual_seed(pos)
    k_cache, v_cache = torch.randn(1, KV, capacity, D, generator=g), torch.randn(1, KV, capacity, D, generator=g)
    qkv = torch.randn(1, (H + 2 * KV) * D, generator=g)
    q, k, v = qkv.split([H * D, KV * D, KV * D], -1)
    angles = torch.rand(1, D // 2, generator=g) * 6
    cos = torch.cat((angles.cos(), angles.cos()), -1)
    sin = torch.cat((-angles.sin(), angles.sin()), -1)

    heads = lambda t, n: t.view(1, n, D).transpose(0, 1).unsqueeze(0)  # noqa: E731
    want_q, want_k = heads(q, H), heads(k, KV)
    if rope:
        want_q, want_k = apply_rope(want_q, cos, sin), apply_rope(want_k, cos, sin)
    want_k_cache, want_v_cache = k_cache.clone(), v_cache.clone()
    want_k_cache[:, :, pos : pos + 1], want_v_cache[:, :, pos : pos + 1] = want_k, heads(v, KV)
    keys, values = want_k_cache[:, :, : pos + 1], want_v_cache[:, :, : pos + 1]
    want = torch.nn.functional.scaled_dot_product_attention(want_q, keys, values, enable_gqa=True)

    got = native.attend(native.library(), qkv, k_cache, v_cache, pos, H, *((cos, sin) if rope else (None, None)))
    torch.testing.assert_close(got, want.squeeze(0).transpose(0, 1).reshape(1, -1), rtol=1e-5, atol=1e-5)
    assert torch.equal(k_cache, want_k_cache) and torch.equal(v_cache, want_v_cache)


@pytest.mark.parametrize("F", [40, 43, 5])  # a row's last F % 8 values through the vector exp too
def test_silu_mul_is_swiglu(lib, F):
    gate_up = torch.randn(3, 2 * F, generator=torch.Generator().manual_seed(F)) * 4
    gate_up[0, : min(F, 8)] = torch.tensor([-1e4, -100.0, -88.5, -87.0, 0.0, 87.5, 100.0, 1e4])[: min(F, 8)]
    want = torch.nn.functional.silu(gate_up[:, :F].double()) * gate_up[:, F:].double()
    torch.testing.assert_close(native.silu_mul(lib, gate_up).double(), want, rtol=1e-6, atol=1e-30)


def test_silu_mul_rows_are_bitwise_the_row_alone():
    gate_up = torch.randn(100, 2 * 1536, generator=torch.Generator().manual_seed(0)) * 4  # threaded from ~22 rows
    alone = torch.cat([native.silu_mul(native.library(), gate_up[m : m + 1], threads=1) for m in range(100)])
    for threads in (1, 2):
        for M in ROW_COUNTS:
            assert torch.equal(native.silu_mul(native.library(), gate_up[:M], threads=threads), alone[:M]), (threads, M)


def test_native_mlp_rows_are_bitwise_the_row_alone():
    """The MLP of a prompt's rows (matmuls and silu) is each row's MLP decoded alone."""
    from backends.checkpoint import open_checkpoint
    from backends.torch.loader import load_weights
    from backends.torch.model import Transformer
    from backends.torch.native_layers import NATIVE_LAYERS

    ckpt = open_checkpoint(tiny_gguf("Q4_K_M"))  # gate/up and down of mixed types
    model = Transformer(ckpt.config, torch.float32, torch.device("cpu"), NATIVE_LAYERS)
    load_weights(model, ckpt)
    mlp = model.layers[0].mlp
    x = torch.randn(100, ckpt.config.hidden_size, generator=torch.Generator().manual_seed(0))
    alone = torch.cat([mlp(x[m : m + 1]) for m in range(100)])
    for M in ROW_COUNTS:
        assert torch.equal(mlp(x[:M]), alone[:M]), M


# --- the real SmolLM2-135M: every kernel path gives the exact reference's greedy tokens ---

# bench/make_agreed_greedy.py: chat prompts, the exact f32 reference's greedy tokens (cut where
# our kernels leave them) with the reference's lead over the runner-up at each step, and
# llama.cpp's tokens. int8 activations (ours and llama.cpp's alike) move a difference of two of
# this model's logits by up to about 0.25 (a lead of 0.234 flipped) and turn near-ties either
# way: every path must give the reference's tokens up to its first step led by less than LEAD.
AGREED = json.loads((FIXTURES / "smollm2-135m-agreed.json").read_text())
LEAD = 0.25


def clear_tokens(case: dict) -> list[int]:
    """The reference's tokens before its first step led by less than LEAD."""
    near_ties = [i for i, lead in enumerate(case["reference_leads"]) if lead < LEAD]
    return case["reference"][: near_ties[0] if near_ties else None]


def test_the_fixture_holds_enough_clear_tokens_and_llamacpp_follows_them_where_known():
    assert sum(len(clear_tokens(c)) for c in AGREED) >= 60
    assert all(c["llamacpp"][: len(clear_tokens(c))] == clear_tokens(c) for c in AGREED if c["llamacpp"])


@pytest.fixture(scope="module")
def smollm2(smollm2_gguf):
    return backends.load(smollm2_gguf, backend="torch")


@pytest.mark.parametrize("split", [False, True], ids=["batched-prefill", "split-prompt"])
def test_greedy_is_the_exact_references_on_the_real_smollm2(smollm2, split):
    """Batched prefill (the int8 GEMM) and one token at a time (the decode dots) both give the
    reference's clear tokens, so a prompt's answer does not depend on how it is split."""
    for case in AGREED:
        want = clear_tokens(case)
        got = list(smollm2.generate(case["prompt_ids"], len(want), GREEDY, split_prompt=split)) if want else []
        assert got == want, (case["prompt"], smollm2.tokenizer.decode(got), smollm2.tokenizer.decode(want))
