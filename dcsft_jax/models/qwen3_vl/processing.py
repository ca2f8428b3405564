"""Qwen3-VL's processor settings: its chat template, its preprocessor config, its on-disk names."""
from __future__ import annotations

import hashlib

# Qwen3-VL-Instruct has no default system turn (QWEN3VL.md §5), unlike Qwen2/2.5-VL.
DEFAULT_SYSTEM_PROMPT = None

# Qwen3-VL-Instruct's chat template (Qwen3-VL-8B-Instruct; 5292 bytes, SHA-256 below). Source: a
# third-party byte copy of the template shipped with Qwen3-VL-8B-Instruct, pinned there by length and
# SHA-256; checked here against the rendered examples of QWEN3VL.md §5 (tests/test_qwen3_vl_model.py).
# No default system turn; images -> <|vision_start|><|image_pad|><|vision_end|> ("Picture k: " with
# add_vision_id); videos likewise with <|video_pad|>; tools; generation prompt <|im_start|>assistant\n.
QWEN3_VL_CHAT_TEMPLATE = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0].role == 'system' %}
        {%- if messages[0].content is string %}
            {{- messages[0].content }}
        {%- else %}
            {%- for content in messages[0].content %}
                {%- if 'text' in content %}
                    {{- content.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {{- '\n\n' }}
    {%- endif %}
    {{- "# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0].role == 'system' %}
        {{- '<|im_start|>system\n' }}
        {%- if messages[0].content is string %}
            {{- messages[0].content }}
        {%- else %}
            {%- for content in messages[0].content %}
                {%- if 'text' in content %}
                    {{- content.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- set image_count = namespace(value=0) %}
{%- set video_count = namespace(value=0) %}
{%- for message in messages %}
    {%- if message.role == "user" %}
        {{- '<|im_start|>' + message.role + '\n' }}
        {%- if message.content is string %}
            {{- message.content }}
        {%- else %}
            {%- for content in message.content %}
                {%- if content.type == 'image' or 'image' in content or 'image_url' in content %}
                    {%- set image_count.value = image_count.value + 1 %}
                    {%- if add_vision_id %}Picture {{ image_count.value }}: {% endif -%}
                    <|vision_start|><|image_pad|><|vision_end|>
                {%- elif content.type == 'video' or 'video' in content %}
                    {%- set video_count.value = video_count.value + 1 %}
                    {%- if add_vision_id %}Video {{ video_count.value }}: {% endif -%}
                    <|vision_start|><|video_pad|><|vision_end|>
                {%- elif 'text' in content %}
                    {{- content.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role + '\n' }}
        {%- if message.content is string %}
            {{- message.content }}
        {%- else %}
            {%- for content_item in message.content %}
                {%- if 'text' in content_item %}
                    {{- content_item.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {%- if message.tool_calls %}
            {%- for tool_call in message.tool_calls %}
                {%- if (loop.first and message.content) or (not loop.first) %}
                    {{- '\n' }}
                {%- endif %}
                {%- if tool_call.function %}
                    {%- set tool_call = tool_call.function %}
                {%- endif %}
                {{- '<tool_call>\n{"name": "' }}
                {{- tool_call.name }}
                {{- '", "arguments": ' }}
                {%- if tool_call.arguments is string %}
                    {{- tool_call.arguments }}
                {%- else %}
                    {{- tool_call.arguments | tojson }}
                {%- endif %}
                {{- '}\n</tool_call>' }}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {%- if message.content is string %}
            {{- message.content }}
        {%- else %}
            {%- for content in message.content %}
                {%- if content.type == 'image' or 'image' in content or 'image_url' in content %}
                    {%- set image_count.value = image_count.value + 1 %}
                    {%- if add_vision_id %}Picture {{ image_count.value }}: {% endif -%}
                    <|vision_start|><|image_pad|><|vision_end|>
                {%- elif content.type == 'video' or 'video' in content %}
                    {%- set video_count.value = video_count.value + 1 %}
                    {%- if add_vision_id %}Video {{ video_count.value }}: {% endif -%}
                    <|vision_start|><|video_pad|><|vision_end|>
                {%- elif 'text' in content %}
                    {{- content.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"""
QWEN3_VL_CHAT_TEMPLATE_SHA256 = "3636d0f0bd6bef02654cdffdc447b79cb2cef8ab02cc75267345946291a489e4"
assert hashlib.sha256(QWEN3_VL_CHAT_TEMPLATE.encode()).hexdigest() == QWEN3_VL_CHAT_TEMPLATE_SHA256


def preprocessor_config(min_pixels: int = 65536, max_pixels: int = 16777216) -> dict:
  """Qwen3-VL's Hub preprocessor_config.json (QWEN3VL.md §2) with the given pixel budget: patch 16,
  merge 2 (smart_resize factor 32), mean = std = 0.5. transformers' class defaults are Qwen2-VL's
  (patch 14, CLIP statistics), so the file must say all of it."""
  return {
      "size": {"shortest_edge": int(min_pixels), "longest_edge": int(max_pixels)},
      "patch_size": 16, "temporal_patch_size": 2, "merge_size": 2,
      "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
      "image_processor_type": "Qwen2VLImageProcessorFast", "processor_class": "Qwen3VLProcessor",
  }


def tiny_preprocessor_config(min_pixels: int = 64 * 64, max_pixels: int = 16777216) -> dict:
  """The tiny model's processor: Qwen3-VL's settings with a small floor (the Hub's 256 x 256 would turn
  an 8 x 8 digit into 64 image tokens; this keeps it at 2 x 2, like the Qwen2.5-VL tiny model's)."""
  return preprocessor_config(min_pixels, max_pixels)


# Qwen3-VL-Instruct's sampling defaults (model card; generation_config.json). The stages' explicit
# settings replace them.
GENERATION_DEFAULTS = {"do_sample": True, "temperature": 0.7, "top_p": 0.8, "top_k": 20, "repetition_penalty": 1.0}


def canonical_name(name: str) -> str:
  """Any spelling of a checkpoint tensor name -> the name table's (transformers 5.x on-disk names,
  model.visual.* and model.language_model.*). Repackaged checkpoints use visual.* and model.layers.*,
  model.embed_tokens.*, model.norm.* (QWEN3VL.md §6)."""
  if name.startswith("visual."):
    return "model." + name
  if name.startswith(("model.layers.", "model.embed_tokens.", "model.norm.")):
    return "model.language_model." + name[len("model."):]
  return name
