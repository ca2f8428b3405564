"""The Qwen2.5-VL family (transformers' `Qwen2_5_VLForConditionalGeneration`).

config.py: sizes from config.json and presets; model.py: the Flax module; rope.py: position ids and
the vision layout; weights.py: the HF name table; processing.py: chat template and processor files.
"""
from __future__ import annotations

from dcsft_jax.models.family import Family
from dcsft_jax.models.layers import LoraSpec, ModelOptions  # noqa: F401  (the generic names, for callers of this family)
from dcsft_jax.models.params import abstract_key, count_params, is_adapter, select, unbox  # noqa: F401
from dcsft_jax.models.qwen2_5_vl import config, processing, rope, weights
from dcsft_jax.models.qwen2_5_vl.model import (MERGER_LORA_TARGETS, TEXT_LORA_TARGETS, VISION_LORA_TARGETS,  # noqa: F401
                                               Qwen25VL)

FAMILY = Family(
    name="qwen2_5_vl",
    title="Qwen2.5-VL",
    model_types=("qwen2_5_vl",),
    architecture="Qwen2_5_VLForConditionalGeneration",
    module=Qwen25VL,
    config_class=config.Qwen25VLConfig,
    presets={"3b": lambda: config.preset("3b"), "7b": lambda: config.preset("7b")},
    tiny=config.tiny_config,
    with_tiny_tokenizer=config.with_tiny_tokenizer,
    image_keys=("pixel_values", "pos_hw", "frame_seg", "window_seg"),
    vision_layout=rope.vision_layout,
    patch_room=rope.patch_room,
    rope_index=rope.get_rope_index,
    mm_token_types=rope.mm_token_types,
    name_table=weights.name_table,
    lora_targets={"language": TEXT_LORA_TARGETS, "vision": VISION_LORA_TARGETS, "merger": MERGER_LORA_TARGETS},
    tiny_chat_template=processing.QWEN2_VL_CHAT_TEMPLATE,
    tiny_preprocessor=processing.preprocessor_config,
    default_system_prompt=processing.DEFAULT_SYSTEM_PROMPT,
    generation_defaults=processing.GENERATION_DEFAULTS,
    canonical_name=processing.canonical_name,
)


def init_params(cfg, opts: ModelOptions = ModelOptions(), rng=None, **kw):
  return FAMILY.init_params(cfg, opts, rng, **kw)


def init_program(cfg, opts: ModelOptions, mesh, keep=None):
  return FAMILY.init_program(cfg, opts, mesh, keep)
