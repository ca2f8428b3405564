
import os as _os

# transformers prints an advisory at import when PyTorch is absent (the core install has no torch): not
# this project's business, and it would be every run's first line.
_os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

# $DCSFT_COMPILATION_CACHE: a persistent compilation cache, one folder per kind of process (compile_cache.py).
from dcsft_jax import compile_cache as _compile_cache  # noqa: E402

_compile_cache.configure()
