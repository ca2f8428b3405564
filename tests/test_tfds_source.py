"""TFDS sources, on small datasets this test prepares itself in a TFDS data_dir (array_record,
built from encoded images, so neither TensorFlow nor a download is needed)."""
import os

import numpy as np
import pytest
from PIL import Image

tfds = pytest.importorskip("tensorflow_datasets")

from dcsft_jax.data import records as records_lib
from dcsft_jax.data import tfds_source

WNIDS = ["n01855672", "n04355338", "n02085620"]


def _png(tmp, i, size):
  p = os.path.join(tmp, f"src{i}_{size[0]}x{size[1]}.png")
  Image.fromarray(np.random.default_rng(i).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(p)
  return p


class FakeImagenetR(tfds.core.GeneratorBasedBuilder):
  """ImageNet-R's features: image, WordNet-id ClassLabel, file_name."""
  VERSION = tfds.core.Version("0.2.0")
  src_dir = None

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        "image": tfds.features.Image(encoding_format="jpeg"), "label": tfds.features.ClassLabel(names=WNIDS),
        "file_name": tfds.features.Text()}))

  def _split_generators(self, dl_manager):
    return {"test": self._generate_examples()}

  def _generate_examples(self):
    for i in range(7):
      yield i, {"image": _png(self.src_dir, i, (40 + i, 30)), "label": i % 3, "file_name": f"art_{i}.jpg"}


class FakeRefCoco(tfds.core.GeneratorBasedBuilder):
  """RefCOCO's features, less the masks, and with one expression per object: the real dataset nests a
  list of expressions per object, which TFDS can only encode with TensorFlow installed."""
  VERSION = tfds.core.Version("1.0.0")
  src_dir = None

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        "image": tfds.features.Image(encoding_format="jpeg"), "image/id": np.int64,
        "objects": tfds.features.Sequence({
            "id": np.int64, "bbox": tfds.features.BBoxFeature(), "label": np.int64,
            "refexp": {"refexp_id": np.int64, "raw": tfds.features.Text()}})}))

  def _split_generators(self, dl_manager):
    return {"validation": self._generate_examples()}

  def _generate_examples(self):
    for i in range(3):
      objs = [{"id": 10 * i + o, "label": 1, "bbox": tfds.features.BBox(0.1 * o, 0.2, 0.5 + 0.1 * o, 0.9),
               "refexp": {"refexp_id": 100 * i + 10 * o, "raw": f"the thing {o} number 0"}} for o in range(2)]
      yield i, {"image": _png(self.src_dir, 100 + i, (200, 100)), "image/id": 1000 + i, "objects": objs}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  d = str(tmp_path_factory.mktemp("tfds"))
  src = str(tmp_path_factory.mktemp("src"))
  for cls in (FakeImagenetR, FakeRefCoco):
    cls.src_dir = src
    cls(data_dir=d, file_format="array_record").download_and_prepare()
  return d


def test_classification_with_wordnet_labels(data_dir):
  with pytest.raises(ValueError, match="WordNet ids"):
    tfds_source.read_tfds("fake_imagenet_r", split="test", data_dir=data_dir)
  words = {"n01855672": "goose", "n04355338": "sundial"}   # n02085620 has no one-word name: selected out
  res = tfds_source.read_tfds("fake_imagenet_r", split="test", data_dir=data_dir, label_names=words)
  assert len(res) == 5 and len(res.skipped) == 2
  assert {r.answer for r in res} == {"goose", "sundial"}
  r = res[0]
  assert r.task == "classification" and r.prompt == tfds_source.CLASSIFICATION_PROMPT
  assert isinstance(r.image, bytes)
  img = Image.open(__import__("io").BytesIO(r.image))
  assert img.size[1] == 30
  # The same records feed the processor, which decodes the bytes.
  from dcsft_jax.data.processor import Processor
  ex = Processor.tiny().encode(r.image, r.prompt, r.answer, name=r.id)
  assert ex["image_grid_thw"].shape == (1, 3)


def test_label_map_from_the_paper_files(paper_data):
  paper = os.path.join(paper_data, "imagenet-r_val_processed.json")
  m = tfds_source.label_map_from_records(records_lib.read_paper_json(paper).records)
  assert m["n01855672"] == "goose" and len(m) == 68


def test_grounding_one_record_per_expression_with_pixel_boxes(data_dir):
  res = tfds_source.read_tfds("fake_ref_coco", split="validation", data_dir=data_dir)
  assert len(res) == 3 * 2 and not res.skipped
  r = [x for x in res if x.id.endswith("/1000/10")][0]
  assert r.task == "grounding" and 'the thing 1 number 0' in r.prompt
  # bbox (ymin .1, xmin .2, ymax .6, xmax .9) on a 200x100 image -> [40, 10, 180, 60]
  assert records_lib.parse_box(r.answer) == (40.0, 10.0, 180.0, 60.0)


def test_missing_dataset_and_split_are_named(data_dir, tmp_path):
  with pytest.raises(FileNotFoundError, match="imagenet_a.*tfds build imagenet_a"):
    tfds_source.read_tfds("imagenet_a", split="test", data_dir=str(tmp_path))
  with pytest.raises(ValueError, match="no split 'train'"):
    tfds_source.read_tfds("fake_imagenet_r", split="train", data_dir=data_dir, label_names={})
