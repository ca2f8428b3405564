"""Qwen3-VL (dense) sizes, read from (and written back to) a Hugging Face `config.json`.

transformers' `Qwen3VLConfig` (configuration_qwen3_vl.py) is always *nested*: `text_config` and
`vision_config` dicts. Hub files give the text rope the old way (`rope_scaling` + `rope_theta` inside
`text_config`), transformers 5.x writes `rope_parameters`; both are read. Unlike Qwen2.5-VL a *flat*
config is not nested by transformers (its text fields are silently ignored), so it is refused here.
The raw dict is kept so that an export writes back exactly what came in.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, ClassVar

# Text fields whose presence at the top level (without a text_config) marks a flat config.
_FLAT_TEXT_KEYS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                   "num_key_value_heads", "vocab_size", "rope_theta", "rope_scaling", "head_dim")

# transformers 5.25's class defaults (Qwen3VLTextConfig / Qwen3VLVisionConfig): what it builds for a
# missing key, so a missing key reads as transformers reads it (QWEN3VL.md §1.1 "silent fallbacks").
_HF_TEXT_DEFAULTS = dict(vocab_size=151936, hidden_size=4096, intermediate_size=22016, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=None, head_dim=128, rms_norm_eps=1e-6,
                         max_position_embeddings=128000, rope_theta=500000.0, mrope_section=(24, 20, 20),
                         hidden_act="silu")
_HF_VISION_DEFAULTS = dict(depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16, out_hidden_size=3584,
                           in_channels=3, patch_size=16, temporal_patch_size=2, spatial_merge_size=2,
                           num_position_embeddings=2304, deepstack_visual_indexes=(8, 16, 24), rope_theta=10000.0,
                           hidden_act="gelu_pytorch_tanh")


@dataclasses.dataclass(frozen=True)
class VisionConfig:
  """transformers' Qwen3VLVisionConfig (defaults: the 8B/32B tower, out_hidden_size of the 8B)."""
  depth: int = 27
  hidden_size: int = 1152
  intermediate_size: int = 4304
  num_heads: int = 16
  out_hidden_size: int = 4096
  in_channels: int = 3
  patch_size: int = 16
  temporal_patch_size: int = 2
  spatial_merge_size: int = 2
  num_position_embeddings: int = 2304          # a learned S x S grid, S = sqrt(this) (48)
  deepstack_visual_indexes: tuple[int, ...] = (8, 16, 24)
  rope_theta: float = 10000.0
  hidden_act: str = "gelu_pytorch_tanh"

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads

  @property
  def patch_dim(self) -> int:
    return self.in_channels * self.temporal_patch_size * self.patch_size * self.patch_size

  @property
  def merge_unit(self) -> int:
    return self.spatial_merge_size ** 2

  @property
  def num_grid_per_side(self) -> int:
    """Side of the learned position-embedding grid (transformers: int(sqrt(num_position_embeddings)))."""
    return int(math.isqrt(self.num_position_embeddings))


@dataclasses.dataclass(frozen=True)
class TextConfig:
  """transformers' Qwen3VLTextConfig (defaults: the 8B). head_dim is its own field, not hidden/heads."""
  vocab_size: int = 151936
  hidden_size: int = 4096
  intermediate_size: int = 12288
  num_hidden_layers: int = 36
  num_attention_heads: int = 32
  num_key_value_heads: int = 8
  head_dim: int = 128
  rms_norm_eps: float = 1e-6
  rope_theta: float = 5_000_000.0
  mrope_section: tuple[int, int, int] = (24, 20, 20)   # interleaved T,H,W (QWEN3VL.md §4.3)
  max_position_embeddings: int = 262144
  hidden_act: str = "silu"


@dataclasses.dataclass(frozen=True)
class Qwen3VLConfig:
  family: ClassVar[str] = "qwen3_vl"   # the package under dcsft_jax/models/ (models.registry)
  text: TextConfig = TextConfig()
  vision: VisionConfig = VisionConfig()
  image_token_id: int = 151655
  video_token_id: int = 151656
  vision_start_token_id: int = 151652
  vision_end_token_id: int = 151653
  tie_word_embeddings: bool = False
  bos_token_id: int | None = 151643
  eos_token_id: int | tuple[int, ...] | None = 151645
  pad_token_id: int | None = None
  torch_dtype: str = "bfloat16"
  # The config.json this was read from, written back verbatim on export.
  raw: dict | None = dataclasses.field(default=None, compare=False, hash=False, repr=False)

  def validate(self) -> "Qwen3VLConfig":
    """The constraints of QWEN3VL.md §1.3; one ValueError listing every problem."""
    t, v = self.text, self.vision
    problems = []
    if t.num_attention_heads % t.num_key_value_heads:
      problems.append(f"num_attention_heads {t.num_attention_heads} is not a multiple of num_key_value_heads "
                      f"{t.num_key_value_heads}")
    if t.head_dim % 2:
      problems.append(f"text head_dim {t.head_dim} is odd")
    half = t.head_dim // 2
    if len(t.mrope_section) != 3 or sum(t.mrope_section) != half:
      problems.append(f"mrope_section {tuple(t.mrope_section)} must be 3 numbers summing to head_dim/2={half}")
    elif 3 * t.mrope_section[1] > half or 3 * t.mrope_section[2] > half:
      problems.append(f"mrope_section {tuple(t.mrope_section)}: 3*s_H and 3*s_W must be <= head_dim/2={half} "
                      f"(interleaved sections)")
    if v.hidden_size % v.num_heads or v.head_dim % 4:
      problems.append(f"vision head_dim {v.hidden_size}/{v.num_heads} must be an integer multiple of 4")
    if v.num_grid_per_side ** 2 != v.num_position_embeddings:
      problems.append(f"num_position_embeddings {v.num_position_embeddings} is not a perfect square")
    if v.out_hidden_size != t.hidden_size:
      problems.append(f"vision out_hidden_size {v.out_hidden_size} != text hidden_size {t.hidden_size}")
    ds = tuple(v.deepstack_visual_indexes)
    if any(not 0 <= i < v.depth for i in ds):
      problems.append(f"deepstack_visual_indexes {ds} fall outside the vision depth {v.depth}")
    if list(ds) != sorted(set(ds)):
      problems.append(f"deepstack_visual_indexes {ds} must be increasing")
    if len(ds) > t.num_hidden_layers:
      problems.append(f"{len(ds)} deepstack levels but only {t.num_hidden_layers} text layers")
    for name in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id"):
      if not 0 <= getattr(self, name) < t.vocab_size:
        problems.append(f"{name}={getattr(self, name)} is outside the vocabulary (size {t.vocab_size})")
    if problems:
      raise ValueError("Invalid Qwen3-VL config: " + "; ".join(problems))
    return self

  # ---------------------------------------------------------------- HF <-> ours
  @classmethod
  def from_hf_dict(cls, d: dict[str, Any]) -> "Qwen3VLConfig":
    mt = d.get("model_type", "qwen3_vl")
    if mt != "qwen3_vl":
      raise ValueError(f"config.json has model_type={mt!r}; this reader is for Qwen3-VL (model_type 'qwen3_vl')")
    if not d.get("text_config") and any(k in d for k in _FLAT_TEXT_KEYS):
      raise ValueError("flat Qwen3-VL config.json (text fields such as hidden_size at the top level, no text_config): "
                       "transformers ignores them and builds its default text model; move the text fields into a "
                       "'text_config' dict and the vision fields into 'vision_config'")
    text = dict(d.get("text_config") or {})
    vis = dict(d.get("vision_config") or {})
    dt, dv = _HF_TEXT_DEFAULTS, _HF_VISION_DEFAULTS
    # transformers 5.x: rope_parameters; Hub files: rope_scaling + rope_theta (convert_rope_params_to_dict).
    rope = dict(text.get("rope_parameters") or text.get("rope_scaling") or {})
    heads = int(text.get("num_attention_heads", dt["num_attention_heads"]))
    kv = text.get("num_key_value_heads")
    tc = TextConfig(
        vocab_size=int(text.get("vocab_size", dt["vocab_size"])),
        hidden_size=int(text.get("hidden_size", dt["hidden_size"])),
        intermediate_size=int(text.get("intermediate_size", dt["intermediate_size"])),
        num_hidden_layers=int(text.get("num_hidden_layers", dt["num_hidden_layers"])),
        num_attention_heads=heads,
        num_key_value_heads=heads if kv is None else int(kv),
        head_dim=int(text.get("head_dim", dt["head_dim"])),
        rms_norm_eps=float(text.get("rms_norm_eps", dt["rms_norm_eps"])),
        rope_theta=float(rope.get("rope_theta", text.get("rope_theta", dt["rope_theta"]))),
        mrope_section=tuple(int(s) for s in rope.get("mrope_section", dt["mrope_section"])),
        max_position_embeddings=int(text.get("max_position_embeddings", dt["max_position_embeddings"])),
        hidden_act=text.get("hidden_act", dt["hidden_act"]),
    )
    vrope = vis.get("rope_parameters") or {}
    vc = VisionConfig(
        depth=int(vis.get("depth", dv["depth"])),
        hidden_size=int(vis.get("hidden_size", dv["hidden_size"])),
        intermediate_size=int(vis.get("intermediate_size", dv["intermediate_size"])),
        num_heads=int(vis.get("num_heads", dv["num_heads"])),
        out_hidden_size=int(vis.get("out_hidden_size", dv["out_hidden_size"])),
        in_channels=int(vis.get("in_channels", dv["in_channels"])),
        patch_size=int(vis.get("patch_size", dv["patch_size"])),
        temporal_patch_size=int(vis.get("temporal_patch_size", dv["temporal_patch_size"])),
        spatial_merge_size=int(vis.get("spatial_merge_size", dv["spatial_merge_size"])),
        num_position_embeddings=int(vis.get("num_position_embeddings", dv["num_position_embeddings"])),
        deepstack_visual_indexes=tuple(int(i) for i in vis.get("deepstack_visual_indexes",
                                                               dv["deepstack_visual_indexes"])),
        rope_theta=float(vrope.get("rope_theta", dv["rope_theta"])),
        hidden_act=vis.get("hidden_act", dv["hidden_act"]),
    )
    eos = text.get("eos_token_id", d.get("eos_token_id"))
    return cls(
        text=tc, vision=vc,
        image_token_id=int(d.get("image_token_id", 151655)),
        video_token_id=int(d.get("video_token_id", 151656)),
        vision_start_token_id=int(d.get("vision_start_token_id", 151652)),
        vision_end_token_id=int(d.get("vision_end_token_id", 151653)),
        # Only the top-level value ties (PreTrainedModel.get_expanded_tied_weights_keys), QWEN3VL.md §1.1.
        tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
        bos_token_id=text.get("bos_token_id", d.get("bos_token_id")),
        eos_token_id=tuple(eos) if isinstance(eos, list) else eos,
        pad_token_id=text.get("pad_token_id", d.get("pad_token_id")),
        torch_dtype=str(d.get("torch_dtype") or d.get("dtype") or text.get("torch_dtype") or text.get("dtype")
                        or "bfloat16"),
        raw=d,
    ).validate()

  @classmethod
  def from_pretrained(cls, path: str) -> "Qwen3VLConfig":
    f = os.path.join(path, "config.json") if os.path.isdir(path) else path
    if not os.path.exists(f):
      raise FileNotFoundError(f"No config.json at {f}: point --hf_path at a Hugging Face Qwen3-VL directory.")
    try:
      with open(f) as fh:
        d = json.load(fh)
    except json.JSONDecodeError as e:
      raise ValueError(f"{f} is not valid JSON ({e}).") from e
    return cls.from_hf_dict(d)

  def to_hf_dict(self) -> dict[str, Any]:
    """The nested form transformers 5.x writes (rope_parameters; mrope_interleaved as the Hub files say)."""
    if self.raw is not None:
      return json.loads(json.dumps(self.raw))
    t, v = self.text, self.vision
    eos = list(self.eos_token_id) if isinstance(self.eos_token_id, tuple) else self.eos_token_id
    return {
        "architectures": ["Qwen3VLForConditionalGeneration"],
        "model_type": "qwen3_vl",
        "text_config": {
            "model_type": "qwen3_vl_text",
            "vocab_size": t.vocab_size, "hidden_size": t.hidden_size,
            "intermediate_size": t.intermediate_size, "num_hidden_layers": t.num_hidden_layers,
            "num_attention_heads": t.num_attention_heads, "num_key_value_heads": t.num_key_value_heads,
            "head_dim": t.head_dim, "hidden_act": t.hidden_act,
            "max_position_embeddings": t.max_position_embeddings, "rms_norm_eps": t.rms_norm_eps,
            "attention_bias": False, "tie_word_embeddings": self.tie_word_embeddings,
            "rope_parameters": {"rope_type": "default", "rope_theta": t.rope_theta,
                                "mrope_section": list(t.mrope_section), "mrope_interleaved": True},
            "bos_token_id": self.bos_token_id, "eos_token_id": eos, "pad_token_id": self.pad_token_id,
        },
        "vision_config": {
            "model_type": "qwen3_vl_vision",
            "depth": v.depth, "hidden_size": v.hidden_size, "intermediate_size": v.intermediate_size,
            "num_heads": v.num_heads, "out_hidden_size": v.out_hidden_size, "in_channels": v.in_channels,
            "patch_size": v.patch_size, "temporal_patch_size": v.temporal_patch_size,
            "spatial_merge_size": v.spatial_merge_size, "num_position_embeddings": v.num_position_embeddings,
            "deepstack_visual_indexes": list(v.deepstack_visual_indexes), "hidden_act": v.hidden_act,
            "rope_parameters": {"rope_type": "axial", "rope_theta": v.rope_theta},
        },
        "image_token_id": self.image_token_id, "video_token_id": self.video_token_id,
        "vision_start_token_id": self.vision_start_token_id, "vision_end_token_id": self.vision_end_token_id,
        "tie_word_embeddings": self.tie_word_embeddings,
        "bos_token_id": self.bos_token_id, "eos_token_id": eos, "pad_token_id": self.pad_token_id,
        "torch_dtype": self.torch_dtype,
    }

  def replace(self, **kw) -> "Qwen3VLConfig":
    return dataclasses.replace(self, raw=None, **kw)


# Special ids of the tiny model: Qwen's ids shifted into a small vocabulary, same roles.
TINY_SPECIAL_OFFSET = 151643 - 400


def tiny_config(*, tie_word_embeddings: bool = False, head_dim: int | None = None,
                deepstack_visual_indexes=(0, 2), vocab_size: int = 414, text_layers: int = 3,
                vision_depth: int = 3, hidden_size: int = 64, num_heads: int = 4, num_kv_heads: int = 2,
                intermediate_size: int = 128, mrope_section=None, vision_hidden: int = 32, vision_heads: int = 2,
                vision_intermediate: int = 64, num_position_embeddings: int = 16) -> Qwen3VLConfig:
  """A random-weight Qwen3-VL for tests (QWEN3VL.md §1.3). head_dim None: hidden/heads; mrope_section
  None: (s_T, s_W, s_W) with s_H = s_W = head_dim/8 and s_T the rest (for head_dim 16: (4, 2, 2))."""
  off = TINY_SPECIAL_OFFSET
  hd = hidden_size // num_heads if head_dim is None else head_dim
  if mrope_section is None:
    s = hd // 8
    mrope_section = (hd // 2 - 2 * s, s, s)
  return Qwen3VLConfig(
      text=TextConfig(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
                      num_hidden_layers=text_layers, num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
                      head_dim=hd, rms_norm_eps=1e-6, rope_theta=5_000_000.0, mrope_section=tuple(mrope_section),
                      max_position_embeddings=4096),
      vision=VisionConfig(depth=vision_depth, hidden_size=vision_hidden, intermediate_size=vision_intermediate,
                          num_heads=vision_heads, out_hidden_size=hidden_size,
                          num_position_embeddings=num_position_embeddings,
                          deepstack_visual_indexes=tuple(deepstack_visual_indexes)),
      image_token_id=151655 - off, video_token_id=151656 - off,
      vision_start_token_id=151652 - off, vision_end_token_id=151653 - off,
      tie_word_embeddings=tie_word_embeddings,
      bos_token_id=151643 - off, eos_token_id=151645 - off, pad_token_id=151643 - off,
      torch_dtype="float32",
  ).validate()


def _released(hidden, layers, heads, inter, tie, small_tower) -> Qwen3VLConfig:
  """A released dense Qwen3-VL (QWEN3VL.md §1.2): 128-wide heads, 8 KV heads, theta 5e6, [24,20,20]."""
  tower = (dict(depth=24, hidden_size=1024, intermediate_size=4096, deepstack_visual_indexes=(5, 11, 17))
           if small_tower else dict(depth=27, hidden_size=1152, intermediate_size=4304,
                                    deepstack_visual_indexes=(8, 16, 24)))
  return Qwen3VLConfig(
      text=TextConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                      num_key_value_heads=8, intermediate_size=inter),
      vision=VisionConfig(out_hidden_size=hidden, num_heads=16, **tower),
      tie_word_embeddings=tie).validate()


PRESETS = ("2b", "4b", "8b", "32b")


def preset(name: str) -> Qwen3VLConfig:
  """The released shapes by name: 'tiny', '2b', '4b', '8b', '32b' (2B/4B tied, 8B/32B untied)."""
  if name == "tiny":
    return tiny_config()
  if name == "2b":
    return _released(2048, 28, 16, 6144, True, True)
  if name == "4b":
    return _released(2560, 36, 32, 9728, True, True)
  if name == "8b":
    return _released(4096, 36, 32, 12288, False, False)
  if name == "32b":
    return _released(5120, 64, 64, 25600, False, False)
  raise ValueError(f"unknown Qwen3-VL preset {name!r}; the presets are tiny, {', '.join(PRESETS)}")


def with_tiny_tokenizer(cfg: Qwen3VLConfig) -> Qwen3VLConfig:
  """`cfg` with the tiny tokenizer's special ids (ids < 414 fit any vocabulary): a random-weight model of
  real shapes that the embedded processor can feed, for speed runs without a checkpoint."""
  t = tiny_config()
  return cfg.replace(image_token_id=t.image_token_id, video_token_id=t.video_token_id,
                     vision_start_token_id=t.vision_start_token_id, vision_end_token_id=t.vision_end_token_id,
                     bos_token_id=t.bos_token_id, eos_token_id=t.eos_token_id, pad_token_id=t.pad_token_id)
