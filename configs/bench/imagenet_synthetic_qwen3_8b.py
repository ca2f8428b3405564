"""The Qwen3-VL-8B twin of imagenet_synthetic_3b.py: the paper's ImageNet-100 pipeline at its sizes on
random Qwen3-VL-8B weights (the released shapes, models/qwen3_vl/config.py) and synthetic ImageNet-sized
images, for memory planning and GPU/TPU speed runs.

  python -m dcsft_jax.aot --config=configs/bench/imagenet_synthetic_qwen3_8b.py --target=h100x1
  python -m dcsft_jax.main --config=configs/bench/imagenet_synthetic_qwen3_8b.py [--config.workdir=DIR]

Everything but the model is the 3B config's, pixel budget included (802,816 pixels: 784 Qwen3-VL image
tokens of 32 x 32 px where Qwen2.5-VL makes 1,024 of 28 x 28). 8.8 B parameters: the cold start (full
fine-tuning) needs FSDP over several devices; the LoRA runs keep the frozen base in bf16 (16.3 GiB).
"""
from dcsft_jax import config_base


def get_config():
  c = config_base.load_config_file("imagenet_synthetic_3b.py", beside=__file__).get_config()
  c.workdir = "workdir/bench_imagenet_synthetic_qwen3_8b"
  c.model.preset = "qwen3_vl_8b"
  return c
