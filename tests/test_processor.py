"""dcsft_jax.data.processor against transformers' Qwen2_5_VLProcessor (PIL backend) and get_rope_index."""

import numpy as np
import pytest
import transformers
from PIL import Image
from transformers.models.qwen2_vl import image_processing_pil_qwen2_vl as hf_image

from dcsft_jax.models.qwen2_5_vl.processing import QWEN2_VL_CHAT_TEMPLATE, preprocessor_config  # noqa: F401
from dcsft_jax.data import processor as P
from dcsft_jax.data import tokenizer as T
from dcsft_jax.models.qwen2_5_vl.config import Qwen25VLConfig, tiny_config

MAX_PIXELS = 802816  # the paper's budget
QUESTION = "Please provide the object name in the image. Output the answer using one word."


class HFProcessor(transformers.Qwen2_5_VLProcessor):
  """QWEN25VL.md §7.12: without torchvision the video processor cannot load, so leave it out."""

  @classmethod
  def get_attributes(cls):
    return ["image_processor", "tokenizer"]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
  return T.save_tiny_processor(str(tmp_path_factory.mktemp("tiny_proc")), max_pixels=MAX_PIXELS)


@pytest.fixture(scope="module")
def hf(tiny_dir):
  proc = HFProcessor.from_pretrained(tiny_dir)
  assert type(proc.image_processor).__name__ == "Qwen2VLImageProcessorPil"
  model = transformers.Qwen2_5_VLModel(transformers.Qwen2_5_VLConfig(**tiny_config().to_hf_dict()))
  return proc, model


@pytest.fixture(scope="module")
def ours(tiny_dir):
  return P.Processor.from_pretrained(tiny_dir, cfg=tiny_config())


def random_image(h: int, w: int, mode: str = "RGB", seed: int = 0) -> Image.Image:
  rng = np.random.default_rng(seed + 7 * h + w)
  channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
  a = rng.integers(0, 256, (h, w, channels), dtype=np.uint8)
  # A gradient under the noise, so that the bicubic filter sees both structure and edges.
  a[..., 0] = a[..., 0] // 4 + np.linspace(0, 190, w).astype(np.uint8)[None, :]
  image = Image.fromarray(a[..., 0] if channels == 1 else a)
  assert image.mode == mode
  return image


def hf_encode(hf, image, question, answer=None, system=None):
  proc, model = hf
  msgs = [] if system is None else [{"role": "system", "content": system}]
  msgs.append({"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]})
  if answer is not None:
    msgs.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
  text = proc.apply_chat_template(msgs, tokenize=False, add_generation_prompt=answer is None)
  out = proc(text=[text], images=[image], return_tensors="pt")
  pos, delta = model.get_rope_index(out["input_ids"], out["mm_token_type_ids"], out["image_grid_thw"],
                                    attention_mask=out["attention_mask"])
  return {k: v.numpy() for k, v in out.items()}, pos.numpy(), delta.numpy()


CASES = [  # (h, w, mode, expected merged grid)
    (224, 224, "RGB", (8, 8)),
    (480, 640, "RGB", (17, 23)),
    (100, 900, "RGB", (4, 32)),
    (900, 100, "RGB", (32, 4)),
    (37, 61, "RGB", (2, 3)),          # below min_pixels: scaled up
    (1200, 1500, "RGB", (28, 35)),    # above max_pixels=802816: scaled down
    (150, 90, "RGBA", (5, 3)),        # transparency is composited onto white
    (123, 77, "L", (4, 3)),
]


@pytest.mark.parametrize("h,w,mode,merged", CASES, ids=[f"{h}x{w}{m}" for h, w, m, _ in CASES])
def test_parity_with_transformers(hf, ours, h, w, mode, merged):
  image = random_image(h, w, mode)
  ref, pos, delta = hf_encode(hf, image, QUESTION, "seven")
  got = ours.encode(image, QUESTION, "seven")
  assert tuple(got["image_grid_thw"][0]) == (1, 2 * merged[0], 2 * merged[1])
  np.testing.assert_array_equal(got["image_grid_thw"], ref["image_grid_thw"])
  assert got["pixel_values"].dtype == np.float32 and got["pixel_values"].shape[1] == 1176
  np.testing.assert_array_equal(got["pixel_values"], ref["pixel_values"])  # bit-identical
  for k in ("input_ids", "attention_mask", "mm_token_type_ids"):
    np.testing.assert_array_equal(got[k], ref[k][0], err_msg=k)
  assert (got["input_ids"] == tiny_config().image_token_id).sum() == merged[0] * merged[1]
  np.testing.assert_array_equal(got["positions"], pos[:, 0])
  assert int(got["rope_delta"]) == int(delta[0, 0])
  assert {k: v.dtype for k, v in got.items() if k != "pixel_values"} == {
      k: np.dtype(np.int32) for k in got if k != "pixel_values"}


@pytest.mark.parametrize("system", [None, "Be brief."])
def test_generation_prompt_and_system_prompt_parity(hf, ours, system):
  image = random_image(64, 200)
  ref, pos, _ = hf_encode(hf, image, "What is it?", None, system)
  got = ours.encode(image, "What is it?", system_prompt=system)
  np.testing.assert_array_equal(got["input_ids"], ref["input_ids"][0])
  np.testing.assert_array_equal(got["positions"], pos[:, 0])
  tail = ours.tokenizer("<|im_start|>assistant\n", add_special_tokens=False).input_ids
  assert got["input_ids"][-len(tail):].tolist() == tail
  assert got["loss_mask"].sum() == 0


@pytest.mark.parametrize("answer", ["seven", " seven", "A cat.", "café au lait, 東京!", "two words\nand lines"])
def test_loss_mask_is_exactly_answer_and_im_end(ours, answer):
  got = ours.encode(random_image(56, 56), QUESTION, answer)
  ids, mask = got["input_ids"], got["loss_mask"]
  on = np.flatnonzero(mask)
  assert on.size and np.all(np.diff(on) == 1), "one contiguous span"
  tok = ours.tokenizer
  answer_ids = tok(answer, add_special_tokens=False).input_ids
  assert ids[on].tolist() == answer_ids + [tok.convert_tokens_to_ids("<|im_end|>")]
  assert tok.decode(ids[on].tolist()) == answer + "<|im_end|>"
  # The prompt ends with "assistant\n" just before the span; the template's "\n" after <|im_end|> is not trained.
  prompt = tok.decode(ids[:on[0]].tolist())
  assert prompt.endswith("<|im_end|>\n<|im_start|>assistant\n")
  assert on[-1] == len(ids) - 2 and tok.decode(ids[-1:].tolist()) == "\n"
  assert got["mm_token_type_ids"][on].sum() == 0


def test_answer_that_merges_with_the_prompt_is_rejected(ours):
  with pytest.raises(ValueError, match="record r17"):
    ours.encode(random_image(56, 56), QUESTION, "\nnine", name="r17")  # "\n\n" is one token


def test_text_only_and_drop_system(ours):
  got = ours.encode(None, "What is two plus two?", "four")
  assert got["pixel_values"].shape == (0, 1176) and got["image_grid_thw"].shape == (0, 3)
  L = len(got["input_ids"])
  np.testing.assert_array_equal(got["positions"], np.broadcast_to(np.arange(L), (3, L)))
  assert int(got["rope_delta"]) == 0
  # The official template always writes a system turn, so it cannot be dropped ...
  with pytest.raises(ValueError, match="always inserts a system turn"):
    ours.encode(None, "hi", drop_system=True)
  # ... but a template without a default one can.
  no_default = QWEN2_VL_CHAT_TEMPLATE.replace(
      "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n", "")
  plain = P.Processor(ours.tokenizer, no_default, ours.image_settings, tiny_config())
  text = ours.tokenizer.decode(plain.encode(random_image(56, 56), "hi", "one", drop_system=True)["input_ids"])
  assert text.startswith("<|im_start|>user\n<|vision_start|><|image_pad|>")


def test_smart_resize_examples_and_edge_cases():
  assert P.smart_resize(480, 640) == (476, 644)
  assert P.smart_resize(224, 224) == (224, 224) and (224 // 28) ** 2 == 64
  assert P.smart_resize(42, 70) == (56, 56)        # banker's rounding: 1.5 -> 2 and 2.5 -> 2
  with pytest.raises(ValueError, match="aspect ratio"):
    P.smart_resize(10, 2010)
  assert P.smart_resize(10, 2000, max_pixels=MAX_PIXELS)[0] == 28  # ratio exactly 200 is allowed
  rng = np.random.default_rng(0)
  for _ in range(3000):
    h, w = (int(x) for x in rng.integers(1, 4000, 2))
    if max(h, w) / min(h, w) > 200:
      continue
    lo = int(rng.choice([3136, 4 * 784, 256 * 784]))
    hi = int(rng.choice([MAX_PIXELS, 1003520, 12845056, 64 * 784]))
    assert P.smart_resize(h, w, 28, lo, hi) == hf_image.smart_resize(h, w, 28, lo, hi), (h, w, lo, hi)


def test_processor_in_memory_equals_loaded(ours):
  tiny = P.Processor.tiny(max_pixels=MAX_PIXELS)
  image = random_image(300, 500)
  a, b = tiny.encode(image, QUESTION, "nine"), ours.encode(image, QUESTION, "nine")
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_preprocessor_config_forms_and_overrides(tmp_path, tiny_dir):
  base = preprocessor_config()
  del base["min_pixels"], base["max_pixels"]
  newer = dict(base, size={"shortest_edge": 8 * 784, "longest_edge": 500 * 784})
  s = P.ImageSettings.from_dict(newer)
  assert (s.min_pixels, s.max_pixels) == (8 * 784, 500 * 784)
  assert P.ImageSettings.from_dict(newer, max_pixels=MAX_PIXELS).max_pixels == MAX_PIXELS
  assert P.ImageSettings.from_dict(dict(newer, min_pixels=3136)).min_pixels == 3136  # legacy key wins
  assert P.ImageSettings.from_dict(base).max_pixels == 28 * 28 * 1280  # transformers' default
  old_size = P.ImageSettings.from_dict(dict(base, size={"min_pixels": 5 * 784, "max_pixels": 6 * 784}))
  assert (old_size.min_pixels, old_size.max_pixels) == (5 * 784, 6 * 784)
  ref = transformers.Qwen2VLImageProcessorPil(**newer)
  assert (ref.size["shortest_edge"], ref.size["longest_edge"]) == (s.min_pixels, s.max_pixels)

  assert P.Processor.from_pretrained(tiny_dir, max_pixels=123 * 784).image_settings.max_pixels == 123 * 784
  bad = tmp_path / "preprocessor_config.json"
  bad.write_text("{not json")
  with pytest.raises(ValueError, match="preprocessor_config.json"):
    P.ImageSettings.from_file(str(bad))


def test_config_mismatch_is_reported(tiny_dir):
  with pytest.raises(ValueError, match="image_token_id: config 151655 vs tokenizer 412"):
    P.Processor.from_pretrained(tiny_dir, cfg=Qwen25VLConfig())


def test_image_inputs_and_errors(ours, tmp_path):
  image = random_image(90, 120)
  path = tmp_path / "img.png"
  image.save(path)
  from_path = ours.encode(str(path), QUESTION, "one")
  from_array = ours.encode(np.asarray(image), QUESTION, "one")
  from_bytes = ours.encode(path.read_bytes(), QUESTION, "one")
  for other in (from_array, from_bytes):
    np.testing.assert_array_equal(other["pixel_values"], from_path["pixel_values"])

  missing = tmp_path / "nope.jpg"
  with pytest.raises(ValueError, match="nope.jpg"):
    ours.encode(str(missing), QUESTION)
  corrupt = tmp_path / "corrupt.png"
  corrupt.write_bytes(path.read_bytes()[:60])
  with pytest.raises(ValueError, match="corrupt.png"):
    ours.encode(str(corrupt), QUESTION)
  with pytest.raises(ValueError, match="rec-3.*aspect ratio"):
    ours.encode(Image.new("RGB", (1000, 4)), QUESTION, name="rec-3")
  with pytest.raises(ValueError, match="uint8"):
    ours.encode(np.zeros((8, 8, 3), np.float32), QUESTION)
