import json
import time

import gguf
import pytest
import tokenizers

from backends.chat_template import ChatTemplate
from backends.errors import TokenizerError
from backends.tokenizer import GPT2_REGEX, LLAMA3_REGEX, PRE_TOKENIZERS, tokenizer_from_file, tokenizer_from_gguf
from conftest import FIXTURES, TINY_HF, tiny_gguf

CORPUS = [
    "Hello world",
    "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n",
    "for (int i = 0; i < 10; ++i) { sum += a[i]; }\t// loop",
    "Numbers: 12345, 3.14159, -42, 1e-6 and 1,000,000.",
    "In 2024 and 1999 we had 007 agents; 0x1F and 0b1010.",
    "The year was 2024",
    "Émoji: 😀🎉👩‍💻 and flags 🇫🇷🇯🇵!",
    "中文分词测试，日本語のテキスト、한국어 문장.",
    "Crème brûlée, naïve café, Ångström, smörgåsbord, Straße.",
    "Ελληνικά και русский текст, עברית, العربية.",
    "I'm sure you're right, they've said we'll go; it's John's and I'd've.",
    "DON'T SHOUT, I'LL LISTEN, HE'S THERE",
    "spaces:   three, tabs:\t\ttwo, newlines:\n\n\nthree",
    "   leading and trailing   ",
    "\n\n",
    " \t \n \r\n mixed whitespace",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "text<|im_end|>glued<|im_start|>system",
    "<|endoftext|><repo_name>smollm<file_sep>main.py",
    "a<b>c</b> && x || y != z; path/to/file.txt @user #tag $100 %20 ^_^ ~~",
    "“Smart quotes” — dashes – and … ellipsis",
    "math: ∑ x² ≤ ∞, α+β=γ, ½ ¾ ①②③",
    "",
    "a",
    "x" * 300,
]


def _metadata(path) -> dict:
    reader = gguf.GGUFReader(path)
    return {k: f.contents() for k, f in reader.fields.items() if k.startswith("tokenizer.")}


@pytest.fixture(scope="module")
def tiny_metadata() -> dict:
    return _metadata(tiny_gguf("Q8_0"))


@pytest.fixture(scope="module")
def smollm2_metadata(smollm2_gguf) -> dict:
    return _metadata(smollm2_gguf)


@pytest.fixture(scope="module")
def smollm2_tokenizer(smollm2_metadata):
    return tokenizer_from_gguf(smollm2_metadata)


def test_gguf_tokenizer_matches_tokenizer_json(tiny_metadata):
    ours = tokenizer_from_gguf(tiny_metadata)
    reference = tokenizers.Tokenizer.from_file(str(TINY_HF / "tokenizer.json"))
    assert ours.vocab_size == reference.get_vocab_size(with_added_tokens=True) == 4096
    for text in CORPUS:
        ids = ours.encode(text)
        assert ids == reference.encode(text, add_special_tokens=False).ids, text
        assert ours.decode(ids) == text


def test_special_tokens_are_never_split(tiny_metadata):
    tok = tokenizer_from_gguf(tiny_metadata)
    im_start, im_end = tok.token_to_id("<|im_start|>"), tok.token_to_id("<|im_end|>")
    assert (im_start, im_end) == (1, 2)
    ids = tok.encode("<|im_start|>user\nhi<|im_end|>")
    assert ids[0] == im_start and ids[-1] == im_end
    assert ids.count(im_start) == ids.count(im_end) == 1


def test_gguf_special_ids(tiny_metadata):
    tok = tokenizer_from_gguf(tiny_metadata)
    assert (tok.bos_id, tok.eos_ids, tok.add_bos) == (1, [2], False)
    with_bos = tokenizer_from_gguf({**tiny_metadata, "tokenizer.ggml.add_bos_token": True})
    assert with_bos.encode("hi") == [1] + tok.encode("hi")
    with_eot = tokenizer_from_gguf({**tiny_metadata, "tokenizer.ggml.eot_token_id": 0})
    assert with_eot.eos_ids == [2, 0]


def test_tokenizer_from_hf_dir_and_file():
    for path in (TINY_HF, TINY_HF / "tokenizer.json"):
        tok = tokenizer_from_file(path)
        assert (tok.bos_id, tok.eos_ids, tok.add_bos, tok.vocab_size) == (1, [2], False, 4096)
        assert tok.encode("<|im_start|>user\n12345") == [1, 4093, 198, 33, 34, 35, 36, 37]


def test_tokenizer_from_dir_eos_union(tmp_path):
    (tmp_path / "tokenizer.json").write_bytes((TINY_HF / "tokenizer.json").read_bytes())
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps({"bos_token": {"content": "<|im_start|>"}, "eos_token": "<|endoftext|>", "add_bos_token": True})
    )
    (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": 2}))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 5]}))
    tok = tokenizer_from_file(tmp_path)
    assert (tok.bos_id, tok.eos_ids, tok.add_bos) == (1, [2, 5, 0], True)
    assert tok.encode("hi")[0] == 1


def test_tokenizer_from_dir_bos_from_config_and_post_processor(tmp_path):
    # SmolLM3-style: tokenizer_config has no BOS, config.json does; the post-processor prepends it.
    spec = json.loads((TINY_HF / "tokenizer.json").read_text())
    spec["post_processor"] = {
        "type": "TemplateProcessing",
        "single": [{"SpecialToken": {"id": "<|endoftext|>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {"<|endoftext|>": {"id": "<|endoftext|>", "ids": [0], "tokens": ["<|endoftext|>"]}},
    }
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": None, "eos_token": "<|im_end|>"}))
    (tmp_path / "config.json").write_text(json.dumps({"bos_token_id": 0, "eos_token_id": 2}))
    tok = tokenizer_from_file(tmp_path)
    assert (tok.bos_id, tok.eos_ids, tok.add_bos) == (0, [2], True)
    assert tok.encode("hi") == [0, 88, 89]


def test_missing_tokenizer_file(tmp_path):
    with pytest.raises(TokenizerError):
        tokenizer_from_file(tmp_path)


def test_smollm2_matches_llamacpp_corpus(smollm2_tokenizer):
    corpus = json.loads((FIXTURES / "smollm2-135m-tokenizer-corpus.json").read_text())
    assert len(corpus) == 50
    mismatches = [c["text"] for c in corpus if smollm2_tokenizer.encode(c["text"]) != c["ids"]]
    assert mismatches == []


def test_smollm2_chat_prompt_ids(smollm2_metadata, smollm2_tokenizer):
    # The GGUF's template adds SmolLM2's default system message when there is none: the
    # reference prompt ids include it and start with <|im_start|> (id 1) from the template, not a BOS.
    template = ChatTemplate(smollm2_metadata["tokenizer.chat_template"])
    cases = json.loads((FIXTURES / "smollm2-135m-greedy.json").read_text())
    assert len(cases) == 5
    for case in cases:
        text = template.render([{"role": "user", "content": case["prompt"]}], add_generation_prompt=True)
        assert text.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
        assert smollm2_tokenizer.encode(text) == case["prompt_ids"], case["prompt"]


def test_smollm2_builds_in_under_a_second(smollm2_metadata):
    start = time.perf_counter()
    tok = tokenizer_from_gguf(smollm2_metadata)
    elapsed = time.perf_counter() - start
    assert tok.vocab_size == 49152
    assert elapsed < 1.0, f"built in {elapsed:.2f} s"


STREAM_TEXTS = [
    "Emoji 😀 and 🎉, family 👨‍👩‍👧, flag 🇯🇵.",
    "中文和日本語が混ざったテキスト。",
    "Accents: é è ê ë, ñ, ü, ø, ß; Ελληνικά; кириллица.",
    "<|im_start|>assistant\nRésumé ✓ 🚀<|im_end|>",
]


@pytest.mark.parametrize("text", STREAM_TEXTS)
def test_streaming_detokenizer(tiny_metadata, smollm2_tokenizer, text):
    tiny = tokenizer_from_gguf(tiny_metadata)
    for tok in (tiny, smollm2_tokenizer):
        ids = tok.encode(text)
        stream = tok.detokenizer()
        chunks = [stream.add(i) for i in ids]
        chunks.append(stream.flush())
        assert "".join(chunks) == tok.decode(ids) == text
        assert not any("\ufffd" in chunk for chunk in chunks)
        if tok is tiny:
            # The tiny vocabulary spells multi-byte characters byte by byte: some tokens complete nothing.
            assert "" in chunks[:-1]


def test_streaming_special_tokens_and_partial_tail(tiny_metadata):
    tok = tokenizer_from_gguf(tiny_metadata)
    stream = tok.detokenizer()
    assert stream.add(tok.token_to_id("<|im_start|>")) == "<|im_start|>"
    emoji = tok.encode("😀")
    assert len(emoji) > 1
    assert [stream.add(i) for i in emoji[:-1]] == [""] * (len(emoji) - 1)
    # A sequence cut short is only turned into U+FFFD at the end, as decode() does.
    assert stream.flush() == tok.decode(emoji[:-1]) == "\ufffd"


def _bytes_to_unicode() -> dict[int, str]:
    # GPT-2's byte-to-character table, which ByteLevel pre-tokenizers use.
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


@pytest.mark.parametrize(
    "pre,pattern",
    [("smaug-bpe", LLAMA3_REGEX), ("llama-bpe", LLAMA3_REGEX), ("dbrx", LLAMA3_REGEX), ("gpt2", GPT2_REGEX + r"|\s+")],
)
def test_pre_tokenizer_splits_like_the_regex(tiny_metadata, pre, pattern):
    regex = pytest.importorskip("regex")
    byte_chars = _bytes_to_unicode()
    tok = tokenizer_from_gguf({**tiny_metadata, "tokenizer.ggml.pre": pre})
    for text in CORPUS:
        text = text.replace("<|im_start|>", "").replace("<|im_end|>", "")
        pieces = [piece for piece, _ in tok.tok.pre_tokenizer.pre_tokenize_str(text)]
        expected = ["".join(byte_chars[b] for b in m.encode()) for m in regex.findall(pattern, text)]
        assert pieces == expected, text
    digits = [p for p, _ in tok.tok.pre_tokenizer.pre_tokenize_str("12345")]
    assert digits == (["12345"] if pre == "gpt2" else ["123", "45"])


def test_smollm_pre_tokenizer_splits_digits(tiny_metadata):
    tok = tokenizer_from_gguf(tiny_metadata)
    assert [tok.decode([i]) for i in tok.encode(" 2024")] == [" ", "2", "0", "2", "4"]


def test_unknown_pre_tokenizer(tiny_metadata):
    with pytest.raises(TokenizerError, match="'tekken'.*smaug-bpe") as info:
        tokenizer_from_gguf({**tiny_metadata, "tokenizer.ggml.pre": "tekken"})
    assert "smollm" in str(info.value)


def test_unknown_tokenizer_model(tiny_metadata):
    with pytest.raises(TokenizerError, match="'llama'"):
        tokenizer_from_gguf({**tiny_metadata, "tokenizer.ggml.model": "llama"})


def test_gguf_tokenizer_cache_round_trip(smollm2_gguf, monkeypatch, tmp_path):
    """A load builds the tokenizer once into the user cache; the next reads it back without
    decoding the GGUF vocabulary, and tokenizes the same; a damaged entry is rebuilt."""
    from backends.gguf_file import GGUFFile
    from backends.tokenizer import tokenizer_cache_dir

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    text = "Hello, world! <|im_start|>user\nRésumé 😀 fib(10)<|im_end|>"
    first_file = GGUFFile(smollm2_gguf)
    key = first_file.header_digest()
    built = tokenizer_from_gguf(first_file.metadata, key)
    (entry,) = tokenizer_cache_dir().glob(f"{key}-*.json")  # keyed by the header and by our builder's version

    second_file = GGUFFile(smollm2_gguf)
    cached = tokenizer_from_gguf(second_file.metadata, second_file.header_digest())
    assert not isinstance(second_file.metadata._raw["tokenizer.ggml.tokens"], list)  # never decoded
    for tok in (cached, tokenizer_from_gguf(GGUFFile(smollm2_gguf).metadata)):
        assert tok.encode(text) == built.encode(text)
        assert (tok.bos_id, tok.eos_ids, tok.add_bos, tok.vocab_size) == (built.bos_id, built.eos_ids, built.add_bos, built.vocab_size)

    entry.write_text("{ not json")
    assert tokenizer_from_gguf(GGUFFile(smollm2_gguf).metadata, key).encode(text) == built.encode(text)


# Llama 3's vocabulary (SmolLM3's), cut to what a multilingual corpus needs, with the real ids and
# the ids transformers gives on the full tokenizer.json (scripts/make_llama3_tokenizer_fixture.py).
LLAMA3 = json.loads((FIXTURES / "llama3-tokenizer-subset.json").read_text(encoding="utf-8"))


def llama3_metadata(pre: str) -> dict:
    """The GGUF tokenizer keys as llama.cpp's converter writes Llama 3's vocabulary; the ids the
    fixture leaves out are empty tokens, which the loader renames as llama.cpp does."""
    size = LLAMA3["vocab_size"]
    tokens, types = [""] * size, [1] * size
    for i, token in LLAMA3["tokens"].items():
        tokens[int(i)] = token
    for i, token in LLAMA3["special_tokens"].items():
        tokens[int(i)], types[int(i)] = token, 3
    merges = [" ".join(pair) for pair in LLAMA3["merges"]]
    return {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": pre, "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.token_type": types, "tokenizer.ggml.merges": merges}


@pytest.mark.parametrize("pre", ["smaug-bpe", "llama-bpe", "llama3"])
def test_llama3_vocabulary_tokenizes_as_transformers(pre):
    tok = tokenizer_from_gguf(llama3_metadata(pre))
    assert tok.encode(" Việt") == [101798]
    assert len(LLAMA3["corpus"]) == 32
    mismatches = [c["text"][:40] for c in LLAMA3["corpus"] if tok.encode(c["text"]) != c["ids"]]
    assert mismatches == []
    assert all(tok.decode(c["ids"]) == c["text"] for c in LLAMA3["corpus"])


def test_llama3_pre_tokenizer_is_the_tokenizer_json_one():
    for pre in ("smaug-bpe", "llama-bpe", "llama3"):
        pre_tokenizer, ignore_merges, _ = PRE_TOKENIZERS[pre]
        assert (pre_tokenizer, ignore_merges) == (LLAMA3["pre_tokenizer"], True)


def test_llama3_merges_alone_split_the_corpus_as_llama_cpp_does():
    """The fixture holds the effect: merges alone (llama.cpp's `smaug-bpe`, and `dbrx` here) give
    other ids on 23 of its texts: every one of the 588 vocabulary words it affects, and ` Việt`."""
    merges_only = tokenizer_from_gguf(llama3_metadata("dbrx"))
    assert [merges_only.decode([i]) for i in merges_only.encode(" Việt")] == [" Vi", "ệ", "t"]
    changed = [c for c in LLAMA3["corpus"] if "merges_only_ids" in c]
    assert len(changed) == 23
    assert all(merges_only.encode(c["text"]) == c["merges_only_ids"] for c in changed)


def test_llama3_fixture_ids_are_transformers_own(tmp_path):
    """transformers, given the fixture as a tokenizer.json shaped as Llama 3's (its pre-tokenizer,
    `ignore_merges`, the special tokens at their ids), gives the recorded ids."""
    transformers = pytest.importorskip("transformers")
    tokens = {int(i): t for i, t in LLAMA3["tokens"].items()}
    vocab = {tokens.get(i, f"<unused {i}>"): i for i in range(128000)}
    added = [{"id": int(i), "content": t, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": True} for i, t in LLAMA3["special_tokens"].items()]
    spec = {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added, "normalizer": None,
        "pre_tokenizer": LLAMA3["pre_tokenizer"], "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": True,
                  "vocab": vocab, "merges": LLAMA3["merges"]},
    }
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec), encoding="utf-8")
    reference = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"))
    for case in LLAMA3["corpus"]:
        assert reference.encode(case["text"], add_special_tokens=False) == case["ids"], case["text"][:40]
