r"""The paper's image-classification run on Qwen2.5-VL-3B-Instruct (NOTES.md §1, §2.1): cold start on
400 ImageNet images, K=8 pass-rate scoring of the 9,600-image `left` set, curation into SFT / SFT-M /
SFT-EM, LoRA SFT on each, the GRPO baseline, greedy evaluation on ImageNet (ID), ImageNet-R and
ImageNet-A (OOD), HF export of SFT-EM. Settings and their sources: configs/paper/_common.py.

  ARG=data_dir=/data/paper,image_root=/data/dataset/Imagenet=/mnt/imagenet,hf_path=/models/Qwen2.5-VL-3B-Instruct,workdir=runs/in_3b
  python -m dcsft_jax.main --config=configs/paper/imagenet_qwen25vl_3b.py:$ARG [--config.KEY=VALUE ...]

Config argument keys (all optional): data_dir (default data/paper), image_root, hf_path (default
models/Qwen2.5-VL-3B-Instruct), tfds_dir, workdir (default workdir/paper/imagenet_qwen25vl_3b), source=json|tfds.

Expected files in data_dir: the paper's own JSON files (github.com/byyx666/DC-SFT), unchanged:
  imagenet_cold_sft.json          400 records, ms-swift messages layout (cold start)
  imagenet_left_grpo.json         9,600 records, {"problem", "solution", "image"} (scored, curated, GRPO)
  imagenet_val_processed.json     5,000 records (ID);  imagenet-r_val_processed.json 10,741 (OOD);
  imagenet-a_val_processed.json   3,015 records (OOD), all in the problem/solution layout.
Their image paths are absolute (/data/dataset/Imagenet/{train,val}/WNID/...): set image_root=OLD=NEW to
remap them (ImageNet-R/A paths likewise). The paper's own 3B buckets, for comparison with ours: easy 4,163 / medium 4,017 / hard 1,420.

source=tfds reads the three evaluation sets from TFDS under tfds_dir (imagenet2012:validation,
imagenet_r:test, imagenet_a:test: the whole sets, not the paper's subsets) and maps their WordNet ids to
answer words with DATA_DIR/imagenet_label_names.json ({"n04355338": "sundial", ...}; make it with
dcsft_jax.data.tfds_source.label_map_from_records over the paper's JSON records). Training data stays
the paper's JSON files: the paper's 100-class, 10k-image subset is defined by them.
"""
from dcsft_jax import config_base


def get_config(arg=None):
  return config_base.load_config_file("_common.py", beside=__file__).imagenet(arg, "3b")
