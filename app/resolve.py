"""From the user's flags (--model, --model-type, --quantization, --model-path) to a local checkpoint."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from backends.errors import ResolutionError
from backends.hub import FileNotOnHub, download_file, download_repo, list_repo_files

QUANTIZATIONS = ("q4_k_m", "q8_0", "f16")


@dataclass(frozen=True)
class ModelVariant:
    full_repo: str  # safetensors, for --model-type full
    gguf_repo: str | None  # None: nobody publishes a GGUF of it
    gguf_file: str  # with {quant} for the quantization's spelling in that repo
    gguf_quant_names: dict[str, str]
    chat: bool = True  # base models default to no chat template


_UNSLOTH = {"q4_k_m": "Q4_K_M", "q8_0": "Q8_0", "f16": "F16"}
_BARTOWSKI = {"q4_k_m": "Q4_K_M", "q8_0": "Q8_0", "f16": "f16"}

MODELS: dict[str, ModelVariant] = {
    "3b": ModelVariant("HuggingFaceTB/SmolLM3-3B", "unsloth/SmolLM3-3B-GGUF", "SmolLM3-3B-{quant}.gguf", _UNSLOTH),
    "3b-base": ModelVariant("HuggingFaceTB/SmolLM3-3B-Base", None, "", {}, chat=False),
    "smollm2-135m": ModelVariant(
        "HuggingFaceTB/SmolLM2-135M-Instruct",
        "bartowski/SmolLM2-135M-Instruct-GGUF",
        "SmolLM2-135M-Instruct-{quant}.gguf",
        _BARTOWSKI,
    ),
    "smollm2-360m": ModelVariant(
        "HuggingFaceTB/SmolLM2-360M-Instruct",
        "bartowski/SmolLM2-360M-Instruct-GGUF",
        "SmolLM2-360M-Instruct-{quant}.gguf",
        _BARTOWSKI,
    ),
    "smollm2-1.7b": ModelVariant(
        "HuggingFaceTB/SmolLM2-1.7B-Instruct",
        "bartowski/SmolLM2-1.7B-Instruct-GGUF",
        "SmolLM2-1.7B-Instruct-{quant}.gguf",
        _BARTOWSKI,
    ),
}


@dataclass(frozen=True)
class Resolved:
    path: Path  # a .gguf file or a Hugging Face directory
    chat: bool  # whether the chat template applies by default
    description: str  # for messages: "unsloth/SmolLM3-3B-GGUF/SmolLM3-3B-Q8_0.gguf"


def gguf_location(model: str, quantization: str) -> tuple[str, str]:
    variant = MODELS[model]
    if variant.gguf_repo is None:
        raise ResolutionError(
            f"no quantized GGUF of {variant.full_repo} is published; "
            f"use --model-type full --model {model} (safetensors), or --model-path with a GGUF you made"
        )
    return variant.gguf_repo, variant.gguf_file.format(quant=variant.gguf_quant_names[quantization])


def resolve(model: str, model_type: str, quantization: str, model_path: str | None) -> Resolved:
    variant = MODELS[model]
    if model_path is not None:
        path = Path(model_path).expanduser()
        if not path.exists():
            raise ResolutionError(f"--model-path {model_path}: no such file or directory")
        return Resolved(path, variant.chat, str(path))
    if model_type == "full":
        return Resolved(download_repo(variant.full_repo), variant.chat, variant.full_repo)
    repo, filename = gguf_location(model, quantization)
    try:
        return Resolved(download_file(repo, filename), variant.chat, f"{repo}/{filename}")
    except FileNotOnHub:
        files = list_repo_files(repo)
        if files is None:
            raise
    # The repository renamed or dropped the file: take the same name in another case, else say what it has.
    same = [f for f in files if f.lower() == filename.lower()]
    if len(same) == 1:
        return Resolved(download_file(repo, same[0]), variant.chat, f"{repo}/{same[0]}")
    raise ResolutionError(missing_quantization_message(model, quantization, repo, filename, files))


def quantizations_in(model: str, files: list[str]) -> list[str]:
    """The --quantization values whose GGUF file the repository (with these files) has."""
    variant = MODELS[model]
    names = {f.lower() for f in files}
    return [q for q, spelled in variant.gguf_quant_names.items()
            if variant.gguf_file.format(quant=spelled).lower() in names]


def missing_quantization_message(model: str, quantization: str, repo: str, filename: str, files: list[str]) -> str:
    ggufs = sorted(f for f in files if f.lower().endswith(".gguf"))
    have = quantizations_in(model, files)
    choices = f"--quantization {' or '.join(have)}" if have else "no --quantization choice"
    listing = ", ".join(ggufs) if ggufs else "no GGUF files at all"
    return (f"{repo} has no {filename} (--quantization {quantization}); it offers {choices}. "
            f"Its GGUF files: {listing}")
