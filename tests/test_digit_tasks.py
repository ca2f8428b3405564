"""The embedded grounding and reasoning tasks (issue 28): their data, their verifiers' verdicts and
reasons through scoring and curation, and GRPO with the IoU reward."""
from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from dcsft_jax import curation, verify
from dcsft_jax.data import builtin, digit_tasks, sources
from dcsft_jax.data.records import parse_box
from dcsft_jax.stages import score


def test_splits_are_deterministic_and_leak_no_test_digit():
  train_idx, test_idx = (set(map(int, x)) for x in builtin._split_indices(0))
  for split in digit_tasks.SPLITS:
    a, b = digit_tasks.load(split, limit=5), digit_tasks.load(split, limit=5)
    assert [r.answer for r in a] == [r.answer for r in b]
    assert all(np.array_equal(np.asarray(x.image), np.asarray(y.image)) for x, y in zip(a, b))
    recs = digit_tasks.load(split)
    pool = train_idx if split.endswith("_train") else test_idx
    used = {r.meta["source_index"] for r in recs}
    if split.startswith("grounding"):           # a distractor in every scene
      assert min(len(r.meta["objects"]) for r in recs) >= 2
    assert used <= pool, split
    assert {r.task for r in recs} == {split.split("_")[0]}


def test_grounding_boxes_are_the_named_digit_in_the_frame_the_model_sees():
  from dcsft_jax.data.processor import Processor
  proc = Processor.tiny()
  for split in digit_tasks.GROUNDING_SPLITS:
    for r in digit_tasks.load(split, limit=40):
      box = parse_box(r.answer, strict=True)
      objects = r.meta["objects"]                                  # [label or -1 for a shape, box], target first
      assert list(box) == objects[0][1] and objects[0][0] == r.meta["label"]
      assert builtin.DIGIT_NAMES[r.meta["label"]] in r.prompt
      digits = [d for d, _ in objects if d >= 0]
      assert len(set(digits)) == len(digits)                       # one digit of each value: unambiguous
      assert len({tuple(b) for _, b in objects}) == len(objects)   # one object per cell
      assert 0 <= box[0] < box[2] <= digit_tasks.CANVAS and 0 <= box[1] < box[3] <= digit_tasks.CANVAS
      assert r.image.size == (digit_tasks.CANVAS, digit_tasks.CANVAS)
  others = lambda split: {sum(d >= 0 for d, _ in r.meta["objects"]) - 1 for r in digit_tasks.load(split, limit=60)}
  assert others("grounding_test") == {1} and others("grounding_clutter") == {3, 4}
  # The processor keeps the canvas's size: the boxes are in pixels of what the model sees.
  _, grid = proc.preprocess_image(r.image)
  assert tuple(grid[1:]) == (digit_tasks.CANVAS // 14,) * 2


def test_reasoning_references_give_their_own_letter_and_the_value_decides_it():
  recs = digit_tasks.load("reasoning_test", limit=60)
  assert {r.meta["question"] for r in recs} == {0, 1, 2}
  for r in recs:
    d, q = r.meta["label"], r.meta["question"]
    k, _ = digit_tasks.QUESTIONS[q][2](d)
    assert r.answer.endswith(f"\\boxed{{{'ABC'[k]}}}") and f"{'ABC'[k]}. " in r.prompt
    assert builtin.DIGIT_NAMES[d] in r.answer and "\\boxed{}" in r.prompt
    assert verify.judge("reasoning", r.answer, r.answer) == (True, "")
    assert verify.extract_answer(r.answer) == "ABC"[k]


def test_label_noise_points_at_another_digit_on_the_training_splits_only():
  g = digit_tasks.load("grounding_train", label_noise=0.1, limit=200)
  noisy = [r for r in g if r.meta["noisy"]]
  assert len(noisy) == 20
  for r in noisy:
    assert list(parse_box(r.answer)) != r.meta["true_box"] and list(parse_box(r.answer)) in [b for _, b in r.meta["objects"]]
  q = digit_tasks.load("reasoning_train", label_noise=0.1, limit=200)
  assert sum(r.meta["noisy"] for r in q) == 20
  assert all(r.meta["noisy_digit"] != r.meta["label"] for r in q if r.meta["noisy"])
  with pytest.raises(ValueError, match="training splits only"):
    digit_tasks.load("grounding_test", label_noise=0.1)


def _shift(box, dx, dy):
  x1, y1, x2, y2 = box
  return f"[{int(x1 + dx)}, {int(y1 + dy)}, {int(x2 + dx)}, {int(y2 + dy)}]"


def test_hand_made_answers_land_in_their_buckets_with_the_verifiers_reasons(tmp_path):
  """Through the scoring stage's own row builder, the scores file and curation: each prompt's K
  answers decide its bucket, and every wrong answer carries why."""
  # Reference boxes of 24 px, so the IoU of a shifted box is known exactly.
  g = [r.__class__(r.id, r.image, r.prompt, "[30, 30, 54, 54]", r.task, r.meta)
       for r in digit_tasks.load("grounding_test", limit=3)]
  q = digit_tasks.load("reasoning_test", limit=3)
  b = [parse_box(r.answer) for r in g]
  right_q = [verify.extract_answer(r.answer) for r in q]
  wrong_q = ["A" if x != "A" else "B" for x in right_q]
  # 24 px boxes: shifted 8 px the VLM-R1 IoU is exactly 384 / 768 = 0.5 (right); 8 and 1 px, 368 / 784.
  assert verify.iou(parse_box(_shift(b[0], 8, 0)), b[0]) == 0.5
  under = verify.iou(parse_box(_shift(b[1], 8, 1)), b[1])
  assert 0.46 < under < 0.5
  answers = {
      g[0].id: [g[0].answer, _shift(b[0], 8, 0)] * 4,                                  # correct: easy
      g[1].id: [_shift(b[1], 8, 1)] * 8,                                               # IoU just under: hard
      g[2].id: [g[2].answer, "[12, 30, 40]", "the digit is there", g[2].answer] * 2,   # medium
      q[0].id: [f"The digit is it. \\boxed{{{right_q[0]}}}"] * 8,                      # right letter: easy
      q[1].id: [f"The digit is it. \\boxed{{{wrong_q[1]}}}"] * 8,                      # wrong letter: hard
      q[2].id: [f"The digit is it. {right_q[2]}", f"\\boxed{{{right_q[2]}}}"] * 4,     # outside the tag: medium
  }
  records = g + q
  rows = [score.score_row(r, i, answers[r.id]) for i, r in enumerate(records)]
  path = tmp_path / "scores.jsonl"
  path.write_text("".join(json.dumps(x) + "\n" for x in rows))
  scores = curation.read_scores(path)
  want = {g[0].id: "easy", g[1].id: "hard", g[2].id: "medium", q[0].id: "easy", q[1].id: "hard", q[2].id: "medium"}
  assert {rid: s.bucket for rid, s in scores.items()} == want
  assert [r.id for r in curation.select(records, scores, recipe="sft_m")] == [g[2].id, q[2].id]
  assert [r.id for r in curation.select(records, scores, recipe="sft_em")] == [g[0].id, g[2].id, q[0].id, q[2].id]
  reasons = {x["id"]: x["reasons"] for x in rows}
  assert reasons[g[0].id] == [""] * 8
  assert set(reasons[g[1].id]) == {f"IoU {under:.2f} < 0.5"}
  assert reasons[g[2].id][:3] == ["", "malformed box", "no box"]
  assert set(reasons[q[1].id]) == {f"option {wrong_q[1]}, not {right_q[1]}"}
  assert reasons[q[2].id][0].startswith("no final answer") and reasons[q[2].id][1] == ""
  summary = curation.summary(records, scores)
  assert summary["tasks"] == {"grounding": {"easy": 1, "medium": 1, "hard": 1},
                              "reasoning": {"easy": 1, "medium": 1, "hard": 1}}


def test_a_mixed_source_interleaves_its_parts_and_keeps_each_task():
  spec = sources.parse("builtin:test[:4]+builtin:grounding_test[:4]+builtin:reasoning_test[:4]")
  assert spec.kind == "mix" and str(sources.parse(str(spec))) == str(spec)
  recs = sources.load(spec, limit=6)
  assert [r.task for r in recs] == ["classification", "grounding", "reasoning"] * 2
  assert sources.check(sources.parse("builtin:test+json:/nowhere/x.json")) is not None
  # Each record is judged by its own task's checker.
  verdicts = verify.verify_many([r.task for r in recs], [r.answer for r in recs], [r.answer for r in recs])
  assert all(verdicts)
  with pytest.raises(ValueError, match="is not a box"):
    verify.verify("grounding", recs[0].answer, recs[0].answer)       # a label is no box: routed wrong, loud


def test_grpo_with_the_iou_reward_moves_the_boxes_to_the_target(tmp_path):
  """A toy grounding policy: its one-token answer picks a cell of the 3 x 3 grid (the token's first
  byte mod 9), the reward is the pipeline's own IoU >= 0.5 verdict of that cell's box against the
  target, the centre cell. The random policy hits it about one time in nine; GRPO raises the hit
  rate and the mean IoU of the sampled boxes."""
  from dcsft_jax import mesh as mesh_lib
  from dcsft_jax import sampling
  from dcsft_jax.data import batching
  from dcsft_jax.data.processor import Processor
  from dcsft_jax.models import qwen2_5_vl as M
  from dcsft_jax.models.qwen2_5_vl.config import tiny_config
  from dcsft_jax.train import optim, rollouts, trainer
  cfg = tiny_config()
  proc = Processor.tiny(cfg=cfg)
  C = digit_tasks.CELL
  target = f"[{C + 2}, {C + 2}, {C + 26}, {C + 26}]"
  recs = [r.__class__(r.id, r.image, r.prompt, target, "grounding", r.meta)
          for r in digit_tasks.load("grounding_train", limit=8)]

  def box_of(text: str) -> str:
    cell = (text.encode()[0] if text else 0) % 9
    x, y = (cell % 3) * C + 2, (cell // 3) * C + 2
    return f"[{x}, {y}, {x + 24}, {y + 24}]"

  ious: list[float] = []

  def reward(rec, text):
    box = box_of(text)
    ious.append(verify.iou(parse_box(box), parse_box(rec.answer)))
    return float(verify.verify(rec.task, box, rec.answer))

  buckets = batching.auto_buckets(recs, proc, with_answers=False, max_buckets=1)
  it = batching.BatchIterator(recs, proc, batch_size=4, buckets=buckets, with_answers=False, shuffle=True,
                              seed=1, epochs=None)
  params = M.unbox(M.init_params(cfg, rng=jax.random.PRNGKey(0)))
  sp = sampling.SamplingParams(max_new_tokens=1, num_samples=8, temperature=1.0, top_k=0, top_p=1.0, eos_ids=(),
                               pad_id=0)
  steps = 24
  tc = trainer.TrainConfig(steps=steps, batch_size=8, accum=2, save_every=100,
                           optim=optim.OptimConfig(learning_rate=2e-2, warmup_ratio=0.0, schedule="constant",
                                                   total_steps=steps, weight_decay=0.0))
  mesh = mesh_lib.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])
  with mesh_lib.use(mesh):
    t = rollouts.rl_trainer(cfg, M.ModelOptions(), params, tc, mesh, str(tmp_path), sampling_params=sp,
                                 records=recs, processor=proc, reward_fn=reward)
    h = t.fit(it, progress=False)["history"]
  first, last = np.mean([x["reward"] for x in h[:3]]), np.mean([x["reward"] for x in h[-3:]])
  per_step = len(ious) // steps
  iou_first, iou_last = np.mean(ious[:3 * per_step]), np.mean(ious[-3 * per_step:])
  assert first < 0.3, first
  assert last > first + 0.3, (first, last)
  assert iou_last > iou_first + 0.2, (iou_first, iou_last)
