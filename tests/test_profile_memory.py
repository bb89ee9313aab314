"""bench/profile_memory.py: every phase of the one-shot path reported, with figures that add up."""

import re
import subprocess
import sys
from pathlib import Path

from conftest import tiny_gguf

SCRIPT = Path(__file__).parent.parent / "bench" / "profile_memory.py"
PHASE = re.compile(r"^(.+?)\s+([\d.]+)s\s+cpu\s+([\d.]+)s\s+RSS\s+(\d+) MiB\s+peak\s+(\d+)\s+anon\s+(\d+)\s+file\s+(\d+)$")


def test_reports_each_phase_with_rss_at_most_peak():
    r = subprocess.run([sys.executable, str(SCRIPT), str(tiny_gguf("Q8_0")), "--tokens", "3", "-n", "8", "--smaps", "--modules"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    phases = [m.groups() for line in r.stdout.splitlines() if (m := PHASE.match(line))]
    names = [p[0] for p in phases]
    assert names[:4] == ["python", "import backends", "import app.cli", "load"]
    assert names[4].startswith("first token (p=") and re.fullmatch(r"\d+ tokens \(\d+ texts\)", names[5])
    peaks = [int(p[4]) for p in phases]
    assert peaks == sorted(peaks)  # a high-water mark never goes down
    for _, _, _, rss, peak, anon, file in phases:
        assert int(rss) <= int(peak) and int(anon) + int(file) <= int(rss) + 1  # MiB rounding
    imported = [line.split("imported:")[1] for line in r.stdout.splitlines() if "imported:" in line]
    assert imported and not any("torch" in line for line in imported)  # --modules: a GGUF runs without torch
    assert "MiB (" in r.stdout.split(names[5], 1)[1]  # --smaps: the largest mappings follow
