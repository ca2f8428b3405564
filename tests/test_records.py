"""dcsft_jax.data.records: the paper's files read with NOTES.md §2.1's counts, bad input, round trips, HF datasets."""
import json
import os

import pytest
from PIL import Image

from dcsft_jax.data import records as R

QUESTION = "Please provide the object name in the image. Output the answer using one word."

# NOTES.md §2.1: file -> (records, distinct labels)
PAPER_COUNTS = {
    "imagenet_cold_sft.json": (400, 100),
    "imagenet_left_sft.json": (9600, 100),
    "imagenet_left_grpo.json": (9600, 100),
    "imagenet_easy_sft_3b.json": (4163, 92),
    "imagenet_middle_sft_3b.json": (4017, 99),
    "imagenet_hard_sft_3b.json": (1420, 98),
    "imagenet_easy_sft_7b.json": (4704, 92),
    "imagenet_middle_sft_7b.json": (3598, 100),
    "imagenet_hard_sft_7b.json": (1298, 96),
    "imagenet_val_processed.json": (5000, 100),
    "imagenet-r_val_processed.json": (10741, 68),
    "imagenet-a_val_processed.json": (3015, 87),
}

@pytest.fixture(scope="module")
def paper(paper_data):
  cache = {}

  def read(name, **kw):
    if kw:
      return R.read_paper_json(os.path.join(paper_data, name), **kw)
    if name not in cache:
      cache[name] = R.read_paper_json(os.path.join(paper_data, name))
    return cache[name]
  return read


# ----------------------------------------------------------------------------- the paper's files
def test_every_paper_file_is_known(paper_data):
  assert sorted(f for f in os.listdir(paper_data) if f.endswith(".json")) == sorted(PAPER_COUNTS)


@pytest.mark.parametrize("name", sorted(PAPER_COUNTS))
def test_paper_file_counts(paper, name):
  res = paper(name)
  n, labels = PAPER_COUNTS[name]
  assert len(res) == n and not res.skipped
  assert len({r.answer for r in res}) == labels
  assert len({r.id for r in res}) == n  # ids are unique
  assert all(r.task == "classification" and r.prompt == QUESTION for r in res)
  assert all(isinstance(r.image, str) and r.image.startswith("/data/dataset/") for r in res)
  assert all(r.meta["source"].endswith(name) for r in res[:3])


@pytest.mark.parametrize("size", ["3b", "7b"])
def test_buckets_partition_the_left_set(paper, size):
  left = paper("imagenet_left_grpo.json")
  buckets = [paper(f"imagenet_{b}_sft_{size}.json") for b in ("easy", "middle", "hard")]
  ids = [r.id for b in buckets for r in b]
  assert len(ids) == len(set(ids)) == 9600
  assert set(ids) == {r.id for r in left}
  assert {r.image for b in buckets for r in b} == {r.image for r in left}
  # Same record whichever layout it came from (meta, the provenance, is not compared).
  by_id = {r.id: r for r in left}
  assert all(r == by_id[r.id] for b in buckets for r in b)


def test_left_sft_and_grpo_are_the_same_records_in_order(paper):
  sft, grpo = paper("imagenet_left_sft.json"), paper("imagenet_left_grpo.json")
  assert sft.records == grpo.records
  assert sft[0].meta["layout"] == "messages" and grpo[0].meta["layout"] == "problem"


def test_task_override(paper):
  res = paper("imagenet_cold_sft.json", task="reasoning")
  assert {r.task for r in res} == {"reasoning"}
  with pytest.raises(ValueError, match="task="):
    paper("imagenet_cold_sft.json", task="detection")


def test_image_root_directory_remap(paper, tmp_path):
  res = paper("imagenet_cold_sft.json", image_root=str(tmp_path))
  plain = paper("imagenet_cold_sft.json")
  assert [r.id for r in res] == [r.id for r in plain]  # ids do not depend on where images live
  sample = res.records[::37]
  for r in sample:  # placeholder images where the remapped paths point
    os.makedirs(os.path.dirname(r.image), exist_ok=True)
    Image.new("RGB", (8, 8)).save(r.image, format="JPEG")
  for r in sample:
    assert r.image.startswith(str(tmp_path) + os.sep) and os.path.isfile(r.image)
    # the common directory /data/dataset/Imagenet/train was replaced: class dir + file remain
    assert os.path.relpath(r.image, tmp_path) == os.path.join(*r.meta["original_image"].split("/")[-2:])
    with Image.open(r.image) as im:
      assert im.size == (8, 8)


def test_image_root_prefix_pair(paper, tmp_path):
  pair = ("/data/dataset", str(tmp_path))
  val = paper("imagenet_val_processed.json", image_root=pair)
  ood = paper("imagenet-a_val_processed.json", image_root=pair)
  assert val[0].image == str(tmp_path / val[0].meta["original_image"][len("/data/dataset/"):])
  assert all(r.image.startswith(str(tmp_path / "Imagenet-A") + "/") for r in ood)
  # "/data/dataset/Imagenet" must not swallow "/data/dataset/Imagenet-A": such paths are bad records.
  with pytest.raises(R.BadRecord, match=r"imagenet-a_val_processed.json: record 0 \(id '/data/dataset/Imagenet-A/.*not under"):
    paper("imagenet-a_val_processed.json", image_root=("/data/dataset/Imagenet", str(tmp_path)))


# ----------------------------------------------------------------------------- bad input
GOOD = {"messages": [{"role": "user", "content": "<image>" + QUESTION},
                     {"role": "assistant", "content": "goose"}], "images": ["/img/a.jpg"]}
BAD_CASES = {
    "not_an_object": (["oops"], "not an object"),
    "no_known_keys": ({"question": "q", "label": "x"}, "neither 'messages'"),
    "messages_not_list": ({"messages": "hi", "images": ["/img/b.jpg"]}, "must be a list"),
    "multi_turn": ({"messages": GOOD["messages"] * 2, "images": ["/img/b.jpg"]}, "roles"),
    "missing_content": ({"messages": [{"role": "user"}, {"role": "assistant", "content": "x"}]}, "lacks"),
    "empty_answer": ({"problem": QUESTION, "solution": "  ", "image": "/img/b.jpg"}, "answer is empty"),
    "solution_not_str": ({"problem": QUESTION, "solution": 3, "image": "/img/b.jpg"}, "'solution' must be"),
    "two_images": ({"messages": GOOD["messages"], "images": ["/img/b.jpg", "/img/c.jpg"]}, "2 images"),
    "tag_mismatch": ({"messages": [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": "x"}],
                      "images": ["/img/b.jpg"]}, "tags"),
    "unknown_task": ({"problem": QUESTION, "solution": "x", "image": "/img/b.jpg", "task": "ocr"}, "unknown task"),
    "image_wrong_type": ({"problem": QUESTION, "solution": "x", "image": 7}, "'image' must be"),
}


def _write(path, rows):
  with open(path, "w") as f:
    json.dump(rows, f)
  return str(path)


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_record_names_file_and_index(tmp_path, case, caplog):
  bad, why = BAD_CASES[case]
  bad = bad[0] if isinstance(bad, list) else bad
  path = _write(tmp_path / f"{case}.json", [GOOD, bad, {**GOOD, "images": ["/img/z.jpg"]}])
  with pytest.raises(R.BadRecord) as e:
    R.read_paper_json(path)
  msg = str(e.value)
  assert f"{case}.json: record 1" in msg and why in msg and "Fix:" in msg, msg
  assert e.value.index == 1 and e.value.source == path
  res = R.read_paper_json(path, skip_bad_records=True)
  assert [r.image for r in res] == ["/img/a.jpg", "/img/z.jpg"]
  assert len(res.skipped) == 1 and res.skipped[0][0] == 1 and why in res.skipped[0][1]
  assert "skipped 1 bad record(s) of 3" in caplog.text  # skipping is never silent


def test_bad_files(tmp_path):
  p = tmp_path / "x.json"
  p.write_text("{not json")
  with pytest.raises(R.BadRecord, match="x.json: not valid JSON"):
    R.read_paper_json(p)
  _write(p, {"messages": []})
  with pytest.raises(R.BadRecord, match="x.json: top level is a dict"):
    R.read_paper_json(p, skip_bad_records=True)  # a broken file is never "skipped"


def test_record_validation():
  ok = dict(id="a", image="/x.jpg", prompt="q", answer="cat", task="classification")
  R.Record(**ok)
  for bad, msg in [(dict(answer=""), "empty"), (dict(task="ocr"), "unknown task"), (dict(id=""), "id"),
                   (dict(image=3), "image"), (dict(prompt=None), "prompt"), (dict(meta=[]), "meta")]:
    with pytest.raises(ValueError, match=msg):
      R.Record(**{**ok, **bad})
  assert R.Record(**ok, meta={"a": 1}) == R.Record(**ok)  # meta is provenance, not identity


# ----------------------------------------------------------------------------- answers and tasks
@pytest.mark.parametrize("text,box", [
    ("[1, 2, 3, 4]", (1, 2, 3, 4)),
    (" [10.5,20,30.25,40]. ", (10.5, 20, 30.25, 40)),
    ("(0, 0, 5, 5)", (0, 0, 5, 5)),
    ('[{"bbox_2d": [12, 34, 56, 78], "label": "dog"}]', (12, 34, 56, 78)),
    ("the box is [1,2,3,4] I think", (1, 2, 3, 4)),
    ("[5, 5, 1, 1]", None),  # inverted
    ("[1, 2, 3]", None),
    ("goose", None),
    ("", None),
])
def test_parse_box(text, box):
  assert R.parse_box(text) == box


def test_parse_box_strict():
  assert R.parse_box("the box is [1,2,3,4]", strict=True) is None
  assert R.parse_box("[1,2,3,4].", strict=True) == (1, 2, 3, 4)


@pytest.mark.parametrize("prompt,answer,task", [
    (QUESTION, "goose", "classification"),
    (QUESTION, "jack-o'-lantern", "classification"),
    ("Locate the dog on the left.", "[12, 34, 56, 78]", "grounding"),
    ("Which is larger? A. 3 B. 5 C. 7", "B", "reasoning"),
    ("Which is larger? (A) 3 (B) 5", "(B)", "reasoning"),
    ("Name the letter on the sign.", "B", "classification"),  # a letter without options is a label
    ("What is x?", "3.5", "reasoning"),
    ("What is x?", "\\frac{1}{2}", "reasoning"),
])
def test_infer_task(prompt, answer, task):
  assert R.infer_task(prompt, answer) == task


def test_mixed_tasks_and_ids(tmp_path):
  rows = [
      {"problem": "the dog", "solution": "[1, 2, 30, 40]", "image": "/img/a.jpg"},
      {"problem": "the cat", "solution": "[5, 6, 7, 8]", "image": "/img/a.jpg"},  # same image, other expression
      {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2? A. 4 B. 5"},
                    {"role": "assistant", "content": "A"}]},  # text-only
      {"problem": QUESTION, "solution": "goose", "image": "/img/g.jpg"},
      {"problem": QUESTION, "solution": "goose", "image": "/img/g.jpg"},  # duplicated row
  ]
  res = R.read_paper_json(_write(tmp_path / "mix.json", rows))
  assert [r.task for r in res] == ["grounding", "grounding", "reasoning", "classification", "classification"]
  ids = [r.id for r in res]
  assert len(set(ids)) == 5
  assert ids[0].startswith("/img/a.jpg#") and ids[2] == "mix:2" and ids[3:] == ["/img/g.jpg", "/img/g.jpg~1"]
  assert res[2].image is None and res[2].meta["system"] == "Be brief."


# ----------------------------------------------------------------------------- writing
def test_write_swift_json_round_trip(tmp_path):
  recs = [
      R.Record("/img/a.jpg", "/img/a.jpg", QUESTION, "goose", "classification"),
      R.Record("/img/b.jpg#x", "/img/b.jpg", "the dog", "[1, 2, 30, 40]", "grounding"),
      R.Record("q7", None, "2+2? A. 4 B. 5", "A", "reasoning", {"system": "Be brief."}),
      R.Record("/img/c.jpg", "/img/c.jpg", "what is it?", "B", "reasoning"),  # task not inferable: written
      R.Record("custom-id", "/img/d.jpg", QUESTION, "jack-o'-lantern", "classification"),
  ]
  path = tmp_path / "out" / "curated.json"
  assert R.write_swift_json(recs, path) == 5
  assert os.listdir(tmp_path / "out") == ["curated.json"]  # no tmp file left behind
  back = R.read_paper_json(path)
  assert back.records == recs and back[2].meta["system"] == "Be brief."
  rows = json.loads(path.read_text())
  assert rows[0] == {"messages": [{"role": "user", "content": "<image>" + QUESTION},
                                  {"role": "assistant", "content": "goose"}], "images": ["/img/a.jpg"]}
  assert rows[3]["task"] == "reasoning" and "task" not in rows[1]


def test_write_truncates_boxes_and_rejects_pil(tmp_path):
  path = tmp_path / "g.json"
  R.write_swift_json([R.Record("a", "/a.jpg", "dog", "[1.4, 2.6, 30.5, 40.49]", "grounding")], path)
  assert R.read_paper_json(path)[0].answer == "[1, 2, 30, 40]"  # int(x), as the paper's infer/sample.py
  with pytest.raises(ValueError, match="PIL image"):
    R.write_swift_json([R.Record("a", Image.new("RGB", (2, 2)), "q", "cat", "classification")], path)
  assert R.read_paper_json(path)[0].answer == "[1, 2, 30, 40]"  # a failed write leaves the old file


def test_paper_file_round_trip(paper, paper_data, tmp_path):
  src = paper("imagenet_hard_sft_7b.json")
  R.write_swift_json(src, tmp_path / "h.json")
  assert json.loads((tmp_path / "h.json").read_text()) == json.load(
      open(os.path.join(paper_data, "imagenet_hard_sft_7b.json")))  # byte-for-byte the paper's layout
  assert R.read_paper_json(tmp_path / "h.json").records == src.records


# ----------------------------------------------------------------------------- HF datasets
def test_hf_dataset_saved_to_disk(tmp_path):
  datasets = pytest.importorskip("datasets")
  imgs = []
  for i in range(3):
    p = tmp_path / f"im{i}.png"
    Image.new("RGB", (4 + i, 4), (i * 50, 0, 0)).save(p)
    imgs.append(str(p))
  ds = datasets.Dataset.from_dict({"img": imgs, "question": ["what?"] * 3, "label": ["cat", "dog", "emu"],
                                   "key": ["k0", "k1", "k2"]})
  ds = ds.cast_column("img", datasets.Image())
  ds.save_to_disk(str(tmp_path / "saved"))
  res = R.read_hf_dataset(str(tmp_path / "saved"), image_column="img", prompt_column="question",
                          answer_column="label", id_column="key", task="classification")
  assert [r.id for r in res] == ["k0", "k1", "k2"] and [r.answer for r in res] == ["cat", "dog", "emu"]
  assert all(r.prompt == "what?" and r.task == "classification" for r in res)
  im = res[2].image
  im = Image.open(im) if isinstance(im, str) else im
  assert im.size == (6, 4)


def test_hf_dataset_json_file_and_bad_rows(tmp_path):
  pytest.importorskip("datasets")
  p = tmp_path / "d.jsonl"
  p.write_text("\n".join(json.dumps({"image": f"/data/x/{i}.jpg", "answer": a}) for i, a in
                         enumerate(["[1, 2, 3, 4]", "", "[0, 0, 9, 9]"])))
  kw = dict(image_column="image", prompt="<image>Find it.", answer_column="answer", task="grounding")
  with pytest.raises(R.BadRecord, match=r"d.jsonl: record 1\b.*answer is empty"):
    R.read_hf_dataset(str(p), **kw)
  res = R.read_hf_dataset(str(p), image_root=("/data", str(tmp_path)), skip_bad_records=True, **kw)
  assert [r.image for r in res] == [str(tmp_path / "x/0.jpg"), str(tmp_path / "x/2.jpg")]
  assert res.skipped == [(1, "answer is empty")] and res[0].prompt == "Find it."
  with pytest.raises(ValueError, match="exactly one"):
    R.read_hf_dataset(str(p), image_column="image", answer_column="answer", task="grounding")


def test_bad_text_and_oversized_images_are_named_and_skippable(tmp_path, monkeypatch):
  """A lone surrogate in a prompt, a file that is not UTF-8 and an image over PIL's pixel limit each
  become an error naming the file (and record), and skip_bad_records skips the record."""
  from dcsft_jax.data import batching
  from dcsft_jax.data.processor import Processor
  img = tmp_path / "big.png"
  Image.new("RGB", (40, 40), "white").save(img)
  good = {"messages": [{"role": "user", "content": "<image>What is it?"}, {"role": "assistant", "content": "cat"}],
          "images": [str(img)]}
  broken = {"messages": [{"role": "user", "content": "<image>What is \ud800 it?"},
                         {"role": "assistant", "content": "cat"}], "images": [str(img)]}
  path = tmp_path / "data.json"
  path.write_text(json.dumps([good, broken]))      # json escapes the surrogate as \\ud800, as such files do
  with pytest.raises(R.BadRecord, match=r"data\.json: record 1.*not valid Unicode.*surrogate"):
    R.read_paper_json(path)
  res = R.read_paper_json(path, skip_bad_records=True)
  assert len(res) == 1 and [i for i, _ in res.skipped] == [1]
  raw = tmp_path / "latin1.json"
  raw.write_bytes(b'[{"problem": "caf\xff", "solution": "1"}]')
  with pytest.raises(R.BadRecord, match=r"latin1\.json: not UTF-8 text \(byte 0xff at offset 17\)"):
    R.read_paper_json(raw)
  # PIL's decompression-bomb limit, lowered so that a 40x40 image crosses it.
  monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 700)
  proc = Processor.tiny()
  with pytest.raises(ValueError, match=r"big\.png.*PIL refuses images over 1,400 pixels"):
    proc.measure(str(img), "What is it?", "cat")
  small = tmp_path / "small.png"
  Image.new("RGB", (20, 20), "white").save(small)
  recs = list(res) + [R.Record("small", str(small), "What is it?", "dog", "classification")]
  assert batching.auto_buckets(recs, proc, with_answers=True, skip_bad_records=True)  # the big one skipped
  with pytest.raises(ValueError, match=r"big\.png"):
    batching.auto_buckets(recs, proc, with_answers=True)
