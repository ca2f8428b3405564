"""The verifier: is a model's answer right? Used by pass-rate scoring, GRPO rewards and evaluation.

One checker per task, dispatched by `verify(task, prediction, answer)`:
  classification  `exact_match`: the paper's rule, strip().strip('.').lower() equality.
  grounding       `grounding_match`: the first "[x1, y1, x2, y2]" of the prediction against the
                  reference box, IoU >= 0.5 with the VLM-R1 convention the paper's code uses (`iou`).
  reasoning       `reasoning_match`: option letters by our own rule; anything else by math_verify
                  when it is installed, OR-ed with our own parser (`_fallback_reasoning_match`), which
                  is always there, so the project runs (and scores plain-text answers) without it.
                  With config.verify.math_verify_only (`configure`): math_verify alone, as ms-swift's
                  'accuracy' reward calls it (`math_verify_only_match`).

Predictions pass through `clean_completion` first: decoded completions keep <|im_end|> when
special tokens are not skipped, and that must not turn a right answer wrong.
"""
from __future__ import annotations

import functools
import importlib
import logging
import math
import re
import threading
from collections.abc import Iterable, Sequence

from dcsft_jax import optional
from dcsft_jax.data.records import TASKS, parse_box

__all__ = ["METRICS", "TASKS", "clean_completion", "configure", "exact_match", "extract_answer", "grounding_match",
           "iou", "judge", "math_verify_only_match", "reasoning_match", "verify", "verify_many"]

# Seconds math_verify may spend parsing/comparing one answer (its own SIGALRM timeout; main thread only).
MATH_VERIFY_TIMEOUT_S = 5
# Tests (and users who want bit-for-bit reproducible scores across installs) can switch it off.
USE_MATH_VERIFY = True
# config.verify.math_verify_only, set for the run by `configure`: reasoning answers by math_verify alone.
MATH_VERIFY_ONLY = False


def configure(config) -> None:
  """Applies a run's `verify` section (dcsft_jax/config_base.py) to this process's verifier."""
  global MATH_VERIFY_ONLY
  MATH_VERIFY_ONLY = bool(config.verify.math_verify_only)


_END_TOKENS = ("<|im_end|>", "<|endoftext|>")


def clean_completion(text: str) -> str:
  """`text` without trailing end-of-turn tokens (any number, any order) and surrounding whitespace."""
  s = text.strip()
  while True:
    for tok in _END_TOKENS:
      if s.endswith(tok):
        s = s[:-len(tok)].rstrip()
        break
    else:
      return s


# ----------------------------------------------------------------------------- classification
def _norm_label(s: str) -> str:
  return s.strip().strip(".").lower()


def exact_match(prediction: str, answer: str) -> bool:
  """The paper's classification rule: both sides strip().strip('.').lower(), then equality."""
  return _norm_label(prediction) == _norm_label(answer)


# ----------------------------------------------------------------------------- grounding
# The paper's (VLM-R1's) box regex: the first bracketed list of four numbers, signs and decimals allowed.
_PRED_BOX = re.compile(r"\[(\s*-?\d*\.?\d+\s*),\s*(\s*-?\d*\.?\d+\s*),\s*(\s*-?\d*\.?\d+\s*),\s*(\s*-?\d*\.?\d+\s*)\]")

Box = Sequence[float]


def iou(box1: Box, box2: Box) -> float:
  """IoU of two [x1, y1, x2, y2] boxes in the VLM-R1 convention the paper's rewards and evals use.

  The intersection treats x2/y2 as exclusive pixel ends (hence the -1/+1) while the areas do not,
  so an overlap only 1 wide counts as none; identical boxes wider and taller than 1 still give 1.0.
  Kept as is on purpose: pass rates and rewards must match the paper's, not a cleaner IoU.
  A union <= 0 (degenerate boxes) gives 0.0 rather than a ZeroDivisionError.
  """
  if len(box1) != 4 or len(box2) != 4:
    raise ValueError(f"boxes must be [x1, y1, x2, y2], got {list(box1)!r} and {list(box2)!r}")
  inter_x1 = max(box1[0], box2[0])
  inter_y1 = max(box1[1], box2[1])
  inter_x2 = min(box1[2] - 1, box2[2] - 1)
  inter_y2 = min(box1[3] - 1, box2[3] - 1)
  if inter_x1 < inter_x2 and inter_y1 < inter_y2:
    inter = (inter_x2 - inter_x1 + 1) * (inter_y2 - inter_y1 + 1)
  else:
    inter = 0
  area1 = (box1[2] - box1[0]) * (box1[3] - box1[1])
  area2 = (box2[2] - box2[0]) * (box2[3] - box2[1])
  union = area1 + area2 - inter
  if union <= 0:
    return 0.0
  return float(inter) / union


def _prediction_box(text: str) -> tuple[float, float, float, float] | None:
  m = _PRED_BOX.search(text)
  if m is None:
    return None
  x1, y1, x2, y2 = (float(g) for g in m.groups())
  return x1, y1, x2, y2


def grounding_match(prediction: str, answer: str, threshold: float = 0.5) -> bool:
  """True iff the first "[x1, y1, x2, y2]" in `prediction` has IoU >= threshold with the reference box.

  Finds the box inside Qwen2.5-VL's usual '{"bbox_2d": [...], "label": ...}' or a ```json fence;
  no box means wrong. A reference that is not a box raises ValueError: that is a data bug, and
  scoring it False would hide it inside a pass rate.
  """
  ref = parse_box(answer)
  if ref is None:
    raise ValueError(f"grounding reference {answer!r} is not a box [x1, y1, x2, y2] with x1 <= x2, y1 <= y2")
  box = _prediction_box(prediction)
  if box is None:
    return False
  return iou(box, ref) >= threshold


# ----------------------------------------------------------------------------- reasoning: extraction
_ANSWER_TAG = re.compile(r"<answer>(.*?)(?:</answer>|$)", re.DOTALL | re.IGNORECASE)
_ANSWER_IS = re.compile(r"answer\s*(?:is|:)\s*:?", re.IGNORECASE)


def _last_boxed(s: str) -> str | None:
  """Content of the last \\boxed{...} (or \\fbox{...}) with balanced braces; None if there is none."""
  for m in reversed(list(re.finditer(r"\\(?:boxed|fbox)\s*\{", s))):
    depth, start = 1, m.end()
    for i in range(start, len(s)):
      if s[i] == "{":
        depth += 1
      elif s[i] == "}":
        depth -= 1
        if depth == 0:
          return s[start:i]
    # Unbalanced (a truncated completion): try an earlier, complete one.
  return None


def extract_answer(text: str) -> str:
  """The final answer in a completion (or a reference), for reasoning tasks.

  Order: within the last <answer>...</answer> if there is one (the model's declared answer, so a
  \\boxed{} left in its <think> part does not win), the last balanced \\boxed{...}; else the text
  after the last "answer is" / "Answer:" up to the end of that line; else the whole text.
  Markdown emphasis and quotes around the result are dropped.
  """
  s = clean_completion(text)
  tags = _ANSWER_TAG.findall(s)
  if tags:
    s = tags[-1]
  boxed = _last_boxed(s)
  if boxed is not None:
    s = boxed
  else:
    hits = list(_ANSWER_IS.finditer(s))
    if hits:
      rest = s[hits[-1].end():].strip()
      s = rest.split("\n", 1)[0] if rest else s
  return s.strip().strip("*`\"' \t\n").strip()


# ----------------------------------------------------------------------------- reasoning: option letters
_REF_LETTER = re.compile(r"\(?([A-H])\)?\.?")
# A bare letter, "(B)", "B." / "B:" / "B)"; case-insensitive since the letter is all there is.
_PRED_LETTER_ONLY = re.compile(r"(?:option|choice)?\s*\(?([A-Ha-h])\)?[.:]?", re.IGNORECASE)
# "(B) 42", "B. 42", "B: 42", "B) 42". A bare letter followed by a space is NOT accepted: "A cat"
# (or "a cat") would otherwise count as option A.
_PRED_LETTER_PREFIX = re.compile(r"(?:option|choice)?\s*(?:\(([A-Ha-h])\)|([A-Ha-h])[.:)])(?![A-Za-z])", re.IGNORECASE)


def _option_letter(answer: str) -> str | None:
  """The option letter if `answer` is one ("B", "(B)", "B."), else None. Upper case only, so a
  math reference like "e" or "a" stays an expression."""
  m = _REF_LETTER.fullmatch(answer.strip())
  return m.group(1) if m else None


def _letter_match(extracted: str, letter: str) -> bool:
  m = _PRED_LETTER_ONLY.fullmatch(extracted)
  if m:
    return m.group(1).upper() == letter
  m = _PRED_LETTER_PREFIX.match(extracted)
  if m:
    return (m.group(1) or m.group(2)).upper() == letter
  return False


# ----------------------------------------------------------------------------- reasoning: numbers, strings
_TEXT_WRAP = re.compile(r"\\(?:text|textbf|textit|mathrm|mathbf|mbox)\s*\{([^{}]*)\}")
_SPACING = re.compile(r"\\[,;:! ]|\\q?quad\b")
_FRAC = re.compile(r"([-+]?)\\[dt]?frac\s*\{\s*([^{}]+?)\s*\}\s*\{\s*([^{}]+?)\s*\}")
_PLAIN = r"[-+]?(?:\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?"
_SLASH = re.compile(rf"({_PLAIN})\s*/\s*({_PLAIN})")
# A unit: a word of 2+ letters, or a single letter after a space ("5 m"). "3x" is not "3 with unit x".
_UNIT = r"(?:\s*[A-Za-z]{2,}|\s+[A-Za-z])(?:\^?\{?\d\}?|²|³)?\.?"
_DEGREE = re.compile(r"\^\s*\{?\s*\\circ\s*\}?|°|\\degree")


def _strip_latex(s: str) -> str:
  s = s.replace("$", "").replace("\\left", "").replace("\\right", "").replace("−", "-")
  s = _SPACING.sub(" ", s)
  prev = None
  while prev != s:  # nested wrappers: \text{\textbf{x}}
    prev, s = s, _TEXT_WRAP.sub(r"\1", s)
  return s.strip()


def _plain(s: str) -> float:
  return float(s.replace(",", ""))


def _number_values(s: str) -> list[float] | None:
  """The values a numeric answer may stand for; None if it is not a number (with an optional unit).

  "50%" stands for both 50 and 0.5 (models answer percentages either way); fractions "3/4",
  "\\frac{3}{4}" and "\\dfrac" give 0.75; "1,234" is 1234; a trailing unit word is ignored.
  """
  t = _strip_latex(s).rstrip(".").strip()
  t = _DEGREE.sub("", t).strip()
  t = re.sub(rf"^(.*?[\d}}%])({_UNIT})$", r"\1", t).strip()  # a unit only after something numeric
  t = t.replace("\\%", "%")
  percent = t.endswith("%")
  if percent:
    t = t[:-1].strip()
  value: float | None = None
  try:
    if m := _FRAC.fullmatch(t):
      num, den = _plain(m.group(2)), _plain(m.group(3))
      value = (-1 if m.group(1) == "-" else 1) * num / den
    elif m := _SLASH.fullmatch(t):
      value = _plain(m.group(1)) / _plain(m.group(2))
    elif re.fullmatch(_PLAIN, t):
      value = _plain(t)
  except (ValueError, ZeroDivisionError):
    return None
  if value is None or not math.isfinite(value):
    return None
  return [value, value / 100] if percent else [value]


def _norm_expr(s: str) -> str:
  """Normalised text for the last-resort string comparison."""
  s = _strip_latex(s).replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
  s = re.sub(r"\s+", "", s)
  return s.strip(".").lower()


def _fallback_reasoning_match(prediction: str, answer: str) -> bool:
  """Our own reasoning checker (no math_verify): option letters, then numbers, then normalised strings.

  Both sides go through `extract_answer`. Numbers match within rel 1e-6 / abs 1e-9; if both sides
  are numbers, that decides. Otherwise: equality after removing $, spaces, \\left/\\right and
  \\text{} wrappers, a trailing '.', and case.
  """
  pred, ref = extract_answer(prediction), extract_answer(answer)
  letter = _option_letter(ref)
  if letter is not None:
    return _letter_match(pred, letter)
  pv, rv = _number_values(pred), _number_values(ref)
  if pv is not None and rv is not None:
    return any(math.isclose(p, r, rel_tol=1e-6, abs_tol=1e-9) for p in pv for r in rv)
  return bool(pred) and _norm_expr(pred) == _norm_expr(ref)


# ----------------------------------------------------------------------------- reasoning: math_verify
@functools.cache
def _load_math_verify():
  # Heavy (sympy), so imported on the first math answer; without it the fallback parser judges alone.
  return optional.load("math_verify", "reasoning answers are checked by the built-in parser only "
                       "(numbers, option letters, normalised text), without symbolic equivalence")


def _looks_mathematical(ref: str) -> bool:
  """Whether math_verify may judge `ref`. It reads words as products of symbols ("blue" == "bleu"
  == b*l*u*e), so references with a word in them (outside LaTeX commands) are left to our parser."""
  if not re.search(r"\d|\\", ref):
    return False
  bare = re.sub(r"\\[A-Za-z]+", " ", _TEXT_WRAP.sub(" ", ref))
  return re.search(r"[A-Za-z]{2,}", bare) is None


def _math_verify_match(pred: str, ref: str) -> bool | None:
  """math_verify's verdict on two extracted answers; None when it is absent, fails, or cannot parse."""
  mv = _load_math_verify() if USE_MATH_VERIFY else None
  if mv is None or not pred or not _looks_mathematical(ref):
    return None
  # Its timeouts use signal.alarm, which only the main thread may set; elsewhere (reward workers)
  # they must be off, or parse raises.
  timeout = MATH_VERIFY_TIMEOUT_S if threading.current_thread() is threading.main_thread() else None

  def dollars(s: str) -> str:
    return s if "$" in s else f"${s}$"
  try:
    gold = mv.parse(dollars(ref), parsing_timeout=timeout)
    target = mv.parse(dollars(pred), parsing_timeout=timeout)
    if not gold or not target:
      return None
    return bool(mv.verify(gold, target, timeout_seconds=timeout))
  except Exception:  # noqa: BLE001 - a reward must not crash on an optional library; the fallback decides
    return None


@functools.cache
def _accuracy_reward_setup():
  """math_verify and the prediction's extraction config of ms-swift's `accuracy` reward (`MathAccuracy`,
  byyx666/DC-SFT swift/plugin/orm.py:235-278): LaTeX only, \\boxed{} first, nothing without an anchor."""
  mv = optional.require("math_verify", "verify.math_verify_only")
  NormalizationConfig = importlib.import_module("math_verify.parser").NormalizationConfig  # its own dependency's
  # The fork passes boxed=True. Where the installed latex2sympy2_extended takes 'all' | 'last' | 'none'
  # (1.11 does), True matches none of them and would switch boxed normalisation off: 'all' stands for it.
  boxed = "all" if isinstance(NormalizationConfig().boxed, str) else True
  norm = NormalizationConfig(nits=False, malformed_operators=False, basic_latex=True, equations=True, boxed=boxed,
                             units=True)
  # Newer releases log a deprecation line for equations=True on every answer; the fork's value stays.
  logging.getLogger("latex2sympy2_extended.math_normalization").addFilter(
      lambda r: "equations=True" not in r.getMessage())
  return mv, [mv.LatexExtractionConfig(normalization_config=norm, boxed_match_priority=0,
                                       try_extract_without_anchor=False)]


def math_verify_only_match(prediction: str, answer: str) -> tuple[bool, str]:
  """(right, why not) by math_verify alone, as ms-swift's `accuracy` reward judges: the reference parsed
  with math_verify's default extraction (first match), the prediction with the reward's LaTeX-only one,
  then `verify(gold, pred)`. A reference it cannot parse (a bare option letter) scores 0, as there."""
  mv, pred_config = _accuracy_reward_setup()
  timeout = MATH_VERIFY_TIMEOUT_S if threading.current_thread() is threading.main_thread() else None
  try:
    gold = mv.parse(answer, extraction_mode="first_match", parsing_timeout=timeout)
  except Exception:  # noqa: BLE001 - as an unparsed reference
    gold = []
  if not gold:
    return False, "math-verify parses no reference answer (scored 0, as by ms-swift's accuracy reward)"
  try:
    pred = mv.parse(prediction, extraction_config=pred_config, extraction_mode="first_match",
                    parsing_timeout=timeout)
    ok = bool(mv.verify(gold, pred, timeout_seconds=timeout))
  except Exception:  # noqa: BLE001 - the reward's own edge case: 0
    return False, "math-verify failed on this answer"
  if ok:
    return True, ""
  if not pred:
    return False, "math-verify finds no LaTeX answer (\\boxed{} or $...$)"
  return False, f"math-verify: {str(pred[-1])[:40]!r} is not {str(gold[-1])[:40]!r}"


def reasoning_match(prediction: str, answer: str) -> bool:
  """Multiple-choice or math answer check.

  An option-letter reference ("B", "(B)", "B.") is always judged by our letter rule. Otherwise the
  answer is right if math_verify (when installed and the reference is mathematical) says so OR the
  fallback parser does: math_verify knows symbolic equivalence, the fallback knows units, plain-text
  answers and whatever math_verify cannot parse. With MATH_VERIFY_ONLY, math_verify alone decides.
  """
  if MATH_VERIFY_ONLY:
    return math_verify_only_match(prediction, answer)[0]
  ref = extract_answer(answer)
  if _option_letter(ref) is None and _math_verify_match(extract_answer(prediction), ref):
    return True
  return _fallback_reasoning_match(prediction, answer)


# ----------------------------------------------------------------------------- reasons
# Why an answer was judged wrong, kept beside each verdict in the scores and evaluation results so a
# user can read what the verifier saw. "" means right.
_ANY_BRACKETS = re.compile(r"\[[^\[\]]*\]")


def _grounding_reason(prediction: str, answer: str) -> str:
  box = _prediction_box(prediction)
  if box is None:
    return "malformed box" if _ANY_BRACKETS.search(prediction) or re.search(r"\d\s*,\s*\d", prediction) else "no box"
  v = iou(box, parse_box(answer))
  return f"IoU {v:.2f} < 0.5"


def _has_final_answer(text: str) -> bool:
  return bool(_ANSWER_TAG.search(text) or _last_boxed(text) is not None or _ANSWER_IS.search(text))


def _reasoning_reason(prediction: str, answer: str) -> str:
  if MATH_VERIFY_ONLY:
    return math_verify_only_match(prediction, answer)[1]
  pred, ref = extract_answer(prediction), extract_answer(answer)
  letter = _option_letter(ref)
  if not _has_final_answer(prediction) and not (letter is not None and _PRED_LETTER_ONLY.fullmatch(pred)):
    return "no final answer (no \\boxed{}, <answer> or 'answer is')"
  if letter is not None:
    m = _PRED_LETTER_ONLY.fullmatch(pred) or _PRED_LETTER_PREFIX.match(pred)
    if m is None:
      return f"no option letter in {pred[:40]!r}"
    return f"option {next(g for g in m.groups() if g).upper()}, not {letter}"
  return f"{pred[:40]!r} is not {ref[:40]!r}"


def _classification_reason(prediction: str, answer: str) -> str:
  return "empty answer" if not _norm_label(prediction) else f"{_norm_label(prediction)[:40]!r} is not {_norm_label(answer)!r}"


# ----------------------------------------------------------------------------- dispatch
_CHECKERS = {"classification": exact_match, "grounding": grounding_match, "reasoning": reasoning_match}
_REASONS = {"classification": _classification_reason, "grounding": _grounding_reason, "reasoning": _reasoning_reason}
assert set(_CHECKERS) == set(TASKS) == set(_REASONS), "a task without a checker (or a checker without a task)"
METRICS = {"classification": "exact-match accuracy", "grounding": "IoU >= 0.5 accuracy",
           "reasoning": "multiple-choice accuracy"}


def _checker(task: str, prediction, answer):
  """The task's checker, once the task and the two texts are known to be valid."""
  checker = _CHECKERS.get(task)
  if checker is None:
    raise ValueError(f"unknown task {task!r}; known tasks: {', '.join(TASKS)}")
  if not isinstance(prediction, str) or not isinstance(answer, str):
    raise TypeError(f"prediction and answer must be strings, got {type(prediction).__name__} "
                    f"and {type(answer).__name__}")
  return checker


def judge(task: str, prediction: str, answer: str) -> tuple[bool, str]:
  """(right, why not): the verdict of `verify` and, for a wrong answer, the verifier's reason in a few
  words ("no box", "IoU 0.31 < 0.5", "option C, not B", "no final answer ..."); "" when right."""
  checker = _checker(task, prediction, answer)
  text = clean_completion(prediction)
  if task == "reasoning" and MATH_VERIFY_ONLY:     # one parse for the verdict and its reason
    return math_verify_only_match(text, answer)
  if checker(text, answer):
    return True, ""
  return False, _REASONS[task](text, answer)


def verify(task: str, prediction: str, answer: str) -> bool:
  """Whether `prediction` (a decoded completion) answers a `task` example whose reference is `answer`."""
  return bool(_checker(task, prediction, answer)(clean_completion(prediction), answer))


def verify_many(tasks: str | Iterable[str], predictions: Iterable[str], answers: Iterable[str]) -> list[bool]:
  """`verify` over parallel sequences; `tasks` may be one task name for all. Lengths must agree."""
  predictions, answers = list(predictions), list(answers)
  tasks = [tasks] * len(predictions) if isinstance(tasks, str) else list(tasks)
  if not len(tasks) == len(predictions) == len(answers):
    raise ValueError(f"lengths differ: {len(tasks)} tasks, {len(predictions)} predictions, {len(answers)} answers")
  return [verify(t, p, a) for t, p, a in zip(tasks, predictions, answers)]
