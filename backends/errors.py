"""Typed errors raised where a problem arises; the CLI/TUI turn them into one line."""


class SmolLMError(Exception):
    """Base class: anything the user can fix by changing input, flags or files."""


class CheckpointError(SmolLMError):
    """A checkpoint is missing, truncated, corrupt, or of an unsupported kind."""


class UnsupportedTensorType(CheckpointError):
    """A tensor is stored in a GGML type we cannot compute with."""


class TokenizerError(SmolLMError):
    """The tokenizer could not be built from the checkpoint or the given file."""


class TemplateError(SmolLMError):
    """The chat template failed to compile or render."""


class ContextOverflow(SmolLMError):
    """The prompt (plus what is to be generated) does not fit the model's context."""


class ResolutionError(SmolLMError):
    """A model name, quantization or path could not be resolved to a checkpoint."""


class BackendUnavailable(SmolLMError):
    """The requested backend or device is not usable on this machine."""
