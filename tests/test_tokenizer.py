"""The tiny tokenizer: Qwen's special-token layout at ids 400..413, round trips, chat template, saved directory."""
import json
import os
import subprocess
import sys

import pytest
import transformers

from dcsft_jax.models.qwen2_5_vl.processing import QWEN2_VL_CHAT_TEMPLATE, preprocessor_config  # noqa: F401
from dcsft_jax.data import tokenizer as T
from dcsft_jax.models.qwen2_5_vl.config import TINY_SPECIAL_OFFSET, tiny_config

QWEN_SPECIAL_IDS = {  # the real Qwen2.5 ids (QWEN25VL.md §5)
    "<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645, "<|object_ref_start|>": 151646,
    "<|object_ref_end|>": 151647, "<|box_start|>": 151648, "<|box_end|>": 151649, "<|quad_start|>": 151650,
    "<|quad_end|>": 151651, "<|vision_start|>": 151652, "<|vision_end|>": 151653, "<|vision_pad|>": 151654,
    "<|image_pad|>": 151655, "<|video_pad|>": 151656,
}
PROMPT = "Please provide the object name in the image. Output the answer using one word."
DIGITS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
SYSTEM = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"


@pytest.fixture(scope="module")
def saved_dir(tmp_path_factory):
  return T.save_tiny_processor(str(tmp_path_factory.mktemp("tiny_proc")), min_pixels=4 * 784, max_pixels=802816)


def test_special_ids_are_qwens_shifted_and_match_tiny_config():
  tok = T.build_tiny_tokenizer()
  assert tok.get_vocab_size() == T.TINY_VOCAB_SIZE == tiny_config().text.vocab_size == 414
  for name, real in QWEN_SPECIAL_IDS.items():
    assert tok.token_to_id(name) == real - TINY_SPECIAL_OFFSET, name
  assert [tok.token_to_id(t) for t in T.SPECIAL_TOKENS] == list(range(400, 414))
  cfg = tiny_config()
  assert cfg.image_token_id == tok.token_to_id("<|image_pad|>") == 412
  assert cfg.video_token_id == tok.token_to_id("<|video_pad|>") == 413
  assert (cfg.vision_start_token_id, cfg.vision_end_token_id) == (409, 410)
  assert cfg.eos_token_id == tok.token_to_id("<|im_end|>") and cfg.pad_token_id == tok.token_to_id("<|endoftext|>")
  # 0..399 are all ordinary BPE tokens.
  vocab = tok.get_vocab(with_added_tokens=False)
  assert sorted(vocab.values()) == list(range(400))


def test_round_trip_and_ordinary_ids():
  tok = T.build_tiny_tokenizer()
  for text in [PROMPT, "You are a helpful assistant.", " ".join(DIGITS), *DIGITS, *(" " + d for d in DIGITS),
               "Unseen: naïve café, 東京 😀\n\ttabs  and  spaces"]:
    ids = tok.encode(text).ids
    assert all(0 <= i < 400 for i in ids), text
    assert tok.decode(ids) == text
  # The corpus words are single merged tokens, so prompts stay short.
  for d in DIGITS:
    assert len(tok.encode(d).ids) == len(tok.encode(" " + d).ids) == 1, d
  assert len(tok.encode(PROMPT).ids) < 40
  # Special tokens are atomic and survive decoding with skip_special_tokens=False.
  text = "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>seven<|im_end|>\n"
  ids = tok.encode(text).ids
  assert ids[:1] == [401] and ids[5:8] == [409, 412, 410] and 402 in ids
  assert tok.decode(ids, skip_special_tokens=False) == text


def test_build_is_deterministic_across_processes():
  code = "from dcsft_jax.data import tokenizer as T; print(T.build_tiny_tokenizer().to_str())"
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, PYTHONPATH=root, PYTHONHASHSEED="12345")
  other = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
  assert other.strip() == T.build_tiny_tokenizer().to_str().strip()


@pytest.mark.parametrize("source", ["memory", "dir"])
def test_chat_template_matches_documented_format(source, saved_dir):
  tok = T.build_tiny_hf_tokenizer() if source == "memory" else transformers.AutoTokenizer.from_pretrained(saved_dir)
  user = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}
  answer = {"role": "assistant", "content": [{"type": "text", "text": "A cat."}]}
  user_turn = "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>What is it?<|im_end|>\n"
  assert tok.apply_chat_template([user, answer], tokenize=False) == \
      SYSTEM + user_turn + "<|im_start|>assistant\nA cat.<|im_end|>\n"
  assert tok.apply_chat_template([user], tokenize=False, add_generation_prompt=True) == \
      SYSTEM + user_turn + "<|im_start|>assistant\n"
  system = {"role": "system", "content": "Be brief."}
  assert tok.apply_chat_template([system, user], tokenize=False) == \
      "<|im_start|>system\nBe brief.<|im_end|>\n" + user_turn
  assert tok.apply_chat_template([user], tokenize=False, add_vision_id=True).startswith(
      SYSTEM + "<|im_start|>user\nPicture 1: <|vision_start|>")


def test_saved_directory_loads_with_transformers(saved_dir):
  names = set(os.listdir(saved_dir))
  assert {"tokenizer.json", "tokenizer_config.json", "chat_template.json", "preprocessor_config.json"} <= names
  tok = transformers.AutoTokenizer.from_pretrained(saved_dir)
  assert type(tok).__name__ == "Qwen2Tokenizer"
  assert len(tok) == 414
  assert (tok.eos_token, tok.eos_token_id, tok.pad_token, tok.pad_token_id) == ("<|im_end|>", 402, "<|endoftext|>", 400)
  assert tok.bos_token is None
  ref = T.build_tiny_tokenizer()
  for text in [PROMPT, " ".join(DIGITS), "<|im_start|>assistant\nnine<|im_end|>\n"]:
    assert tok(text).input_ids == ref.encode(text).ids  # no BOS/EOS added, same segmentation
  assert tok.convert_tokens_to_ids("<|image_pad|>") == 412
  assert tok.chat_template == QWEN2_VL_CHAT_TEMPLATE

  ip = transformers.Qwen2VLImageProcessorPil.from_pretrained(saved_dir)
  assert (ip.size["shortest_edge"], ip.size["longest_edge"]) == (4 * 784, 802816)
  assert (ip.patch_size, ip.temporal_patch_size, ip.merge_size, ip.resample) == (14, 2, 2, 3)
  with open(os.path.join(saved_dir, "preprocessor_config.json")) as f:
    pc = json.load(f)
  assert pc["image_mean"] == [0.48145466, 0.4578275, 0.40821073]
  assert pc["image_std"] == [0.26862954, 0.26130258, 0.27577711]
