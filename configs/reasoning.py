"""DC-SFT on visual reasoning, the paper's third task, in miniature: the default run (configs/dcsft.py)
on the embedded multiple-choice questions about a digit (dcsft_jax/data/digit_tasks.py). The prompt
gives the options and asks for a thought, then the letter in \\boxed{}; an answer is right when its
last \\boxed{} holds the reference's letter (multiple-choice accuracy, as the paper scores MMK12's
benchmarks). OOD: the same questions on the classification set's two shifted styles.

  python -m dcsft_jax.main --config=configs/reasoning.py [--config.KEY=VALUE ...]
  python -m dcsft_jax.main --config=configs/reasoning.py:short=true    # every stage, few steps

Same model, methods and settings as the default; only the data and the answer budget (a thought and a
letter: up to 30 tokens of the tiny tokenizer, and the end token) change.
"""
from dcsft_jax import config_base


def get_config(arg=None):
  a = config_base.parse_arg(arg, hard_sweep=False, short=False)
  c = config_base.load_config_file("dcsft.py", beside=__file__).get_config(arg)
  c.workdir = "workdir/reasoning_short" if a.short else "workdir/reasoning"
  c.data.train = "builtin:reasoning_train[256:]"
  c.cold_start.data = "builtin:reasoning_train[:256]" if not a.short else "builtin:reasoning_train[:128]"
  c.data.eval = ("id=builtin:reasoning_test,rendition=builtin:reasoning_rendition,"
                 "adversarial=builtin:reasoning_adversarial")
  c.data.ood = "rendition,adversarial"
  c.score.max_new_tokens = c.grpo.max_new_tokens = c.evaluate.max_new_tokens = 40
  return c
