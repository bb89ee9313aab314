"""Keeping the backends' resident memory to what they use (glibc on Linux; elsewhere these do
nothing).

A quantized model's weights stay mapped from the file, so past them our resident set is the
runtime's: the heap, and for the torch backend torch itself. `import torch` leaves ~110 MB of its
shared libraries resident (libtorch_cpu.so alone 92 MB): pages its operator registry's static
constructors run through once and that a CPU session mostly never reads again."""

from __future__ import annotations

import ctypes
import functools
import os
import sys

MADV_PAGEOUT = 21  # Linux 5.4+: reclaim these pages now; a page read again faults back from its file


@functools.cache
def _libc():
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        libc.malloc_trim.argtypes = [ctypes.c_size_t]
        return libc
    except (OSError, AttributeError):  # not glibc (macOS, musl)
        return None


def return_freed_memory() -> None:
    """Hand freed heap memory back to the OS. Repacking leaves glibc's heap fragmented by
    temporaries (measured: 240 MB held after loading the 98 MB SmolLM2), which would
    otherwise stay in our resident set for the whole session."""
    if (libc := _libc()) is not None:
        libc.malloc_trim(0)


def library_ranges(package_dir: str) -> list[tuple[int, int]]:
    """The read-only mappings of the shared libraries under `package_dir` ([start, end)
    addresses): code and constants, which the kernel can drop and read again from the file at
    any time."""
    lib_dir = os.path.join(package_dir, "")
    ranges = []
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                fields = line.split(maxsplit=5)
                if len(fields) == 6 and "w" not in fields[1] and fields[5].startswith(lib_dir) and ".so" in fields[5]:
                    start, end = fields[0].split("-")
                    ranges.append((int(start, 16), int(end, 16)))
    except OSError:
        return []
    return ranges


def release_library_pages(package_dir: str) -> int:
    """Reclaim the resident pages of a package's libraries (torch's: see the module's docstring)
    and return the bytes of mappings advised. Code a forward runs comes back on its first use
    (~20 MB of libtorch_cpu.so for a CPU forward, measured); pages shared with another process
    stay. Writable mappings (relocated data) are never touched."""
    libc = _libc() if sys.platform.startswith("linux") else None
    if libc is None:
        return 0
    advised = 0
    for start, end in library_ranges(package_dir):
        if libc.madvise(start, end - start, MADV_PAGEOUT) == 0:
            advised += end - start
    return advised
