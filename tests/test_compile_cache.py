"""DCSFT_COMPILATION_CACHE (dcsft_jax/compile_cache.py): one cache folder per kind of process. JAX's
keys leave the simulated device count out, and a worker that read another device count's executable
aborted; so each count (and a jax.distributed run's process count) gets its own folder."""
import os
import subprocess
import sys

from dcsft_jax import compile_cache

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_each_kind_of_process_has_its_folder():
  assert compile_cache.folder("/c", "") == "/c/host1"
  assert compile_cache.folder("/c", "--xla_force_host_platform_device_count=8 --xla_foo=1") == "/c/host8"
  assert compile_cache.folder("/c", "--xla_force_host_platform_device_count=4", processes=2) == "/c/host4-p2"


def test_a_process_writes_its_entries_to_its_own_folder(tmp_path):
  code = ("import dcsft_jax, jax, jax.numpy as jnp\n"
          "jax.jit(lambda x: jnp.sin(x) @ x.T)(jnp.ones((64, 64))).block_until_ready()\n"
          "print(jax.config.jax_compilation_cache_dir)")
  env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
  for n in (1, 3):
    env.update(PYTHONPATH=REPO, JAX_PLATFORMS="cpu", DCSFT_COMPILATION_CACHE=str(tmp_path),
               XLA_FLAGS=f"--xla_force_host_platform_device_count={n}" if n > 1 else "",
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip().splitlines()[-1] == str(tmp_path / f"host{n}")
  assert sorted(os.listdir(tmp_path)) == ["host1", "host3"]
  assert all(os.listdir(tmp_path / d) for d in ("host1", "host3"))
