"""Tests run on 8 simulated CPU devices, so the sharded-vs-unsharded checks have a real 2x2x2 mesh.

The flag must be set before JAX initialises its backend, hence here, at collection time.
"""
import os
import sys

if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# A persistent XLA compilation cache shared by the pytest workers, the subprocesses the tests start
# (an environment variable, so they inherit it) and later runs: most of the suite's time is compiling
# the same step and sampler programs. dcsft_jax/compile_cache.py gives each kind of process (simulated
# device count, process count) its own folder: JAX's keys do not tell them apart, and reading another
# kind's executable aborted a worker. DCSFT_TEST_JAX_CACHE= (empty) turns it off.
_cache = os.environ.get("DCSFT_TEST_JAX_CACHE",
                        os.path.join(os.path.expanduser("~"), ".cache", "dcsft_jax", "xla-tests-v2"))
if _cache:
  os.environ.setdefault("DCSFT_COMPILATION_CACHE", _cache)
  os.environ.pop("JAX_COMPILATION_CACHE_DIR", None)    # set per process by dcsft_jax.compile_cache
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
  # A size limit turns on the cache's file lock around every read and write. Without it JAX writes an
  # entry in place, and a process reading the same program's entry meanwhile could get a truncated
  # executable. 8 GiB: nothing is evicted in practice.
  os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(8 << 30))
sys.path.insert(0, os.path.dirname(__file__))

# The compile-only accelerator targets (tests/test_aot.py): JAX stays on the CPU, libtpu may load in
# every pytest worker and stays quiet. Must happen before JAX starts a backend.
from dcsft_jax import targets  # noqa: E402  (imports no JAX)

targets.prepare_environment(attached=False)

import pytest  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The paper's data files (never copied into the repository): $DCSFT_PAPER_DATA, else
# ../shared/paper_data beside the repository.
PAPER_DATA_ENV = "DCSFT_PAPER_DATA"


def paper_data_dir() -> str:
  return os.environ.get(PAPER_DATA_ENV) or os.path.normpath(os.path.join(REPO, "..", "shared", "paper_data"))


@pytest.fixture(scope="session")
def paper_data() -> str:
  """The paper data directory. Where it is missing the test is skipped, by name, with the reason in
  pytest's summary (-rs); under CI (CI set) it fails instead, since CI always has it beside the repo."""
  d = paper_data_dir()
  if not os.path.isdir(d):
    msg = f"the paper's data files are not at {d}: set {PAPER_DATA_ENV}=DIR or put paper_data/ in ../shared"
    if os.environ.get("CI"):
      pytest.fail(msg)
    pytest.skip(msg)
  return d



# The two longest modules (whole pipelines as subprocesses: about a fifth of the suite's work) first,
# the rest in file order. pytest-xdist hands each worker a run of consecutive tests and then more as it
# goes, so at the end of an alphabetical order these would start last and leave the other worker idle
# for minutes. Not more of them: the first worker's first run of tests would then hold over half the work.
LONGEST_FIRST = ("test_task_pipelines.py", "test_pipeline_mesh.py")


def pytest_collection_modifyitems(config, items):
  rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
  key = lambda item: rank.get(os.path.basename(str(item.fspath)), len(rank))
  items[:] = sorted(items, key=key)          # stable: file order within each rank
