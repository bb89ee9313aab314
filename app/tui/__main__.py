"""`python -m app.tui [smollm3 flags] [--resume]`: the chat TUI with the CLI's model flags.

This is also how `smollm3` (app/cli.py) starts the TUI when --prompt is absent.
"""

from __future__ import annotations

import sys

from backends import SmolLMError, Tracer

from . import run_tui


def model_label(args) -> str:
    if args.model_path:
        return args.model_path
    if args.model_type == "full":
        return f"{args.model} (safetensors)"
    return f"{args.model} {args.quantization or 'q8_0'}"


def main(argv: list[str] | None = None) -> int:
    from app.cli import build_parser, check_flags, load_engine, sampling_from

    parser = build_parser()
    parser.add_argument("--resume", action="store_true", help="reopen the last chat")
    try:
        args = parser.parse_args(argv)
        check_flags(args)
        sampling = sampling_from(args)
    except SmolLMError as e:
        print(f"smollm3: error: {e}", file=sys.stderr)
        return 2
    tracer = Tracer()
    return run_tui(
        lambda progress: load_engine(args, tracer),
        thinking=args.thinking,
        sampling=sampling,
        max_new_tokens=args.sample_len,
        resume=args.resume,
        model_label=model_label(args),
        use_template=not args.no_chat_template,
    )


if __name__ == "__main__":
    sys.exit(main())
