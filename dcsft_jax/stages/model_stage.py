"""The model stages: bring a checkpoint in (or build the embedded default), and export it to HF."""
from __future__ import annotations

import jax

from dcsft_jax import checkpoint, hf
from dcsft_jax.data import tokenizer
from dcsft_jax.models import registry
from dcsft_jax.models.params import count_params


def init(config, ctx) -> dict:
  opts = ctx.model_options
  if config.model.hf_path:
    cfg, params = hf.load_hf(config.model.hf_path, mesh=ctx.mesh, opts=opts)
    source = config.model.hf_path
  else:
    # The embedded default: a family's tiny architecture with random weights (model.preset: tiny, the
    # default, or <family>_tiny); or a released size's shapes with random weights and the tiny
    # tokenizer (model.preset=3b, <family>_<size>, ...: speed runs).
    cfg = registry.run_config(config.model.preset)
    params = registry.of(cfg).init_params(cfg, opts, jax.random.PRNGKey(config.seed), mesh=ctx.mesh)
    source = None
  out = ctx.wd.base_model
  if source is None and jax.process_index() == 0:
    # The tiny model's tokenizer and processor travel with it, so its HF export loads in transformers.
    tokenizer.save_tiny_processor(out, family=registry.of(cfg))
  checkpoint.save_model(out, params, cfg, source_dir=source)
  return {"parameters": count_params(params),
          "source": source or f"random weights, {config.model.preset or 'tiny'} shapes",
          "written": out}


def export(config, ctx) -> dict:
  """The chosen model (export.model: the paper's best, SFT-EM, by default), LoRA merged, as HF."""
  from dcsft_jax.stages import common
  src = common.model_path(ctx, config.export.model)
  cfg, params, lora = checkpoint.load_model(src, mesh=ctx.mesh)
  out = ctx.wd.export
  hf.save_hf(params, cfg, out, source_dir=src, dtype=config.export.dtype or None, lora=lora)
  return {"written": out, "model": src}
