"""The tiny tokenizer of the tiny default models, written out as a processor directory of a family.

A byte-level BPE with exactly 400 ordinary tokens (ids 0..399), trained on a fixed built-in corpus,
followed by Qwen's 14 special tokens at ids 400..413: Qwen's real ids minus `TINY_SPECIAL_OFFSET`,
so `tiny_config()` and this tokenizer agree on every role. The normalizer, pre-tokenizer and
decoder are Qwen2's own (transformers' `Qwen2Tokenizer` rebuilds exactly this pipeline when it
loads the directory), so the tiny and real tokenizers segment text the same way.
"""
from __future__ import annotations

import functools
import json
import os
from typing import TYPE_CHECKING

from dcsft_jax import atomic

if TYPE_CHECKING:  # the return annotation only; transformers is imported where it is used
  import transformers

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

# The special tokens in Qwen's id order (151643..151656).
SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
)
NUM_ORDINARY = 400
TINY_VOCAB_SIZE = NUM_ORDINARY + len(SPECIAL_TOKENS)  # 414 == tiny_config().text.vocab_size

# Qwen2's pre-tokenizer split (transformers/models/qwen2/tokenization_qwen2.py).
PRETOKENIZE_REGEX = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|"""
                     r""" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""")

# Roles as in Qwen2.5-VL's tokenizer_config.json: no BOS, eos <|im_end|>, pad <|endoftext|>.
_ROLE_TOKENS = {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "unk_token": None, "bos_token": None}

# Training text. Changing a single character changes the merges, hence every tiny checkpoint's
# meaning of its token ids: treat this string as frozen.
_CORPUS = """\
zero one two three four five six seven eight nine
Zero One Two Three Four Five Six Seven Eight Nine
0 1 2 3 4 5 6 7 8 9 10 11 12 20 100
Please provide the object name in the image. Output the answer using one word.
You are a helpful assistant.
What is the digit in the image? The digit is seven. The answer is three.
Describe the image. The image shows a small handwritten number on a dark background.
What object is in the picture? It is a cat. It is a dog. It is a bird, a ship, a car or a truck.
Answer the question with a single word. Answer: nine.
The model reads the picture and writes the name of the object it sees.
A photo of an airplane, an automobile, a horse, a frog, a deer and a cat.
Is there a person in the photo? Yes. No. There are two people and one dog.
How many objects are there? There are four objects: one red box, two blue balls and a green cup.
The quick brown fox jumps over the lazy dog.
User: what color is the sky? Assistant: the sky is blue.
Count the dots, then give the number as a word, for example eight or zero.
"""
DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# Answers are bare digit names right after "assistant\n": repeat them so that each one, with or
# without a leading space, is a single token.
_CORPUS += ("\n".join(DIGIT_NAMES) + "\n") * 3 + ("The answer is " + ". The answer is ".join(DIGIT_NAMES) + ".\n") * 2


@functools.lru_cache(maxsize=None)
def _tiny_tokenizer_json() -> str:
  tok = Tokenizer(models.BPE())
  tok.normalizer = normalizers.NFC()
  tok.pre_tokenizer = pre_tokenizers.Sequence([
      pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
      pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
  ])
  tok.decoder = decoders.ByteLevel()
  tok.post_processor = processors.ByteLevel(trim_offsets=False)
  # The full 256-byte alphabet makes every string encodable; the remaining 144 ids are merges.
  trainer = trainers.BpeTrainer(vocab_size=NUM_ORDINARY, min_frequency=1, show_progress=False,
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[])
  # Qwen has "\n\n" as one token (271); giving the tiny BPE that merge too keeps answers that start
  # with a newline as awkward here as there (see Processor.encode's boundary check).
  tok.train_from_iterator(_CORPUS.splitlines() + ["\n\n"] * 8, trainer=trainer)
  if tok.get_vocab_size() != NUM_ORDINARY:
    raise RuntimeError(f"tiny BPE trained to {tok.get_vocab_size()} tokens, expected {NUM_ORDINARY}: "
                       "the built-in corpus is too small for the requested vocabulary")
  tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
  for i, t in enumerate(SPECIAL_TOKENS):
    if tok.token_to_id(t) != NUM_ORDINARY + i:
      raise RuntimeError(f"special token {t} got id {tok.token_to_id(t)}, expected {NUM_ORDINARY + i}")
  return tok.to_str()


def build_tiny_tokenizer() -> Tokenizer:
  """The tiny tokenizer as a `tokenizers.Tokenizer` (deterministic: same corpus, same ids)."""
  return Tokenizer.from_str(_tiny_tokenizer_json())


def _family(family):
  from dcsft_jax.models import registry
  return registry.DEFAULT if family is None else family


def build_tiny_hf_tokenizer(family=None) -> "transformers.PreTrainedTokenizerFast":
  """The tiny tokenizer wrapped as transformers' fast tokenizer, with Qwen's roles and the family's chat
  template (the default family's when None)."""
  from transformers import PreTrainedTokenizerFast
  return PreTrainedTokenizerFast(tokenizer_object=build_tiny_tokenizer(),
                                 chat_template=_family(family).tiny_chat_template, **_ROLE_TOKENS)


def _tokenizer_config(chat_template: str) -> dict:
  added = {str(NUM_ORDINARY + i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                                   "single_word": False, "special": True}
           for i, t in enumerate(SPECIAL_TOKENS)}
  return {
      "add_bos_token": False, "add_prefix_space": False, "added_tokens_decoder": added,
      "additional_special_tokens": list(SPECIAL_TOKENS[1:]),
      "bos_token": None, "chat_template": chat_template, "clean_up_tokenization_spaces": False,
      "eos_token": "<|im_end|>", "errors": "replace", "model_max_length": 131072, "pad_token": "<|endoftext|>",
      "split_special_tokens": False, "tokenizer_class": "Qwen2Tokenizer", "unk_token": None,
  }


def generation_config(family=None) -> dict:
  """The family's Instruct generation_config.json, at the tiny tokenizer's ids: both end tokens (<|im_end|>,
  <|endoftext|>) and its sampling defaults (Qwen2.5-VL: repetition penalty 1.05, near-greedy), which the
  stages' explicit settings replace, as the authors' generate calls replace them."""
  ids = {t: NUM_ORDINARY + i for i, t in enumerate(SPECIAL_TOKENS)}
  return {"bos_token_id": ids["<|endoftext|>"], "pad_token_id": ids["<|endoftext|>"],
          "eos_token_id": [ids["<|im_end|>"], ids["<|endoftext|>"]], **_family(family).generation_defaults}


def save_tiny_processor(directory: str, *, family=None, min_pixels: int | None = None,
                        max_pixels: int | None = None) -> str:
  """Writes the files of a processor directory of `family` (the default family's when None) for the tiny
  tokenizer; returns `directory`. min/max_pixels: the family's preprocessor defaults when None.

  tokenizer.json, tokenizer_config.json (chat template inside, as on the Hub), chat_template.json
  (what processors read), preprocessor_config.json, generation_config.json. Loadable with `AutoTokenizer.from_pretrained`
  and `Qwen2VLImageProcessorPil.from_pretrained`.
  """
  family = _family(family)
  pixels = {k: v for k, v in (("min_pixels", min_pixels), ("max_pixels", max_pixels)) if v}
  os.makedirs(directory, exist_ok=True)
  files = {
      "tokenizer.json": _tiny_tokenizer_json(),
      "tokenizer_config.json": json.dumps(_tokenizer_config(family.tiny_chat_template), indent=2, ensure_ascii=False),
      "chat_template.json": json.dumps({"chat_template": family.tiny_chat_template}, indent=2, ensure_ascii=False),
      "preprocessor_config.json": json.dumps(family.tiny_preprocessor(**pixels), indent=2),
      "generation_config.json": json.dumps(generation_config(family), indent=2),
  }
  for name, text in files.items():
    atomic.write_text(os.path.join(directory, name), text + ("" if text.endswith("\n") else "\n"))
  return directory
