"""Byte-level BPE tokenizers for SmolLM checkpoints, built from a Hugging Face tokenizer.json or
from GGUF metadata, with a streaming detokenizer for generation.

GGUF tokenization follows llama.cpp (`src/llama-vocab.cpp`): the pre-tokenizer regexes are chosen
by `tokenizer.ggml.pre`, and control / user-defined tokens are matched whole in the text. Llama 3's
vocabulary (`llama3`, `llama-bpe`, and `smaug-bpe`, which llama.cpp's converter writes for SmolLM3)
is the exception: it is tokenized as its own Hugging Face tokenizer.json does, which the model was
trained with (see PRE_TOKENIZERS).
"""

import hashlib
import json
import os
import tempfile
from pathlib import Path

import tokenizers

from . import settings
from .errors import TokenizerError

GPT2_REGEX = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
# Llama 3's tokenizer.json pattern. llama.cpp spells the contractions out ('[sS]) where this one is
# case-insensitive, so that "'ſ" (long s, which folds to s) is a contraction here and not there.
LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _split(pattern: str) -> dict:
    return {"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": False}


def _byte_level(use_regex: bool) -> dict:
    return {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": use_regex}


def _sequence(*steps: dict) -> dict:
    return {"type": "Sequence", "pretokenizers": list(steps)}


_LLAMA3 = _sequence(_split(LLAMA3_REGEX), _byte_level(False))

# tokenizer.ggml.pre -> (pre-tokenizer, ignore_merges, add_bos unless the file says otherwise),
# as llama.cpp's llama_vocab::impl::load sets them, except ignore_merges for `smaug-bpe`: Llama 3's
# tokenizer.json (SmolLM3's too) looks a whole pre-token up in the vocabulary before merging, and
# llama.cpp does so only for `llama3`/`llama-bpe`. Merges alone split 588 of Llama 3's 128000 tokens
# (non-English words: " Việt" is 101798, not " Vi" "ệ" "t"), so the model would read them split
# in a way it never saw in training.
PRE_TOKENIZERS = {
    "smollm": (_sequence({"type": "Digits", "individual_digits": True}, _byte_level(True)), False, False),
    "gpt2": (_byte_level(True), False, False),
    "gpt-2": (_byte_level(True), False, False),
    "llama3": (_LLAMA3, True, True),
    "llama-bpe": (_LLAMA3, True, True),
    "smaug-bpe": (_LLAMA3, True, False),
    "dbrx": (_LLAMA3, False, False),
    # llama.cpp's "default" is not plain GPT-2: punctuation runs and 3-digit groups split first.
    "default": (
        _sequence(
            _split(r"[\p{P}\$\+<=>\^~\|]+"),
            _split(GPT2_REGEX),
            _split(r"\p{N}+"),
            _split(r"[0-9][0-9][0-9]"),
            _byte_level(False),
        ),
        False,
        False,
    ),
}

# llama.cpp matches UNKNOWN (2), CONTROL (3) and USER_DEFINED (4) tokens whole in the input text.
_SPECIAL_TOKEN_TYPES = (2, 3, 4)


class Tokenizer:
    def __init__(self, tok: tokenizers.Tokenizer, bos_id: int | None, eos_ids: list[int], add_bos: bool = False):
        self.tok = tok
        self.bos_id = bos_id
        self.eos_ids = list(eos_ids)
        self.add_bos = add_bos
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        ids = self.tok.encode(text, add_special_tokens=False).ids
        if self.add_bos and self.bos_id is not None:
            ids.insert(0, self.bos_id)
        return ids

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=False)

    def token_to_id(self, token: str) -> int | None:
        return self.tok.token_to_id(token)

    def detokenizer(self) -> "StreamingDetokenizer":
        return StreamingDetokenizer(self)


class StreamingDetokenizer:
    """Turns ids into text as they arrive, holding back a token while its text would end in a
    partial UTF-8 sequence (decoded as U+FFFD). The same prefix/read-offset scheme as text-generation-
    inference: the previous emitted window is decoded again as context, so the pieces join up to
    exactly `decode(all ids)`."""

    def __init__(self, tokenizer: Tokenizer):
        self._decode = tokenizer.decode
        self._ids: list[int] = []
        self._read = 0  # ids[:_read] were emitted last time; they stay as context for decoding the rest

    def add(self, token_id: int) -> str:
        self._ids.append(token_id)
        emitted = self._decode(self._ids[: self._read])
        text = self._decode(self._ids)
        if len(text) <= len(emitted) or text.endswith("\ufffd"):
            return ""
        self._ids = self._ids[self._read :]
        self._read = len(self._ids)
        return text[len(emitted) :]

    def flush(self) -> str:
        emitted = self._decode(self._ids[: self._read])
        text = self._decode(self._ids)
        self._ids, self._read = [], 0
        return text[len(emitted) :]


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise TokenizerError(f"cannot read {path}: {exc}") from exc


def _token_content(token) -> str | None:
    # tokenizer_config.json writes special tokens as a string or as an AddedToken dict.
    return token.get("content") if isinstance(token, dict) else token


def _as_list(value) -> list:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def tokenizer_from_file(path) -> Tokenizer:
    """A tokenizer.json, or a directory holding one; BOS, EOS and add_bos come from the
    tokenizer_config.json, config.json and generation_config.json beside it."""
    path = Path(path)
    file = path / "tokenizer.json" if path.is_dir() else path
    if not file.is_file():
        raise TokenizerError(f"no tokenizer.json at {path}")
    try:
        tok = tokenizers.Tokenizer.from_file(str(file))
    except Exception as exc:
        raise TokenizerError(f"cannot load {file}: {exc}") from exc
    folder = file.parent
    tok_config = _read_json(folder / "tokenizer_config.json")
    config = _read_json(folder / "config.json")
    gen_config = _read_json(folder / "generation_config.json")

    def id_of(token) -> int | None:
        content = _token_content(token)
        return tok.token_to_id(content) if content else None

    bos_candidates = [id_of(tok_config.get("bos_token")), config.get("bos_token_id"), gen_config.get("bos_token_id")]
    bos_id = next((i for i in bos_candidates if isinstance(i, int)), None)
    eos_ids: list[int] = []
    for eos in [
        *_as_list(gen_config.get("eos_token_id")),
        *_as_list(config.get("eos_token_id")),
        id_of(tok_config.get("eos_token")),
    ]:
        if isinstance(eos, int) and eos not in eos_ids:
            eos_ids.append(eos)
    add_bos = tok_config.get("add_bos_token")
    if add_bos is None:
        # No explicit flag: the tokenizer's own post-processor says whether it prepends BOS.
        add_bos = bos_id is not None and tok.encode("", add_special_tokens=True).ids[:1] == [bos_id]
    return Tokenizer(tok, bos_id, eos_ids, bool(add_bos))


# The cache holds what this module builds: a change to it (pre-tokenizers, special tokens...)
# must not be served from entries an older version wrote.
_BUILDER_VERSION = hashlib.blake2b(Path(__file__).read_bytes(), digest_size=6).hexdigest()


def tokenizer_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "smollm3" / "tokenizers"


def tokenizer_from_gguf(metadata, cache_key: str | None = None) -> Tokenizer:
    """Build llama.cpp's tokenizer from GGUF metadata (key -> python value).

    Building through one JSON string for `Tokenizer.from_str` is the fast path: SmolLM2's 49152
    tokens and 48900 merges build in 0.10 s (0.25 s for the first build in a process), measured on
    this project's x86 dev machine; 0.06 s of it is tokenizers parsing the JSON. With `cache_key`
    (a digest of the GGUF header) that JSON is kept in the user cache, and a later load reads it
    back without decoding the vocabulary from the GGUF at all (0.28 -> 0.18 s to a first token
    for SmolLM2-135M)."""
    model = metadata.get("tokenizer.ggml.model")
    if model != "gpt2":
        raise TokenizerError(f"unsupported GGUF tokenizer model {model!r}: only 'gpt2' (byte-level BPE)")
    pre = metadata.get("tokenizer.ggml.pre", "default")
    if pre not in PRE_TOKENIZERS:
        raise TokenizerError(
            f"unsupported GGUF pre-tokenizer {pre!r}; supported: {', '.join(sorted(PRE_TOKENIZERS))}"
        )
    pre_tokenizer, ignore_merges, add_bos = PRE_TOKENIZERS[pre]
    use_cache = cache_key and settings.tokenizer_cache()
    cached = tokenizer_cache_dir() / f"{cache_key}-{_BUILDER_VERSION}.json" if use_cache else None
    tok = None
    if cached is not None and cached.is_file():
        try:
            tok = tokenizers.Tokenizer.from_file(str(cached))
        except Exception:  # a damaged cache entry: build it again
            tok = None
    if tok is None:
        spec = _gguf_tokenizer_json(metadata, pre_tokenizer, ignore_merges)
        try:
            tok = tokenizers.Tokenizer.from_str(spec)
        except Exception as exc:
            raise TokenizerError(f"cannot build the GGUF tokenizer: {exc}") from exc
        if cached is not None:
            _write_atomically(cached, spec)
    vocab_size = tok.get_vocab_size(with_added_tokens=True)

    def token_id(key: str) -> int | None:
        value = metadata.get(key)
        return int(value) if value is not None and 0 <= int(value) < vocab_size else None

    eos_ids = [token_id("tokenizer.ggml.eos_token_id"), token_id("tokenizer.ggml.eot_token_id")]
    eos_ids = list(dict.fromkeys(i for i in eos_ids if i is not None))
    add_bos = metadata.get("tokenizer.ggml.add_bos_token", add_bos)
    return Tokenizer(tok, token_id("tokenizer.ggml.bos_token_id"), eos_ids, bool(add_bos))


def _gguf_tokenizer_json(metadata, pre_tokenizer: dict, ignore_merges: bool) -> str:
    try:
        tokens = list(metadata["tokenizer.ggml.tokens"])
        merges = list(metadata["tokenizer.ggml.merges"])
    except KeyError as exc:
        raise TokenizerError(f"GGUF metadata lacks {exc.args[0]}") from exc
    types = metadata.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    # llama.cpp renames empty tokens the same way, so that every id stays reachable.
    tokens = [t if t else f"[EMPTY_{i}]" for i, t in enumerate(tokens)]
    vocab = {t: i for i, t in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise TokenizerError("GGUF vocabulary has duplicate tokens")
    added = [
        {"id": i, "content": tokens[i], "single_word": False, "lstrip": False, "rstrip": False,
         "normalized": False, "special": True}
        for i, kind in enumerate(types)
        if kind in _SPECIAL_TOKEN_TYPES
    ]
    spec = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
        "model": {
            "type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
            "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
            "ignore_merges": ignore_merges, "vocab": vocab, "merges": merges,
        },
    }
    return json.dumps(spec, ensure_ascii=False)


def _write_atomically(path: Path, text: str) -> None:
    """Best effort: a read-only or full cache only costs the next load the build."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", encoding="utf-8", dir=path.parent, delete=False, suffix=".tmp") as f:
            f.write(text)
        os.replace(f.name, path)
    except OSError:
        pass
