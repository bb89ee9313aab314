"""The MLX backend (Apple Silicon via Metal; Linux via mlx[cpu], for tests). Needs mlx and mlx-lm."""

from importlib.util import find_spec

from ..errors import BackendUnavailable

if find_spec("mlx") is None or find_spec("mlx_lm") is None:
    hint = 'pip install "smollm3[mlx]" on Apple Silicon, "smollm3[mlx-cpu]" elsewhere'
    raise BackendUnavailable(f"the MLX backend needs mlx and mlx-lm ({hint})")
