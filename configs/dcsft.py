"""The default DC-SFT run. With `model.hf_path` empty it uses the embedded default: a tiny
random-weight Qwen2.5-VL-architecture model that runs on a laptop CPU.

  python -m dcsft_jax.main --config=configs/dcsft.py [--config.workdir=DIR --config.stages=init,export ...]
"""
import ml_collections


def get_config():
  c = ml_collections.ConfigDict()
  c.workdir = "workdir/dcsft_default"
  # Stages run in this order; each one is skipped when its outputs already exist in the workdir.
  c.stages = "init,export"
  c.seed = 0
  # 'auto' calls jax.distributed.initialize() when a multi-host launcher is detected.
  c.distributed = "auto"
  # Device mesh: one size may be -1 (all remaining devices).
  c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1))

  c.model = ml_collections.ConfigDict()
  c.model.hf_path = ""              # a local Qwen2.5-VL directory; empty = the embedded tiny model
  c.model.dtype = "float32"         # compute dtype: float32 | bfloat16
  c.model.param_dtype = "float32"   # master weights
  c.model.attention = "auto"        # auto | xla | cudnn
  c.model.remat = False

  c.export = ml_collections.ConfigDict()
  c.export.dtype = ""               # '' = the checkpoint's own dtype (config.json torch_dtype)
  return c
