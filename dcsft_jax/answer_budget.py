"""Answers the run can never produce: a reference answer longer than the generation budget.

Scoring, GRPO's rollouts and evaluation generate at most `max_new_tokens` tokens. A classification
answer that needs more (the tiny tokenizer spells "triangle" in 6 tokens; the default budget is 4) is cut
short, so every such prompt scores 0 for every model, and nothing else would say why. Before any work,
`check` tokenises every reference answer of the splits a stage generates for, with the run's tokenizer,
and names the longest that does not fit. Only exact-match (classification) answers are counted: a
grounding box or a math answer may be written shorter than its reference.
"""
from __future__ import annotations

import os

BUDGETS = (("score", "data.train"), ("grpo", "data.train"), ("evaluate", "data.eval"))


def tokenizer_for(config):
  """The tokenizer the run will use: model.hf_path's, else the tiny one of the preset's family."""
  from dcsft_jax.data import tokenizer as tiny
  from dcsft_jax.models import registry
  hf_path = config.model.hf_path
  if hf_path:
    if not os.path.isfile(os.path.join(hf_path, "tokenizer_config.json")):
      return None                               # not on this machine (a dry run, aot): nothing to count with
    import transformers
    return transformers.AutoTokenizer.from_pretrained(hf_path)
  return tiny.build_tiny_hf_tokenizer(registry.family_of_preset(config.model.preset))


def problems(config, stages: list[str]) -> list[str]:
  """One message per (stage, split) whose classification answers do not all fit the stage's budget."""
  from dcsft_jax.data import sources
  from dcsft_jax.stages import common
  tok = None
  out, cache = [], {}
  d = config.data
  for stage, key in BUDGETS:
    if stage not in stages:
      continue
    budget = int(config[stage].max_new_tokens)
    specs = ({"train": d.train} if key == "data.train" else
             {name: str(spec) for name, spec in sources.parse_sets(d.eval).items()})
    limit = d.train_limit if key == "data.train" else config.evaluate.limit
    for name, spec in specs.items():
      if (spec, limit) not in cache:
        records = common.load_records(config, sources.parse(spec), limit=limit or None, train=key == "data.train")
        answers = sorted({r.answer for r in records if r.task == "classification" and isinstance(r.answer, str)})
        if answers and tok is None:
          tok = tokenizer_for(config)
        if tok is None:
          cache[(spec, limit)] = []
          continue
        lengths = tok(answers, add_special_tokens=False)["input_ids"] if answers else []
        cache[(spec, limit)] = sorted(((len(ids), a) for ids, a in zip(lengths, answers)), reverse=True)
      counted = cache[(spec, limit)]
      over = [(n, a) for n, a in counted if n > budget]
      if over:
        n, longest = over[0]
        where = key if key == "data.train" else f"data.eval set {name!r}"
        out.append(f"{len(over)} of the {len(counted)} distinct answers of {where} ({spec}) need more than "
                   f"{stage}.max_new_tokens={budget} tokens (longest: {longest!r}, {n} tokens with this tokenizer), "
                   f"so {stage} could never produce them: set --config.{stage}.max_new_tokens={n} or more "
                   f"(or --config.data.answer_budget=warn to go on anyway)")
  return out
