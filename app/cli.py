"""The `smollm3` command: one-shot `--prompt` mode streaming to stdout, or the chat TUI."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from datetime import datetime

import backends
from backends import SamplingParams, SmolLMError, Tracer, settings

from .resolve import MODELS, QUANTIZATIONS, resolve
from .session import ChatSession, ThinkingSplitter

DEFAULT_QUANTIZATION = "q8_0"  # the seed's default
DIM, RESET = "\x1b[2m", "\x1b[0m"


class UsageError(SmolLMError):
    pass


class Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, not argparse's usage block
        raise UsageError(f"{message} (see smollm3 --help)")


def one_line(text: str) -> str:
    """An error as one printable line: a message may quote names read from a corrupt file."""
    return "".join(c if c.isprintable() else ascii(c)[1:-1] for c in text)


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="smollm3", description="Chat with SmolLM3 (or SmolLM2) locally, from GGUF or safetensors.")
    m = p.add_argument_group("model")
    m.add_argument("--model-type", choices=("quantized", "full"), default="quantized",
                   help="quantized: a GGUF file; full: Hugging Face safetensors (default: quantized)")
    m.add_argument("--model", choices=tuple(MODELS), default="3b", help="which model to download (default: 3b)")
    m.add_argument("--quantization", choices=QUANTIZATIONS, default=None,
                   help=f"GGUF quantization to download (default: {DEFAULT_QUANTIZATION})")
    m.add_argument("--model-path", help="a local .gguf file or Hugging Face model directory (no download)")
    m.add_argument("--tokenizer", help="a tokenizer.json (or directory) to use instead of the checkpoint's own")
    m.add_argument("--dtype", choices=("auto", *backends.DTYPES), default="auto",
                   help="compute dtype (auto: bf16 on CUDA/MPS, f32 on CPU)")
    m.add_argument("--quantize", type=int, choices=(4, 8),
                   help="MLX backend: quantize a full-precision checkpoint to 4 or 8 bits at load")
    m.add_argument("--backend", choices=backends.BACKENDS, default="auto", help="auto: MLX on Apple Silicon, else torch")
    m.add_argument("--device", help="torch device: cpu, cuda, cuda:N, mps (default: the best available)")

    g = p.add_argument_group("generation")
    g.add_argument("--prompt", help="generate one answer to this prompt and exit (without it: the chat TUI)")
    g.add_argument("--resume", action="store_true", help="chat TUI: reopen the last chat")
    g.add_argument("-n", "--sample-len", type=int, default=1000, help="most tokens to generate (default: 1000)")
    g.add_argument("--temperature", type=float, default=0.8, help="0 for greedy (default: 0.8)")
    g.add_argument("--top-p", type=float, help="nucleus sampling cutoff")
    g.add_argument("--top-k", type=int, help="sample among the k most likely tokens only")
    g.add_argument("--repeat-penalty", type=float, default=1.1, help="1.0 disables it (default: 1.1)")
    g.add_argument("--repeat-last-n", type=int, default=64, help="tokens the repeat penalty looks back on (default: 64)")
    g.add_argument("--seed", type=int, default=299792458, help="random seed (default: 299792458)")
    g.add_argument("--no-chat-template", action="store_true", help="send the prompt as is, without the chat template")
    g.add_argument("--thinking", action="store_true", help="let SmolLM3 reason first (enable_thinking)")
    g.add_argument("--split-prompt", action="store_true", help="feed the prompt one token at a time (for debugging)")
    g.add_argument("--tracing", action="store_true", help="write a Chrome trace (trace-<time>.json) of load, prefill, decode")
    return p


def check_flags(args: argparse.Namespace) -> None:
    if args.model_path is not None and args.quantization is not None:
        raise UsageError("--quantization picks a file to download; it cannot be combined with --model-path")
    if args.model_type == "full" and args.quantization is not None:
        raise UsageError("--quantization applies to --model-type quantized only")
    if args.no_chat_template and args.thinking:
        raise UsageError("--thinking needs the chat template; drop --no-chat-template")
    if args.sample_len < 1:
        raise UsageError(f"-n/--sample-len must be at least 1, got {args.sample_len}")
    if args.prompt is not None and not args.prompt.strip():
        raise UsageError("--prompt is empty")


def sampling_from(args: argparse.Namespace) -> SamplingParams:
    try:
        return SamplingParams(
            temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
            repeat_penalty=args.repeat_penalty, repeat_last_n=args.repeat_last_n, seed=args.seed,
        ).validate()
    except ValueError as e:
        raise UsageError(str(e)) from None


def load_engine(args: argparse.Namespace, tracer: Tracer, chatter: bool = True) -> tuple[backends.Engine, bool]:
    resolved = resolve(args.model, args.model_type, args.quantization or DEFAULT_QUANTIZATION, args.model_path)
    t0 = time.perf_counter()
    engine = backends.load(resolved.path, backend=args.backend, device=args.device, dtype=args.dtype,
                           tokenizer_path=args.tokenizer, tracer=tracer, quantize=args.quantize)
    i = engine.info
    if chatter and sys.stderr.isatty():  # progress chatter only for a person watching; errors stay one line
        print(f"loaded {i.checkpoint} ({i.weight_type}) on {i.backend} {i.device} {i.dtype} in "
              f"{time.perf_counter() - t0:.2f}s", file=sys.stderr)
    return engine, resolved.chat and not args.no_chat_template


def run_prompt(args: argparse.Namespace, engine: backends.Engine, use_template: bool) -> int:
    session = ChatSession(engine, thinking=args.thinking, use_template=use_template)
    sampling = sampling_from(args)
    tty = sys.stdout.isatty()
    splitter = ThinkingSplitter()
    out = sys.stdout

    def show(text: str):
        if not tty:
            out.write(text)
        else:
            for kind, piece in splitter.feed(text):
                out.write(f"{DIM}{piece}{RESET}" if kind == "think" else piece)
        out.flush()

    try:
        for text in session.reply(args.prompt, args.sample_len, sampling, split_prompt=args.split_prompt):
            show(text)
    finally:
        if tty:
            for kind, piece in splitter.flush():
                out.write(f"{DIM}{piece}{RESET}" if kind == "think" else piece)
            out.write(RESET)  # Ctrl-C can land inside a dimmed write: never leave the terminal dim
        out.write("\n")
        out.flush()
    s = engine.stats
    print(f"{s.prompt_tokens:4} prompt tokens processed: {s.prompt_tokens / s.prefill_s if s.prefill_s else 0:.2f} token/s",
          file=sys.stderr)
    print(f"{s.generated_tokens:4} tokens generated: {s.decode_tok_s:.2f} token/s", file=sys.stderr)
    if s.stop_reason == "context":
        print("smollm3: stopped: the model's context is full", file=sys.stderr)
    return 0


def run_chat(args: argparse.Namespace, tracer: Tracer) -> int:
    from .tui import run_tui  # Textual loads only for the chat

    def engine_factory(progress):  # the app shows what loading prints (download bars) on its loading panel
        progress(f"loading {args.model_path or 'SmolLM ' + args.model}...")
        return load_engine(args, tracer, chatter=False)

    label = os.path.basename(args.model_path.rstrip("/")) if args.model_path else f"SmolLM {args.model}"
    return run_tui(engine_factory, thinking=args.thinking, sampling=sampling_from(args),
                   max_new_tokens=args.sample_len, resume=args.resume, model_label=label)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench"]:  # `smollm3 bench ...`: load and speed figures, like llama-bench
        from .bench import bench_main

        return bench_main(argv[1:])
    tracer = Tracer()
    args = None
    try:
        args = build_parser().parse_args(argv)
        check_flags(args)
        sampling_from(args)
        if args.prompt is None:
            return run_chat(args, tracer)
        if args.resume:
            raise UsageError("--resume opens the chat TUI: drop --prompt")
        engine, use_template = load_engine(args, tracer)
        return run_prompt(args, engine, use_template)
    except SmolLMError as e:
        print(f"smollm3: error: {one_line(str(e))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not interrupt the way out
        sys.stdout.flush()
        print("\nsmollm3: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # stdout closed early (e.g. piped into `head`): not an error worth a traceback.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except Exception as e:  # a bug of ours: still one line, with a way to get the traceback
        if settings.debug():
            raise
        print(f"smollm3: internal error: {type(e).__name__}: {one_line(str(e))} (set SMOLLM3_DEBUG=1 for a traceback)",
              file=sys.stderr)
        return 1
    finally:
        if args is not None and getattr(args, "tracing", False) and tracer.events:
            path = f"trace-{datetime.now():%Y%m%d-%H%M%S}.json"
            tracer.write(path)
            print(f"trace written to {path}", file=sys.stderr)


def entry_point() -> None:
    """`smollm3` and `python -m app`: main(), then leave without the interpreter's teardown.

    With torch loaded (and inductor's sympy, networkx) teardown unloads ~2,700 modules for
    ~1.7 s, which would break "Ctrl-C exits within 1 s" and slow every run. main() has written
    everything it means to (the trace in its `finally`); what is buffered is flushed here."""
    try:
        code = main()
    except KeyboardInterrupt:  # Ctrl-C before main() took over (while importing)
        code = 130
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


if __name__ == "__main__":
    entry_point()
