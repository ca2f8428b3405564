"""Difficulty curation: the paper's bucket rule, its rollout files, our scores file, recipes and writers."""
from __future__ import annotations

import io
import json
import os
import random
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dcsft_jax import curation, plots
from dcsft_jax.curation import ScoreRow
from dcsft_jax.data.records import BadRecord, Record, read_paper_json

K = 8
PROMPT = "Please provide the object name in the image. Output the answer using one word."


def _write_rollouts(tmp_path, items, verdicts, prefix="imagenet_left_grpo_qwen2_5vl_3b_cold_img"):
  """K files in test_dp.py's output format; items[i] = (image, question, ground_truth), verdicts[i] = K ints."""
  verdicts = np.asarray(verdicts, dtype=int)
  tmp_path.mkdir(parents=True, exist_ok=True)
  paths = []
  for k in range(verdicts.shape[1]):
    results = [{"image": img, "question": q, "ground_truth": gt, "model_output": gt if verdicts[i, k] else "no",
                "correct": int(verdicts[i, k])} for i, (img, q, gt) in enumerate(items)]
    path = tmp_path / f"{prefix}_{k + 1}.json"
    path.write_text(json.dumps({"accuracy": float(verdicts[:, k].mean()) if len(items) else 0.0,
                                "results": results}))
    paths.append(str(path))
  return paths


def _patterns(n: int, seed: int) -> np.ndarray:
  """Verdict rows covering all-correct, all-wrong, one-correct (each slot), seven-correct, random mixes."""
  rng = np.random.default_rng(seed)
  rows = [np.ones(K, int), np.zeros(K, int)]
  rows += [np.eye(K, dtype=int)[j] for j in range(K)]
  rows += [1 - np.eye(K, dtype=int)[j] for j in range(K)]
  while len(rows) < n:
    rows.append(rng.integers(0, 2, K))
  rows = np.stack(rows[:n])
  return rows[rng.permutation(n)]


def _sample_py_buckets(paths):
  """A literal re-statement of the paper's infer/sample.py loop (independent of curation.py)."""
  all_data = []
  for p in paths:
    with open(p) as f:
      all_data.append(json.load(f)["results"])
  easy, middle, hard = [], [], []
  for i in range(len(all_data[0])):
    correct_values = [data[i]["correct"] for data in all_data]
    if len(set(correct_values)) > 1:
      middle.append(i)
    elif correct_values[0] == 0:
      hard.append(i)
    else:
      easy.append(i)
  return {"easy": easy, "medium": middle, "hard": hard}


# ----------------------------------------------------------------------------- the rule
def test_bucket_of():
  assert curation.bucket_of([1] * 8) == "easy"
  assert curation.bucket_of([0] * 8) == "hard"
  assert curation.bucket_of([0] * 7 + [1]) == "medium"
  assert curation.bucket_of([True, False]) == "medium"
  assert curation.bucket_of([1]) == "easy"
  with pytest.raises(ValueError, match="no verdicts"):
    curation.bucket_of([])
  with pytest.raises(ValueError, match="0 or 1"):
    curation.bucket_of([1, 2])


# ----------------------------------------------------------------------------- the paper's rollout files
def test_eight_synthetic_rollout_files_bucket_exactly_as_sample_py(tmp_path):
  """Eight synthetic rollout files in test_dp.py's output format bucket exactly as the paper's infer/sample.py rule does."""
  n = 40
  verdicts = _patterns(n, seed=3)
  items = [(f"/data/dataset/Imagenet/train/n{i:08d}/x_{i}.JPEG", PROMPT, f"class{i % 7}") for i in range(n)]
  paths = _write_rollouts(tmp_path, items, verdicts)

  expected = _sample_py_buckets(paths)
  got = curation.rollout_buckets(paths)
  assert got == expected  # same indices, same order, per bucket
  assert all(expected.values()) and sum(map(len, expected.values())) == n  # every bucket occurs

  rows = curation.read_rollout_files(paths)
  assert [r["verdicts"] for r in rows] == verdicts.tolist()
  assert [r["bucket"] for r in rows] == [curation.bucket_of(v) for v in verdicts]

  # Classification: sample.py's ms-swift items, medium only by default.
  out = tmp_path / "middle.json"
  assert curation.write_rollout_bucket(paths, "medium", out) == len(expected["medium"])
  assert json.loads(out.read_text()) == [
    {"messages": [{"role": "user", "content": "<image>" + items[i][1]},
                  {"role": "assistant", "content": items[i][2]}],
     "images": [items[i][0]]} for i in expected["medium"]]
  assert curation.write_rollout_bucket(paths, "middle", tmp_path / "m2.json") == len(expected["medium"])
  assert json.loads((tmp_path / "m2.json").read_text()) == json.loads(out.read_text())


def test_write_rollout_bucket_grounding_truncates_boxes(tmp_path):
  items = [("/data/coco/a.jpg", "the dog on the left", "[10.7, 20.2, 30.9, 40.5]"),
           ("/data/coco/b.jpg", "the red car", "[0.99, 1.5, 100.49, 200.999]"),
           ("/data/coco/c.jpg", "the man", "[5, 6, 7, 8]")]
  verdicts = [[1, 0] * 4, [1, 0] * 4, [1] * 8]
  paths = _write_rollouts(tmp_path, items, verdicts, prefix="refcoco_ref")
  out = tmp_path / "g.json"
  assert curation.write_rollout_bucket(paths, "medium", out) == 2
  got = json.loads(out.read_text())
  # int() truncates, as sample.py's [int(x) for x in bbox_sol]; rounding would give [11, 20, 31, 41].
  assert [g["messages"][1]["content"] for g in got] == ["[10, 20, 30, 40]", "[0, 1, 100, 200]"]
  assert got[0]["messages"][0]["content"] == "<image>the dog on the left"
  assert got[0]["images"] == ["/data/coco/a.jpg"]
  # grounding=False keeps the ground truth text as it is.
  curation.write_rollout_bucket(paths, "easy", out, grounding=False)
  assert json.loads(out.read_text())[0]["messages"][1]["content"] == "[5, 6, 7, 8]"


def test_rollout_files_must_agree(tmp_path):
  items = [(f"/i/{i}.jpg", PROMPT, "cat") for i in range(5)]
  a = _write_rollouts(tmp_path / "a", items, np.ones((5, 2), int))
  b = _write_rollouts(tmp_path / "b", items[:4], np.ones((4, 1), int))
  with pytest.raises(ValueError, match=r"differ in length.*: 5.*: 4"):
    curation.rollout_buckets(a + b)
  swapped = items[:2] + [("/i/other.jpg", PROMPT, "cat")] + items[3:]
  c = _write_rollouts(tmp_path / "c", swapped, np.ones((5, 1), int))
  with pytest.raises(ValueError, match=r"_1\.json: result 2 is a different prompt"):
    curation.read_rollout_files(a + c)
  with pytest.raises(ValueError, match="unknown bucket"):
    curation.write_rollout_bucket(a, "medium-ish", tmp_path / "x.json")


def test_paper_bucket_files_are_reproduced(paper_data, tmp_path):
  """Rollouts that put the paper's records in the paper's buckets reproduce its bucket files exactly."""
  def load(name):
    with open(f"{paper_data}/{name}.json") as f:
      return json.load(f)

  def key(rec):
    return rec["images"][0], rec["messages"][1]["content"]

  left = load("imagenet_left_sft")
  buckets = {"easy": load("imagenet_easy_sft_3b"), "medium": load("imagenet_middle_sft_3b"),
             "hard": load("imagenet_hard_sft_3b")}
  where = {}
  for b, recs in buckets.items():
    for r in recs:
      assert key(r) not in where, f"{key(r)} is in two bucket files"
      where[key(r)] = b
  assert len({key(r) for r in left}) == len(left) == len(where) == 9600
  assert {key(r) for r in left} == set(where)

  # test_dp.py shuffles the set with random.seed(42) before sampling; the bucket files follow that
  # order (not left_sft's), so the synthetic rollouts must too.
  order = list(left)
  random.Random(42).shuffle(order)
  rng = np.random.default_rng(0)
  verdicts = []
  for r in order:
    b = where[key(r)]
    if b == "easy":
      v = np.ones(K, int)
    elif b == "hard":
      v = np.zeros(K, int)
    else:
      v = rng.integers(0, 2, K)
      v[rng.choice(K, 2, replace=False)] = [0, 1]  # at least one right and one wrong
    verdicts.append(v)
  items = [(r["images"][0], r["messages"][0]["content"].removeprefix("<image>"), r["messages"][1]["content"])
           for r in order]
  paths = _write_rollouts(tmp_path, items, verdicts)

  out = tmp_path / "middle.json"
  assert curation.write_rollout_bucket(paths, "medium", out) == len(buckets["medium"])
  assert json.loads(out.read_text()) == buckets["medium"]
  with open(f"{paper_data}/imagenet_middle_sft_3b.json", "rb") as f:
    assert out.read_bytes() == f.read()  # even byte-identical: sample.py's json.dump(indent=2) layout
  rows = curation.read_rollout_files(paths)
  for b in ("easy", "hard"):
    assert [{"messages": [{"role": "user", "content": "<image>" + r["question"]},
                          {"role": "assistant", "content": r["ground_truth"]}], "images": [r["image"]]}
            for r in rows if r["bucket"] == b] == buckets[b], b


# ----------------------------------------------------------------------------- scores file
def _row(rid, verdicts, **extra):
  return {"id": rid, "completions": ["x"] * len(verdicts), "verdicts": verdicts,
          "pass_rate": sum(verdicts) / len(verdicts), **extra}


def _write_jsonl(path, lines):
  path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
  return path


def test_read_scores_ok(tmp_path):
  p = _write_jsonl(tmp_path / "s.jsonl", [_row("a", [1, 1]), "", _row("b", [0, 1], model="cold", seed=3)])
  s = curation.read_scores(p)
  assert list(s) == ["a", "b"]
  assert s["b"] == ScoreRow("b", ["x", "x"], [0, 1], 0.5)
  assert (s["a"].bucket, s["b"].bucket, s["b"].k) == ("easy", "medium", 2)


@pytest.mark.parametrize("bad,msg", [
  ('{"id": "c", "verdicts": [1]', "not valid JSON"),
  (json.dumps({"id": "c", "verdicts": [1], "pass_rate": 1.0}), r"missing key\(s\) \['completions'\]"),
  (json.dumps(_row("c", [1, 0]) | {"pass_rate": 0.75}), "pass_rate 0.75 is inconsistent"),
  (json.dumps(_row("c", [1, 0]) | {"verdicts": [1, 3]}), "0 or 1"),
  (json.dumps(_row("c", [1, 0]) | {"completions": ["x"]}), "1 completions but 2 verdicts"),
  (json.dumps(_row("a", [1, 0])), r"duplicate id 'a' \(first on line 1\)"),
  ("[1, 2]", "not an object"),
])
def test_read_scores_errors_name_file_and_line(tmp_path, bad, msg):
  p = _write_jsonl(tmp_path / "scores.jsonl", [_row("a", [1, 1]), _row("b", [0, 0]), bad])
  with pytest.raises(BadRecord, match=msg) as e:
    curation.read_scores(p)
  assert f"{p}: line 3" in str(e.value)


# ----------------------------------------------------------------------------- select
def _scored_set(n_easy=4, n_medium=6, n_hard=10):
  """Records r00.. (buckets interleaved so input order matters) and their scores."""
  kinds = ["easy"] * n_easy + ["medium"] * n_medium + ["hard"] * n_hard
  random.Random(1).shuffle(kinds)
  records, scores, m = [], {}, 0
  for i, kind in enumerate(kinds):
    rid = f"r{i:02d}"
    v = {"easy": [1] * K, "hard": [0] * K}.get(kind)
    if v is None:  # medium pass rates cycle through 1/8 .. 7/8
      v, m = [1] * (1 + m % 7) + [0] * (K - 1 - m % 7), m + 1
    records.append(Record(id=rid, image=f"/img/{rid}.jpg", prompt=PROMPT, answer=f"c{i % 3}", task="classification"))
    scores[rid] = ScoreRow(rid, ["x"] * K, v, sum(v) / K)
  return records, scores, kinds


@pytest.mark.parametrize("recipe,keep", [("sft_m", {"medium"}), ("sft_em", {"easy", "medium"}),
                                         ("sft", {"easy", "medium", "hard"}), ("easy", {"easy"}),
                                         ("medium", {"medium"}), ("hard", {"hard"})])
def test_select_recipes(recipe, keep):
  records, scores, kinds = _scored_set()
  got = curation.select(records, scores, recipe=recipe)
  assert got == [r for r, k in zip(records, kinds) if k in keep]  # input order kept


def test_select_hard_ratio():
  records, scores, kinds = _scored_set(n_hard=10)
  medium = [r for r, k in zip(records, kinds) if k == "medium"]
  for ratio, n in ((0.0, 0), (0.25, 3), (0.3, 3), (0.5, 5), (1.0, 10)):  # 2.5 rounds half up to 3
    got = curation.select(records, scores, recipe="sft_m", hard_ratio=ratio, seed=7)
    hard = [r for r in got if scores[r.id].bucket == "hard"]
    assert len(hard) == n == curation.n_hard_added(ratio, 10)
    assert [r for r in got if scores[r.id].bucket == "medium"] == medium
    assert got == [r for r in records if r in got]  # still in input order
  a = curation.select(records, scores, recipe="sft_em", hard_ratio=0.3, seed=0)
  assert a == curation.select(records, scores, recipe="sft_em", hard_ratio=0.3, seed=0)
  picks = {tuple(r.id for r in curation.select(records, scores, recipe="sft_em", hard_ratio=0.3, seed=s)) for s in
           range(6)}
  assert len(picks) > 1  # the seed matters (3 of 10: 120 possible picks)
  with pytest.raises(ValueError, match="already keeps every hard"):
    curation.select(records, scores, recipe="sft", hard_ratio=0.5)
  with pytest.raises(ValueError, match=r"hard_ratio must be in \[0, 1\]"):
    curation.select(records, scores, recipe="sft_m", hard_ratio=1.5)


def test_select_window_and_errors():
  records, scores, _ = _scored_set()
  got = curation.select(records, scores, recipe="sft", window=(0.25, 0.5))
  assert got and all(0.25 <= scores[r.id].pass_rate <= 0.5 for r in got)
  assert {scores[r.id].pass_rate for r in got} == {0.25, 0.375, 0.5}  # both ends inclusive
  assert got == [r for r in records if 0.25 <= scores[r.id].pass_rate <= 0.5]
  assert curation.select(records, scores, recipe="sft_m", window=(1.0, 1.0)) == []
  with pytest.raises(ValueError, match="window"):
    curation.select(records, scores, recipe="sft", window=(0.6, 0.2))
  with pytest.raises(ValueError, match="unknown recipe"):
    curation.select(records, scores, recipe="sft_x")

  del scores["r03"], scores["r05"]
  with pytest.raises(ValueError, match=r"2 of 20 records have no score \(e\.g\. id 'r03', 'r05'\).*scoring stage"):
    curation.select(records, scores, recipe="sft")
  got = curation.select(records, scores, recipe="sft", allow_missing=True)
  assert [r.id for r in got] == [r.id for r in records if r.id not in ("r03", "r05")]


# ----------------------------------------------------------------------------- summary and histogram
def test_summary_hand_made():
  def rec(rid, answer, task="classification"):
    return Record(id=rid, image=f"/i/{rid}.jpg", prompt="q", answer=answer, task=task)

  records = [rec("a", "Cat"), rec("b", " cat "), rec("c", "dog"), rec("d", "dog"),
             rec("e", "[1, 2, 3, 4]", "grounding"), rec("f", "fox")]
  v = {"a": [1, 1, 1, 1], "b": [1, 0, 0, 0], "c": [0, 0, 0, 0], "d": [1, 1, 0, 0], "e": [0, 0, 0, 0]}
  scores = {k: ScoreRow(k, ["x"] * 4, x, sum(x) / 4) for k, x in v.items()}
  s = curation.summary(records, scores)
  assert s["n"] == 5 and s["unscored"] == 1 and s["k"] == 4
  assert s["buckets"] == {"easy": 1, "medium": 2, "hard": 2}
  assert s["classes"] == {"easy": {"cat": 1}, "medium": {"cat": 1, "dog": 1}, "hard": {"dog": 1}}
  assert s["pass_rate_hist"] == [2, 1, 1, 0, 1]
  assert s["pass_rate_labels"] == ["0/4", "1/4", "2/4", "3/4", "4/4"]
  assert s["mean_pass_rate"] == pytest.approx((1 + 0.25 + 0 + 0.5 + 0) / 5)

  scores["f"] = ScoreRow("f", ["x"] * 8, [1] * 8, 1.0)
  with pytest.raises(ValueError, match=r"K=4 .*K=8"):
    curation.summary(records, scores)


def test_pass_rate_histogram_png(tmp_path):
  counts = [5, 1, 0, 2, 1, 0, 0, 3, 9]
  scores = {}
  for j, c in enumerate(counts):
    for m in range(c):
      v = [1] * j + [0] * (K - j)
      scores[f"{j}-{m}"] = ScoreRow(f"{j}-{m}", ["x"] * K, v, j / K)
  p = curation.pass_rate_histogram_png(scores, tmp_path / "h.png")
  with Image.open(p) as img:
    assert img.format == "PNG" and img.size == plots.SIZE
    img = img.convert("RGB")
    left, top, right, bottom = plots.PLOT_BOX
    slot = (right - left) / len(counts)
    def at(j, y=bottom - 4):
      return img.getpixel((int(left + (j + 0.5) * slot), y))

    assert at(0) == curation.BUCKET_COLORS["hard"]
    assert at(8) == curation.BUCKET_COLORS["easy"]
    assert at(1) == at(3) == curation.BUCKET_COLORS["medium"]
    column = {at(2, y) for y in range(top, bottom - 1)}
    assert plots.BACKGROUND in column and not column & set(curation.BUCKET_COLORS.values())  # nobody solved 2 of 8


# ----------------------------------------------------------------------------- writing curated sets
def test_materialize_and_write_curated_round_trip(tmp_path):
  # In-memory PIL images as the builtin dataset holds them (plus other modes PNG must round-trip).
  rng = np.random.default_rng(0)
  records = [Record(id=f"digits-train-{i:05d}", image=Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)),
                    prompt=PROMPT, answer=name, task="classification")
             for i, (shape, name) in enumerate([((56, 56, 3), "one"), ((56, 56, 3), "two"), ((20, 30), "three"),
                                                ((16, 12, 4), "four")])]
  buf = io.BytesIO()
  Image.new("RGB", (9, 7), (10, 200, 30)).save(buf, format="JPEG")
  jpeg = buf.getvalue()
  records.append(Record(id="bytes/one", image=jpeg, prompt=PROMPT, answer="green", task="classification"))
  path_rec = Record(id="p", image=str(tmp_path / "elsewhere.png"), prompt=PROMPT, answer="x", task="classification")
  records.append(path_rec)

  image_dir = tmp_path / "images"
  n = curation.write_curated(records, tmp_path / "curated.json", image_dir)
  assert n == len(records)
  back = read_paper_json(tmp_path / "curated.json").records
  assert [(r.id, r.prompt, r.answer, r.task) for r in back] == [(r.id, r.prompt, r.answer, r.task) for r in records]
  assert back[-1].image == path_rec.image  # path images pass through
  assert back[-2].image.endswith(".jpg") and Path(back[-2].image).read_bytes() == jpeg  # bytes kept verbatim
  for orig, new in zip(records[:4], back[:4]):
    assert new.image.endswith(".png") and os.path.dirname(new.image) == str(image_dir)
    with Image.open(new.image) as img:
      assert img.size == orig.image.size
      assert img.mode == orig.image.mode
      assert np.array_equal(np.asarray(img), np.asarray(orig.image))
  assert len({r.image for r in back[:5]}) == 5

  # Existing files are kept, not rewritten; the returned records are new, the inputs untouched.
  with open(back[0].image, "ab") as f:
    f.write(b"sentinel")
  again = curation.materialize_images(records, image_dir)
  assert Path(back[0].image).read_bytes().endswith(b"sentinel")
  assert [r.image for r in again] == [r.image for r in back]
  assert isinstance(records[0].image, Image.Image)
  assert sorted(os.listdir(image_dir)) == sorted(os.path.basename(r.image) for r in back[:5])  # no tmp files

  with pytest.raises(ValueError, match="'junk'.*not a readable image"):
    curation.materialize_images([Record(id="junk", image=b"nope", prompt="q", answer="a", task="classification")],
                                image_dir)


def test_safe_name_keeps_similar_ids_apart():
  assert curation.safe_name("a/b") != curation.safe_name("a_b")
  assert "/" not in curation.safe_name("/data/x/../y.JPEG")


def test_the_curves_subset_is_stratified_seeded_and_covers_every_class(paper_data):
  """Issue 29: the paper configs' curve_limit 2048 kept the first 2,048 ImageNet-R records: 12 of its 68
  classes. The stratified subset keeps every class, each in proportion, and the same records per seed."""
  import collections
  from dcsft_jax.data import sources
  recs = sources.load(f"json:{os.path.join(paper_data, 'imagenet-r_val_processed.json')}")
  counts = collections.Counter(r.answer for r in recs)
  assert len(counts) == 68 and len({r.answer for r in recs[:2048]}) == 12
  sub = curation.stratified_subset(recs, 2048, seed=0)
  got = collections.Counter(r.answer for r in sub)
  assert len(sub) == 2048 and set(got) == set(counts)
  for label, n in counts.items():
    assert abs(got[label] - 2048 * n / len(recs)) < 1, label
  assert [r.id for r in curation.stratified_subset(recs, 2048, seed=0)] == [r.id for r in sub]
  assert [r.id for r in curation.stratified_subset(recs, 2048, seed=1)] != [r.id for r in sub]
  ids = [r.id for r in recs]
  assert [ids.index(r.id) for r in sub] == sorted(ids.index(r.id) for r in sub)      # the file's order
  assert curation.stratified_subset(recs[:10], 0, 0) == recs[:10] == curation.stratified_subset(recs[:10], 50, 0)
