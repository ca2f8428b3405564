"""Convert between Hugging Face directories and dcsft_jax (Orbax) model directories.

  python -m dcsft_jax.convert --from_hf=DIR --to_orbax=DIR
  python -m dcsft_jax.convert --from_orbax=DIR --to_hf=DIR [--dtype=bfloat16]
"""
from __future__ import annotations

import sys

from absl import app, flags, logging

import jax.numpy as jnp

from dcsft_jax import checkpoint, hf
from dcsft_jax.models import qwen2_5_vl as model_lib

FLAGS = flags.FLAGS
flags.DEFINE_string("from_hf", None, "A local Hugging Face Qwen2.5-VL directory to read.")
flags.DEFINE_string("to_orbax", None, "Where to write the dcsft_jax model directory.")
flags.DEFINE_string("from_orbax", None, "A dcsft_jax model directory to read.")
flags.DEFINE_string("to_hf", None, "Where to write the Hugging Face directory.")
flags.DEFINE_string("dtype", None, "Export dtype for --to_hf (float32, bfloat16, float16); default: config's.")


def main(argv):
  del argv
  if bool(FLAGS.from_hf) == bool(FLAGS.from_orbax):
    sys.exit("convert: give exactly one of --from_hf or --from_orbax")
  if FLAGS.from_hf:
    if not FLAGS.to_orbax:
      sys.exit("convert: --from_hf needs --to_orbax=DIR")
    cfg, params = hf.load_hf(FLAGS.from_hf, opts=model_lib.ModelOptions(param_dtype=jnp.float32))
    checkpoint.save_model(FLAGS.to_orbax, params, cfg, source_dir=FLAGS.from_hf)
    print(f"wrote {FLAGS.to_orbax} ({model_lib.count_params(params):,} parameters)")
  else:
    if not FLAGS.to_hf:
      sys.exit("convert: --from_orbax needs --to_hf=DIR")
    cfg, params, lora = checkpoint.load_model(FLAGS.from_orbax)  # LoRA adapters, if any, are merged
    hf.save_hf(params, cfg, FLAGS.to_hf, source_dir=FLAGS.from_orbax, dtype=FLAGS.dtype, lora=lora)
    print(f"wrote {FLAGS.to_hf}")


if __name__ == "__main__":
  logging.set_verbosity(logging.WARNING)
  app.run(main)
