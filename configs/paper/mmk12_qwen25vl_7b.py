r"""The paper's multimodal-reasoning run (§6.2) on Qwen2.5-VL-7B-Instruct (NOTES.md §2.3): MMK12 questions
with GLM-4.5V responses verified correct, 400 for the cold start and 6,400 for post-training; 400
training steps; GRPO's KL beta 0.001; greedy evaluation with up to 4,096 new tokens on multiple-choice
questions of the reasoning benchmarks. (NOTES: the paper's text says 3B, its Table 6 says 7B.)

  ARG=data_dir=/data/mmk12,image_root=/data/mmk12/images,hf_path=/models/Qwen2.5-VL-7B-Instruct,workdir=runs/mmk12_7b
  python -m dcsft_jax.main --config=configs/paper/mmk12_qwen25vl_7b.py:$ARG [--config.KEY=VALUE ...]

Config argument keys: data_dir, image_root, hf_path, tfds_dir, workdir.

The paper's repo ships no reasoning data: build these files in data_dir, each one JSON list in either
of the paper's layouts. Training records carry the verified response as the answer (messages layout:
the assistant turn); scoring and GRPO compare the final answer extracted from it (an option letter,
\boxed{...} or the last line) with the model's. Benchmark records are multiple-choice questions with
their options in the prompt ("A. ...", "B. ...") and the option letter as the solution:
  mmk12_cold_sft.json     400 records (cold start)
  mmk12_train.json        6,400 records (scored, curated, GRPO's prompts)
  mmmu_val.json, mathvista_mini.json, mathvision.json, mathverse_mini.json, wemath.json
                          the benchmarks NOTES names (MMMU val, MathVista mini, MathVision, MathVerse
                          mini, WeMath), multiple-choice questions only; the paper's 6th is unknown.
"""
from dcsft_jax import config_base


def get_config(arg=None):
  return config_base.load_config_file("_common.py", beside=__file__).mmk12(arg, "7b")
