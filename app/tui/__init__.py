"""The chat TUI (`smollm3` without --prompt)."""

from __future__ import annotations

from backends import SamplingParams

from .app import ChatApp, EngineFactory

__all__ = ["ChatApp", "run_tui"]


def run_tui(
    engine_factory: EngineFactory,
    *,
    thinking: bool,
    sampling: SamplingParams,
    max_new_tokens: int,
    resume: bool,
    model_label: str,
    use_template: bool = True,
    flag_settings: dict | None = None,
    system_prompt: str | None = None,
) -> int:
    """Run the chat app until the user quits; the exit status (2 when the model failed to load,
    130 after a SIGINT from outside: a partial answer is kept and the terminal restored).

    engine_factory(progress) loads the model inside the app (in a worker thread, with a loading
    screen); it may call progress("...") with a line to show, and returns an Engine or
    (Engine, use_template). SmolLMError it raises is shown in the UI with what to do.
    """
    app = ChatApp(
        engine_factory,
        thinking=thinking,
        sampling=sampling,
        max_new_tokens=max_new_tokens,
        resume=resume,
        model_label=model_label,
        use_template=use_template,
        flag_settings=flag_settings,
        system_prompt=system_prompt,
        catch_sigint=True,
    )
    code = app.run()
    if app.return_code:  # the app failed (Textual has printed why)
        return app.return_code
    return code if isinstance(code, int) else 0
