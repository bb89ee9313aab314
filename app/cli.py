"""The `smollm3` command: one-shot `--prompt` mode streaming to stdout, or the chat TUI."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import os
import signal
import sys
import threading
import time
from datetime import datetime
from importlib.metadata import PackageNotFoundError, version

import backends
from backends import NullTracer, SamplingParams, SmolLMError, Tracer, settings

from backends.remote import DIALECTS

from .resolve import MODELS, QUANTIZATIONS, resolve
from .oneshot import InterruptedAnswer, run_prompt

DEFAULT_MODEL = "3b"
DEFAULT_QUANTIZATION = "q8_0"
KV_MEMORY_SHARE = 0.5  # the default context's KV cache may take this share of the memory free after the load
DTYPE_BYTES = {"f32": 4, "f16": 2, "bf16": 2}


class UsageError(SmolLMError):
    pass


class Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, not argparse's usage block
        raise UsageError(f"{message} (see smollm3 --help)")


def one_line(text: str) -> str:
    """An error as one printable line: a message may quote names read from a corrupt file."""
    return "".join(c if c.isprintable() else ascii(c)[1:-1] for c in text)


@contextlib.contextmanager
def interrupt_ends_the_load():
    """Ctrl-C while a model loads ends the process on the spot, exit 130. Raised as usual,
    KeyboardInterrupt can surface inside a Python callback torch's C++ makes while it imports
    and sets up (pybind11), where it aborts the process ("terminate called ...", exit -6) instead;
    nothing has been streamed or saved yet. (Only the main thread may set a handler.)"""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def leave(signum, frame):
        print("\nsmollm3: interrupted", file=sys.stderr, flush=True)
        os._exit(130)

    previous = signal.signal(signal.SIGINT, leave)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def number(kind: type, minimum: float | None = None, above: float | None = None, maximum: float | None = None):
    """An argparse type: a finite int or float in range, or one line saying what was wrong."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, got {text!r}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
        if minimum is not None and value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {text}")
        if above is not None and value <= above:
            raise argparse.ArgumentTypeError(f"must be more than {above}, got {text}")
        if maximum is not None and value > maximum:
            raise argparse.ArgumentTypeError(f"must be at most {maximum}, got {text}")
        return value

    return parse


def app_version() -> str:
    try:
        return version("smollm3")
    except PackageNotFoundError:  # run from a checkout that was never installed
        return "unknown"


def add_model_arguments(p: argparse.ArgumentParser, backend_choices: tuple[str, ...] = backends.BACKENDS) -> None:
    """Which model and how to run it: shared by every subcommand that loads an engine (load_engine)."""
    m = p.add_argument_group("model")
    m.add_argument("--model-type", choices=("quantized", "full"), default="quantized",
                   help="quantized: a GGUF file; full: Hugging Face safetensors (default: quantized)")
    # Defaults of None here and below: check_model_flags tells a flag the user gave from a default.
    m.add_argument("--model", choices=tuple(MODELS), default=None,
                   help=f"which model to download (default: {DEFAULT_MODEL})")
    m.add_argument("--quantization", choices=QUANTIZATIONS, default=None,
                   help=f"GGUF quantization to download (default: {DEFAULT_QUANTIZATION})")
    m.add_argument("--model-path", help="a local .gguf file or Hugging Face model directory (no download)")
    m.add_argument("--tokenizer", help="a tokenizer.json (or directory) to use instead of the checkpoint's own")
    m.add_argument("--chat-template", metavar="FILE", help="a Jinja chat template to use instead of the checkpoint's own")
    m.add_argument("--dtype", choices=("auto", *backends.DTYPES), default="auto",
                   help="compute dtype (auto: bf16 on CUDA/MPS, f32 on CPU)")
    m.add_argument("--quantize", type=int, choices=(4, 8),
                   help="MLX backend: quantize a full-precision checkpoint to 4 or 8 bits at load")
    m.add_argument("--backend", choices=backend_choices, default="auto",
                   help="auto: MLX on Apple Silicon; else native (a GGUF on our C kernels, on the CPU, without torch) "
                        "where it runs the file; else torch")
    m.add_argument("--device", help="torch device: cpu, cuda, cuda:N, mps (default: the best available)")
    m.add_argument("--ctx-size", type=number(int, minimum=1), metavar="N",
                   help="most tokens of context (default: the model's, capped by free memory)")


def add_sampling_arguments(g: argparse._ArgumentGroup) -> None:
    g.add_argument("-n", "--sample-len", type=number(int, minimum=1), default=1000, metavar="N",
                   help="most tokens to generate (default: 1000)")
    g.add_argument("--temperature", type=number(float, minimum=0), default=0.8, metavar="T", help="0 for greedy (default: 0.8)")
    g.add_argument("--top-p", type=number(float, above=0, maximum=1), metavar="P", help="nucleus sampling cutoff, in (0, 1]")
    g.add_argument("--top-k", type=number(int, minimum=1), metavar="K", help="sample among the k most likely tokens only")
    g.add_argument("--repeat-penalty", type=number(float, above=0), default=1.1, metavar="X", help="1.0 disables it (default: 1.1)")
    g.add_argument("--repeat-last-n", type=number(int, minimum=0), default=64, metavar="N",
                   help="tokens the repeat penalty looks back on (default: 64)")
    g.add_argument("--seed", type=number(int, minimum=0, maximum=2**63 - 1), default=299792458, metavar="N",
                   help="random seed (default: 299792458)")


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="smollm3", description="Chat with SmolLM3 (or SmolLM2) locally, from GGUF or safetensors.",
               epilog="other commands: smollm3 bench --model-path M (load time and speed; "
                      "smollm3 bench --help for its flags)")
    p.add_argument("--version", action="version", version=f"smollm3 {app_version()}")
    add_model_arguments(p, backends.BACKENDS + ("remote",))
    r = p.add_argument_group("remote server (OpenAI-compatible: vLLM, SGLang, llama-server, Ollama, mlx_lm.server, smollm3 serve)")
    r.add_argument("--endpoint", metavar="URL", help="chat with the model this server serves, e.g. http://gpu-box:8000/v1 "
                                                    "(implies --backend remote)")
    r.add_argument("--api-key", metavar="KEY", help="the server's API key (default: $OPENAI_API_KEY)")
    r.add_argument("--served-model", metavar="NAME", help="the model to ask for (default: the server's first)")
    r.add_argument("--dialect", choices=DIALECTS, help="the server's kind, when probing it guesses wrong")
    g = p.add_argument_group("generation")
    g.add_argument("--prompt", metavar="TEXT", help="generate one answer to this prompt and exit ('-': read it from standard "
                                    "input, as happens without --prompt when input is piped; without either: the chat)")
    g.add_argument("--system", metavar="TEXT", help="one-shot mode: a system prompt for the answer")
    g.add_argument("--resume", action="store_true", help="chat TUI: reopen the last chat")
    add_sampling_arguments(g)
    g.add_argument("--no-chat-template", action="store_true", help="send the prompt as is, without the chat template")
    g.add_argument("--thinking", action="store_true", help="let SmolLM3 reason first (enable_thinking)")
    g.add_argument("--split-prompt", action="store_true", help="feed the prompt one token at a time (for debugging)")
    g.add_argument("--tracing", action="store_true", help="write a Chrome trace (trace-<time>.json) of load, prefill, decode")
    return p


def check_model_flags(args: argparse.Namespace) -> None:
    """Flags that contradict each other are errors, not silently ignored; then the defaults apply."""
    if args.model_path is not None:
        for flag, value in (("--model", args.model), ("--quantization", args.quantization)):
            if value is not None:
                raise UsageError(f"{flag} picks a model to download; it cannot be combined with --model-path")
    if args.model_type == "full" and args.quantization is not None:
        raise UsageError("--quantization applies to --model-type quantized only")
    if args.device is not None and args.backend == "mlx":
        raise UsageError("--device picks a torch device; MLX chooses its own (drop --device or use --backend torch)")
    args.model = args.model or DEFAULT_MODEL


# Flags that pick or shape a local model: with --endpoint the server has chosen all of these.
LOCAL_ONLY_FLAGS = {"model_type": "quantized", "model": None, "quantization": None, "model_path": None, "tokenizer": None,
                    "chat_template": None, "dtype": "auto", "quantize": None, "device": None, "ctx_size": None,
                    "no_chat_template": False, "split_prompt": False}


def check_remote_flags(args: argparse.Namespace) -> None:
    if args.endpoint is None:
        if args.backend == "remote":
            raise UsageError("--backend remote needs --endpoint URL")
        for flag in ("api_key", "served_model", "dialect"):
            if getattr(args, flag) is not None:
                raise UsageError(f"--{flag.replace('_', '-')} applies to a remote server: add --endpoint URL")
        return
    if args.backend not in ("auto", "remote"):
        raise UsageError(f"--endpoint chats with a server; it cannot be combined with --backend {args.backend}")
    for name, default in LOCAL_ONLY_FLAGS.items():
        if getattr(args, name) != default:
            raise UsageError(f"--{name.replace('_', '-')} applies to a local model; the server at --endpoint chose its own")
    args.backend = "remote"


def check_flags(args: argparse.Namespace) -> None:
    check_remote_flags(args)
    if args.endpoint is None:
        check_model_flags(args)
    if args.no_chat_template and args.thinking:
        raise UsageError("--thinking needs the chat template; drop --no-chat-template")
    if args.no_chat_template and args.system is not None:
        raise UsageError("--system needs the chat template; drop --no-chat-template")
    if args.prompt is not None and args.resume:
        raise UsageError("--resume opens the chat TUI: drop --prompt")


def is_terminal(stream) -> bool:
    return stream is not None and stream.isatty()  # None: started without that stream (pythonw, some daemons)


def read_prompt(args: argparse.Namespace) -> str | None:
    """The one-shot prompt: --prompt, or standard input for `--prompt -` and for piped input
    (as `llm` and `ollama run` do); None when the chat should open."""
    piped = sys.stdin is not None and not is_terminal(sys.stdin)
    if args.prompt == "-" or (args.prompt is None and piped and not args.resume):
        if sys.stdin is None:
            raise UsageError("--prompt -: this process has no standard input")
        # The newline that echo and editors end input with is not part of the question.
        prompt = sys.stdin.buffer.read().decode("utf-8", errors="replace").rstrip()
        if not prompt.strip():
            raise UsageError("no prompt: standard input was empty")
        return prompt
    if args.prompt is not None:
        if not args.prompt.strip():
            raise UsageError("--prompt is empty")
        return args.prompt
    for stream, name in ((sys.stdin, "input"), (sys.stdout, "output"), (sys.stderr, "error output")):
        if not is_terminal(stream):
            raise UsageError(f"the chat needs a terminal, and standard {name} is not one; "
                             "give --prompt TEXT, or pipe a prompt in")
    return None


def sampling_from(args: argparse.Namespace) -> SamplingParams:
    try:
        return SamplingParams(
            temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
            repeat_penalty=args.repeat_penalty, repeat_last_n=args.repeat_last_n, seed=args.seed,
        ).validate()
    except ValueError as e:
        raise UsageError(str(e)) from None


def load_engine(args: argparse.Namespace, tracer: Tracer, chatter: bool = True) -> tuple[backends.Engine, bool]:
    """The engine the model flags (add_model_arguments, checked by check_model_flags) describe,
    with its context limited to --ctx-size; and whether the chat template applies."""
    if getattr(args, "endpoint", None) is not None:
        from backends.remote import RemoteEngine

        # The server applies its chat template; RemoteError (unreachable, 401, ...) is one line.
        return RemoteEngine(args.endpoint, args.api_key, args.served_model, args.dialect), True
    resolved = resolve(args.model, args.model_type, args.quantization or DEFAULT_QUANTIZATION, args.model_path)
    t0 = time.perf_counter()
    engine = backends.load(resolved.path, backend=args.backend, device=args.device, dtype=args.dtype,
                           tokenizer_path=args.tokenizer, tracer=tracer, quantize=args.quantize,
                           chat_template_path=getattr(args, "chat_template", None))
    use_template = resolved.chat and not getattr(args, "no_chat_template", False)
    if use_template and engine.chat_template is not None and engine.chat_template.notice:
        print(f"smollm3: {engine.chat_template.notice}", file=sys.stderr)
    model_context = engine.config.context_length
    if args.ctx_size is not None and args.ctx_size > model_context:
        raise UsageError(f"--ctx-size {args.ctx_size} is more than the model's context ({model_context} tokens)")
    context = args.ctx_size or min(model_context, context_for_memory(engine))
    engine.config = dataclasses.replace(engine.config, context_length=context)
    i = engine.info
    if chatter and sys.stderr.isatty():  # progress chatter only for a person watching; errors stay one line
        limited = f", limited by free memory from {model_context}" if context < model_context and not args.ctx_size else ""
        print(f"loaded {i.checkpoint} ({i.weight_type}) on {i.backend} {i.device} {i.dtype} in "
              f"{time.perf_counter() - t0:.2f}s; context {context} tokens{limited}", file=sys.stderr)
    return engine, use_template


def context_for_memory(engine: backends.Engine) -> int:
    """Most tokens whose KV cache fits in KV_MEMORY_SHARE of the memory free now (after the load)."""
    c = engine.config
    per_token = 2 * c.num_layers * c.num_kv_heads * c.head_dim * DTYPE_BYTES.get(engine.info.dtype, 4)
    free = free_memory_bytes(engine.info.device)
    return max(256, int(free * KV_MEMORY_SHARE) // per_token) if free else c.context_length


def free_memory_bytes(device: str) -> int | None:
    if device.startswith("cuda"):
        import torch

        return torch.cuda.mem_get_info(torch.device(device))[0]
    try:  # Linux: what can be allocated without swapping, page cache included
        for line in open("/proc/meminfo"):
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:  # elsewhere (macOS, where MPS and MLX share it): the physical memory
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def given_flags(argv: list[str]) -> set[str]:
    """The dests of the flags argv gives (abbreviated or not), as opposed to their defaults."""
    parser = build_parser()
    for action in parser._actions:  # argparse sets no attribute for a SUPPRESS default not given
        action.default = argparse.SUPPRESS
    return set(vars(parser.parse_args(argv)))


# The chat's settings (Settings.to_dict keys) from the flags that set them.
CHAT_SETTING_FLAGS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "sample_len": "max_new_tokens"}


def run_chat(args: argparse.Namespace, tracer: Tracer, given: set[str] = frozenset()) -> int:
    """The chat TUI. Flags the user gave win over the settings saved in the chat, for this run."""
    from .tui import run_tui  # Textual loads only for the chat

    if args.endpoint is not None:
        label = args.endpoint
    elif args.model_path:
        label = os.path.basename(args.model_path.rstrip("/"))
    else:
        label = f"SmolLM {args.model}"

    def engine_factory(progress):  # the app shows what loading prints (download bars) on its loading panel
        progress(f"connecting to {label}..." if args.endpoint else f"loading {args.model_path or label}...")
        return load_engine(args, tracer, chatter=False)

    flag_settings = {key: getattr(args, dest) for dest, key in CHAT_SETTING_FLAGS.items() if dest in given}
    return run_tui(engine_factory, thinking=args.thinking, sampling=sampling_from(args),
                   max_new_tokens=args.sample_len, resume=args.resume, model_label=label,
                   flag_settings=flag_settings, system_prompt=args.system)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench"]:  # `smollm3 bench ...`: load and speed figures, like llama-bench
        from .bench import bench_main

        return bench_main(argv[1:])
    if argv[:1] == ["serve"]:  # `smollm3 serve ...`: the OpenAI-compatible HTTP server
        from .server import serve_main

        return serve_main(argv[1:])
    tracer: Tracer = NullTracer()  # spans kept for the whole run (a chat of hours) only when asked for
    args = None
    try:
        args = build_parser().parse_args(argv)
        if args.tracing:
            tracer = Tracer()
        check_flags(args)
        sampling_from(args)
        prompt = read_prompt(args)
        if prompt is None:
            return run_chat(args, tracer, given_flags(argv))
        with interrupt_ends_the_load():
            engine, use_template = load_engine(args, tracer)
        return run_prompt(args, prompt, engine, use_template, sampling_from(args))
    except SmolLMError as e:
        print(f"smollm3: error: {one_line(str(e))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not interrupt the way out
        sys.stdout.flush()
        fresh_line = "" if isinstance(e, InterruptedAnswer) else "\n"  # after the terminal's ^C
        print(f"{fresh_line}smollm3: interrupted", file=sys.stderr)
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
