"""Time the native matmul alone over every quantized weight of a GGUF, at a prompt's row counts:
what a prefill spends in matmuls, without the rest of the model or the peers.

    python bench/matmul.py FILE.gguf --rows 1,16,128
    python bench/matmul.py FILE.gguf --rows 128 --cflags='-mno-avx512f -mno-amx-tile -mno-amx-int8'   # another CPU's build

--cflags builds the kernels with this CPU's features less some (an AVX2 machine's build on an
AVX-512 one), as tests/test_torch_native.py does; the default is the build smollm3 loads.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import gguf  # noqa: E402
import torch  # noqa: E402

from backends.torch import native  # noqa: E402


def library(cflags: str):
    if not cflags:
        return native.library()
    out = Path(tempfile.mkdtemp()) / "cpu_kernels.so"
    flags = ["-O3", "-fPIC", "-shared", "-fopenmp", "-std=c11", "-march=native", *shlex.split(cflags)]
    subprocess.run([native.compiler(), *flags, str(native.SOURCE), "-o", str(out), "-lm"], check=True, timeout=300)
    return native.load(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("file", type=Path)
    parser.add_argument("--rows", default="1,16,128", help="activation rows per call (prompt tokens), comma-separated")
    parser.add_argument("--reps", type=int, default=3, help="best of this many sweeps")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--cflags", default="", help="extra compiler flags: a build without some of this CPU's features")
    args = parser.parse_args()
    lib = library(args.cflags)
    if lib is None:
        sys.exit("error: the native kernels are not available here (no C compiler, or SMOLLM3_NATIVE=0)")
    try:
        reader = gguf.GGUFReader(args.file)
    except (OSError, ValueError) as e:
        sys.exit(f"error: {args.file}: not a readable GGUF ({e})")
    warnings.filterwarnings("ignore", message="The given NumPy array is not writable")  # the kernels only read the mapped blocks
    weights = [(int(t.tensor_type), torch.from_numpy(t.data.reshape(int(t.shape[1]), -1)), int(t.shape[0]))
               for t in reader.tensors
               if len(t.shape) == 2 and t.name != "token_embd.weight" and lib.gguf_matmul_supports(int(t.tensor_type), int(t.shape[0]))]
    total = sum(w.numel() for _, w, _ in weights)
    for M in [int(r) for r in args.rows.split(",")]:
        inputs = [torch.randn(M, K) for _, _, K in weights]

        def sweep():
            for (ggml_type, w, _), x in zip(weights, inputs):
                native.gguf_matmul(lib, ggml_type, w, x, threads=args.threads)

        sweep()
        best = float("inf")
        for _ in range(args.reps):
            t0 = time.perf_counter()
            sweep()
            best = min(best, time.perf_counter() - t0)
        print(f"{args.file.name} rows={M} threads={args.threads}: {best * 1e3:.1f} ms ({len(weights)} weights, "
              f"{total / 1e9:.2f} GB; {M / best:.1f} rows/s through the matmuls)")


if __name__ == "__main__":
    main()
