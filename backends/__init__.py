"""smollm3's backends and the code they share.

`load(path_or_repo, backend="auto")` is the one entry point: it reads the checkpoint, its
tokenizer and chat template, picks a backend, and returns an `Engine`.

The backends: `mlx` (Apple Silicon), `native` (a GGUF file on our C kernels on the CPU, without
torch in the process) and `torch` (CUDA, MPS, the CPU; every checkpoint). `auto` takes MLX on
Apple Silicon, else native where it can run the file and no GPU is asked for or present, else torch.
"""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path

from .chat_template import ChatTemplate, chat_template_from_dir, chat_template_from_file, official_chat_template
from .checkpoint import Checkpoint, open_checkpoint
from .engine import DTYPES, Engine, GenerationStats
from .errors import BackendUnavailable, CheckpointError, SmolLMError
from .sampling import SamplingParams
from .tokenizer import Tokenizer, tokenizer_from_file, tokenizer_from_gguf
from .tracing import NullTracer, Tracer

BACKENDS = ("auto", "native", "torch", "mlx")

__all__ = [
    "BACKENDS",
    "DTYPES",
    "Engine",
    "GenerationStats",
    "SamplingParams",
    "SmolLMError",
    "Tracer",
    "load",
    "load_tokenizer",
    "select_backend",
]


def mlx_importable() -> bool:
    try:
        import mlx.core  # noqa: F401
    except ImportError:
        return False
    return True


def select_backend(requested: str = "auto") -> str:
    """auto: MLX on Apple Silicon when it imports, else torch (which picks CUDA, MPS or CPU);
    `load` then runs the file on the native backend instead where torch would be on the CPU and
    native can run it."""
    if requested not in BACKENDS:
        raise BackendUnavailable(f"unknown backend '{requested}' (choose from {', '.join(BACKENDS)})")
    if requested == "auto":
        on_apple_silicon = sys.platform == "darwin" and platform.machine() == "arm64"
        return "mlx" if on_apple_silicon and mlx_importable() else "torch"
    if requested == "mlx" and not mlx_importable():
        hint = 'pip install "smollm3[mlx]"' if sys.platform == "darwin" else 'pip install "mlx[cpu]" mlx-lm'
        raise BackendUnavailable(f"--backend mlx: MLX is not installed (install it with: {hint})")
    return requested


def load_tokenizer(ckpt: Checkpoint, tokenizer_path: str | Path | None = None) -> Tokenizer:
    if tokenizer_path is not None:
        return tokenizer_from_file(tokenizer_path)
    if ckpt.gguf_metadata is not None:
        return tokenizer_from_gguf(ckpt.gguf_metadata, ckpt.gguf_file.header_digest() if ckpt.gguf_file else None)
    return tokenizer_from_file(ckpt.hf_dir)


def load_chat_template(
    ckpt: Checkpoint, tokenizer: Tokenizer, chat_template_path: str | Path | None = None
) -> ChatTemplate | None:
    """The checkpoint's chat template, or the file given instead; when a SmolLM3 or SmolLM2
    checkpoint has none (converters drop or rewrite them), the model's official one, with a
    notice saying so. Rendered once here, so that a broken or runaway template fails at load."""
    bos = tokenizer.decode([tokenizer.bos_id]) if tokenizer.bos_id is not None else ""
    eos = tokenizer.decode([tokenizer.eos_ids[0]]) if tokenizer.eos_ids else ""
    if chat_template_path is not None:
        template = chat_template_from_file(chat_template_path, bos_token=bos, eos_token=eos)
    elif ckpt.gguf_metadata is not None:
        source = ckpt.gguf_metadata.get("tokenizer.chat_template")
        template = ChatTemplate(source, bos, eos, name=f"{ckpt.path.name} chat template") if source else None
    else:
        template = chat_template_from_dir(ckpt.hf_dir)
    # The official templates speak ChatML: only a vocabulary with its markers can use them.
    chatml = tokenizer.token_to_id("<|im_start|>") is not None and tokenizer.token_to_id("<|im_end|>") is not None
    if template is None and chatml:
        template = official_chat_template(ckpt.config.architecture, bos_token=bos, eos_token=eos)
        if template is not None:
            template.notice = f"{ckpt.path.name} has no chat template: using {template.name}"
    return template.check() if template is not None else None


def load(
    path_or_repo: str | Path,
    backend: str = "auto",
    device: str | None = None,
    dtype: str = "auto",
    tokenizer_path: str | Path | None = None,
    tracer: Tracer | None = None,
    quantize: int | None = None,
    chat_template_path: str | Path | None = None,
) -> Engine:
    """An engine for a local .gguf file or HF directory, or a Hub repo id (downloaded into the HF cache)."""
    tracer = tracer or NullTracer()
    with tracer.span("load"):
        path = Path(path_or_repo)
        if not path.exists() and _looks_like_repo(str(path_or_repo)):
            from .hub import download_repo

            path = download_repo(str(path_or_repo))
        ckpt = open_checkpoint(path)
        tokenizer = load_tokenizer(ckpt, tokenizer_path)
        template = load_chat_template(ckpt, tokenizer, chat_template_path)
        name = select_backend(backend)
        if name == "mlx":
            from .mlx.engine import MLXEngine

            engine: Engine = MLXEngine(ckpt, tokenizer, template, dtype=dtype, quantize=quantize)
        elif quantize is not None:
            raise BackendUnavailable("--quantize (quantizing a full checkpoint at load) needs --backend mlx")
        elif name == "native" or (backend == "auto" and _on_the_cpu(device, dtype)):
            engine = _native_engine(ckpt, tokenizer, template, device, dtype, asked=name == "native") or _torch_engine(
                ckpt, tokenizer, template, device, dtype
            )
        else:
            engine = _torch_engine(ckpt, tokenizer, template, device, dtype)
    engine.tracer = tracer
    return engine


def _native_engine(ckpt, tokenizer, template, device, dtype, asked: bool) -> Engine | None:
    """The native backend's engine, or None where it cannot run the file and was not asked for
    by name (then torch runs it)."""
    from .native.engine import NativeEngine, native_model
    from .native.model import NotNative

    if asked and (device not in (None, "auto", "cpu") or dtype not in ("auto", "f32")):
        raise BackendUnavailable("--backend native runs on the CPU in f32 (drop --device and --dtype, or use --backend torch)")
    try:
        return NativeEngine(ckpt, tokenizer, template, native_model(ckpt))
    except NotNative as e:
        if asked:
            raise BackendUnavailable(f"--backend native: {e}") from None
        return None


def _torch_engine(ckpt, tokenizer, template, device, dtype) -> Engine:
    from .torch.engine import TorchEngine

    return TorchEngine(ckpt, tokenizer, template, device=device, dtype=dtype)


def _on_the_cpu(device: str | None, dtype: str) -> bool:
    """Whether torch would run in f32 on the CPU: asked for, or no GPU it could use. Decided
    without importing torch where no GPU's device node exists (Linux); elsewhere torch says."""
    if dtype not in ("auto", "f32"):
        return False
    if device == "cpu":
        return True
    if device not in (None, "auto"):
        return False
    if sys.platform.startswith("linux") and not any(os.path.exists(p) for p in ("/dev/nvidiactl", "/dev/kfd", "/dev/dxg")):
        return True
    from .torch.engine import pick_device

    return pick_device(device).type == "cpu"


def _looks_like_repo(text: str) -> bool:
    parts = text.split("/")
    return len(parts) == 2 and all(parts) and not text.startswith((".", "/", "~"))
