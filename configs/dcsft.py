"""The default DC-SFT run. With `model.hf_path` empty it uses the embedded default: a tiny
random-weight Qwen2.5-VL-architecture model that runs on a laptop CPU.

  python -m dcsft_jax.main --config=configs/dcsft.py [--config.workdir=DIR --config.stages=init,export ...]
"""
import ml_collections


def get_config():
  c = ml_collections.ConfigDict()
  c.workdir = "workdir/dcsft_default"
  # Stages run in this order; each one is skipped when its outputs already exist in the workdir.
  c.stages = "init,score,curate,evaluate,export"
  c.seed = 0
  # 'auto' calls jax.distributed.initialize() when a multi-host launcher is detected.
  c.distributed = "auto"
  # Device mesh: one size may be -1 (all remaining devices).
  c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1))

  c.model = ml_collections.ConfigDict()
  c.model.hf_path = ""              # a local Qwen2.5-VL directory; empty = the embedded tiny model
  c.model.dtype = "float32"         # compute dtype: float32 | bfloat16
  c.model.param_dtype = "float32"   # master weights
  c.model.attention = "auto"        # auto | xla | cudnn
  c.model.remat = False

  # Datasets (dcsft_jax/data/sources.py): builtin:SPLIT | json:PATH | tfds:NAME[:SPLIT] | hf:PATH[:SPLIT].
  c.data = ml_collections.ConfigDict()
  c.data.train = "builtin:train"
  c.data.train_limit = 0            # 0 = every record
  c.data.eval = "id=builtin:test,rendition=builtin:rendition,adversarial=builtin:adversarial"
  c.data.ood = "rendition,adversarial"   # which eval sets are out of distribution (the OOD average)
  c.data.image_root = ""            # 'OLD_PREFIX=NEW_PREFIX' or a directory, for the paper's JSON paths
  c.data.tfds_dir = ""              # where prepared TFDS datasets live
  c.data.label_names = ""           # JSON file mapping TFDS class names (WordNet ids) to answer words
  c.data.skip_bad_records = False   # True: skip (and count) unreadable records instead of stopping
  c.data.min_pixels = 0             # 0 = the processor's own setting
  c.data.max_pixels = 0             # the paper uses 802816 (1024 * 28 * 28)
  c.data.max_buckets = 4            # image-size classes, i.e. compiled shapes per stage
  c.data.label_noise = 0.1          # builtin train only: wrong labels, the kind of data that lands in 'hard'
  c.data.builtin_image_size = 56

  # Difficulty scoring: K samples per training prompt (the paper: 8, T=0.9, top-k 50, top-p 1.0, 128 tokens).
  c.score = ml_collections.ConfigDict()
  c.score.model = "base_model"      # a stage's model directory in the workdir, or a path
  c.score.num_samples = 8
  c.score.temperature = 0.9
  c.score.top_k = 50
  c.score.top_p = 1.0
  c.score.max_new_tokens = 8        # the digits' answers are one word; the paper's configs use 128
  c.score.batch_size = 16           # prompts per batch (each gives num_samples answers)

  # Curation: recipes among sft_m (medium), sft_em (easy+medium), sft (all), easy, medium, hard.
  c.curate = ml_collections.ConfigDict()
  c.curate.recipes = "sft_m,sft_em,sft"
  c.curate.hard_ratio = 0.0         # Fig. 5: add back this share of the hard bucket (recipes without hard)
  c.curate.window_lo = 0.0          # keep only pass rates in [window_lo, window_hi]
  c.curate.window_hi = 1.0

  # Greedy evaluation of each NAME=MODEL on every data.eval set.
  c.evaluate = ml_collections.ConfigDict()
  c.evaluate.models = "base=base_model"
  c.evaluate.batch_size = 32
  c.evaluate.max_new_tokens = 8
  c.evaluate.limit = 0              # 0 = every record of each set

  c.export = ml_collections.ConfigDict()
  c.export.dtype = ""               # '' = the checkpoint's own dtype (config.json torch_dtype)
  return c
