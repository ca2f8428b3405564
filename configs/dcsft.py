"""The default DC-SFT run: the paper's whole pipeline at laptop scale. With `model.hf_path` empty it
uses the embedded default, a tiny random-weight Qwen2.5-VL-architecture model, and the builtin
digits dataset (ID: held-out digits; OOD: font renditions and corrupted digits).

  python -m dcsft_jax.main --config=configs/dcsft.py [--config.workdir=DIR --config.stages=init,cold_start ...]
  python -m dcsft_jax.main --config=configs/dcsft.py:hard_sweep=true     # + the Fig. 5 hard-ratio sweep
  python -m dcsft_jax.main --config=configs/dcsft.py:table1=true         # + Table 1's protocol: each bucket
                                                                        # cut to the smallest, 100 steps each
  python -m dcsft_jax.main --config=configs/dcsft.py --config.seeds=3    # mean +- std over 3 training seeds
  python -m dcsft_jax.main --config=configs/dcsft.py:short=true         # every stage, few steps (a check
                                                                        # of a mesh or a launch, ~1 min)

Every field is documented in dcsft_jax/config_base.py; the paper's own settings are in configs/paper/.
"""
from dcsft_jax import config_base, curation


# Fig. 5's sweep: SFT-EM's data plus this share of the hard bucket (0 is SFT-EM itself).
HARD_SWEEP = (0.2, 0.5)


def get_config(arg=None):
  a = config_base.parse_arg(arg, hard_sweep=False, table1=False, short=False)
  c = config_base.base()
  c.workdir = "workdir/dcsft_default"
  c.data.train = "builtin:train[256:]"
  c.data.train_limit = 256
  c.data.eval = "id=builtin:test,rendition=builtin:rendition,adversarial=builtin:adversarial"
  c.data.label_noise = 0.1          # some wrong labels: the kind of data that lands in 'hard'
  c.data.max_buckets = 1

  # A random tiny model needs a real cold start to answer at all: more steps and a larger lr than the
  # paper's 1e-5 for a pretrained 3B model.
  c.cold_start.data = "builtin:train[:256]"
  c.cold_start.epochs = 12.0
  c.cold_start.learning_rate = 2e-3
  c.cold_start.warmup_ratio = 0.05
  c.cold_start.save_every = 1000

  c.score.max_new_tokens = 4        # the digits' answers are one word (a token or two plus EOS)

  # A hard-only run beside the paper's recipes: SFT on the whole bucket of prompts the cold start never
  # solves, for the run's steps. Table 1's own protocol (table1=true) balances the three buckets to the
  # smallest and trains each 100 steps (curation.TABLE1).
  recipes = ["sft", "sft_m", "sft_em", "hard"]
  if a.hard_sweep:
    recipes += [f"sft_em+hard{r:g}" for r in HARD_SWEEP]
  if a.table1:
    recipes += list(curation.TABLE1)
  c.curate.recipes = c.finetune.recipes = ",".join(recipes)
  c.evaluate.models = ",".join(["cold_start=cold_start_model"] + [f"{r}=models/{r}" for r in recipes[:1]] +
                               ["grpo=models/grpo"] + [f"{r}=models/{r}" for r in recipes[1:]])

  c.finetune.steps = 40
  c.finetune.learning_rate = 1e-3
  c.finetune.lora_rank = 8
  c.finetune.lora_alpha = 16.0
  c.finetune.eval_every = 10

  c.grpo.steps = 20
  c.grpo.batch_size = 8
  c.grpo.learning_rate = 1e-3
  c.grpo.lora_rank = 8
  c.grpo.lora_alpha = 16.0
  c.grpo.max_new_tokens = 4
  c.grpo.eval_every = 5

  c.evaluate.max_new_tokens = 4
  c.evaluate.limit = 200
  c.report.curve_limit = 64
  if a.short:
    shorten(c)
  return c


def shorten(c) -> None:
  """Every stage of the default run, each with few steps and little data: what the tests run on
  meshes and on two processes (tests/test_pipeline_mesh.py), and a quick check of a new launch. The
  batch sizes stay the default's (16 cold-start and LoRA rows, 8 GRPO prompts x 8 rollouts), so any
  mesh the default runs on runs this too."""
  c.workdir = "workdir/dcsft_short"
  c.data.train_limit = 32
  c.cold_start.data = "builtin:train[:128]"
  c.cold_start.epochs = 12.0                # 96 steps: mixed pass rates (medium and hard filled)
  c.finetune.steps = 6
  c.finetune.eval_every = 3
  c.grpo.steps = 2
  c.grpo.eval_every = 2
  c.evaluate.limit = 32
  c.report.curve_limit = 16
