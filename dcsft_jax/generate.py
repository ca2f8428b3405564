"""Try a model on one image:

  python -m dcsft_jax.generate --model=DIR --image=PATH --prompt=TEXT --max_new_tokens=N \
      [--num_samples=K --temperature=T --top_k=K --top_p=P --repetition_penalty=R --seed=S]

DIR is a Hugging Face Qwen2.5-VL or Qwen3-VL directory (with its tokenizer and processor files) or a model
directory this project wrote. Prints one JSON object: {"texts": [...], "token_ids": [[...], ...]}.
Without --temperature (or with 0) decoding is greedy. Without --repetition_penalty the model's
generation_config.json sets it (Qwen2.5-VL-Instruct: 1.05), as transformers' generate does.
"""
from __future__ import annotations

import json
import sys

from absl import app, flags

_MODEL = flags.DEFINE_string("model", None, "HF or dcsft_jax model directory.")
_IMAGE = flags.DEFINE_string("image", None, "Image file (omit for a text-only prompt).")
_PROMPT = flags.DEFINE_string("prompt", None, "The question.")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 32, "Most tokens to generate per answer.")
_NUM = flags.DEFINE_integer("num_samples", 1, "Answers to sample (they share one prefill).")
_TEMP = flags.DEFINE_float("temperature", 0.0, "0 = greedy.")
_TOP_K = flags.DEFINE_integer("top_k", 0, "0 = off.")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "1.0 = off.")
_PENALTY = flags.DEFINE_float("repetition_penalty", 0.0, "transformers' repetition penalty; 0 = the model's "
                              "generation_config.json (1.0 where it has none).")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Compute dtype.")
_MAX_PIXELS = flags.DEFINE_integer("max_pixels", None, "Resize the image to at most this many pixels.")


def generate(model_dir: str, image: str | None, prompt: str, *, max_new_tokens: int = 32, num_samples: int = 1,
             temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, repetition_penalty: float = 0.0,
             seed: int = 0, dtype: str = "float32",
             max_pixels: int | None = None, mesh=None) -> dict:
  import jax.numpy as jnp

  from dcsft_jax import checkpoint, sampling
  from dcsft_jax import mesh as mesh_lib
  from dcsft_jax.data import batching
  from dcsft_jax.data.processor import Processor
  from dcsft_jax.data.records import BadRecord, Record
  from dcsft_jax.errors import UserError
  from dcsft_jax.models.layers import ModelOptions

  dt = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[dtype]
  opts = ModelOptions(dtype=dt, param_dtype=dt)
  mesh = mesh or mesh_lib.make_mesh({"data": 1, "fsdp": -1, "tensor": 1})
  with mesh_lib.use(mesh):
    cfg, params, lora = checkpoint.load_any(model_dir, mesh=mesh, opts=opts)
    if lora is not None:
      opts = ModelOptions(dtype=dt, param_dtype=dt, lora=lora)
    processor = Processor.from_pretrained(model_dir, cfg=cfg, max_pixels=max_pixels)
    sp = sampling.settings(model_dir, processor, repetition_penalty=repetition_penalty, pad_id=cfg.pad_token_id or 0,
                           max_new_tokens=max_new_tokens, num_samples=num_samples, temperature=temperature,
                           top_k=top_k, top_p=top_p)
    rec = Record("cli", image, prompt, "-", "classification")
    try:
      buckets = batching.auto_buckets([rec], processor, with_answers=False, max_buckets=1)
    except BadRecord as e:       # the pipeline's wording names a data file and its records; here, the flag
      raise UserError(f"--image={image}: {e.reason}; give an image file that PIL can open") from None
    # One prompt, padded with empty rows to one per batch shard of the mesh.
    gen = sampling.RecordGenerator(sampling.Sampler(cfg, opts), params, processor, mesh, sp,
                                   batch_size=mesh.shape["data"] * mesh.shape["fsdp"], buckets=buckets, seed=seed)
    out = next(iter(gen.run([rec])))
  return {"texts": out.texts[0], "token_ids": out.tokens[0]}


def main(argv):
  if len(argv) > 1:
    sys.exit(f"unexpected arguments {argv[1:]}")
  if not _MODEL.value or _PROMPT.value is None:
    sys.exit("give --model=DIR and --prompt=TEXT (and usually --image=PATH)")
  from dcsft_jax import errors
  result = errors.cli("generate", lambda: generate(
      _MODEL.value, _IMAGE.value, _PROMPT.value, max_new_tokens=_MAX_NEW.value, num_samples=_NUM.value,
      temperature=_TEMP.value, top_k=_TOP_K.value, top_p=_TOP_P.value, repetition_penalty=_PENALTY.value,
      seed=_SEED.value, dtype=_DTYPE.value, max_pixels=_MAX_PIXELS.value))
  print(json.dumps(result))


if __name__ == "__main__":
  app.run(main)
