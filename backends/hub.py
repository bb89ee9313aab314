"""Fetching checkpoints from the Hugging Face Hub into its standard cache (HF_HUB_CACHE).

huggingface_hub 2.4 downloads into a process-unique temporary file that it deletes when the
transfer fails, so after Ctrl-C or a dropped connection the next run starts from zero. We
fetch each blob ourselves, through huggingface_hub's HTTP session and with its progress bar,
into `blobs/<etag>.incomplete`: that file outlives an interruption, and a dropped connection
(in this run) or the next run resumes it with a Range request. The blob gets its final name
only once its size, and its sha256 for LFS files, are right; huggingface_hub then links it
into the snapshot and writes the refs as usual, so `hf cache` and offline mode see an ordinary
cache. Offline (HF_HUB_OFFLINE=1) everything comes from the cache without a single request."""

from __future__ import annotations

import hashlib
import os
import re
import time
from pathlib import Path
from urllib.parse import urlsplit

from .errors import ResolutionError

# A Hugging Face model directory is its top-level config, safetensors and tokenizer files.
# Pickles (*.bin, *.pt, ...) can run code when loaded: never fetched, never read.
HF_DIR_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "tokenizer*", "*.txt"]
HF_DIR_IGNORE = ["*/*", "*.bin", "*.pt", "*.pth", "*.pkl", "*.pickle", "*.ckpt", "*.h5", "*.msgpack"]

_SHA256 = re.compile(r"[0-9a-f]{64}")
_CHUNK = 1 << 20  # written as received: an interruption loses at most this much of what arrived
_RETRIES = 3  # reconnections in a row without a byte of progress before a dropped download fails


class FileNotOnHub(ResolutionError):
    """The repository exists on the Hub but has no file of that name."""


def download_file(repo: str, filename: str, revision: str | None = None) -> Path:
    """The cached path of one file of a model repository, downloaded (or resumed) if needed."""
    from huggingface_hub import get_hf_file_metadata, hf_hub_download, hf_hub_url, is_offline_mode

    what = f"{repo}/{filename}"
    if is_offline_mode():
        from huggingface_hub.errors import LocalEntryNotFoundError

        try:
            return Path(hf_hub_download(repo, filename, revision=revision))
        except LocalEntryNotFoundError:
            raise ResolutionError(_offline_missing(what, f"hf download {repo} {filename}")) from None
        except Exception as e:
            raise ResolutionError(f"{what}: {_reason(e)}") from None
    url = hf_hub_url(repo, filename, revision=revision)
    try:
        meta = get_hf_file_metadata(url)  # one HEAD, no retries
        if meta.commit_hash is None or meta.etag is None:
            raise ResolutionError(f"{_endpoint()} does not answer like the Hugging Face Hub "
                                  "(no X-Repo-Commit or ETag); check HF_ENDPOINT")
    except ResolutionError:
        raise
    except Exception as e:
        _raise_if_definite(e, repo, what)
        cached = _cached_file(repo, filename, revision)
        if cached is not None:  # the Hub is down or unreachable, but we have the file
            return cached
        raise ResolutionError(_unreachable_and_not_cached(what, e)) from None
    # Without a redirect to a CDN, fetch by commit: the bytes cannot change under a moving branch.
    source = hf_hub_url(repo, filename, revision=meta.commit_hash) if meta.location == url else meta.location
    _fetch_blob(what, repo, meta, source)
    try:  # links the blob into snapshots/<commit>/ and records refs/<revision>
        return Path(hf_hub_download(repo, filename, revision=revision))
    except Exception as e:
        _raise_if_definite(e, repo, what)
        raise ResolutionError(f"{what}: {_reason(e)}") from None


def download_repo(repo: str) -> Path:
    """A Hugging Face model directory in the cache: config, safetensors and tokenizer files, never pickles."""
    from huggingface_hub import HfApi, is_offline_mode
    from huggingface_hub.utils import filter_repo_objects

    if is_offline_mode():
        return _cached_snapshot(repo, offline=True)
    try:
        info = HfApi().model_info(repo)
    except Exception as e:
        _raise_if_definite(e, repo, repo)
        try:
            return _cached_snapshot(repo, offline=False)
        except ResolutionError:
            raise ResolutionError(_unreachable_and_not_cached(repo, e)) from None
    siblings = [s.rfilename for s in info.siblings or []]
    names = list(filter_repo_objects(siblings, allow_patterns=HF_DIR_PATTERNS, ignore_patterns=HF_DIR_IGNORE))
    if not any(name.endswith(".safetensors") for name in names):
        raise ResolutionError(f"{repo} has no safetensors weights (pickled checkpoints such as *.bin are never loaded)")
    for name in names:  # one by one in this thread: resumable, and Ctrl-C stops at once
        download_file(repo, name, revision=info.sha)
    try:  # every blob is here: this records refs/main and the tree listing offline mode checks against
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo, allow_patterns=HF_DIR_PATTERNS, ignore_patterns=HF_DIR_IGNORE,
                                      tqdm_class=_silent_tqdm()))  # nothing left to show progress for
    except Exception as e:
        _raise_if_definite(e, repo, repo)
        raise ResolutionError(f"{repo}: {_reason(e)}") from None


def list_repo_files(repo: str) -> list[str] | None:
    """The repository's file names, or None when the Hub cannot be asked (offline, unreachable)."""
    from huggingface_hub import HfApi, is_offline_mode

    if is_offline_mode():
        return None
    try:  # model_info is one request without retries, unlike the paginated tree listing
        return [s.rfilename for s in HfApi().model_info(repo).siblings or []]
    except Exception:
        return None


# --- the resumable blob download ---------------------------------------------------------------


def _fetch_blob(what: str, repo: str, meta, source: str) -> None:
    from huggingface_hub.utils import WeakFileLock, build_hf_headers

    storage = _storage_folder(repo)
    blob = storage / "blobs" / meta.etag
    if blob.exists():
        return
    partial = blob.with_name(blob.name + ".incomplete")
    lock = _cache_dir() / ".locks" / storage.name / f"{meta.etag}.lock"  # the lock huggingface_hub takes for it
    lock.parent.mkdir(parents=True, exist_ok=True)
    blob.parent.mkdir(parents=True, exist_ok=True)
    headers = build_hf_headers()
    headers["Accept-Encoding"] = "identity"  # byte offsets must be offsets in the file
    if urlsplit(source).netloc != urlsplit(_endpoint()).netloc:
        headers.pop("authorization", None)  # a signed CDN URL: the token stays on the Hub
    with WeakFileLock(lock):
        if blob.exists():
            return
        if meta.size is not None and partial.exists() and partial.stat().st_size > meta.size:
            partial.unlink()
        try:
            _stream_into(partial, source, headers, meta.size, label=Path(what).name)
        except Exception as e:
            have = partial.stat().st_size if partial.exists() else 0
            if _status(e) == 416:  # the server rejects our offset: the partial file is not worth keeping
                partial.unlink(missing_ok=True)
            raise ResolutionError(
                f"{what}: download interrupted at {_size(have)} of {_size(meta.size)} ({_reason(e)}); "
                "run the same command again to resume it"
            ) from None
        _verify(what, partial, meta)
        os.replace(partial, blob)


def _stream_into(partial: Path, source: str, headers: dict, size: int | None, label: str) -> None:
    """Append the rest of `source` to `partial`, asking for it with a Range from where it stops.

    A dropped connection is resumed at once, up to _RETRIES times in a row without progress; an
    HTTP error is final. Each chunk is written as it arrives, so an interruption loses at most
    one chunk of what was received.
    """
    import httpx2
    from huggingface_hub import constants
    from huggingface_hub.utils import get_session, hf_raise_for_status
    from huggingface_hub.utils import tqdm as hf_tqdm

    done = partial.stat().st_size if partial.exists() else 0
    failures = 0
    # disable=None: a bar on a terminal only, like the CLI's other progress chatter (and off with
    # HF_HUB_DISABLE_PROGRESS_BARS=1).
    with hf_tqdm(total=size, initial=done, unit="B", unit_scale=True, unit_divisor=1024, desc=label,
                 disable=None, name="huggingface_hub.http_get") as bar:
        while size is None or done < size:
            request_headers = {**headers, "Range": f"bytes={done}-"} if done else headers
            try:
                with get_session().stream("GET", source, headers=request_headers,
                                          timeout=constants.HF_HUB_DOWNLOAD_TIMEOUT) as response:
                    hf_raise_for_status(response)
                    if done and response.status_code != 206:  # the server ignored the Range: start over
                        bar.update(-done)
                        done = 0
                    with partial.open("ab" if done else "wb") as f:
                        for chunk in response.iter_bytes(_CHUNK):
                            f.write(chunk)
                            done += len(chunk)
                            bar.update(len(chunk))
                            failures = 0
                if size is None:
                    return  # no promised size: the server's end of body is the end of the file
                if done < size:
                    raise httpx2.RemoteProtocolError("the body ended early")
            except httpx2.TransportError:  # dropped, refused, timed out: resume from what we have
                failures += 1
                if failures > _RETRIES:
                    raise
                time.sleep(0.2 * failures)


def _verify(what: str, partial: Path, meta) -> None:
    size = partial.stat().st_size
    problem = None
    if meta.size is not None and size != meta.size:
        problem = f"it has {size} bytes, the Hub says {meta.size}"
    elif _SHA256.fullmatch(meta.etag):  # LFS files: the ETag is the content's sha256
        h = hashlib.sha256()
        with partial.open("rb") as f:
            while chunk := f.read(1 << 22):
                h.update(chunk)
        if h.hexdigest() != meta.etag:
            problem = f"its sha256 is {h.hexdigest()[:12]}..., the Hub says {meta.etag[:12]}..."
    if problem:
        partial.unlink()
        raise ResolutionError(f"{what}: the download is corrupt ({problem}); "
                              "it was deleted, run again to download it anew")


def _silent_tqdm():
    from huggingface_hub.utils import tqdm as hf_tqdm

    class Silent(hf_tqdm):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **{**kwargs, "disable": True})

    return Silent


# --- the cache ----------------------------------------------------------------------------------


def _cache_dir() -> Path:
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE).expanduser()


def _endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT


def _storage_folder(repo: str) -> Path:
    from huggingface_hub.file_download import repo_folder_name

    return _cache_dir() / repo_folder_name(repo_id=repo, repo_type="model")


def _cached_file(repo: str, filename: str, revision: str | None) -> Path | None:
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo, filename, revision=revision)
    return Path(found) if isinstance(found, str) else None


def _cached_snapshot(repo: str, offline: bool) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import IncompleteSnapshotError

    try:
        return Path(snapshot_download(repo, allow_patterns=HF_DIR_PATTERNS, ignore_patterns=HF_DIR_IGNORE,
                                      local_files_only=True))
    except IncompleteSnapshotError:
        if offline:
            raise ResolutionError(f"the cached copy of {repo} is incomplete and HF_HUB_OFFLINE=1 forbids finishing it; "
                                  "run once without HF_HUB_OFFLINE to complete the download") from None
        raise ResolutionError(f"the cached copy of {repo} is incomplete") from None
    except Exception:
        if offline:
            raise ResolutionError(_offline_missing(repo, f"hf download {repo}")) from None
        raise ResolutionError(f"{repo} is not in the Hugging Face cache ({_cache_dir()})") from None


def _unreachable_and_not_cached(what: str, e: Exception) -> str:
    return f"{what}: {_reason(e)}, and it is not in the Hugging Face cache ({_cache_dir()})"


def _offline_missing(what: str, command: str) -> str:
    return (f"{what} is not in the Hugging Face cache ({_cache_dir()}) and HF_HUB_OFFLINE=1 forbids downloading it; "
            f"run once without HF_HUB_OFFLINE to download it (or `{command}` on a connected machine, "
            "then copy the cache over)")


# --- errors -------------------------------------------------------------------------------------


def _raise_if_definite(e: Exception, repo: str, what: str) -> None:
    """Answers from the Hub that no cache or retry can fix become one line each."""
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    if isinstance(e, GatedRepoError):
        raise ResolutionError(f"{repo} is gated: accept its terms on the Hub, then `hf auth login`") from None
    if isinstance(e, RepositoryNotFoundError):
        raise ResolutionError(f"{repo}: no such repository on the Hub (or it is private: `hf auth login`)") from None
    if isinstance(e, RevisionNotFoundError):
        raise ResolutionError(f"{what}: no such revision on the Hub") from None
    if isinstance(e, EntryNotFoundError) and _status(e) == 404:
        raise FileNotOnHub(f"{what}: no such file in the repository") from None
    if _status(e) in (401, 403):
        raise ResolutionError(f"{what}: access denied by the Hub ({_reason(e)}); "
                              "check your token (`hf auth login`)") from None


def _status(e: Exception) -> int | None:
    response = getattr(e, "response", None)
    return getattr(response, "status_code", None)


def _reason(e: Exception) -> str:
    """What went wrong, in a few words (huggingface_hub's own messages run over several lines)."""
    import httpx2

    status = _status(e)
    if status is not None:
        phrase = getattr(e.response, "reason_phrase", "") or ""
        return f"the Hub answered {status} {phrase}".rstrip()
    if isinstance(e, httpx2.ConnectError):
        return f"cannot connect to {_endpoint()}"
    if isinstance(e, httpx2.TimeoutException):
        return f"{_endpoint()} timed out"
    if isinstance(e, (httpx2.RemoteProtocolError, httpx2.ReadError)):
        return "the connection dropped"
    first_line = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {first_line}" if first_line else type(e).__name__


def _size(n: int | None) -> str:
    if n is None:
        return "an unknown size"
    return f"{n / 1e6:.1f} MB" if n >= 100_000 else f"{n} bytes"
