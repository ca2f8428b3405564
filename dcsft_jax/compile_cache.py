"""A persistent XLA compilation cache shared by runs: DCSFT_COMPILATION_CACHE=DIR.

JAX's own cache (JAX_COMPILATION_CACHE_DIR) keys an entry by the program, the XLA flags, the devices
and the versions, but leaves `--xla_force_host_platform_device_count` out of its key and does not tell
a process of a jax.distributed run from a single process, so such processes would read each other's
executables. So every kind of process gets its own subfolder of DIR: the simulated device count, and
the process count once jax.distributed is up. (A test worker that aborted in CI reading a cached
executable was first put down to this; it recurred with these folders, always reading op-by-op init
programs back, and models/family.py now jits the adapters' init instead.) `configure()` runs when dcsft_jax is imported (before any compile in the
project's processes) and again after jax.distributed.initialize (main.maybe_initialize_distributed).
"""
from __future__ import annotations

import os
import re
import sys

ENV = "DCSFT_COMPILATION_CACHE"


def folder(base: str, xla_flags: str, processes: int = 1) -> str:
  """The cache folder for a process: DIR/host{N}[-p{processes}]."""
  m = re.search(r"--xla_force_host_platform_device_count=(\d+)", xla_flags or "")
  tag = f"host{m.group(1) if m else 1}" + (f"-p{processes}" if processes > 1 else "")
  return os.path.join(base, tag)


def configure() -> str | None:
  """Points JAX's persistent cache at this process's folder of $DCSFT_COMPILATION_CACHE (None: unset,
  nothing changes)."""
  base = os.environ.get(ENV)
  if not base:
    return None
  processes = 1
  jax = sys.modules.get("jax")
  if jax is not None and jax.distributed.is_initialized():
    processes = jax.process_count()
  path = folder(base, os.environ.get("XLA_FLAGS", ""), processes)
  os.environ["JAX_COMPILATION_CACHE_DIR"] = path
  if jax is not None:
    jax.config.update("jax_compilation_cache_dir", path)
    # JAX decides once per process whether its cache is used, at the first compile; make it decide again.
    from jax.experimental.compilation_cache import compilation_cache
    compilation_cache.reset_cache()
  return path
