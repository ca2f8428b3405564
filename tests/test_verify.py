"""dcsft_jax.verify: the paper's exact match, VLM-R1 IoU on hand-computed boxes, grounding on Qwen-style
output, reasoning with and without math_verify, dispatch."""
from __future__ import annotations

import threading

import pytest

from dcsft_jax import verify as V

try:
  import math_verify  # noqa: F401
  HAVE_MATH_VERIFY = True
except ImportError:
  HAVE_MATH_VERIFY = False

needs_math_verify = pytest.mark.skipif(not HAVE_MATH_VERIFY, reason="math-verify is not installed")


@pytest.fixture(params=["math_verify", "fallback_only"])
def mode(request, monkeypatch):
  """Run a test with math_verify on (when installed) and off: the answers must not depend on it."""
  if request.param == "math_verify" and not HAVE_MATH_VERIFY:
    pytest.skip("math-verify is not installed")
  monkeypatch.setattr(V, "USE_MATH_VERIFY", request.param == "math_verify")
  return request.param


# ----------------------------------------------------------------------------- classification
@pytest.mark.parametrize("pred, answer, expected", [
    ("Goldfish.", "goldfish", True),
    (" Tench ", "tench", True),
    ("tench", "Tench.", True),
    ("...tench...", "tench", True),  # strip('.') takes all leading/trailing dots
    ("tench fish", "tench", False),
    ("goldfish.", "gold fish", False),
    ("goldfish!", "goldfish", False),
    ("", "goldfish", False),
])
def test_exact_match_is_the_papers_rule(pred, answer, expected):
  assert V.exact_match(pred, answer) is expected


def test_exact_match_does_not_strip_inner_dots_or_punctuation():
  assert V.exact_match("St. Bernard", "st. bernard")
  assert not V.exact_match("St Bernard", "st. bernard")


@pytest.mark.parametrize("text, expected", [
    ("goldfish<|im_end|>", "goldfish"),
    ("  goldfish <|im_end|>\n", "goldfish"),
    ("goldfish<|im_end|>\n<|endoftext|>", "goldfish"),
    ("goldfish<|endoftext|><|endoftext|>", "goldfish"),
    ("<|im_end|> goldfish", "<|im_end|> goldfish"),  # only trailing tokens go
    ("goldfish", "goldfish"),
])
def test_clean_completion(text, expected):
  assert V.clean_completion(text) == expected


# ----------------------------------------------------------------------------- IoU (hand-computed)
def test_iou_identical_integer_boxes_is_exactly_one():
  # inter = (9-0+1)*(9-0+1) = 100 = area, union = 100 + 100 - 100 = 100.
  assert V.iou([0, 0, 10, 10], [0, 0, 10, 10]) == 1.0
  assert V.iou([12, 30, 200, 310], [12, 30, 200, 310]) == 1.0


def test_iou_identical_float_boxes():
  assert V.iou([0.5, 0.5, 10.2, 10.2], [0.5, 0.5, 10.2, 10.2]) == pytest.approx(1.0, abs=1e-12)


def test_iou_identical_one_pixel_box_is_zero():
  # The convention's quirk: inter_x1 = 0, inter_x2 = 1 - 1 = 0, not 0 < 0, so no intersection.
  assert V.iou([0, 0, 1, 1], [0, 0, 1, 1]) == 0.0
  assert V.iou([0, 0, 1, 10], [0, 0, 1, 10]) == 0.0


def test_iou_partial_overlap():
  # inter x: 5..9 (5), y: 5..9 (5) = 25; union = 100 + 100 - 25 = 175.
  assert V.iou([0, 0, 10, 10], [5, 5, 15, 15]) == 25 / 175
  assert V.iou([5, 5, 15, 15], [0, 0, 10, 10]) == 25 / 175


def test_iou_contained():
  # inter = 10*10 = 100 (the inner box); union = 100 + 400 - 100 = 400.
  assert V.iou([0, 0, 10, 10], [0, 0, 20, 20]) == 0.25
  # inner [5,5,15,15] in [0,0,20,20]: inter x 5..14 (10) -> 100; union = 100 + 400 - 100.
  assert V.iou([5, 5, 15, 15], [0, 0, 20, 20]) == 0.25


def test_iou_disjoint_and_touching_are_zero():
  assert V.iou([0, 0, 10, 10], [20, 20, 30, 30]) == 0.0
  assert V.iou([0, 0, 10, 10], [10, 0, 20, 10]) == 0.0  # share an edge
  assert V.iou([0, 0, 10, 10], [10, 10, 20, 20]) == 0.0  # share a corner


def test_iou_narrow_overlaps_follow_the_convention():
  # 1 pixel wide overlap: inter_x1 = 9 == inter_x2 = 9, so none (a plain IoU would say 10/190).
  assert V.iou([0, 0, 10, 10], [9, 0, 20, 10]) == 0.0
  # 2 pixels: inter = (9-8+1)*(9-0+1) = 20; union = 100 + 120 - 20 = 200.
  assert V.iou([0, 0, 10, 10], [8, 0, 20, 10]) == 0.1


def test_iou_degenerate_union_is_zero_not_an_error():
  assert V.iou([0, 0, 0, 0], [0, 0, 0, 0]) == 0.0
  assert V.iou([5, 5, 5, 5], [3, 3, 3, 3]) == 0.0
  assert V.iou([10, 10, 0, 0], [10, 10, 0, 0]) == 0.0  # negative areas: union -200


def test_iou_rejects_non_boxes():
  with pytest.raises(ValueError, match="x1, y1, x2, y2"):
    V.iou([0, 0, 10], [0, 0, 10, 10])


# ----------------------------------------------------------------------------- grounding
REF = "[12, 30, 200, 310]"


@pytest.mark.parametrize("pred", [
    '{"bbox_2d": [12, 30, 200, 310], "label": "cat"}',
    '```json\n[\n  {"bbox_2d": [12, 30, 200, 310], "label": "cat"}\n]\n```',
    "[12,30,200,310]",
    "The cat is at [ 12.0 , 30.5 , 199.5 , 310 ].",
    '<think>it is on the left</think><answer>{"bbox_2d": [14, 32, 198, 305]}</answer>',
])
def test_grounding_finds_qwen_style_boxes(pred):
  assert V.grounding_match(pred, REF)


def test_grounding_uses_the_first_box_only():
  good, bad = "[12, 30, 200, 310]", "[500, 500, 600, 600]"
  assert V.grounding_match(f'[{{"bbox_2d": {good}}}, {{"bbox_2d": {bad}}}]', REF)
  assert not V.grounding_match(f'[{{"bbox_2d": {bad}}}, {{"bbox_2d": {good}}}]', REF)


@pytest.mark.parametrize("pred", ["a cat", "", '{"bbox_2d": []}', "[12, 30, 200]", "(12, 30, 200, 310)",
                                  "12, 30, 200, 310"])
def test_grounding_without_a_box_is_wrong(pred):
  assert V.grounding_match(pred, REF) is False


def test_grounding_threshold_boundary():
  # inter = 10*10 = 100, union = 100 + 200 - 100 = 200: IoU exactly 0.5 counts (>=).
  assert V.iou([0, 0, 10, 10], [0, 0, 10, 20]) == 0.5
  assert V.grounding_match("[0, 0, 10, 10]", "[0, 0, 10, 20]")
  assert not V.grounding_match("[0, 0, 10, 10]", "[0, 0, 10, 20]", threshold=0.51)
  # 25/175 ~ 0.143
  assert not V.grounding_match("[5, 5, 15, 15]", "[0, 0, 10, 10]")
  assert V.grounding_match("[5, 5, 15, 15]", "[0, 0, 10, 10]", threshold=0.14)


def test_grounding_negative_and_decimal_coordinates():
  assert V.grounding_match("[-2, -3.5, 100, 100]", "[0, 0, 100, 100]")


def test_grounding_reference_forms_and_bad_reference():
  assert V.grounding_match("[12, 30, 200, 310]", "(12, 30, 200, 310)")  # parse_box takes parentheses
  assert V.grounding_match("[12, 30, 200, 310]", " [12.0, 30.0, 200.0, 310.0]. ")
  with pytest.raises(ValueError, match="not a box"):
    V.grounding_match("[12, 30, 200, 310]", "a cat")


# ----------------------------------------------------------------------------- answer extraction
@pytest.mark.parametrize("text, expected", [
    ("so \\boxed{3} or rather \\boxed{\\frac{1}{2}}.", "\\frac{1}{2}"),
    ("\\boxed{\\frac{\\sqrt{2}}{2}}", "\\frac{\\sqrt{2}}{2}"),
    ("\\boxed{5} and a truncated \\boxed{\\frac{1}{", "5"),
    ("<think>maybe \\boxed{3}</think><answer>4</answer>", "4"),
    ("<think>x</think><answer> \\boxed{7} </answer>", "7"),
    ("<answer>B</answer> <answer>C</answer>", "C"),
    ("<answer>12", "12"),
    ("Let me think.\nThe answer is 42.\nDone.", "42."),
    ("Final Answer: (C)", "(C)"),
    ("The answer is **B**", "B"),
    ("  17 ", "17"),
    ("17<|im_end|>", "17"),
])
def test_extract_answer(text, expected):
  assert V.extract_answer(text) == expected


# ----------------------------------------------------------------------------- reasoning
RIGHT = [
    ("\\boxed{42}", "42"),
    ("We get $x = 3$, so the result is \\boxed{\\frac{3}{4}}.", "0.75"),
    ("\\boxed{0.75}", "\\frac{3}{4}"),
    ("3/4", "\\dfrac{3}{4}"),
    ("\\tfrac{3}{4}", "3/4"),
    ("-\\frac{3}{4}", "-0.75"),
    ("<answer>1,234</answer>", "1234"),
    ("The answer is 1234.", "1,234"),
    ("50%", "0.5"),
    ("50\\%", "50"),
    ("0.5", "50%"),
    ("The answer is 12 cm.", "12"),
    ("\\boxed{12\\text{ cm}}", "12"),
    ("90^\\circ", "90"),
    ("0.3333333", "1/3"),
    ("\\boxed{\\text{Paris}}", "paris"),
    ("The answer is: $\\left( 1, 2 \\right)$", "(1,2)"),
]
WRONG = [
    ("\\boxed{41}", "42"),
    ("\\boxed{\\frac{2}{3}}", "0.75"),
    ("0.5", "50"),
    ("3x", "3"),
    ("1,234", "1.234"),
    ("\\boxed{}", "42"),
    ("", "42"),
    ("I cannot tell.", "42"),
    ("bleu", "blue"),
    ("0.333", "1/3"),
]
LETTERS_RIGHT = [
    ("B", "B"), ("b", "B"), ("(B)", "B"), ("B.", "B"), ("B:", "(B)"), ("B)", "B."),
    ("B. 42", "B"), ("(B) 42", "B"), ("b) forty-two", "B"), ("Option B", "B"),
    ("The answer is (B).", "B"), ("\\boxed{B}", "B"), ("<answer> C </answer>", "C"),
    ("<think>A or B?</think><answer>B</answer>", "B"),
]
LETTERS_WRONG = [
    ("C", "B"), ("(C) 42", "B"), ("The answer is A.", "B"),
    ("A cat", "A"), ("a cat", "A"),  # a bare letter + space is a word, not an option
    ("Because", "B"), ("B42", "B"), ("", "B"), ("e.g. B", "E"),
    ("<think>B</think><answer>C</answer>", "B"),
]


@pytest.mark.parametrize("pred, answer", RIGHT + LETTERS_RIGHT)
def test_reasoning_right(mode, pred, answer):
  assert V.reasoning_match(pred, answer) is True


@pytest.mark.parametrize("pred, answer", WRONG + LETTERS_WRONG)
def test_reasoning_wrong(mode, pred, answer):
  assert V.reasoning_match(pred, answer) is False


@pytest.mark.parametrize("pred, answer", RIGHT + LETTERS_RIGHT)
def test_fallback_right(pred, answer):
  assert V._fallback_reasoning_match(pred, answer) is True


@pytest.mark.parametrize("pred, answer", WRONG + LETTERS_WRONG)
def test_fallback_wrong(pred, answer):
  assert V._fallback_reasoning_match(pred, answer) is False


def test_fallback_never_imports_math_verify(monkeypatch):
  # A broken math_verify must not matter to the fallback or to reasoning_match.
  monkeypatch.setattr(V, "_load_math_verify", lambda: (_ for _ in ()).throw(AssertionError("called")))
  assert V._fallback_reasoning_match("\\boxed{\\frac{1}{2}}", "0.5")
  monkeypatch.setattr(V, "USE_MATH_VERIFY", False)
  assert V.reasoning_match("\\boxed{\\frac{1}{2}}", "0.5")


def test_letter_references_never_reach_math_verify(monkeypatch):
  monkeypatch.setattr(V, "_math_verify_match", lambda p, a: pytest.fail("math_verify asked about a letter"))
  assert V.reasoning_match("(B) 42", "B")
  assert not V.reasoning_match("42", "B")


def test_math_verify_is_ored_with_the_fallback(monkeypatch):
  monkeypatch.setattr(V, "_math_verify_match", lambda p, a: True)
  assert V.reasoning_match("anything", "42")
  monkeypatch.setattr(V, "_math_verify_match", lambda p, a: False)
  assert V.reasoning_match("\\boxed{42}", "42")  # the fallback still sees it
  monkeypatch.setattr(V, "_math_verify_match", lambda p, a: None)
  assert not V.reasoning_match("\\boxed{41}", "42")


@needs_math_verify
def test_math_verify_symbolic_equivalence():
  assert V.reasoning_match("\\boxed{(x+1)^2}", "x^2+2x+1")
  assert V.reasoning_match("$\\sqrt{2}/2$", "\\frac{\\sqrt{2}}{2}")
  assert not V.reasoning_match("\\boxed{(x+1)^3}", "x^2+2x+1")
  assert not V._fallback_reasoning_match("\\boxed{(x+1)^2}", "x^2+2x+1")  # beyond the fallback


@needs_math_verify
def test_math_verify_is_not_asked_about_words():
  # math_verify reads "blue" as b*l*u*e, equal to "bleu"; such references stay with the fallback.
  assert V._math_verify_match("bleu", "blue") is None
  assert V._math_verify_match("12 apples", "12 oranges") is None
  assert V._math_verify_match("x^2", "x\\cdot x") is not None


@pytest.mark.parametrize("use_math_verify", [True, False])
def test_reasoning_from_a_worker_thread(monkeypatch, use_math_verify):
  # math_verify's signal-based timeouts raise off the main thread unless they are turned off.
  monkeypatch.setattr(V, "USE_MATH_VERIFY", use_math_verify)
  out, errors = [], []

  def work():
    try:
      out.append(V.reasoning_match("\\boxed{(x+1)^2}", "x^2+2x+1"))
      out.append(V.reasoning_match("\\boxed{\\frac{1}{2}}", "0.5"))
      out.append(V.reasoning_match("\\boxed{3}", "0.5"))
    except BaseException as e:  # noqa: BLE001 - surfaced in the main thread below
      errors.append(e)
  t = threading.Thread(target=work)
  t.start()
  t.join(timeout=30)
  assert not errors and not t.is_alive()
  assert out == [use_math_verify and HAVE_MATH_VERIFY, True, False]


# ----------------------------------------------------------------------------- dispatch
def test_tasks():
  assert V.TASKS == ("classification", "grounding", "reasoning")


@pytest.mark.parametrize("task, pred, answer, expected", [
    ("classification", "Goldfish.", "goldfish", True),
    ("classification", "goldfish<|im_end|>", "goldfish", True),  # cleaned before the paper's rule
    ("classification", "tench fish", "tench", False),
    ("grounding", '{"bbox_2d": [12, 30, 200, 310], "label": "cat"}<|im_end|>', REF, True),
    ("grounding", "no box here", REF, False),
    ("reasoning", "\\boxed{\\frac{1}{2}}<|im_end|>", "0.5", True),
    ("reasoning", "(C) 7", "B", False),
])
def test_verify_dispatch(task, pred, answer, expected):
  assert V.verify(task, pred, answer) is expected


def test_verify_classification_is_exact_not_lenient():
  # A box answer under "classification" is compared as text, not by IoU.
  assert not V.verify("classification", "[12, 30, 200, 311]", REF)
  assert V.verify("grounding", "[12, 30, 200, 311]", REF)


def test_verify_unknown_task():
  with pytest.raises(ValueError, match=r"'detection'.*classification, grounding, reasoning"):
    V.verify("detection", "x", "x")


def test_verify_rejects_non_strings():
  with pytest.raises(TypeError):
    V.verify("classification", None, "goldfish")


def test_verify_many():
  assert V.verify_many(["classification", "grounding", "reasoning"],
                       ["Goldfish.", "[0, 0, 10, 10]", "\\boxed{2}"],
                       ["goldfish", "[50, 50, 60, 60]", "2"]) == [True, False, True]
  assert V.verify_many("classification", iter(["a", "b"]), ("a", "c")) == [True, False]
  assert V.verify_many([], [], []) == []
  with pytest.raises(ValueError, match="lengths differ"):
    V.verify_many(["classification"], ["a", "b"], ["a", "b"])
  with pytest.raises(ValueError, match="unknown task"):
    V.verify_many(["nope"], ["a"], ["a"])


# ----------------------------------------------------------------------------- verify.math_verify_only
@pytest.fixture
def math_verify_only(monkeypatch):
  if not HAVE_MATH_VERIFY:
    pytest.skip("math-verify is not installed")
  monkeypatch.setattr(V, "MATH_VERIFY_ONLY", True)


@pytest.mark.parametrize("pred, answer", [
    ("<answer>B</answer>", "A short thought. \\boxed{B}"),   # our <answer> tag; no LaTeX for math-verify
    ("The answer is 5 m", "5"),                               # a unit, without an anchor
    ("<answer>0.5</answer>", "1/2"),
    ("(B) 42", "B"),                                          # a bare letter: math-verify parses no reference
    ("\\boxed{B}", "B"),
])
def test_math_verify_only_rejects_what_only_our_parser_accepts(math_verify_only, monkeypatch, pred, answer):
  assert not V.reasoning_match(pred, answer)
  ok, why = V.judge("reasoning", pred, answer)
  assert not ok and why.startswith("math-verify")
  monkeypatch.setattr(V, "MATH_VERIFY_ONLY", False)
  assert V.reasoning_match(pred, answer)                     # the default ORs our parser in


@pytest.mark.parametrize("pred, answer", [
    ("\\boxed{\\frac{1}{2}}", "0.5"),
    ("So the digit is odd. \\boxed{B}", "A short thought. \\boxed{B}"),
    ("\\boxed{(x+1)^2}", "$x^2+2x+1$"),                      # bare x^2+2x+1 parses to nothing there
])
def test_math_verify_only_accepts_what_math_verify_accepts(math_verify_only, pred, answer):
  assert V.reasoning_match(pred, answer)
  assert V.judge("reasoning", pred + "<|im_end|>", answer) == (True, "")
  assert not V.reasoning_match("\\boxed{7}", answer)


def test_math_verify_only_leaves_labels_and_boxes_alone(monkeypatch):
  monkeypatch.setattr(V, "MATH_VERIFY_ONLY", True)
  monkeypatch.setattr(V, "_accuracy_reward_setup", lambda: pytest.fail("math_verify asked about a label"))
  assert V.verify("classification", "Goldfish.", "goldfish")
  assert V.verify("grounding", "[12, 30, 200, 311]", REF)


def test_math_verify_only_is_set_by_the_config(monkeypatch):
  from dcsft_jax import config_base
  monkeypatch.setattr(V, "MATH_VERIFY_ONLY", False)
  c = config_base.base()
  c.verify.math_verify_only = True
  V.configure(c)
  assert V.MATH_VERIFY_ONLY is True
  V.configure(config_base.base())
  assert V.MATH_VERIFY_ONLY is False


def test_math_verify_only_without_the_package_stops_at_validation(monkeypatch):
  import sys
  from dcsft_jax import config_base, run_config
  from dcsft_jax.stages import STAGES
  monkeypatch.setitem(sys.modules, "math_verify", None)      # import math_verify raises ImportError
  c = config_base.base()
  c.verify.math_verify_only = True
  with pytest.raises(run_config.ConfigError) as e:
    run_config.validate(c, [s.name for s in STAGES], check_files=False)
  msg = str(e.value)
  assert "\n" not in msg and msg.startswith("config.verify.math_verify_only: needs math-verify")
  assert "pip install 'dcsft-jax[math]' (or: pip install math-verify)" in msg
  c.stages = "init,cold_start,curate,finetune,report,export"   # nothing verifies: no need for it
  run_config.validate(c, [s.name for s in STAGES], check_files=False)
  c.stages = "evaluate"
  with pytest.raises(run_config.ConfigError, match="math_verify_only"):
    run_config.validate(c, [s.name for s in STAGES], check_files=False)
