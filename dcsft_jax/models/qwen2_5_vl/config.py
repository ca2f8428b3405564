"""Qwen2.5-VL sizes, read from (and written back to) a Hugging Face `config.json`.

Hub checkpoints store a *flat* config (text fields at the top level, `rope_scaling`), while
transformers 5.x writes a *nested* one (`text_config`, `rope_parameters`). Both are accepted; the
raw dict is kept so that an export writes back exactly what came in.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, ClassVar

# Fields of the text model that Hub configs keep at the top level.
_TEXT_KEYS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "rms_norm_eps", "max_position_embeddings", "hidden_act", "rope_theta",
    "rope_scaling", "rope_parameters", "bos_token_id", "eos_token_id", "pad_token_id",
)


@dataclasses.dataclass(frozen=True)
class VisionConfig:
  depth: int = 32
  hidden_size: int = 1280
  intermediate_size: int = 3420
  num_heads: int = 16
  out_hidden_size: int = 2048
  in_channels: int = 3
  patch_size: int = 14
  temporal_patch_size: int = 2
  spatial_merge_size: int = 2
  window_size: int = 112
  fullatt_block_indexes: tuple[int, ...] = (7, 15, 23, 31)
  tokens_per_second: int = 2
  rope_theta: float = 10000.0
  hidden_act: str = "silu"

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
  def window_merged(self) -> int:
    """Window side in merged tokens (4 for the released models)."""
    return self.window_size // self.spatial_merge_size // self.patch_size


@dataclasses.dataclass(frozen=True)
class TextConfig:
  vocab_size: int = 151936
  hidden_size: int = 2048
  intermediate_size: int = 11008
  num_hidden_layers: int = 36
  num_attention_heads: int = 16
  num_key_value_heads: int = 2
  rms_norm_eps: float = 1e-6
  rope_theta: float = 1_000_000.0
  mrope_section: tuple[int, int, int] = (16, 24, 24)
  max_position_embeddings: int = 128000
  hidden_act: str = "silu"

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_attention_heads


@dataclasses.dataclass(frozen=True)
class Qwen25VLConfig:
  family: ClassVar[str] = "qwen2_5_vl"   # the package under dcsft_jax/models/ (models.registry)
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

  def validate(self) -> "Qwen25VLConfig":
    t, v = self.text, self.vision
    problems = []
    if t.hidden_size % t.num_attention_heads:
      problems.append(f"text hidden_size {t.hidden_size} is not divisible by num_attention_heads {t.num_attention_heads}")
    if t.num_attention_heads % t.num_key_value_heads:
      problems.append(f"num_attention_heads {t.num_attention_heads} is not a multiple of num_key_value_heads {t.num_key_value_heads}")
    if sum(t.mrope_section) * 2 != t.head_dim:
      problems.append(f"sum(mrope_section)={sum(t.mrope_section)} must be head_dim/2={t.head_dim // 2}")
    if v.hidden_size % v.num_heads or v.head_dim % 4:
      problems.append(f"vision head_dim {v.hidden_size}/{v.num_heads} must be an integer multiple of 4")
    if v.out_hidden_size != t.hidden_size:
      problems.append(f"vision out_hidden_size {v.out_hidden_size} != text hidden_size {t.hidden_size}")
    if v.window_merged < 1:
      problems.append(f"window_size {v.window_size} is smaller than one merged token ({v.spatial_merge_size * v.patch_size} px)")
    if any(not 0 <= i < v.depth for i in v.fullatt_block_indexes):
      problems.append(f"fullatt_block_indexes {v.fullatt_block_indexes} fall outside depth {v.depth}")
    for name in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id"):
      if not 0 <= getattr(self, name) < t.vocab_size:
        problems.append(f"{name}={getattr(self, name)} is outside the vocabulary (size {t.vocab_size})")
    if problems:
      raise ValueError("Invalid Qwen2.5-VL config: " + "; ".join(problems))
    return self

  # ---------------------------------------------------------------- HF <-> ours
  @classmethod
  def from_hf_dict(cls, d: dict[str, Any]) -> "Qwen25VLConfig":
    mt = d.get("model_type", "qwen2_5_vl")
    if mt not in ("qwen2_5_vl",):
      raise ValueError(f"config.json has model_type={mt!r}; dcsft_jax ports Qwen2.5-VL (model_type 'qwen2_5_vl')")
    text = dict(d.get("text_config") or {})
    for k in _TEXT_KEYS:  # Hub (flat) configs keep the text fields at the top level.
      if k in d and k not in text:
        text[k] = d[k]
    rope = dict(text.get("rope_parameters") or text.get("rope_scaling") or {})
    rope_theta = rope.get("rope_theta", text.get("rope_theta", 1_000_000.0))
    mrope = tuple(rope.get("mrope_section", (16, 24, 24)))
    vis = dict(d.get("vision_config") or {})
    vrope = vis.get("rope_parameters") or {}
    tc = TextConfig(
        vocab_size=int(text.get("vocab_size", 151936)),
        hidden_size=int(text.get("hidden_size", 8192)),
        intermediate_size=int(text.get("intermediate_size", 29568)),
        num_hidden_layers=int(text.get("num_hidden_layers", 80)),
        num_attention_heads=int(text.get("num_attention_heads", 64)),
        num_key_value_heads=int(text.get("num_key_value_heads", 8)),
        rms_norm_eps=float(text.get("rms_norm_eps", 1e-5)),
        rope_theta=float(rope_theta),
        mrope_section=mrope,
        max_position_embeddings=int(text.get("max_position_embeddings", 128000)),
        hidden_act=text.get("hidden_act", "silu"),
    )
    vc = VisionConfig(
        depth=int(vis.get("depth", 32)),
        hidden_size=int(vis.get("hidden_size", 3584)),
        intermediate_size=int(vis.get("intermediate_size", 3420)),
        num_heads=int(vis.get("num_heads", 16)),
        out_hidden_size=int(vis.get("out_hidden_size", 3584)),
        in_channels=int(vis.get("in_channels", 3)),
        patch_size=int(vis.get("patch_size", 14)),
        temporal_patch_size=int(vis.get("temporal_patch_size", 2)),
        spatial_merge_size=int(vis.get("spatial_merge_size", 2)),
        window_size=int(vis.get("window_size", 112)),
        fullatt_block_indexes=tuple(vis.get("fullatt_block_indexes", (7, 15, 23, 31))),
        tokens_per_second=int(vis.get("tokens_per_second", 4)),
        rope_theta=float(vrope.get("rope_theta", 10000.0)),
        hidden_act=vis.get("hidden_act", "silu"),
    )
    tie = d.get("tie_word_embeddings", text.get("tie_word_embeddings", False))
    eos = text.get("eos_token_id", d.get("eos_token_id"))
    return cls(
        text=tc, vision=vc,
        image_token_id=int(d.get("image_token_id", 151655)),
        video_token_id=int(d.get("video_token_id", 151656)),
        vision_start_token_id=int(d.get("vision_start_token_id", 151652)),
        vision_end_token_id=int(d.get("vision_end_token_id", 151653)),
        tie_word_embeddings=bool(tie),
        bos_token_id=text.get("bos_token_id", d.get("bos_token_id")),
        eos_token_id=tuple(eos) if isinstance(eos, list) else eos,
        pad_token_id=text.get("pad_token_id", d.get("pad_token_id")),
        torch_dtype=str(d.get("torch_dtype") or d.get("dtype") or text.get("dtype") or "bfloat16"),
        raw=d,
    ).validate()

  @classmethod
  def from_pretrained(cls, path: str) -> "Qwen25VLConfig":
    f = os.path.join(path, "config.json") if os.path.isdir(path) else path
    if not os.path.exists(f):
      raise FileNotFoundError(f"No config.json at {f}: point --hf_path at a Hugging Face Qwen2.5-VL directory.")
    try:
      with open(f) as fh:
        d = json.load(fh)
    except json.JSONDecodeError as e:
      raise ValueError(f"{f} is not valid JSON ({e}).") from e
    return cls.from_hf_dict(d)

  def to_hf_dict(self) -> dict[str, Any]:
    """The nested form transformers 5.x writes (and 4.5x reads)."""
    if self.raw is not None:
      return json.loads(json.dumps(self.raw))
    t, v = self.text, self.vision
    eos = list(self.eos_token_id) if isinstance(self.eos_token_id, tuple) else self.eos_token_id
    return {
        "architectures": ["Qwen2_5_VLForConditionalGeneration"],
        "model_type": "qwen2_5_vl",
        "text_config": {
            "model_type": "qwen2_5_vl_text",
            "vocab_size": t.vocab_size, "hidden_size": t.hidden_size,
            "intermediate_size": t.intermediate_size, "num_hidden_layers": t.num_hidden_layers,
            "num_attention_heads": t.num_attention_heads, "num_key_value_heads": t.num_key_value_heads,
            "hidden_act": t.hidden_act, "max_position_embeddings": t.max_position_embeddings,
            "rms_norm_eps": t.rms_norm_eps, "use_sliding_window": False,
            "rope_parameters": {"rope_type": "default", "rope_theta": t.rope_theta,
                                "mrope_section": list(t.mrope_section)},
            "bos_token_id": self.bos_token_id, "eos_token_id": eos, "pad_token_id": self.pad_token_id,
        },
        "vision_config": {
            "model_type": "qwen2_5_vl_vision",
            "depth": v.depth, "hidden_size": v.hidden_size, "intermediate_size": v.intermediate_size,
            "num_heads": v.num_heads, "out_hidden_size": v.out_hidden_size, "in_channels": v.in_channels,
            "patch_size": v.patch_size, "temporal_patch_size": v.temporal_patch_size,
            "spatial_merge_size": v.spatial_merge_size, "window_size": v.window_size,
            "fullatt_block_indexes": list(v.fullatt_block_indexes),
            "tokens_per_second": v.tokens_per_second, "hidden_act": v.hidden_act,
            "rope_parameters": {"rope_type": "axial", "rope_theta": v.rope_theta},
        },
        "image_token_id": self.image_token_id, "video_token_id": self.video_token_id,
        "vision_start_token_id": self.vision_start_token_id, "vision_end_token_id": self.vision_end_token_id,
        "tie_word_embeddings": self.tie_word_embeddings,
        "bos_token_id": self.bos_token_id, "eos_token_id": eos, "pad_token_id": self.pad_token_id,
        "torch_dtype": self.torch_dtype,
    }

  def replace(self, **kw) -> "Qwen25VLConfig":
    return dataclasses.replace(self, raw=None, **kw)


# Special ids of the tiny model: Qwen's ids shifted into a small vocabulary, same roles.
TINY_SPECIAL_OFFSET = 151643 - 400


def tiny_config(*, tie_word_embeddings: bool = False, vocab_size: int = 414, text_layers: int = 3,
                vision_depth: int = 4, fullatt_block_indexes=(1, 3), window_size: int = 56,
                hidden_size: int = 96, num_heads: int = 6, num_kv_heads: int = 2,
                intermediate_size: int = 160, mrope_section=(4, 2, 2), vision_hidden: int = 48,
                vision_heads: int = 4, vision_intermediate: int = 80) -> Qwen25VLConfig:
  """A random-weight Qwen2.5-VL for tests and the embedded default (QWEN25VL.md §1.3)."""
  off = TINY_SPECIAL_OFFSET
  return Qwen25VLConfig(
      text=TextConfig(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
                      num_hidden_layers=text_layers, num_attention_heads=num_heads,
                      num_key_value_heads=num_kv_heads, rms_norm_eps=1e-6, mrope_section=tuple(mrope_section),
                      max_position_embeddings=4096),
      vision=VisionConfig(depth=vision_depth, hidden_size=vision_hidden, intermediate_size=vision_intermediate,
                          num_heads=vision_heads, out_hidden_size=hidden_size, window_size=window_size,
                          fullatt_block_indexes=tuple(fullatt_block_indexes), tokens_per_second=2),
      image_token_id=151655 - off, video_token_id=151656 - off,
      vision_start_token_id=151652 - off, vision_end_token_id=151653 - off,
      tie_word_embeddings=tie_word_embeddings,
      bos_token_id=151643 - off, eos_token_id=151645 - off, pad_token_id=151643 - off,
      torch_dtype="float32",
  ).validate()


def preset(name: str) -> Qwen25VLConfig:
  """The released shapes by name (QWEN25VL.md §1.2), for dry runs and benchmarks: 'tiny', '3b', '7b'."""
  if name == "tiny":
    return tiny_config()
  if name == "3b":
    return Qwen25VLConfig(text=TextConfig(), vision=VisionConfig(out_hidden_size=2048),
                          tie_word_embeddings=True).validate()
  if name == "7b":
    return Qwen25VLConfig(text=TextConfig(vocab_size=152064, hidden_size=3584, intermediate_size=18944,
                                          num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4),
                          vision=VisionConfig(out_hidden_size=3584), tie_word_embeddings=False).validate()
  raise ValueError(f"unknown model preset {name!r}; the presets are tiny, 3b, 7b")


PRESETS = ("tiny", "3b", "7b")


def with_tiny_tokenizer(cfg: Qwen25VLConfig) -> Qwen25VLConfig:
  """`cfg` with the tiny tokenizer's special ids (ids < 414 fit any vocabulary): a random-weight model of
  real shapes that the embedded processor can feed, for speed runs without a checkpoint."""
  t = tiny_config()
  return cfg.replace(image_token_id=t.image_token_id, video_token_id=t.video_token_id,
                     vision_start_token_id=t.vision_start_token_id, vision_end_token_id=t.vision_end_token_id,
                     bos_token_id=t.bos_token_id, eos_token_id=t.eos_token_id, pad_token_id=t.pad_token_id)
