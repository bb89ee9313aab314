"""Fetching checkpoints from the Hugging Face Hub into its standard cache.

huggingface_hub downloads into a temporary `.incomplete` file and renames it only when
whole, resumes it on the next run, shows progress bars, and serves the cache offline.
"""

from __future__ import annotations

from pathlib import Path

from .errors import ResolutionError

HF_DIR_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "tokenizer*", "*.txt"]


def _hub_error(what: str, e: Exception) -> ResolutionError:
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    if isinstance(e, LocalEntryNotFoundError):
        return ResolutionError(f"{what} is not in the Hugging Face cache and the Hub cannot be reached (offline?)")
    if isinstance(e, GatedRepoError):
        return ResolutionError(f"{what}: the repository is gated; accept its terms on the Hub and run `hf auth login`")
    if isinstance(e, RepositoryNotFoundError):
        return ResolutionError(f"{what}: no such repository on the Hub (or it is private)")
    if isinstance(e, (EntryNotFoundError, RevisionNotFoundError)):
        return ResolutionError(f"{what}: no such file in the repository")
    return ResolutionError(f"{what}: download failed ({type(e).__name__}: {e})")


def download_file(repo: str, filename: str) -> Path:
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(repo, filename))
    except Exception as e:  # every failure of the Hub client becomes one line for the user
        raise _hub_error(f"{repo}/{filename}", e) from None


def download_repo(repo: str) -> Path:
    """A Hugging Face model directory (config, safetensors shards, tokenizer files; never pickles)."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo, allow_patterns=HF_DIR_PATTERNS))
    except Exception as e:
        raise _hub_error(repo, e) from None


def list_repo_files(repo: str) -> list[str] | None:
    """The repository's file names, or None when the Hub cannot be asked."""
    from huggingface_hub import list_repo_files as hub_list

    try:
        return hub_list(repo)
    except Exception:
        return None
