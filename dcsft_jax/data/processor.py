"""Qwen-VL input processing, identical to transformers' processor of each family (PIL backend), for
any family of the seam (the family supplies the position ids).

One example = one user turn (an image and a question) and, for training, the assistant's answer:

  [<|im_start|>system\\n{system}<|im_end|>\\n]<|im_start|>user\\n
  <|vision_start|><|image_pad|>...<|vision_end|>{question}<|im_end|>\\n<|im_start|>assistant\\n{answer}<|im_end|>\\n

with `<|image_pad|>` repeated t*gh*gw/4 times (QWEN25VL.md §2 and §5, QWEN3VL.md §2 and §5). The text
comes from the directory's own chat template (Qwen2.5-VL's inserts a default system turn, Qwen3-VL's
does not), so a real checkpoint and the tiny tokenizer go through the same code.
The image side follows `Qwen2VLImageProcessorPil` step for step (PIL bicubic on uint8, float64
rescale, float32 normalisation), which makes `pixel_values` bit-identical to it. The torchvision
backend (`Qwen2VLImageProcessor`) resizes with its own antialiased bicubic and differs slightly.
"""
from __future__ import annotations

import dataclasses
import io
import json
import math
import os
from typing import Any, Union

import numpy as np
from PIL import Image, UnidentifiedImageError


OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IM_END = "<|im_end|>"
ImageInput = Union[Image.Image, str, os.PathLike, bytes, np.ndarray]


# ----------------------------------------------------------------------------- image side
def smart_resize(height: int, width: int, factor: int = 28, min_pixels: int = 56 * 56,
                 max_pixels: int = 28 * 28 * 1280) -> tuple[int, int]:
  """transformers' smart_resize: sides divisible by `factor`, area within [min_pixels, max_pixels].

  Rounding is Python's (banker's) `round`, as in transformers; do not "fix" it to round-half-up.
  """
  if max(height, width) / min(height, width) > 200:
    raise ValueError(f"absolute aspect ratio must be smaller than 200, got {max(height, width) / min(height, width)} "
                     f"for a {height}x{width} image")
  h_bar = round(height / factor) * factor
  w_bar = round(width / factor) * factor
  if h_bar * w_bar > max_pixels:
    beta = math.sqrt((height * width) / max_pixels)
    h_bar = max(factor, math.floor(height / beta / factor) * factor)
    w_bar = max(factor, math.floor(width / beta / factor) * factor)
  elif h_bar * w_bar < min_pixels:
    beta = math.sqrt(min_pixels / (height * width))
    h_bar = math.ceil(height * beta / factor) * factor
    w_bar = math.ceil(width * beta / factor) * factor
  return h_bar, w_bar


@dataclasses.dataclass(frozen=True)
class ImageSettings:
  """What preprocessor_config.json says about images (defaults: transformers' class defaults)."""
  min_pixels: int = 56 * 56
  max_pixels: int = 28 * 28 * 1280
  patch_size: int = 14
  temporal_patch_size: int = 2
  merge_size: int = 2
  image_mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
  image_std: tuple[float, float, float] = OPENAI_CLIP_STD
  rescale_factor: float = 1 / 255

  @property
  def factor(self) -> int:
    return self.patch_size * self.merge_size

  @classmethod
  def from_dict(cls, d: dict[str, Any], *, source: str = "preprocessor config",
                min_pixels: int | None = None, max_pixels: int | None = None) -> "ImageSettings":
    for flag in ("do_resize", "do_rescale", "do_normalize", "do_convert_rgb"):
      if d.get(flag, True) is False:
        raise ValueError(f"{source}: {flag}=false is not supported (Qwen-VL processors always use it)")
    if d.get("resample", 3) != 3:
      raise ValueError(f"{source}: resample={d['resample']} is not supported, only 3 (bicubic)")
    # Precedence as in Qwen2VLImageProcessorPil.__init__: `size`, then the legacy top-level
    # min_pixels/max_pixels keys, then the caller's override. transformers 4.4x saved
    # size={min_pixels, max_pixels}; newer versions save size={shortest_edge, longest_edge}.
    lo, hi = cls.min_pixels, cls.max_pixels
    size = d.get("size") or {}
    lo = size.get("shortest_edge", size.get("min_pixels", lo))
    hi = size.get("longest_edge", size.get("max_pixels", hi))
    lo, hi = d.get("min_pixels", lo), d.get("max_pixels", hi)
    lo = lo if min_pixels is None else min_pixels
    hi = hi if max_pixels is None else max_pixels
    if not (0 < int(lo) <= int(hi)):
      raise ValueError(f"{source}: need 0 < min_pixels <= max_pixels, got {lo} and {hi}")
    return cls(min_pixels=int(lo), max_pixels=int(hi),
               patch_size=int(d.get("patch_size", cls.patch_size)),
               temporal_patch_size=int(d.get("temporal_patch_size", cls.temporal_patch_size)),
               merge_size=int(d.get("merge_size", cls.merge_size)),
               image_mean=tuple(float(x) for x in d.get("image_mean", OPENAI_CLIP_MEAN)),
               image_std=tuple(float(x) for x in d.get("image_std", OPENAI_CLIP_STD)),
               rescale_factor=float(d.get("rescale_factor", 1 / 255)))

  @classmethod
  def from_file(cls, path: str, **overrides) -> "ImageSettings":
    try:
      with open(path, encoding="utf-8") as f:
        d = json.load(f)
    except FileNotFoundError:
      raise ValueError(f"No preprocessor_config.json at {path}") from None
    except json.JSONDecodeError as e:
      raise ValueError(f"{path} is not valid JSON ({e})") from e
    return cls.from_dict(d, source=path, **overrides)


def _to_rgb(img: Image.Image, what: str) -> Image.Image:
  if img.width < 1 or img.height < 1:
    raise ValueError(f"image {what} is empty ({img.width}x{img.height})")
  # As transformers' convert_to_rgb: transparency is composited onto white, not dropped.
  if "A" in img.getbands() or img.info.get("transparency") is not None:
    rgba = img.convert("RGBA")
    return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
  return img.convert("RGB")


# What PIL raises for a file it cannot decode, including one over its pixel limit (a decompression bomb).
IMAGE_ERRORS = (UnidentifiedImageError, OSError, SyntaxError, Image.DecompressionBombError)


def _hint(e: Exception) -> str:
  if isinstance(e, Image.DecompressionBombError):
    return (f" (PIL refuses images over {2 * Image.MAX_IMAGE_PIXELS:,} pixels: downscale it, raise "
            f"--config.data.max_image_pixels, or drop the record "
            f"with --config.data.skip_bad_records=true)")
  return ""


def load_image(image: ImageInput, *, name: str | None = None) -> Image.Image:
  """A PIL image, a path, encoded bytes or a uint8 [H, W(, C)] array -> an RGB PIL image.

  Errors are ValueErrors naming `name`, else the path.
  """
  path = os.fspath(image) if isinstance(image, (str, os.PathLike)) else None
  # Name both the file and the record when both are known: the user needs the file to fix it.
  what = (f"{path} (record {name})" if path and name else path) or name or type(image).__name__
  if isinstance(image, (str, os.PathLike, bytes)):
    try:
      with Image.open(io.BytesIO(image) if isinstance(image, bytes) else os.fspath(image)) as f:
        f.load()  # decode now, so that a truncated file fails here and names its path
        return _to_rgb(f, what)
    except FileNotFoundError:
      raise ValueError(f"image file not found: {what}") from None
    except IMAGE_ERRORS as e:
      raise ValueError(f"cannot read image {what}: {e}{_hint(e)}") from e
  if isinstance(image, np.ndarray):
    if image.dtype != np.uint8 or not (image.ndim == 2 or (image.ndim == 3 and image.shape[-1] in (1, 3, 4))):
      raise ValueError(f"image {what}: arrays must be uint8 [H, W] or [H, W, 1|3|4], got {image.dtype} {image.shape}")
    return _to_rgb(Image.fromarray(image[..., 0] if image.ndim == 3 and image.shape[-1] == 1 else image), what)
  if isinstance(image, Image.Image):
    return _to_rgb(image, what)
  raise ValueError(f"image {what}: expected a PIL image, a path, bytes or a uint8 array, got {type(image).__name__}")


def preprocess_image(image: ImageInput, settings: ImageSettings = ImageSettings(), *,
                     name: str | None = None) -> tuple[np.ndarray, tuple[int, int, int]]:
  """One still image -> (pixel_patches float32 [gh*gw, C*T*p*p], grid_thw (1, gh, gw))."""
  img = load_image(image, name=name)
  s = settings
  try:
    h, w = smart_resize(img.height, img.width, s.factor, s.min_pixels, s.max_pixels)
  except ValueError as e:
    raise ValueError(f"image {name}: {e}" if name else str(e)) from e
  img = img.resize((w, h), resample=Image.Resampling.BICUBIC)
  # Same arithmetic as transformers: rescale in float64, cast, then normalise in float32.
  x = (np.asarray(img, np.uint8).transpose(2, 0, 1).astype(np.float64) * s.rescale_factor).astype(np.float32)
  mean, std = np.asarray(s.image_mean, np.float32), np.asarray(s.image_std, np.float32)
  x = (x - mean[:, None, None]) / std[:, None, None]
  p, m, T = s.patch_size, s.merge_size, s.temporal_patch_size
  gh, gw = h // p, w // p
  x = x.reshape(3, gh // m, m, p, gw // m, m, p).transpose(1, 4, 2, 5, 0, 3, 6)   # (gh', gw', m, m, C, p, p)
  # A still image is its own T frames: duplicate it along a temporal axis placed after C.
  x = np.broadcast_to(x[:, :, :, :, :, None], x.shape[:5] + (T,) + x.shape[5:])
  return np.ascontiguousarray(x.reshape(gh * gw, 3 * T * p * p), dtype=np.float32), (1, gh, gw)


# ----------------------------------------------------------------------------- text side
def _read_chat_template(directory: str, tokenizer) -> str:
  """The processor's template wins over the tokenizer's, as in transformers' ProcessorMixin."""
  jinja = os.path.join(directory, "chat_template.jinja")
  if os.path.exists(jinja):
    with open(jinja, encoding="utf-8") as f:
      return f.read()
  path = os.path.join(directory, "chat_template.json")
  if os.path.exists(path):
    try:
      with open(path, encoding="utf-8") as f:
        return json.load(f)["chat_template"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
      raise ValueError(f"{path} has no readable 'chat_template' string ({e!r})") from e
  if isinstance(tokenizer.chat_template, str):
    return tokenizer.chat_template
  raise ValueError(f"{directory} has no chat template (chat_template.jinja, chat_template.json or "
                   "tokenizer_config.json's chat_template)")


class Processor:
  """Turns (image, question[, answer]) into model inputs for a model of `cfg`'s family.

  Build it with `Processor.from_pretrained(dir)` (a Hub model directory, or one written by
  `dcsft_jax.data.tokenizer.save_tiny_processor`) or `Processor.tiny()`. Without `cfg`, `family`
  (default: the registry's default) reads the positions, with the processor's own sizes.
  """

  def __init__(self, tokenizer, chat_template: str, image_settings: ImageSettings = ImageSettings(),
               cfg=None, family=None):
    from dcsft_jax.models import registry
    self.tokenizer = tokenizer
    self.chat_template = chat_template
    self.image_settings = image_settings
    ids = {}
    for field, token in (("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
                         ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>"),
                         ("im_end_id", IM_END)):
      i = tokenizer.convert_tokens_to_ids(token)
      if i is None or i == tokenizer.unk_token_id:
        raise ValueError(f"the tokenizer has no {token} token: not a Qwen-VL tokenizer")
      ids[field] = int(i)
    self.im_end_id = ids.pop("im_end_id")
    s = image_settings
    if cfg is None:
      # Only the fields get_rope_index and mm_token_types read; everything else is irrelevant here.
      default = (family or registry.DEFAULT).config_class()
      cfg = dataclasses.replace(default, vision=dataclasses.replace(
          default.vision, patch_size=s.patch_size, temporal_patch_size=s.temporal_patch_size,
          spatial_merge_size=s.merge_size), **ids)
    else:
      wrong = [f"{k}: config {getattr(cfg, k)} vs tokenizer {v}" for k, v in ids.items() if getattr(cfg, k) != v]
      v = cfg.vision
      if (v.patch_size, v.temporal_patch_size, v.spatial_merge_size) != (s.patch_size, s.temporal_patch_size,
                                                                          s.merge_size):
        wrong.append(f"patch/temporal/merge: config {(v.patch_size, v.temporal_patch_size, v.spatial_merge_size)} "
                     f"vs preprocessor {(s.patch_size, s.temporal_patch_size, s.merge_size)}")
      if wrong:
        raise ValueError("model config and processor disagree: " + "; ".join(wrong))
    self.cfg = cfg
    self.family = registry.of(cfg)

  @classmethod
  def from_pretrained(cls, directory: str, *, cfg=None, min_pixels: int | None = None,
                      max_pixels: int | None = None, family=None) -> "Processor":
    """Reads tokenizer.json/tokenizer_config.json, the chat template and preprocessor_config.json."""
    from transformers import AutoTokenizer
    if not os.path.isdir(directory):
      raise ValueError(f"processor directory not found: {directory}")
    try:
      tokenizer = AutoTokenizer.from_pretrained(directory)
    except Exception as e:  # transformers raises many types here; name the directory
      raise ValueError(f"cannot load a tokenizer from {directory}: {e}") from e
    settings = ImageSettings.from_file(os.path.join(directory, "preprocessor_config.json"),
                                       min_pixels=min_pixels, max_pixels=max_pixels)
    return cls(tokenizer, _read_chat_template(directory, tokenizer), settings, cfg, family)

  @classmethod
  def tiny(cls, *, cfg=None, min_pixels: int | None = None, max_pixels: int | None = None,
           family=None) -> "Processor":
    """The tiny model's processor of `cfg`'s family (or `family`), built in memory (same as loading a
    `save_tiny_processor` directory)."""
    from dcsft_jax.data import tokenizer as tiny
    from dcsft_jax.models import registry
    family = registry.of(cfg) if cfg is not None else (family or registry.DEFAULT)
    settings = ImageSettings.from_dict(family.tiny_preprocessor(), min_pixels=min_pixels, max_pixels=max_pixels)
    return cls(tiny.build_tiny_hf_tokenizer(family), family.tiny_chat_template, settings, cfg, family)

  # -------------------------------------------------------------------------- pieces
  def preprocess_image(self, image: ImageInput, *,
                       name: str | None = None) -> tuple[np.ndarray, tuple[int, int, int]]:
    return preprocess_image(image, self.image_settings, name=name)

  def messages(self, question: str, answer: str | None = None, *, with_image: bool = True,
               system_prompt: str | None = None) -> list[dict]:
    msgs = [] if system_prompt is None else [{"role": "system", "content": system_prompt}]
    user = ([{"type": "image"}] if with_image else []) + [{"type": "text", "text": question}]
    msgs.append({"role": "user", "content": user})
    if answer is not None:
      msgs.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
    return msgs

  def render(self, messages: list[dict], *, add_generation_prompt: bool) -> str:
    return self.tokenizer.apply_chat_template(messages, chat_template=self.chat_template, tokenize=False,
                                              add_generation_prompt=add_generation_prompt)

  def prompt_text(self, question: str, answer: str | None = None, *, with_image: bool = True,
                  system_prompt: str | None = None, drop_system: bool = False) -> tuple[str, int]:
    """(chat text with one <|image_pad|> per image, index where the answer starts)."""
    if drop_system and system_prompt is not None:
      raise ValueError("pass either system_prompt or drop_system, not both")
    prompt = self.render(self.messages(question, with_image=with_image, system_prompt=system_prompt),
                         add_generation_prompt=True)
    if drop_system and prompt.startswith("<|im_start|>system"):
      raise ValueError("this chat template always inserts a system turn, so drop_system is impossible; "
                       "pass a template without a default system prompt to use it")
    if answer is None:
      return prompt, len(prompt)
    full = self.render(self.messages(question, answer, with_image=with_image, system_prompt=system_prompt),
                       add_generation_prompt=False)
    if not full.startswith(prompt) or not full[len(prompt):].startswith(answer + IM_END):
      raise ValueError("the chat template does not render the assistant turn as generation prompt + answer + "
                       f"{IM_END}; cannot locate the answer tokens")
    return full, len(prompt)

  # -------------------------------------------------------------------------- one example
  def encode(self, image: ImageInput | None, question: str, answer: str | None = None, *,
             system_prompt: str | None = None, drop_system: bool = False,
             name: str | None = None) -> dict[str, np.ndarray]:
    """One example -> numpy arrays (no batch axis).

    input_ids, attention_mask, loss_mask, mm_token_type_ids: int32 [L];
    positions: int32 [3, L] (M-RoPE); rope_delta: int32 scalar;
    pixel_values: float32 [gh*gw, C*T*p*p]; image_grid_thw: int32 [n_images, 3] (n_images 0 or 1).

    loss_mask marks the tokens to be predicted: the answer and its <|im_end|>, not the "\\n" the
    template writes after it. Without an answer the sequence ends in "<|im_start|>assistant\\n"
    (a generation prompt) and loss_mask is all 0. `name` (a record id, a path) goes into errors.
    system_prompt=None keeps the template's default system turn.
    """
    label = f" (record {name})" if name else ""
    if image is not None:
      pixel_values, grid = self.preprocess_image(image, name=name)
    else:
      pixel_values, grid = np.zeros((0, self.cfg.vision.patch_dim), np.float32), None
    try:
      text, answer_start = self.prompt_text(question, answer, with_image=image is not None,
                                            system_prompt=system_prompt, drop_system=drop_system)
    except ValueError as e:
      raise ValueError(f"{e}{label}") from e
    enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = np.asarray(enc["input_ids"], np.int32)
    offsets = np.asarray(enc["offset_mapping"], np.int64).reshape(-1, 2)
    loss = np.zeros_like(ids)
    if answer is not None:
      answer_end = answer_start + len(answer) + len(IM_END)
      inside = (offsets[:, 0] >= answer_start) & (offsets[:, 1] <= answer_end)
      straddles = (offsets[:, 0] < answer_start) & (offsets[:, 1] > answer_start)
      if straddles.any():
        raise ValueError(f"the answer {answer!r} merges with the text before it into one token{label}; "
                         "its loss mask would be ambiguous")
      loss[inside] = 1
    # Expanding in id space equals transformers' text-level expansion: <|image_pad|> is atomic.
    pads = np.flatnonzero(ids == self.cfg.image_token_id)
    n_images = 0 if grid is None else 1
    if len(pads) != n_images:
      raise ValueError(f"the rendered prompt has {len(pads)} <|image_pad|> tokens for {n_images} images{label} "
                       "(does the question contain <|image_pad|>?)")
    if grid is not None:
      reps = np.ones(len(ids), np.int64)
      reps[pads[0]] = int(np.prod(grid)) // self.image_settings.merge_size ** 2
      ids, loss = np.repeat(ids, reps), np.repeat(loss, reps)
    grid_thw = np.asarray([grid] if grid is not None else np.zeros((0, 3)), np.int32)
    types = self.family.mm_token_types(ids, self.cfg)
    positions, delta = self.family.rope_index(ids[None], self.cfg, image_grid_thw=grid_thw,
                                              mm_token_type_ids=types[None])
    return {
        "input_ids": ids.astype(np.int32),
        "attention_mask": np.ones(len(ids), np.int32),
        "loss_mask": loss.astype(np.int32),
        "mm_token_type_ids": types.astype(np.int32),
        "positions": positions[:, 0],
        "rope_delta": np.int32(delta[0]),
        "pixel_values": pixel_values,
        "image_grid_thw": grid_thw,
    }

  def measure(self, image: ImageInput | None, question: str, answer: str | None = None, *,
              system_prompt: str | None = None, name: str | None = None) -> tuple[int, int]:
    """(patches, tokens) of `encode`'s output, reading only the image header: cheap enough to plan
    the batches of a whole dataset before decoding any pixels. `patches` is the room the image needs
    in a batch: its own patches, or more where the family's vision layout needs it (Family.patch_room)."""
    patches = 0
    if image is not None:
      if isinstance(image, (str, os.PathLike, bytes)):
        what = name if isinstance(image, bytes) else os.fspath(image)
        try:
          with Image.open(io.BytesIO(image) if isinstance(image, bytes) else os.fspath(image)) as f:
            w, h = f.size
        except FileNotFoundError:
          raise ValueError(f"image file not found: {what}") from None
        except IMAGE_ERRORS as e:
          raise ValueError(f"cannot read image {what}: {e}{_hint(e)}") from e
      else:
        img = load_image(image, name=name)
        w, h = img.size
      s = self.image_settings
      try:
        rh, rw = smart_resize(h, w, s.factor, s.min_pixels, s.max_pixels)
      except ValueError as e:
        raise ValueError(f"image {name or image}: {e}") from e
      patches = (rh // s.patch_size) * (rw // s.patch_size)
    text, _ = self.prompt_text(question, answer, with_image=image is not None, system_prompt=system_prompt)
    n = len(self.tokenizer(text, add_special_tokens=False)["input_ids"])
    tokens = n + (patches // self.image_settings.merge_size ** 2 - 1 if image is not None else 0)
    if image is not None:     # the room the family's layout needs (Qwen2.5-VL: a thin image's windows)
      patches = self.family.patch_room((1, rh // s.patch_size, rw // s.patch_size), self.cfg.vision)
    return patches, tokens

  def decode(self, ids, *, skip_special_tokens: bool = True) -> str:
    return self.tokenizer.decode(np.asarray(ids).tolist(), skip_special_tokens=skip_special_tokens)
