r"""The paper's visual-grounding run on Qwen2.5-VL-3B-Instruct (NOTES.md §2.2): RefCOCO (ID), Ref-L4 and
LISA-grounding (OOD); an answer is right when its box has IoU >= 0.5 with the reference (the task is
inferred per record: a box answer is grounding). Same pipeline and settings as the ImageNet configs.

  ARG=data_dir=/data/grounding,image_root=/data/coco=/mnt/coco,hf_path=/models/Qwen2.5-VL-3B-Instruct,workdir=runs/ref_3b
  python -m dcsft_jax.main --config=configs/paper/refcoco_qwen25vl_3b.py:$ARG [--config.KEY=VALUE ...]

Config argument keys: data_dir, image_root, hf_path, tfds_dir, workdir, source=json|tfds (as the ImageNet configs).

The paper's repo ships no grounding data (NOTES §2.2): build these files in data_dir yourself, each one
JSON list in either of the paper's layouts,
  {"problem": "Locate the object described as 'the man on the left' ... as [x1, y1, x2, y2].",
   "solution": "[12, 40, 230, 388]", "image": "/abs/path/COCO_train2014_000000000001.jpg"}
  or {"messages": [{"role": "user", "content": "<image>..."}, {"role": "assistant", "content": "[12, 40, 230, 388]"}],
      "images": ["/abs/path/..."]},
with integer pixel boxes [x1, y1, x2, y2] of the image file:
  refcoco_cold_sft.json       400 RefCOCO training samples (cold start; the count is ImageNet's, NOTES
                              gives none for grounding)
  refcoco_left.json           9,600 more RefCOCO training samples (10k in all, NOTES §2.2)
  refcoco_val.json            the RefCOCO evaluation split (ID; which split the paper used is unknown)
  ref_l4_test.json            Ref-L4 (OOD; test size unknown)
  lisa_grounding_test.json    LISA grounding (OOD; test size unknown)
source=tfds takes the RefCOCO sets from TFDS ref_coco/refcoco_unc under tfds_dir instead (train[:400],
train[400:10000], validation: in the dataset's order, not a random 10k); Ref-L4 and LISA stay JSON.
"""
from dcsft_jax import config_base


def get_config(arg=None):
  return config_base.load_config_file("_common.py", beside=__file__).refcoco(arg, "3b")
