"""The 7B twin of imagenet_synthetic_3b.py: the paper's ImageNet-100 pipeline at its sizes on random
Qwen2.5-VL-7B weights and synthetic ImageNet-sized images, for memory planning and GPU/TPU speed runs.

  python -m dcsft_jax.aot --config=configs/bench/imagenet_synthetic_7b.py --target=h100x8
  python -m dcsft_jax.main --config=configs/bench/imagenet_synthetic_7b.py [--config.workdir=DIR]

Everything but the model is the 3B config's. The cold start (full fine-tuning: fp32 master weights and
Adam moments, 8.3 B parameters, 99 GiB before any activation) needs FSDP over several devices; the LoRA
runs keep the frozen base in bf16 (15.5 GiB) and fit one H100.
"""
from dcsft_jax import config_base


def get_config():
  c = config_base.load_config_file("imagenet_synthetic_3b.py", beside=__file__).get_config()
  c.workdir = "workdir/bench_imagenet_synthetic_7b"
  c.model.preset = "7b"
  return c
