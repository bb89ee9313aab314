"""SmolLM3-3B-shaped GGUF files with random weights, for benchmarking without the real model.

The shape is the real SmolLM3-3B config (tests/fixtures/smollm3-3b-meta/config.json); the
F16 file is written tensor by tensor the way llama.cpp's converter writes arch `smollm3`
(norms F32, matrices F16, tied embeddings so no `output`), then llama.cpp's own quantizer
makes each type in QUANT_FTYPES from it (the types people download: Q4_K_M, Q8_0, Q5_K_M,
Q3_K_M, Q2_K, Q5_0, Q5_1, IQ4_NL, IQ4_XS, Q6_K). Weights are seeded normal(0, 0.02) (norms 1.0), so
activations stay in a sane range and every engine does the same arithmetic as on the real
model. Q/K rows are random, so the converter's row permutation changes nothing here.

The tokenizer is SmolLM2's real byte-level BPE (49152 tokens) padded with unused
`<|reserved_N|>` tokens to 128256, so prompt token ids are real text.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
META = ROOT / "tests" / "fixtures" / "smollm3-3b-meta"
MODELS_DIR = Path(__file__).resolve().parent / "models"
F16_NAME = "smollm3-3b-random-F16.gguf"
# llama_ftype values (llama.h): the types people download, each made from the same F16
QUANT_FTYPES = {
    "Q4_K_M": 15, "Q8_0": 7, "Q5_K_M": 17, "Q3_K_M": 12, "Q2_K": 10, "Q5_0": 8, "Q5_1": 9, "IQ4_NL": 25, "IQ4_XS": 30, "Q6_K": 18,
}  # fmt: skip
SEED = 20250708
STD = 0.02
TOKENIZER_KEYS = (  # copied from the SmolLM2 GGUF, then padded
    "tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.tokens", "tokenizer.ggml.token_type",
    "tokenizer.ggml.merges", "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
    "tokenizer.ggml.unknown_token_id", "tokenizer.ggml.padding_token_id", "tokenizer.ggml.add_bos_token",
)


def tensor_plan(cfg: dict) -> list[tuple[str, tuple[int, ...], type]]:
    """(GGUF name, row-major shape, numpy dtype) in the converter's order."""
    h, inter, vocab = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    head_dim = h // cfg["num_attention_heads"]
    kv = cfg["num_key_value_heads"] * head_dim
    plan = [("token_embd.weight", (vocab, h), np.float16)]
    for i in range(cfg["num_hidden_layers"]):
        b = f"blk.{i}"
        plan += [
            (f"{b}.attn_norm.weight", (h,), np.float32),
            (f"{b}.attn_q.weight", (h, h), np.float16),
            (f"{b}.attn_k.weight", (kv, h), np.float16),
            (f"{b}.attn_v.weight", (kv, h), np.float16),
            (f"{b}.attn_output.weight", (h, h), np.float16),
            (f"{b}.ffn_norm.weight", (h,), np.float32),
            (f"{b}.ffn_gate.weight", (inter, h), np.float16),
            (f"{b}.ffn_up.weight", (inter, h), np.float16),
            (f"{b}.ffn_down.weight", (h, inter), np.float16),
        ]
    plan.append(("output_norm.weight", (h,), np.float32))
    return plan


def random_tensor(index: int, shape: tuple[int, ...], dtype) -> np.ndarray:
    if len(shape) == 1:
        return np.ones(shape, dtype=dtype)
    rng = np.random.default_rng([SEED, index])
    out = np.empty(shape, dtype=dtype)
    rows = max(1, (1 << 24) // shape[1])  # 16M values at a time: bounded f32 scratch
    for start in range(0, shape[0], rows):
        block = rng.standard_normal((min(rows, shape[0] - start), shape[1]), dtype=np.float32)
        block *= STD
        out[start : start + rows] = block
    return out


def padded_tokenizer(smollm2_gguf: Path, vocab_size: int) -> dict:
    from backends.gguf_file import GGUFFile

    meta = GGUFFile(smollm2_gguf).metadata
    fields = {k: meta[k] for k in TOKENIZER_KEYS if k in meta}
    tokens, types = list(fields["tokenizer.ggml.tokens"]), list(fields["tokenizer.ggml.token_type"])
    n = len(tokens)
    tokens += [f"<|reserved_{i}|>" for i in range(vocab_size - n)]
    # Normal (1), not control (3): the real file has 256 control tokens, and 79k of them would add
    # a load cost (1.5 s in our tokenizer's added-token matcher) that the real model does not have.
    types += [1] * (vocab_size - n)
    fields["tokenizer.ggml.tokens"], fields["tokenizer.ggml.token_type"] = tokens, types
    return fields


def write_f16(path: Path, smollm2_gguf: Path, cfg: dict | None = None) -> None:
    """Stream the F16 file to `path` (via `path.part`); cfg: an HF config.json dict, SmolLM3-3B's by default."""
    import gguf

    cfg = cfg or json.loads((META / "config.json").read_text())
    h, heads = cfg["hidden_size"], cfg["num_attention_heads"]
    arch = "smollm3"
    w = gguf.GGUFWriter(path.with_suffix(".part"), arch)
    w.add_name("SmolLM3-3B-shaped random (benchmark)")
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(h)
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_head_count(heads)
    w.add_head_count_kv(cfg["num_key_value_heads"])
    w.add_rope_freq_base(float(cfg["rope_theta"]))
    w.add_layer_norm_rms_eps(float(cfg["rms_norm_eps"]))
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    w.add_vocab_size(cfg["vocab_size"])
    w.add_rope_dimension_count(h // heads)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    for key, value in padded_tokenizer(smollm2_gguf, cfg["vocab_size"]).items():
        _add_field(w, key, value)
    w.add_chat_template((META / "chat_template.jinja").read_text())
    plan = tensor_plan(cfg)
    for name, shape, dtype in plan:
        nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
        w.add_tensor_info(name, shape, np.dtype(dtype), nbytes)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for index, (name, shape, dtype) in enumerate(plan):
        w.write_tensor_data(random_tensor(index, shape, dtype))  # one tensor in memory at a time
    w.close()
    path.with_suffix(".part").rename(path)


def _add_field(w, key: str, value) -> None:
    if isinstance(value, bool):
        w.add_bool(key, value)
    elif isinstance(value, int):
        w.add_uint32(key, value)
    elif isinstance(value, str):
        w.add_string(key, value)
    elif key == "tokenizer.ggml.token_type":
        w.add_array(key, [int(t) for t in value])  # the writer stores a list of ints as INT32, as the converter
    else:
        w.add_array(key, list(value))


def quantize(src: Path, dst: Path, ftype: int, threads: int) -> None:
    """llama.cpp's quantizer; runs in a child with bench/deps.py's environment, where llama_cpp imports."""
    import ctypes

    import llama_cpp

    llama_cpp.llama_backend_init()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = threads
    part = dst.with_suffix(".part")
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(part).encode(), ctypes.byref(params))
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize({src.name} -> {dst.name}, ftype {ftype}) returned {rc}")
    part.rename(dst)


def ensure_f16(smollm2_gguf: Path, log=print) -> Path:
    f16 = MODELS_DIR / F16_NAME
    if not f16.exists():
        MODELS_DIR.mkdir(exist_ok=True)
        log(f"writing {f16.name} (6 GB of seeded random F16 weights) ...")
        t0 = time.perf_counter()
        write_f16(f16, smollm2_gguf)
        log(f"  {time.perf_counter() - t0:.0f} s")
    return f16


def ensure_models(qtypes: list[str], smollm2_gguf: Path, threads: int = 2, log=print) -> dict[str, Path]:
    """The 3B-shaped files for `qtypes` (Q4_K_M, Q8_0, F16), made once and cached in bench/models/."""
    import subprocess

    from deps import env_with

    out = {}
    for qtype in qtypes:
        dst = MODELS_DIR / F16_NAME.replace("F16", qtype)
        if not dst.exists():
            f16 = ensure_f16(smollm2_gguf, log)
            log(f"quantizing to {dst.name} with llama.cpp ...")
            t0 = time.perf_counter()
            with open(dst.with_suffix(".log"), "w") as log_file:  # llama.cpp lists every tensor
                subprocess.run([sys.executable, str(Path(__file__)), "quantize", str(f16), str(dst),
                                str(QUANT_FTYPES[qtype]), str(threads)], check=True, env=env_with("llamacpp"),
                               stdout=log_file, stderr=subprocess.STDOUT)
            log(f"  {time.perf_counter() - t0:.0f} s")
        out[qtype] = dst
    return out


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    if sys.argv[1:2] == ["quantize"]:
        src, dst, ftype, threads = sys.argv[2:6]
        quantize(Path(src), Path(dst), int(ftype), int(threads))
    elif sys.argv[1:2] == ["f16"]:
        write_f16(Path(sys.argv[2]), Path(sys.argv[3]))
    else:
        print("usage: make_models.py quantize SRC DST FTYPE THREADS | f16 DST SMOLLM2_GGUF", file=sys.stderr)
        sys.exit(2)
