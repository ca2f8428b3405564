"""DC-SFT on visual grounding, the paper's second task, in miniature: the default run (configs/dcsft.py)
on the embedded grounding scenes (dcsft_jax/data/digit_tasks.py). A prompt names one of two or three
digits on a canvas and asks for its box; an answer is right when its box has IoU >= 0.5 with the
reference (the paper's rule). OOD: busier scenes (Ref-L4's role) and another drawing style (LISA's).

  python -m dcsft_jax.main --config=configs/grounding.py [--config.KEY=VALUE ...]
  python -m dcsft_jax.main --config=configs/grounding.py:short=true    # every stage, few steps

Same model, methods and settings as the default; only the data, the answer budget (a box is 16 tokens
of the tiny tokenizer, and the end token) and the cold start (1,024 scenes, learning rate 5e-4)
change.
"""
from dcsft_jax import config_base


def get_config(arg=None):
  a = config_base.parse_arg(arg, hard_sweep=False, short=False)
  c = config_base.load_config_file("dcsft.py", beside=__file__).get_config(arg)
  c.workdir = "workdir/grounding_short" if a.short else "workdir/grounding"
  c.data.train = "builtin:grounding_train[1024:]"
  # Finding a digit and reading its cell takes this tiny random model more than the digits' 256 samples
  # (README, "The other two tasks"): 1,024 scenes, at a quarter of the default's learning rate (at
  # 2e-3 it settles on one box for every prompt).
  c.cold_start.data = "builtin:grounding_train[:1024]" if not a.short else "builtin:grounding_train[:512]"
  # short: 384 steps, what it takes to find digits often enough that every bucket fills
  c.cold_start.learning_rate = 5e-4
  c.data.eval = "id=builtin:grounding_test,clutter=builtin:grounding_clutter,style=builtin:grounding_style"
  c.data.ood = "clutter,style"
  c.score.max_new_tokens = c.grpo.max_new_tokens = c.evaluate.max_new_tokens = 20
  return c
