"""backends/hub.py against a local fake Hub: downloads land in the standard cache, resume after a
dropped connection (in the same run and in the next), never leave a complete-looking partial
file, and turn every failure into one line; offline mode uses the cache without a request."""

import hashlib

import pytest
from huggingface_hub import constants

from backends.errors import ResolutionError
from backends.hub import FileNotOnHub, download_file, download_repo, list_repo_files
from conftest import TINY_HF, tiny_gguf
from fake_hub import FULL_REPO, GGUF_NAME, GGUF_REPO, PICKLES, FakeHub, point_huggingface_hub_at, smollm3_repos

MiB = 1 << 20
GGUF_BYTES = tiny_gguf("Q4_K_M").read_bytes()


@pytest.fixture
def hub(tmp_path, monkeypatch):
    with FakeHub(smollm3_repos()) as hub:
        point_huggingface_hub_at(hub, tmp_path / "hf", monkeypatch)
        yield hub


def storage(tmp_path, repo: str):
    return tmp_path / "hf" / "hub" / ("models--" + repo.replace("/", "--"))


def leftovers(tmp_path, repo: str) -> list[str]:
    return sorted(p.name for p in (storage(tmp_path, repo) / "blobs").glob("*.incomplete"))


def test_gguf_lands_in_the_standard_cache(hub, tmp_path):
    path = download_file(GGUF_REPO, GGUF_NAME)
    sha = hub.sha(GGUF_REPO)
    assert path == storage(tmp_path, GGUF_REPO) / "snapshots" / sha / GGUF_NAME
    assert path.read_bytes() == GGUF_BYTES
    assert path.resolve() == storage(tmp_path, GGUF_REPO) / "blobs" / hashlib.sha256(GGUF_BYTES).hexdigest()
    assert (storage(tmp_path, GGUF_REPO) / "refs" / "main").read_text() == sha
    assert leftovers(tmp_path, GGUF_REPO) == []
    gets = hub.requests_for(GGUF_NAME, "GET")
    assert len(gets) == 1 and gets[0].range is None and gets[0].path == f"/{GGUF_REPO}/resolve/{sha}/{GGUF_NAME}"


def test_a_cached_file_is_not_fetched_again(hub):
    first = download_file(GGUF_REPO, GGUF_NAME)
    assert download_file(GGUF_REPO, GGUF_NAME) == first
    assert len(hub.requests_for(GGUF_NAME, "GET")) == 1


def test_dropped_connection_is_resumed_in_the_same_run(hub, tmp_path):
    hub.drop(GGUF_NAME, after=2 * MiB + 12345)
    path = download_file(GGUF_REPO, GGUF_NAME)
    assert path.read_bytes() == GGUF_BYTES
    ranges = [r.range for r in hub.requests_for(GGUF_NAME, "GET")]
    assert ranges == [None, f"bytes={2 * MiB}-"]  # what arrived whole (2 chunks) was kept
    assert leftovers(tmp_path, GGUF_REPO) == []


def test_interrupted_download_fails_in_one_line_and_the_next_run_resumes(hub, tmp_path):
    hub.drop(GGUF_NAME, after=2 * MiB + 12345)
    hub.fail(GGUF_NAME, 503, methods=("GET",))  # the Hub goes down after the drop
    with pytest.raises(ResolutionError) as e:
        download_file(GGUF_REPO, GGUF_NAME)
    message = str(e.value)
    assert message == (
        f"{GGUF_REPO}/{GGUF_NAME}: download interrupted at 2.1 MB of {len(GGUF_BYTES) / 1e6:.1f} MB "
        "(the Hub answered 503 Service Unavailable); run the same command again to resume it"
    )
    etag = hashlib.sha256(GGUF_BYTES).hexdigest()
    blobs = storage(tmp_path, GGUF_REPO) / "blobs"
    assert not (blobs / etag).exists()
    assert not list((storage(tmp_path, GGUF_REPO) / "snapshots").rglob(GGUF_NAME))
    assert leftovers(tmp_path, GGUF_REPO) == [f"{etag}.incomplete"]
    assert (blobs / f"{etag}.incomplete").read_bytes() == GGUF_BYTES[: 2 * MiB]

    hub.clear()
    path = download_file(GGUF_REPO, GGUF_NAME)
    assert path.read_bytes() == GGUF_BYTES
    assert hub.requests_for(GGUF_NAME, "GET")[-1].range == f"bytes={2 * MiB}-"
    assert leftovers(tmp_path, GGUF_REPO) == []


def test_corrupt_partial_file_is_detected_and_deleted(hub, tmp_path):
    etag = hashlib.sha256(GGUF_BYTES).hexdigest()
    blobs = storage(tmp_path, GGUF_REPO) / "blobs"
    blobs.mkdir(parents=True)
    (blobs / f"{etag}.incomplete").write_bytes(b"\0" * MiB)  # not what the Hub has: the sha256 says so
    with pytest.raises(ResolutionError, match=r"the download is corrupt \(its sha256 is .*deleted, run again"):
        download_file(GGUF_REPO, GGUF_NAME)
    assert not list(blobs.iterdir())
    assert download_file(GGUF_REPO, GGUF_NAME).read_bytes() == GGUF_BYTES


@pytest.mark.parametrize("method", ["HEAD", "GET"])
def test_server_error_is_one_line(hub, method):
    hub.fail(GGUF_NAME, 500, methods=(method,))
    with pytest.raises(ResolutionError) as e:
        download_file(GGUF_REPO, GGUF_NAME)
    message = str(e.value)
    assert "\n" not in message and "500 Internal Server Error" in message
    assert message.startswith(f"{GGUF_REPO}/{GGUF_NAME}: ")


def test_hub_down_falls_back_to_the_cache(hub):
    path = download_file(GGUF_REPO, GGUF_NAME)
    hub.fail(GGUF_NAME, 503)
    assert download_file(GGUF_REPO, GGUF_NAME) == path


def test_missing_file_and_missing_repo(hub):
    with pytest.raises(FileNotOnHub, match=f"^{GGUF_REPO}/SmolLM3-3B-Q2_K.gguf: no such file in the repository$"):
        download_file(GGUF_REPO, "SmolLM3-3B-Q2_K.gguf")
    with pytest.raises(ResolutionError, match="^nobody/nothing: no such repository on the Hub"):
        download_file("nobody/nothing", GGUF_NAME)


def test_offline_with_a_cache_makes_no_request(hub, monkeypatch):
    path = download_file(GGUF_REPO, GGUF_NAME)
    snapshot = download_repo(FULL_REPO)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    before = len(hub.requests)
    assert download_file(GGUF_REPO, GGUF_NAME) == path
    assert download_repo(FULL_REPO) == snapshot
    assert list_repo_files(GGUF_REPO) is None
    assert len(hub.requests) == before


def test_offline_without_a_cache_says_what_is_missing(hub, tmp_path, monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ResolutionError) as e:
        download_file(GGUF_REPO, GGUF_NAME)
    assert str(e.value) == (
        f"{GGUF_REPO}/{GGUF_NAME} is not in the Hugging Face cache ({tmp_path / 'hf' / 'hub'}) and HF_HUB_OFFLINE=1 "
        "forbids downloading it; run once without HF_HUB_OFFLINE to download it "
        f"(or `hf download {GGUF_REPO} {GGUF_NAME}` on a connected machine, then copy the cache over)"
    )
    with pytest.raises(ResolutionError, match=f"^{FULL_REPO} is not in the Hugging Face cache .* HF_HUB_OFFLINE=1"):
        download_repo(FULL_REPO)
    assert hub.requests == []


def test_safetensors_directory_without_pickles(hub):
    snapshot = download_repo(FULL_REPO)
    names = sorted(p.name for p in snapshot.iterdir())
    assert names == sorted(p.name for p in TINY_HF.iterdir())
    for p in TINY_HF.iterdir():
        assert (snapshot / p.name).read_bytes() == p.read_bytes()
    fetched = {r.path.split("/resolve/")[1].split("/", 1)[1] for r in hub.requests if "/resolve/" in r.path}
    assert not fetched & set(PICKLES) and "README.md" not in fetched


def test_repository_without_safetensors_is_refused(tmp_path, monkeypatch):
    with FakeHub({"someone/pickled": {"config.json": b"{}", "pytorch_model.bin": b"\x80\x04"}}) as hub:
        point_huggingface_hub_at(hub, tmp_path / "hf", monkeypatch)
        with pytest.raises(ResolutionError, match=r"^someone/pickled has no safetensors weights \(pickled"):
            download_repo("someone/pickled")
        assert not hub.requests_for("pytorch_model.bin")


def test_list_repo_files(hub):
    assert GGUF_NAME in list_repo_files(GGUF_REPO)
    assert list_repo_files("nobody/nothing") is None


class Terminal:
    """A stderr that says it is a terminal, keeping what is written to it."""

    def __init__(self):
        self.text = ""

    def write(self, s):
        self.text += s

    def flush(self):
        pass

    def isatty(self):
        return True


def test_progress_bar_on_a_terminal_only(hub, monkeypatch, capsys):
    terminal = Terminal()
    monkeypatch.setattr("sys.stderr", terminal)
    download_file(GGUF_REPO, GGUF_NAME)
    assert f"{GGUF_NAME}: 100%" in terminal.text and "3.66M/3.66M" in terminal.text


def test_no_progress_bar_in_a_pipe(hub, capsys):
    download_file(GGUF_REPO, GGUF_NAME)
    assert capsys.readouterr().err == ""
