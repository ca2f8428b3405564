"""The Qwen3-VL (dense) family (transformers' `Qwen3VLForConditionalGeneration`).

config.py: sizes from config.json and presets; model.py: the Flax module; rope.py: position ids and
the vision layout; weights.py: the HF name table; processing.py: chat template and processor files.
"""
from __future__ import annotations

from dcsft_jax.models.family import Family
from dcsft_jax.models.layers import LoraSpec, ModelOptions  # noqa: F401  (the generic names, for callers of this family)
from dcsft_jax.models.params import abstract_key, count_params, is_adapter, select, unbox  # noqa: F401
from dcsft_jax.models.qwen3_vl import config, processing, rope, weights
from dcsft_jax.models.qwen3_vl.model import (MERGER_LORA_TARGETS, TEXT_LORA_TARGETS, VISION_LORA_TARGETS,  # noqa: F401
                                             Qwen3VL)

FAMILY = Family(
    name="qwen3_vl",
    title="Qwen3-VL",
    model_types=("qwen3_vl",),
    architecture="Qwen3VLForConditionalGeneration",
    module=Qwen3VL,
    config_class=config.Qwen3VLConfig,
    presets={size: (lambda size=size: config.preset(size)) for size in config.PRESETS},
    tiny=config.tiny_config,
    with_tiny_tokenizer=config.with_tiny_tokenizer,
    image_keys=("pixel_values", "pos_hw", "frame_seg", "pe_index", "pe_weight"),
    vision_layout=rope.vision_layout,
    patch_room=lambda grid, vcfg: int(grid[0]) * int(grid[1]) * int(grid[2]),   # full attention only
    rope_index=rope.get_rope_index,
    mm_token_types=rope.mm_token_types,
    name_table=weights.name_table,
    lora_targets={"language": TEXT_LORA_TARGETS, "vision": VISION_LORA_TARGETS, "merger": MERGER_LORA_TARGETS},
    tiny_chat_template=processing.QWEN3_VL_CHAT_TEMPLATE,
    tiny_preprocessor=processing.tiny_preprocessor_config,
    default_system_prompt=processing.DEFAULT_SYSTEM_PROMPT,
    generation_defaults=processing.GENERATION_DEFAULTS,
    canonical_name=processing.canonical_name,
)


def init_params(cfg, opts: ModelOptions = ModelOptions(), rng=None, **kw):
  return FAMILY.init_params(cfg, opts, rng, **kw)


def init_program(cfg, opts: ModelOptions, mesh, keep=None):
  return FAMILY.init_program(cfg, opts, mesh, keep)
