"""Ctrl-C in one-shot mode, in a real subprocess: during the download, the load, the prefill and
the decode, `smollm3` exits with 130 within 1 s of the signal, with what was streamed flushed
and the terminal as it was; an interrupted download is resumed by the next run.

The child runs app/__main__.py exactly as `python -m app` does, with one addition: each trace
span it enters ("load", "prefill", "decode", ...) is written to a pipe, so the test signals
the child in the phase it means to interrupt instead of guessing from the clock.
"""

import hashlib
import os
import re
import select
import signal
import subprocess
import sys
import termios
import threading
import time
from pathlib import Path

import pytest

from conftest import tiny_gguf
from fake_hub import GGUF_NAME, GGUF_REPO, FakeHub, smollm3_repos

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="SIGINT to a child process is a POSIX matter")

EXIT_BOUND_S = 1.0  # from the signal to the process's exit
MiB = 1 << 20

CHILD = """
import contextlib, os, runpy, signal, sys
# As a user's shell starts it: a suite started in the background (`cmd &` in a script) would
# otherwise hand every child SIGINT ignored.
signal.signal(signal.SIGINT, signal.default_int_handler)
from backends import tracing
phase_fd = int(os.environ["SMOLLM3_TEST_PHASE_FD"])
def reporting(plain_span):
    @contextlib.contextmanager
    def span(self, name, **args):
        os.write(phase_fd, name.encode() + b"\\n")
        with plain_span(self, name, **args):
            yield
    return span
# The CLI keeps no spans unless --tracing: its NullTracer reports phases too.
tracing.Tracer.span = reporting(tracing.Tracer.span)
tracing.NullTracer.span = reporting(tracing.NullTracer.span)
sys.argv[0] = "smollm3"
runpy.run_module("app", run_name="__main__", alter_sys=True)
"""


class Child:
    """`smollm3 ARGS` as a subprocess, its stdout, stderr and phases collected by threads."""

    def __init__(self, args: list[str], env: dict | None = None, cwd: Path | None = None, stdout_fd: int | None = None):
        read_phase, write_phase = os.pipe()
        env = {**os.environ, **(env or {}), "SMOLLM3_TEST_PHASE_FD": str(write_phase)}
        self.proc = subprocess.Popen(
            [sys.executable, "-c", CHILD, *args],
            stdin=subprocess.DEVNULL if stdout_fd is None else stdout_fd,
            stdout=subprocess.PIPE if stdout_fd is None else stdout_fd,
            stderr=subprocess.PIPE,
            env=env,
            cwd=cwd,
            pass_fds=(write_phase,),
            start_new_session=True,  # our own process group: a stray SIGINT never reaches pytest
        )
        os.close(write_phase)
        self.out = b""
        self.err = b""
        self.phases: list[str] = []
        self.first_output = threading.Event()
        self._threads = [
            threading.Thread(target=self._collect_phases, args=(read_phase,), daemon=True),
            threading.Thread(target=self._collect_err, daemon=True),
        ]
        if stdout_fd is None:
            stdout = self.proc.stdout.fileno()
            self._threads.append(threading.Thread(target=self._collect_out, args=(stdout,), daemon=True))
        for t in self._threads:
            t.start()

    def _collect_phases(self, fd: int) -> None:
        pending = b""
        while chunk := os.read(fd, 4096):
            pending += chunk
            *lines, pending = pending.split(b"\n")
            self.phases.extend(line.decode() for line in lines)
        os.close(fd)

    def _collect_err(self) -> None:
        while chunk := self.proc.stderr.read1(4096):
            self.err += chunk

    def _collect_out(self, fd: int) -> None:
        # A pty's master never reads end-of-file while the test holds the slave open: stop once
        # the child has exited and nothing is left to read.
        while True:
            ready, _, _ = select.select([fd], [], [], 0.05)
            if not ready:
                if self.proc.poll() is not None:
                    return
                continue
            try:
                chunk = os.read(fd, 4096)
            except OSError:  # EIO: the pty's last writer is gone
                return
            if not chunk:
                return
            self.out += chunk
            if self.out.strip():
                self.first_output.set()

    def wait_for(self, condition, what: str, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if self.proc.poll() is not None:
                err = self.err.decode()[-2000:]
                raise AssertionError(f"the CLI exited ({self.proc.returncode}) before {what}: {err}")
            if time.monotonic() > deadline:
                self.proc.kill()
                raise AssertionError(f"no {what} within {timeout} s; phases so far: {self.phases[-5:]}")
            time.sleep(0.01)

    def interrupt(self) -> float:
        """Send SIGINT as Ctrl-C would; the seconds until the process has exited."""
        self.proc.send_signal(signal.SIGINT)
        sent = time.monotonic()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise AssertionError("the CLI ignored Ctrl-C for 30 s") from None
        elapsed = time.monotonic() - sent
        for t in self._threads:
            t.join(timeout=10)
        return elapsed

    def finish(self, timeout: float = 300) -> int:
        code = self.proc.wait(timeout=timeout)
        for t in self._threads:
            t.join(timeout=10)
        return code


def assert_interrupted(child: Child, elapsed: float) -> None:
    err = child.err.decode(errors="replace")
    assert child.proc.returncode == 130, err[-3000:]
    assert elapsed < EXIT_BOUND_S, f"exited {elapsed:.2f} s after SIGINT"
    assert err.rstrip().endswith("smollm3: interrupted") and "Traceback" not in err, err[-3000:]


TINY_ARGS = ["--model-path", str(tiny_gguf("Q8_0")), "--temperature", "0"]


def test_ctrl_c_during_the_load():
    # On torch: its load imports torch and builds the engine (seconds); the native backend's
    # loads the tiny model in a tenth of that, too short to aim a signal at.
    child = Child(TINY_ARGS + ["--backend", "torch", "--prompt", "Hello", "-n", "5"])
    child.wait_for(lambda: "load" in child.phases, "load")
    time.sleep(0.3)  # well inside it
    elapsed = child.interrupt()
    assert_interrupted(child, elapsed)
    assert "prefill" not in child.phases
    assert child.out == b""


def test_ctrl_c_during_the_prefill():
    # ~2,900 tokens fed one at a time: most of the tiny model's context, about a second of
    # prefill on a fast CPU (3,500 tokens/s), so the signal sent as the prefill starts lands
    # inside it.
    long_prompt = "hello world " * 700
    child = Child(TINY_ARGS + ["--split-prompt", "--prompt", long_prompt, "-n", "5"])
    child.wait_for(lambda: "prefill" in child.phases, "prefill")
    time.sleep(0.05)
    elapsed = child.interrupt()
    assert_interrupted(child, elapsed)
    assert "decode" not in child.phases and "sample" not in child.phases
    assert child.out == b"\n"  # nothing generated; the line is ended


def test_ctrl_c_during_the_decode_keeps_what_was_streamed():
    child = Child(TINY_ARGS + ["--prompt", "Tell me a story", "-n", "4000"])
    child.wait_for(child.first_output.is_set, "output")
    streamed = child.out
    elapsed = child.interrupt()
    assert_interrupted(child, elapsed)
    assert "decode" in child.phases
    assert child.out.startswith(streamed) and child.out.endswith(b"\n")
    assert len(child.out.strip()) >= len(streamed.strip()) > 0
    # The statistics of what was generated, as llama-cli prints them, before the last line.
    stats = child.err.decode().splitlines()[-3:]
    assert re.fullmatch(r" *\d+ prompt tokens processed: [\d.]+ token/s", stats[0]), stats
    generated = re.fullmatch(r" *(\d+) tokens generated: [\d.]+ token/s", stats[1])
    assert generated and int(generated.group(1)) >= 1, stats


SGR = re.compile(rb"\x1b\[[0-9;]*m")


def test_ctrl_c_on_a_terminal_leaves_it_as_it_was():
    master, slave = os.openpty()
    try:
        before = termios.tcgetattr(slave)
        child = Child(TINY_ARGS + ["--thinking", "--prompt", "Tell me a story", "-n", "4000"], stdout_fd=slave)
        reader = threading.Thread(target=child._collect_out, args=(master,), daemon=True)
        reader.start()
        child._threads.append(reader)
        child.wait_for(child.first_output.is_set, "output")
        elapsed = child.interrupt()
        assert_interrupted(child, elapsed)
        assert termios.tcgetattr(slave) == before  # echo, line mode: untouched
        styles = SGR.findall(child.out)
        assert not styles or styles[-1] in (b"\x1b[0m", b"\x1b[m")  # not left dim
        assert child.out.endswith(b"\r\n")  # the cursor is on a fresh line
    finally:
        os.close(slave)
        os.close(master)


def test_ctrl_c_during_the_download_keeps_a_partial_file_the_next_run_resumes(tmp_path):
    gguf = tiny_gguf("Q4_K_M").read_bytes()
    etag = hashlib.sha256(gguf).hexdigest()
    blobs = tmp_path / "hf" / "hub" / ("models--" + GGUF_REPO.replace("/", "--")) / "blobs"
    args = ["--quantization", "q4_k_m", "--prompt", "hi", "-n", "3", "--temperature", "0"]
    with FakeHub(smollm3_repos()) as hub:
        env = hub.env(tmp_path / "hf")
        hub.throttle(GGUF_NAME, bytes_per_s=MiB)  # 3.7 MB: seconds of download to interrupt
        child = Child(args, env=env)
        child.wait_for(lambda: hub.bytes_sent.get(GGUF_NAME, 0) >= 1.5 * MiB, "download")
        elapsed = child.interrupt()
        assert_interrupted(child, elapsed)
        assert child.phases == [] and child.out == b""
        assert not (blobs / etag).exists() and not list(blobs.parent.glob(f"snapshots/*/{GGUF_NAME}"))
        partial = (blobs / f"{etag}.incomplete").read_bytes()
        assert len(partial) >= MiB and gguf.startswith(partial)

        hub.clear()
        again = Child(args, env=env)
        assert again.finish() == 0, again.err.decode()[-3000:]
        assert hub.requests_for(GGUF_NAME, "GET")[-1].range == f"bytes={len(partial)}-"
        assert (blobs / etag).read_bytes() == gguf
        assert not list(blobs.glob("*.incomplete"))
        assert again.out.strip()
