"""Tests run on 8 simulated CPU devices, so the sharded-vs-unsharded checks have a real 2x2x2 mesh.

The flag must be set before JAX initialises its backend, hence here, at collection time.
"""
import os
import sys

if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, os.path.dirname(__file__))

# The compile-only accelerator targets (tests/test_aot.py): JAX stays on the CPU, libtpu may load in
# every pytest worker and stays quiet. Must happen before JAX starts a backend.
from dcsft_jax import targets  # noqa: E402  (imports no JAX)

targets.prepare_environment(attached=False)
