"""The miniature with a prior (issue 29): the builtin 'prior' split stays disjoint from every evaluation
digit and from the default's cold-start and scored prompts, and the optional 'pretrain' stage trains
the base model into pretrained_model/, which configs/prior.py's cold start starts from."""
from __future__ import annotations

import collections
import json
import os

import numpy as np

from dcsft_jax import config_base, main
from dcsft_jax.data import builtin, sources
from dcsft_jax.workdir import Workdir

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _prior_config():
  return config_base.load_config_file(os.path.join(REPO, "configs", "prior.py")).get_config()


def test_the_prior_never_holds_an_evaluation_digit_nor_the_cold_start_or_scored_ones():
  c = _prior_config()
  prior = sources.load(sources.parse(c.pretrain.data))
  src = lambda recs: {r.meta["source_index"] for r in recs}
  for name, spec in sources.parse_sets(c.data.eval).items():
    assert not src(prior) & src(sources.load(spec)), name
  cold = sources.load(sources.parse(c.cold_start.data))
  scored = sources.load(sources.parse(c.data.train), limit=c.data.train_limit)
  assert not src(prior) & (src(cold) | src(scored))
  # Every remaining training digit, each in the four styles, the OOD families among them.
  assert len(prior) == 4 * len(src(prior)) == 4 * (len(builtin.load_builtin("train")) - 512)
  styles = collections.Counter(r.meta["style"] for r in prior)
  assert styles["plain"] == styles["rendition"] == styles["corrupted"] == len(prior) // 4
  assert styles["blur"] + styles["invert"] + styles["shrink"] == len(prior) // 4
  assert all(r.answer == builtin.DIGIT_NAMES[r.meta["label"]] for r in prior)     # clean labels
  # The rendition-family image of a digit is not its rendition-set image (a test digit in any case)
  # and not its plain image: its own random stream.
  one = [r for r in prior if r.meta["source_index"] == prior[0].meta["source_index"]]
  assert len({np.asarray(r.image).tobytes() for r in one}) == 4


def test_pretrain_stage_makes_the_model_the_cold_start_starts_from(tmp_path):
  c = _prior_config()
  c.workdir = str(tmp_path / "wd")
  c.stages = "init,pretrain,cold_start"
  c.pretrain.data = "builtin:prior[2048:2080]"
  c.pretrain.steps = c.cold_start.steps = 2
  c.cold_start.data = "builtin:train[:32]"
  main.run(c)
  wd = Workdir(c.workdir)
  assert os.path.exists(os.path.join(wd.pretrained_model, "config.json"))
  stages = json.load(open(wd.stages))
  assert stages["pretrain"]["steps"] == 2 and stages["pretrain"]["records"] == 32
  # The cold start started from the pretrained model, not the random base.
  assert stages["cold_start"]["start"] == "pretrained_model", stages["cold_start"]
  # Restarting the pretraining redoes the cold start that read it.
  c.restart_stage = "pretrain"
  c.pretrain.learning_rate = 1e-3
  c.stages = "init,pretrain"
  main.run(c)
  assert not os.path.exists(wd.cold_start_model)
