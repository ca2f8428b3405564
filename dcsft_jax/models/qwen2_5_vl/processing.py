"""Qwen2.5-VL's processor settings: its chat template, its preprocessor config, its on-disk names."""
from __future__ import annotations

DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."

# The official Qwen2-VL / Qwen2.5-VL chat template (Hub chat_template.json), video branch included.
QWEN2_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

def preprocessor_config(min_pixels: int = 56 * 56, max_pixels: int = 28 * 28 * 1280) -> dict:
  """Qwen2.5-VL's Hub preprocessor_config.json with the given pixel budget."""
  return {
      "min_pixels": int(min_pixels), "max_pixels": int(max_pixels),
      "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2,
      "image_mean": [0.48145466, 0.4578275, 0.40821073],
      "image_std": [0.26862954, 0.26130258, 0.27577711],
      "image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2_5_VLProcessor",
  }



# Qwen2.5-VL-Instruct's generation_config.json: both end tokens, repetition penalty 1.05, near-greedy
# sampling defaults (which the stages' explicit settings replace, as the authors' generate calls do).
GENERATION_DEFAULTS = {"do_sample": True, "repetition_penalty": 1.05, "temperature": 0.1, "top_p": 0.001, "top_k": 1}


def canonical_name(name: str) -> str:
  """transformers 5.x in-memory names (model.visual.*, model.language_model.*) -> on-disk names."""
  if name.startswith("model.visual."):
    return name[len("model."):]
  if name.startswith("model.language_model."):
    return "model." + name[len("model.language_model."):]
  return name
