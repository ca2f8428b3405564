"""DC-SFT on the paper's three tasks at once: the default run (configs/dcsft.py) whose every set mixes
classification, grounding and reasoning records (dcsft_jax/data/digit_tasks.py). The paper trains one
task at a time; here each record is routed to its own task's verifier in scoring, GRPO's reward and
evaluation, the buckets are counted per task, and the report gives each task's ID and OOD accuracy.

  python -m dcsft_jax.main --config=configs/mixed.py [--config.KEY=VALUE ...]
  python -m dcsft_jax.main --config=configs/mixed.py:short=true       # every stage, few steps

Sets are '+'-joined sources: their records interleave, so a limit keeps each task's share.
"""
from dcsft_jax import config_base

TASK_SPLITS = {"classification": ("train", "test", "rendition", "adversarial"),
               "grounding": ("grounding_train", "grounding_test", "grounding_style", "grounding_clutter"),
               "reasoning": ("reasoning_train", "reasoning_test", "reasoning_rendition", "reasoning_adversarial")}


def _mix(column: int, ranges=("", "", "")) -> str:
  return "+".join(f"builtin:{splits[column]}{r}" for splits, r in zip(TASK_SPLITS.values(), ranges))


def get_config(arg=None):
  a = config_base.parse_arg(arg, hard_sweep=False, short=False)
  c = config_base.load_config_file("dcsft.py", beside=__file__).get_config(arg)
  c.workdir = "workdir/mixed_short" if a.short else "workdir/mixed"
  c.data.train = _mix(0, ("[256:]", "[1024:]", "[256:]"))
  # Each task's cold-start share as in its own config (grounding's scenes need more), for fewer passes
  # at a learning rate between the digits' and grounding's. Not calibrated as the single tasks are.
  c.cold_start.data = _mix(0, ("[:128]",) * 3 if a.short else ("[:256]", "[:512]", "[:256]"))
  c.cold_start.epochs = 4.0 if a.short else 8.0   # short: 96 steps, as the other short runs
  c.cold_start.learning_rate = 1e-3
  # ID; OOD 'style': renditions and the bright-ink scenes; OOD 'corrupted': the adversarial digits and
  # the cluttered scenes.
  c.data.eval = f"id={_mix(1)},style={_mix(2)},corrupted={_mix(3)}"
  c.data.ood = "style,corrupted"
  c.score.max_new_tokens = c.grpo.max_new_tokens = c.evaluate.max_new_tokens = 40
  return c
