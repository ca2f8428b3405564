"""The paper's ImageNet-100 DC-SFT pipeline at its sizes, on random Qwen2.5-VL-3B weights and synthetic
images of ImageNet-like sizes: the GPU speed run of issue 7 (target: <= 10 minutes on one H100).

  python -m dcsft_jax.main --config=configs/bench/imagenet_synthetic_3b.py [--config.workdir=DIR]

Sizes: cold start 400 samples x 1 epoch (batch 16, full fine-tuning); scoring 9,600 prompts x 8
samples; 600 LoRA SFT steps x 16; greedy evaluation on 5,000 + 10,741 + 3,015 = 18,756 images (the sizes of
the paper's ImageNet val, ImageNet-R and ImageNet-A files). Random weights never emit an end-of-sequence
token, so every generation runs 4 new tokens (the paper's one-word answers are about 3 tokens plus EOS),
and every prompt is 'hard': curation makes only the plain-SFT recipe, which costs what SFT-M/EM cost.
Needs no checkpoint and no dataset: the model is built from `model.preset` with the embedded tokenizer,
the images from the builtin digits (`synthetic:N`, JPEG bytes, 250-500 px sides).
"""
from dcsft_jax import config_base


def get_config():
  c = config_base.base()
  c.workdir = "workdir/bench_imagenet_synthetic_3b"
  c.stages = "init,cold_start,score,curate,finetune,evaluate,report"
  c.model.preset = "3b"
  c.model.dtype = "bfloat16"
  c.model.param_dtype = "float32"
  # One H100 (python -m dcsft_jax.aot --target=h100x1): without recomputing layers in the backward
  # pass, the cold start's full SFT of batch 16 needs 145 GiB; with it, 59 of the 59.3 GiB JAX takes.
  c.model.remat = True
  c.model.frozen_in_compute_dtype = True   # the LoRA base in bf16, as the authors' runs keep it
  c.mesh.fsdp = -1

  c.data.train = "synthetic:10000[400:]"          # 9,600 post-training prompts
  c.cold_start.data = "synthetic:10000[:400]"
  c.data.eval = "id=synthetic:5000:test,rendition=synthetic:10741:rendition,adversarial=synthetic:3015:adversarial"
  c.data.ood = "rendition,adversarial"
  c.data.max_pixels = 802816
  c.data.max_buckets = 4

  c.cold_start.batch_size = 16
  c.cold_start.save_every = 1000
  c.score.max_new_tokens = 4
  c.score.batch_size = 64
  c.curate.recipes = "sft"
  c.finetune.recipes = "sft"
  c.finetune.steps = 600
  c.finetune.batch_size = 16
  c.finetune.save_every = 600
  c.evaluate.models = "sft=models/sft"
  c.evaluate.max_new_tokens = 4
  c.evaluate.batch_size = 64
  c.export.model = "models/sft"
  return c
