"""Shared by the paper configs in configs/paper/ (files starting with '_' are not configs).

ml_collections' config_flags loads a config file by its path, and configs/ is not a Python package,
so each paper config loads this file by path too (`load_common(__file__)` in its few lines). The
numbers are the paper's (section numbers in the comments refer to the paper notes summarised in
FIDELITY.md); what the paper leaves unset is the authors' code's (github.com/byyx666/DC-SFT, ms-swift
3.6.0.dev0), and FIDELITY.md cites the file and line of each choice.

Config-file argument (big_vision style), the same keys for every paper config:
  --config=configs/paper/FILE.py:data_dir=DIR,image_root=OLD=NEW,hf_path=DIR,tfds_dir=DIR,workdir=DIR
plus `source=json|tfds` for the ImageNet and RefCOCO configs, and `small_slice=true` for the smallest
slices (8 x 16 GB, a TPU v5e-8): the full-SFT cold start keeps Adam's moments in bfloat16, which the
7B needs to fit (BENCHMARKS.md's fit table; the loss effect is measured there too).
"""
from __future__ import annotations

import os

import ml_collections

from dcsft_jax import config_base

HF_NAMES = {"3b": "Qwen2.5-VL-3B-Instruct", "7b": "Qwen2.5-VL-7B-Instruct"}
SOURCES = ("json", "tfds")


def parse(arg: str | None, *, task: str, size: str, **extra) -> ml_collections.ConfigDict:
  """The config argument over this config's defaults (unknown keys are refused, naming the known ones)."""
  a = config_base.parse_arg(arg, data_dir="data/paper", image_root="", hf_path=f"models/{HF_NAMES[size]}",
                            tfds_dir="", workdir=f"workdir/paper/{task}_qwen25vl_{size}", small_slice=False,
                            **extra)
  if "source" in a and a.source not in SOURCES:
    raise ValueError(f"config argument source={a.source!r}: expected one of {', '.join(SOURCES)}")
  return a


def json_spec(a, name: str, rng: str = "") -> str:
  """'json:DATA_DIR/NAME' (+ an optional record range such as '[:400]')."""
  return "json:" + os.path.join(a.data_dir, name) + rng


def paper_base(a, size: str) -> ml_collections.ConfigDict:
  """The settings every paper run shares: model, precision, sampling, LoRA, schedule (NOTES §1)."""
  c = config_base.base()
  c.workdir = a.workdir
  c.seed = 42                          # ms-swift's default seed (the paper's scripts set none)
  c.stages = "init,cold_start,score,curate,finetune,grpo,evaluate,report,export"
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, -1, 1   # FSDP over every device; launchers may override

  c.model.hf_path = a.hf_path
  c.model.preset = size                # checked against hf_path's config.json; dry runs build these shapes
  c.model.dtype = "bfloat16"           # §1.2/§1.6: bf16 ...
  c.model.param_dtype = "float32"      # ... with fp32 master weights and Adam state (as DeepSpeed ZeRO-2 bf16)
  c.model.attention = "auto"
  # ms-swift's default gradient_checkpointing=True (swift/trainers/arguments.py), on in every paper run.
  c.model.remat = True
  # The authors load the model in bf16 (--torch_dtype bfloat16): a LoRA run's frozen base is bf16.
  c.model.frozen_in_compute_dtype = True

  c.data.image_root = a.image_root     # e.g. /data/dataset/Imagenet=/mnt/imagenet (the JSONs' absolute paths)
  c.data.tfds_dir = a.tfds_dir
  c.data.max_pixels = 802816           # §1.2: MAX_PIXELS = 1024 * 28 * 28
  c.data.max_buckets = 4

  # Step 1, cold start (§1.2): full fine-tuning, 1 epoch, lr 1e-5, warmup 0.1, batch 16 (1 per device
  # x accum 2 x 8 GPUs; our batch_size is the global batch, accum=1 unless memory needs more),
  # freeze_vit false / freeze_aligner false.
  _train(c.cold_start, model="base_model", lora=False, steps=0, epochs=1.0)
  c.cold_start.save_every = 100        # §1.2: save every 100 steps (the 400-sample run has 25)
  if a.small_slice:                    # fp32 moments: 12 bytes a parameter; bf16 moments: 8
    c.cold_start.adam_moments = "bfloat16"

  # Step 2, difficulty scoring (§1.3): K = 8 samples, T 0.9, top-k 50, top-p 1.0, 128 new tokens.
  c.score.model = "cold_start_model"
  c.score.num_samples = 8
  c.score.temperature = 0.9
  c.score.top_k = 50
  c.score.top_p = 1.0
  c.score.max_new_tokens = 128
  c.score.batch_size = 16
  # The authors score with HF generate (infer/test_dp.py), which keeps the checkpoint's generation
  # config for what it does not pass: repetition_penalty 1.05 for Qwen2.5-VL-Instruct (0 = read it).
  c.score.repetition_penalty = 0.0
  # test_dp.py resizes with qwen_vl_utils' defaults, up to 16384 * 28 * 28 pixels, for scoring and
  # evaluation alike; training (ms-swift) uses MAX_PIXELS = 802,816.
  c.score.max_pixels = 12845056

  # Step 3 (§1.4-1.5): easy = 8/8, hard = 0/8, medium = the rest; SFT = all, SFT-M = medium, SFT-EM = easy+medium.
  c.curate.recipes = "sft,sft_m,sft_em"
  c.curate.hard_ratio = 0.0
  c.curate.window_lo, c.curate.window_hi = 0.0, 1.0

  # Step 4, LoRA SFT / SFT-M / SFT-EM (§1.6): 600 steps, batch 16, lr 1e-5, warmup 0.1, r32 a64 dropout .05.
  _train(c.finetune, model="cold_start_model", lora=True, steps=600)
  c.finetune.recipes = "sft,sft_m,sft_em"

  # The RL baseline (§1.7): 600 steps x 16 prompts x 8 generations, T 0.9, top-p 1.0, 128 tokens, beta 0.04.
  _train(c.grpo, model="cold_start_model", lora=True, steps=600)
  c.grpo.num_generations = 8
  c.grpo.temperature = 0.9
  c.grpo.top_k = 50                    # not set by grpo_lora.sh: ms-swift's default (50), as in scoring
  c.grpo.top_p = 1.0
  c.grpo.max_new_tokens = 128
  c.grpo.beta = 0.04
  c.grpo.clip_eps = 0.2                # not stated; ms-swift's default epsilon 0.2
  c.grpo.num_iterations = 1            # ms-swift's default: one update per rollout batch
  c.grpo.repetition_penalty = 1.0      # ms-swift's GRPO passes its own default, 1.0

  # Step 5 (§1.8): greedy decoding, 128 new tokens, every set whole.
  c.evaluate.models = ("cold_start=cold_start_model,sft=models/sft,grpo=models/grpo,sft_m=models/sft_m,"
                       "sft_em=models/sft_em")
  c.evaluate.batch_size = 32
  c.evaluate.max_new_tokens = 128
  c.evaluate.limit = 0
  c.evaluate.repetition_penalty = 0.0  # the checkpoint's generation_config.json (1.05), as test_dp.py
  c.evaluate.max_pixels = 12845056     # qwen_vl_utils' default (test_dp.py), not training's 802,816

  # Fig. 3: OOD accuracy every 100 steps. The paper's curves use the whole OOD sets (step 0 equals its
  # Table 1 numbers); 2048 records per set keeps the 7 points per run affordable. 0 = the paper's.
  c.report.curve_limit = 2048

  c.export.model = "models/sft_em"     # the paper's strongest variant
  c.export.dtype = ""                  # the checkpoint's own dtype (Qwen2.5-VL ships bfloat16)
  return c


def _train(s, *, model: str, lora: bool, steps: int, epochs: float = 1.0) -> None:
  s.model = model
  s.steps = steps
  s.epochs = epochs
  s.batch_size = 16                    # §1.6: per-device 1 x accum 2 x 8 GPUs (GRPO: 16 prompts, §1.7)
  s.accum = 1
  s.learning_rate = 1e-5
  s.warmup_ratio = 0.1
  s.schedule = "cosine"                # ms-swift's default scheduler
  s.weight_decay = 0.1                 # ms-swift's default
  s.b1, s.b2, s.eps = 0.9, 0.95, 1e-8  # ms-swift's adam_beta1/adam_beta2/adam_epsilon defaults
  s.max_grad_norm = 1.0                # ms-swift's default
  # The scripts' --max_length 128 counts image tokens, which a typical ImageNet image alone exceeds at
  # 802,816 pixels; ms-swift would resample such samples and fail after 10 tries, yet the authors'
  # runs trained, so their effective image sizes are unknown (FIDELITY.md). Off: every sample trains.
  s.max_length = 0
  s.lora = lora
  s.lora_rank = 32
  s.lora_alpha = 64.0
  s.lora_dropout = 0.05
  # freeze_vit false with ms-swift's target_modules all-linear puts LoRA adapters on the ViT and the
  # aligner too (ms-swift's documented behaviour), hence lora_vision for the LoRA runs.
  s.lora_vision = lora
  s.freeze_vit = False
  s.freeze_aligner = False
  s.save_every = 100
  s.keep = 2
  s.eval_every = 0 if not lora else 100   # Fig. 3: every 100 steps


# ----------------------------------------------------------------------------- the three tasks
def imagenet(arg: str | None, size: str) -> ml_collections.ConfigDict:
  """Image classification (NOTES §1, §2.1): ImageNet (ID), ImageNet-R and ImageNet-A (OOD)."""
  a = parse(arg, task="imagenet", size=size, source="json")
  c = paper_base(a, size)
  # §1.2: 400 samples = 100 classes x 4, messages format.
  c.cold_start.data = json_spec(a, "imagenet_cold_sft.json")
  # The 9,600-image `left` set: scored, curated (SFT, SFT-M, SFT-EM) and GRPO's prompts. Our reader takes
  # both of the paper's layouts and gives equal records (same ids, prompts, answers) for either file;
  # imagenet_left_grpo.json (problem/solution/image) is the file the paper itself scores (test_dp.py)
  # and trains GRPO on, and it is half the size of imagenet_left_sft.json (the same images and answers
  # in messages format). Curation writes each recipe (sft, sft_m, sft_em) from these records to its own file.
  c.data.train = json_spec(a, "imagenet_left_grpo.json")
  c.data.train_limit = 0
  if a.source == "json":
    # §2.1: the paper's test files (ImageNet val 5,000; ImageNet-R 10,741; ImageNet-A 3,015 records).
    c.data.eval = ",".join([f"imagenet={json_spec(a, 'imagenet_val_processed.json')}",
                            f"imagenet_r={json_spec(a, 'imagenet-r_val_processed.json')}",
                            f"imagenet_a={json_spec(a, 'imagenet-a_val_processed.json')}"])
  else:
    # The whole TFDS sets (50,000 / 30,000 / 7,500 images), not the paper's one-word-class subsets, so
    # the numbers are not the paper's. WordNet ids map to answer words through data.label_names.
    c.data.eval = "imagenet=tfds:imagenet2012:validation,imagenet_r=tfds:imagenet_r:test,imagenet_a=tfds:imagenet_a:test"
    c.data.label_names = os.path.join(a.data_dir, "imagenet_label_names.json")
  c.data.ood = "imagenet_r,imagenet_a"
  return c


def refcoco(arg: str | None, size: str) -> ml_collections.ConfigDict:
  """Visual grounding (NOTES §2.2): RefCOCO (ID), Ref-L4 and LISA-grounding (OOD), IoU >= 0.5."""
  a = parse(arg, task="refcoco", size=size, source="json")
  c = paper_base(a, size)
  # §2.2: 10k RefCOCO training samples. The split between cold start and post-training is not stated
  # for grounding; by analogy with ImageNet (10k = 400 cold start + 9,600), 400 + 9,600.
  if a.source == "json":
    c.cold_start.data = json_spec(a, "refcoco_cold_sft.json")
    c.data.train = json_spec(a, "refcoco_left.json")
    refcoco_eval = json_spec(a, "refcoco_val.json")
  else:
    # TFDS ref_coco (refcoco_unc), one record per referring expression, in the dataset's order.
    c.cold_start.data = "tfds:ref_coco/refcoco_unc:train[:400]"
    c.data.train = "tfds:ref_coco/refcoco_unc:train[400:10000]"
    refcoco_eval = "tfds:ref_coco/refcoco_unc:validation"
  # The RefCOCO evaluation split and the Ref-L4 / Lisa test sizes are not known (NOTES §2.2, §7).
  c.data.eval = ",".join([f"refcoco={refcoco_eval}", f"ref_l4={json_spec(a, 'ref_l4_test.json')}",
                          f"lisa={json_spec(a, 'lisa_grounding_test.json')}"])
  c.data.ood = "ref_l4,lisa"
  # Everything else as ImageNet: Fig. 3 shows the grounding runs at 600 steps too (GRPO and SFT-EM);
  # the sampling settings, LoRA and beta 0.04 are the paper's shared ones (§1.3, §1.7).
  return c


def mmk12(arg: str | None, size: str) -> ml_collections.ConfigDict:
  """Multimodal reasoning (NOTES §2.3): MMK12 questions with verified GLM-4.5V responses."""
  a = parse(arg, task="mmk12", size=size)
  c = paper_base(a, size)
  c.cold_start.data = json_spec(a, "mmk12_cold_sft.json")      # §2.3: 400 for initialisation
  c.data.train = json_spec(a, "mmk12_train.json")              # §2.3: 6,400 for post-training
  # §2.3: "Training: 400 steps" (SFT variants and GRPO alike), KL beta 0.001.
  c.finetune.steps = 400
  c.grpo.steps = 400
  c.grpo.beta = 0.001
  # The sampling length for scoring and GRPO is not stated; the only documented reasoning length is
  # evaluation's 4,096 new tokens, and chain-of-thought answers do not fit in classification's 128.
  c.score.max_new_tokens = 4096
  c.grpo.max_new_tokens = 4096
  c.evaluate.max_new_tokens = 4096   # §2.3: greedy, max 4,096 new tokens,
  c.evaluate.repetition_penalty = 1.1   # and repetition penalty 1.1
  c.evaluate.batch_size = 16
  # Batch size, lr, LoRA and the number of generations for reasoning are not stated: the ImageNet
  # values (§1.6, §1.7) are kept. Six multiple-choice benchmarks; the 6th is unknown (§2.3), add it
  # with --config.data.eval=...,NAME=json:PATH and --config.data.ood=...,NAME.
  names = {"mmmu": "mmmu_val.json", "mathvista": "mathvista_mini.json", "mathvision": "mathvision.json",
           "mathverse": "mathverse_mini.json", "wemath": "wemath.json"}
  c.data.eval = ",".join(f"{k}={json_spec(a, v)}" for k, v in names.items())
  c.data.ood = ",".join(names)       # Table 6 averages every benchmark; there is no ID set
  c.report.curve_limit = 256         # 4,096-token generations: keep the Fig.-3-style curves cheap
  return c

