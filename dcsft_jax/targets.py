"""Accelerators a program can be compiled for, with or without the hardware.

Each target is a named set of devices: the GPUs or TPU chips of one machine type. On a host that has
them, they are the attached devices. Anywhere else, XLA's own compilers build them compile-only:
- NVIDIA: the CUDA PJRT plugin (`jax[cuda12]`, or `jax[cuda12-local]` plus cuDNN) compiles for a GPU
  described by an XLA `GpuTargetConfigProto` text (dcsft_jax/accelerators/*.txtpb: core counts, shared
  memory, memory size, compute capability, cuDNN version);
- TPU: libtpu (`jax[tpu]`) builds a topology by name (`v5e:2x4`).
`jax.jit(f).lower(ShapeDtypeStructs sharded over these devices).compile()` then runs the real XLA:GPU
or XLA:TPU compiler, and `.memory_analysis()` gives the bytes each device needs.

Import this module before JAX initialises a backend when compile-only devices are wanted:
`prepare_environment()` keeps JAX on the CPU (the CUDA plugin then skips its driver check, and libtpu
does not probe for a TPU VM) and quiets libtpu.
"""
from __future__ import annotations

import dataclasses
import os
import re
import shutil

from dcsft_jax import errors

GiB = 1 << 30
HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "accelerators")

# JAX's GPU allocator takes this share of device memory unless XLA_PYTHON_CLIENT_MEM_FRACTION says
# otherwise; XLA:GPU compiles a program whatever its size, so "fits" is checked against it here.
DEFAULT_GPU_MEM_FRACTION = 0.75


@dataclasses.dataclass(frozen=True)
class Target:
  name: str
  platform: str                 # 'gpu' | 'tpu'
  devices: int
  description: str
  topology: str                 # TPU: libtpu's topology name; GPU: XLA's platform name
  gpu_config: str = ""          # GPU: the GpuTargetConfigProto file in dcsft_jax/accelerators/
  tpu_kwargs: tuple = ()        # TPU: extra get_topology_desc arguments
  tpu_hbm_bytes: int = 0        # TPU: the HBM its compiler lets a program use (it refuses more)
  device_kind: str = ""         # what jax.devices()[0].device_kind says on the real machine


TARGETS: dict[str, Target] = {t.name: t for t in (
    Target("h100x1", "gpu", 1, "one H100 SXM 80GB", "h100", gpu_config="h100_sxm.txtpb", device_kind="H100"),
    Target("h100x8", "gpu", 8, "8 H100 SXM 80GB (one host)", "h100", gpu_config="h100_sxm.txtpb", device_kind="H100"),
    Target("h200x1", "gpu", 1, "one H200 SXM 141GB", "h200", gpu_config="h200.txtpb", device_kind="H200"),
    Target("h200x8", "gpu", 8, "8 H200 SXM 141GB (one host)", "h200", gpu_config="h200.txtpb", device_kind="H200"),
    Target("a100-80x8", "gpu", 8, "8 A100 SXM4 80GB (one host)", "a100", gpu_config="a100_sxm_80.txtpb",
           device_kind="A100"),
    # Cloud TPU accelerator types. A v4-8 is 4 chips, each one megacore device; v5p is megacore by
    # default. The 8-chip v5e and v6e slices are one host on Cloud (libtpu would split 2x4 in two).
    Target("v4-8", "tpu", 4, "Cloud TPU v4-8 (4 chips, megacore)", "v4:2x2x1",
           tpu_kwargs=(("chip_config_name", "megacore"),), tpu_hbm_bytes=int(30.75 * GiB), device_kind="TPU v4"),
    Target("v5e-4", "tpu", 4, "Cloud TPU v5litepod-4 (2x2)", "v5e:2x2", tpu_hbm_bytes=int(15.75 * GiB),
           device_kind="TPU v5 lite"),
    Target("v5e-8", "tpu", 8, "Cloud TPU v5litepod-8 (2x4, one host)", "v5e:2x4",
           tpu_kwargs=(("chips_per_host_bounds", (2, 4, 1)),), tpu_hbm_bytes=int(15.75 * GiB),
           device_kind="TPU v5 lite"),
    Target("v5p-8", "tpu", 4, "Cloud TPU v5p-8 (4 chips, megacore)", "v5p:2x2x1", tpu_hbm_bytes=int(95.74 * GiB),
           device_kind="TPU v5"),
    Target("v6e-8", "tpu", 8, "Cloud TPU v6e-8 (2x4, one host)", "v6e:2x4",
           tpu_kwargs=(("chips_per_host_bounds", (2, 4, 1)),), tpu_hbm_bytes=int(31.25 * GiB),
           device_kind="TPU v6 lite"),
)}

INSTALL = {"gpu": "pip install '.[aot]'  (the CUDA PJRT plugin and cuDNN; or: pip install -r requirements-aot.txt)",
           "tpu": "pip install '.[aot]'  (libtpu, through jax[tpu]; or: pip install -r requirements-aot.txt)"}


def get(name: str) -> Target:
  if name not in TARGETS:
    raise ValueError(f"unknown target {name!r}; the targets are {', '.join(TARGETS)}")
  return TARGETS[name]


def hardware_present(platform: str) -> bool:
  """Whether this host has accelerators of `platform` attached (checked without starting JAX)."""
  if platform == "gpu":
    return os.path.exists("/dev/nvidia0") or os.path.exists("/dev/nvidiactl") or shutil.which("nvidia-smi") is not None
  return os.path.exists("/dev/accel0") or os.path.exists("/dev/vfio/0")


def prepare_environment(attached: bool) -> None:
  """Environment for compile-only devices; call before JAX initialises a backend (no-op when the
  target's hardware is attached). setdefault everywhere: the user's settings win."""
  env = os.environ
  if not attached:
    # JAX stays on the CPU; the CUDA plugin then skips its cuInit/version check, which on a host
    # without a GPU would otherwise disable its compile-only topologies for the whole process.
    env.setdefault("JAX_PLATFORMS", "cpu")
  env.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")
  quiet_libtpu()


def quiet_libtpu() -> None:
  """libtpu settings for compile-only use: several processes may load it (pytest workers), no log
  files, and no probing of a TPU VM's metadata server on hosts that are not TPU VMs."""
  env = os.environ
  env.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  env.setdefault("TPU_LOG_DIR", "disabled")
  if not hardware_present("tpu"):
    for k, v in dict(TPU_SKIP_MDS_QUERY="1", TPU_WORKER_HOSTNAMES="localhost", TPU_ACCELERATOR_TYPE="v5litepod-8",
                     TPU_WORKER_ID="0").items():
      env.setdefault(k, v)


def gpu_config_text(target: Target) -> str:
  with open(os.path.join(HERE, target.gpu_config), encoding="utf-8") as f:
    return f.read()


def gpu_memory_bytes(target: Target) -> int:
  m = re.search(r"device_memory_size:\s*(\d+)", gpu_config_text(target))
  if not m:
    raise ValueError(f"{target.gpu_config} has no device_memory_size")
  return int(m.group(1))


@dataclasses.dataclass(frozen=True)
class Devices:
  target: Target
  devices: list
  attached: bool
  memory_bytes: int             # per device
  budget_bytes: int             # what a program may use per device ("fits" means at most this)
  budget_note: str


def devices(name: str, *, attached: bool | None = None) -> Devices:
  """The target's devices: the attached ones when this host has them (attached=None: detect), else
  compile-only ones. Raises with the install command when the backend's plugin is missing."""
  import jax
  t = get(name)
  if attached is None:
    attached = hardware_present(t.platform) and jax.default_backend() == t.platform
  if attached:
    devs = [d for d in jax.devices() if d.platform == t.platform]
    if len(devs) < t.devices:
      raise ValueError(f"target {name} needs {t.devices} {t.platform.upper()} devices; this host has {len(devs)}")
    devs = devs[:t.devices]
    stats = devs[0].memory_stats() or {}
    mem = int(stats.get("bytes_limit", 0)) or (gpu_memory_bytes(t) if t.platform == "gpu" else t.tpu_hbm_bytes)
    return Devices(t, devs, True, mem, mem, "the attached devices' allocator limit")
  from jax.experimental import topologies
  try:
    if t.platform == "gpu":
      topo = topologies.get_topology_desc(topology_name=t.topology, platform="cuda", target_config=gpu_config_text(t),
                                          topology=f"1x1x{t.devices}")
    else:
      quiet_libtpu()
      topo = topologies.get_topology_desc(topology_name=t.topology, platform="tpu", **dict(t.tpu_kwargs))
  except Exception as e:  # pylint: disable=broad-except
    raise errors.UserError(f"cannot build compile-only {t.description} devices ({type(e).__name__}: {e}). Install "
                           f"the compiler: {INSTALL[t.platform]}; JAX must start with JAX_PLATFORMS=cpu "
                           f"(python -m dcsft_jax.aot sets it)") from None
  devs = list(topo.devices)
  if len(devs) != t.devices:
    raise RuntimeError(f"{t.topology} gave {len(devs)} devices, expected {t.devices}")
  if t.platform == "gpu":
    mem = gpu_memory_bytes(t)
    frac = float(os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION", DEFAULT_GPU_MEM_FRACTION))
    return Devices(t, devs, False, mem, int(mem * frac),
                   f"{frac:.0%} of device memory, JAX's GPU allocator (XLA_PYTHON_CLIENT_MEM_FRACTION)")
  return Devices(t, devs, False, t.tpu_hbm_bytes, t.tpu_hbm_bytes, "the HBM the TPU compiler allows a program")
