"""Convert between Hugging Face directories and dcsft_jax (Orbax) model directories.

  python -m dcsft_jax.convert --from_hf=DIR --to_orbax=DIR
  python -m dcsft_jax.convert --from_orbax=DIR --to_hf=DIR [--dtype=bfloat16]

The output must be new, empty, or a model directory of the same kind, and that only with --overwrite;
it is never the input. It appears whole: written beside the target and swapped into place.
"""
from __future__ import annotations

import os
import re

from absl import app, flags, logging

import jax.numpy as jnp

from dcsft_jax import errors
from dcsft_jax import atomic, checkpoint, hf
from dcsft_jax.models.layers import ModelOptions
from dcsft_jax.models.params import count_params

FLAGS = flags.FLAGS


def _define_flags() -> None:
  # Defined only when run as a program: importing this module (convert(), check_output()) next to
  # another CLI module must not define a second --dtype.
  flags.DEFINE_string("from_hf", None, "A local Hugging Face model directory to read (Qwen2.5-VL or Qwen3-VL).")
  flags.DEFINE_string("to_orbax", None, "Where to write the dcsft_jax model directory.")
  flags.DEFINE_string("from_orbax", None, "A dcsft_jax model directory to read.")
  flags.DEFINE_string("to_hf", None, "Where to write the Hugging Face directory.")
  flags.DEFINE_string("dtype", None, "Export dtype for --to_hf (float32, bfloat16, float16); default: config's.")
  flags.DEFINE_bool("overwrite", False, "Replace an existing model directory at the output (never a folder "
                    "holding anything else).")

# What each kind of model directory holds when this tool (or the pipeline) wrote it. An output folder
# holding anything else is the user's, and is never replaced.
_HF_FILES = re.compile(r"^(config\.json|generation_config\.json|model\.safetensors(\.index\.json)?|"
                       r"model-\d{5}-of-\d{5}\.safetensors)$")
_ORBAX_FILES = {"config.json", checkpoint.PARAMS, checkpoint.LORA, checkpoint.BASE}


class ConvertError(errors.UserError):
  pass


def _inside(a: str, b: str) -> bool:
  a, b = os.path.realpath(a), os.path.realpath(b)
  return a == b or a.startswith(b.rstrip(os.sep) + os.sep)


def check_output(out: str, inputs: list[str], kind: str, overwrite: bool) -> None:
  """Refuses an output that is (or holds, or is inside) an input, a folder that is not a model
  directory of `kind` ("hf" or "orbax"), and an existing model directory without --overwrite."""
  for src in inputs:
    if _inside(out, src) or _inside(src, out):
      raise ConvertError(f"the output {out} is the input {src} (or inside it, or holds it): converting in place "
                         f"would destroy the source. Write to another directory.")
  if not os.path.exists(out):
    return
  if not os.path.isdir(out):
    raise ConvertError(f"the output {out} exists and is not a directory")
  entries = sorted(os.listdir(out))
  if not entries:
    return
  ours = (lambda n: bool(_HF_FILES.match(n))) if kind == "hf" else (lambda n: n in _ORBAX_FILES)
  foreign = [n for n in entries if not (ours(n) or n in hf.PROCESSOR_FILES)]
  if foreign or "config.json" not in entries:
    raise ConvertError(f"the output {out} is a folder that is not a {kind} model directory (it holds "
                       f"{', '.join(foreign[:5] or entries[:5])}{' ...' if len(foreign) > 5 else ''}); it is never "
                       f"replaced. Choose an empty or new directory.")
  if not overwrite:
    raise ConvertError(f"the output {out} is an existing {kind} model directory; pass --overwrite to replace it")


def convert(*, from_hf=None, to_orbax=None, from_orbax=None, to_hf=None, dtype=None, overwrite=False) -> str:
  """One conversion. The output is written into a directory beside it and swapped into place whole
  (dcsft_jax.atomic.directory): killed at any moment, the output path holds the old model or the new
  one, never a mix."""
  if bool(from_hf) == bool(from_orbax):
    raise ConvertError("give exactly one of --from_hf or --from_orbax")
  if from_hf:
    if not to_orbax:
      raise ConvertError("--from_hf needs --to_orbax=DIR")
    check_output(to_orbax, [from_hf], "orbax", overwrite)
    cfg, params = hf.load_hf(from_hf, opts=ModelOptions(param_dtype=jnp.float32))
    with atomic.directory(to_orbax) as tmp:
      checkpoint.save_model(tmp, params, cfg, source_dir=from_hf)
    return f"wrote {to_orbax} ({count_params(params):,} parameters)"
  if not to_hf:
    raise ConvertError("--from_orbax needs --to_hf=DIR")
  base = checkpoint.base_of(from_orbax) if os.path.isdir(from_orbax) else None
  check_output(to_hf, [from_orbax] + ([base] if base else []), "hf", overwrite)
  cfg, params, lora = checkpoint.load_model(from_orbax)  # LoRA adapters, if any, are merged
  hf.save_hf(params, cfg, to_hf, source_dir=from_orbax, dtype=dtype, lora=lora)
  return f"wrote {to_hf}"


def main(argv):
  del argv
  errors.cli("convert", lambda: print(convert(from_hf=FLAGS.from_hf, to_orbax=FLAGS.to_orbax,
                                              from_orbax=FLAGS.from_orbax, to_hf=FLAGS.to_hf, dtype=FLAGS.dtype,
                                              overwrite=FLAGS.overwrite)))


if __name__ == "__main__":
  _define_flags()
  logging.set_verbosity(logging.WARNING)
  app.run(main)
