"""The training stages. Every run starts from a model directory in the workdir and ends as one:

  cold_start  full SFT of the base model on a small set (the paper: 400 samples, 1 epoch)
              -> cold_start_model/
  finetune    one LoRA SFT run per recipe on curation/{recipe}.json (SFT, SFT-M, SFT-EM)
              -> models/{recipe}/
  grpo        GRPO on all training prompts, the RL baseline -> models/grpo/

A run's optimizer checkpoints, metrics and evaluation curve live in train/{name}/, so a killed run
resumes at its last checkpoint. A model directory's config.json is written last: its presence
means the run finished.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os

from dcsft_jax import checkpoint, curation, run_config, sampling
from dcsft_jax import fingerprint as fingerprint_lib
from dcsft_jax.data import batching, sources
from dcsft_jax.models.layers import LoraSpec
from dcsft_jax.models.params import count_params
from dcsft_jax.stages import common, evaluate
from dcsft_jax.train import optim, rollouts, trainer
from dcsft_jax.workdir import Workdir, run_name

def lora_spec(s) -> LoraSpec | None:
  if not s.lora:
    return None
  return LoraSpec(rank=s.lora_rank, alpha=float(s.lora_alpha), dropout=float(s.lora_dropout),
                            language=True, vision=bool(s.lora_vision), merger=bool(s.lora_vision))


def frozen_dtype(config):
  """The dtype frozen weights are stored in (model.frozen_in_compute_dtype): a LoRA run's base and a
  full-FT GRPO run's reference copy; None keeps param_dtype."""
  from dcsft_jax import run_config
  return run_config.DTYPES[config.model.dtype] if config.model.frozen_in_compute_dtype else None


def train_config(config, s, steps: int, seed: int, stage: str = "") -> trainer.TrainConfig:
  lora = lora_spec(s)
  return trainer.TrainConfig(
      steps=steps, batch_size=s.batch_size, accum=s.accum, lora=lora, freeze_vit=bool(s.freeze_vit),
      # At least every 10% of the run, whatever save_every says: a kill then costs at most a tenth.
      freeze_aligner=bool(s.freeze_aligner), save_every=min(s.save_every, max(1, math.ceil(steps / 10))),
      keep=s.keep, seed=seed, damaged_checkpoints=config.damaged_checkpoints,
      stage=stage,
      frozen_dtype=frozen_dtype(config),
      optim=optim.OptimConfig(learning_rate=float(s.learning_rate), warmup_ratio=float(s.warmup_ratio),
                              schedule=s.schedule, weight_decay=float(s.weight_decay), b1=float(s.b1),
                              b2=float(s.b2), eps=float(s.eps), max_grad_norm=float(s.max_grad_norm),
                              total_steps=steps, moments=s.get("adam_moments", "float32")))


def _iterator(config, records, processor, s, *, with_answers: bool, seed: int, source: str, key: str, mesh):
  ways = mesh.shape["data"] * mesh.shape["fsdp"]
  micro = s.batch_size // s.accum
  if micro % ways:
    raise ValueError(f"config.{key}.batch_size / accum = {micro} rows per micro-batch is not divisible by the "
                     f"mesh's data x fsdp = {ways} batch shards; use a multiple of {ways * s.accum}")
  buckets = batching.auto_buckets(records, processor, with_answers=with_answers, max_buckets=config.data.max_buckets,
                                  skip_bad_records=config.data.skip_bad_records)
  return batching.BatchIterator(records, processor, batch_size=s.batch_size // s.accum, buckets=buckets,
                                with_answers=with_answers, shuffle=True, seed=seed, epochs=None,
                                skip_bad_records=config.data.skip_bad_records, source=source)


def _steps(s, it) -> int:
  """section.steps, or enough steps for section.epochs passes over the data (the last batch padded)."""
  if s.steps > 0:
    return int(s.steps)
  return max(1, math.ceil(s.epochs * len(it.plan(0)) / s.accum))


class Curve:
  """Greedy accuracy on the OOD sets every `eval_every` steps (the paper's Fig. 3), kept in
  train/{name}/curve.json so a resumed run keeps its earlier points."""

  def __init__(self, config, ctx, name: str, model: common.LoadedModel, opts):
    self.config, self.ctx = config, ctx
    self.path = ctx.wd.curve(name)
    self.points = json.load(open(self.path)) if os.path.exists(self.path) else []
    sets = sources.parse_sets(config.data.eval)
    names = [x.strip() for x in config.data.ood.split(",") if x.strip()] or list(sets)
    # report.curve_limit records of each set, a seeded random subset stratified by answer (the first N
    # of a file sorted by class would be a few classes), the same for every method and step.
    self.sets = {n: curation.stratified_subset(common.load_records(config, sets[n]), config.report.curve_limit,
                                               config.seed) for n in names}
    # Evaluated as the evaluate stage would: its image sizes (evaluate.max_pixels), not training's.
    processor = common.processor_for(config, model.directory, model.cfg, config.evaluate.max_pixels)
    self.model = dataclasses.replace(model, opts=opts, processor=processor)
    self.sampler = common.sampler_for(model.cfg, opts)

  def __call__(self, step: int, params) -> dict[str, float | None]:
    """{"accuracy/SET": accuracy at `step`}, evaluated once: a resumed run takes the point it kept
    (its params at that step are the same), so the step's metrics get it again."""
    point = next((p for p in self.points if p["step"] == step), None)
    if point is None:
      model = dataclasses.replace(self.model, params=params)
      point = {"step": step, "images": {n: len(recs) for n, recs in self.sets.items()}}
      for n, recs in self.sets.items():
        results, _ = evaluate.greedy_results(self.config, self.ctx, model, recs, n, desc=f"curve {n}@{step}",
                                             sampler=self.sampler)
        point[n] = evaluate.accuracy_of(results)
      self.points.append(point)
      self.points.sort(key=lambda p: p["step"])
      common.write_json(self.path, self.points)
    return {f"accuracy/{n}": point.get(n) for n in self.sets}


def hparams(config, name: str, s) -> dict:
  """A run's settings for TensorBoard's HPARAMS tab: its training section under "train." (so cold-start,
  fine-tuning and GRPO runs share those columns) and the settings every run shares."""
  return {"run": name, "train": s.to_dict(), "seed": config.seed, "model": config.model.to_dict(),
          "data": config.data.to_dict(), "mesh": config.mesh.to_dict()}


def _fit(config, ctx, name: str, t: trainer.Trainer, it, s, model: common.LoadedModel) -> dict:
  curve = Curve(config, ctx, name, model, t.opts) if s.eval_every > 0 else None
  if curve is not None and t.manager.latest_step() is None:
    curve(0, t.params)            # the starting model (adapters at zero): the curves' first point

  def on_step(step, m):
    # The curve's points join their step's metrics: metrics.jsonl and TensorBoard scalars.
    if curve is not None and (step % s.eval_every == 0 or step == t.tc.steps):
      return curve(step, t.params)
    return None

  out = t.fit(it, progress=True, on_step=on_step, hparams=hparams(config, name, s))
  directory = ctx.wd.model(name)
  # A LoRA run keeps only its adapters; the frozen base stays in the starting model's directory.
  base = model.directory if t.tc.lora is not None and checkpoint.is_model_dir(model.directory) else None
  # A full disk here gets the same one line as during training (the run's checkpoints are intact).
  t.save_or_explain(lambda: checkpoint.save_model(directory, t.params, model.cfg, source_dir=model.directory,
                                                 lora=t.tc.lora, base_dir=base),
                   int(t.state.step), what=f"the model directory {directory}")
  h = out["history"]
  figures = {"steps": out["steps"], "final_loss": round(h[-1]["loss"], 4) if h else None,
             "parameters_trained": count_params(t.state.train), "written": directory}
  if h:
    figures["tokens_per_s"] = round(sum(x["tokens_per_s"] for x in h[1:] or h) / len(h[1:] or h), 1)
  return figures


def _start(config, ctx, ref: str, key: str) -> common.LoadedModel:
  model = common.load_model(config, ctx, ref)
  if model.opts.lora is not None:
    raise ValueError(f"config.{key}={ref!r} is a LoRA model; training starts from a full model (export or "
                     f"merge it first)")
  return model


def run_seed(config, name: str, seed_index: int = 0) -> int:
  """The RNG seed of training seed `seed_index` of run `name` (LoRA init, data order, dropout, rollouts):
  distinct per run and per seed; seed 0 of a run is what a one-seed run always used."""
  return config.seed + sum(map(ord, name)) + 1_000_003 * seed_index


def _sft_run(config, ctx, name: str, s, start_ref: str, start_key: str, spec, *, train_noise: bool,
             key: str, seed: int) -> dict:
  model = _start(config, ctx, start_ref, start_key)
  curated = key == "finetune"
  records = common.load_records(
      config, spec, train=train_noise,
      why_empty=(f"recipe {name}'s curated set is empty: the cold-start model got every prompt of its buckets right "
                 f"or every one wrong (see scores/ and curation/summary.json); a stronger or weaker cold start, "
                 f"more training prompts or a wider curate window fixes it, or leave {name} out of "
                 f"finetune.recipes") if curated else "")
  read_skipped = getattr(records, "skipped", [])
  records, dropped = within_max_length(records, model.processor, s.max_length, key)
  it = _iterator(config, records, model.processor, s, with_answers=True, seed=seed, source=str(spec),
                 key=key, mesh=ctx.mesh)
  tc = train_config(config, s, _steps(s, it), seed, stage=key)
  params = model.params
  if tc.lora is not None:
    params = trainer.init_lora(params, model.cfg, tc.lora, seed=seed, mesh=ctx.mesh, opts=ctx.model_options)
  t = trainer.Trainer(model.cfg, ctx.model_options, params, tc, ctx.mesh, ctx.wd.train(name),
                         fingerprint=_data_fingerprint(config, ctx, spec, records, model))
  params = model.params = None   # the trainer holds the weights now (a LoRA base perhaps in bf16)
  fit = _fit(config, ctx, name, t, it, s, model)
  # Records trained on, and every one left out (by the reader or when its image would not decode).
  # (distinct ids: the batcher meets a bad record again every epoch)
  bad = len({sk.record for sk in it.skipped})
  out = {"records": len(records) - bad, "skipped": len(read_skipped) + bad, **fit}
  if s.max_length:
    out["dropped_over_max_length"] = dropped
  return out


def _data_fingerprint(config, ctx, spec, records, model: common.LoadedModel) -> dict:
  """What a training run reads besides its TrainConfig: resuming its checkpoints on other data or from
  another start model would mix two runs."""
  spec = sources.parse(spec) if isinstance(spec, str) else spec
  path = spec.path if spec.kind in ("json", "hf") else None
  root = ctx.wd.root
  return {"data": fingerprint_lib.portable(path, root) if path else str(spec),
          "data_identity": fingerprint_lib.identity(path) if path else None,
          "records": len(records), "label_noise": config.data.label_noise, "max_pixels": config.data.max_pixels,
          "start": fingerprint_lib.portable(model.directory, root),
          "start_identity": fingerprint_lib.identity(model.directory)}


def within_max_length(records, processor, max_length: int, key: str):
  """(the records whose whole sample, image tokens included, fits max_length tokens, how many were
  dropped): ms-swift's max_length with the over-length samples left out instead of resampled."""
  if not max_length:
    return records, 0
  keep = []
  for r in records:
    try:
      n = processor.measure(r.image, r.prompt, r.answer, name=str(r.id))[1]
    except ValueError:
      n = 0                   # an unreadable record is the batcher's to report or skip
    if n <= max_length:
      keep.append(r)
  dropped = len(records) - len(keep)
  if dropped:
    print(f"[{key}] max_length {max_length}: dropped {dropped} of {len(records)} samples that are longer")
  if not keep:
    raise ValueError(f"config.{key}.max_length={max_length} drops all {len(records)} samples (image tokens count); "
                     f"raise it, lower data.max_pixels, or set 0 to keep every sample")
  return keep, dropped


def pretrain(config, ctx) -> dict:
  p = config.pretrain
  if not p.data:
    raise ValueError("the 'pretrain' stage has no data: set --config.pretrain.data (e.g. builtin:prior[2048:]) "
                     "or leave 'pretrain' out of --config.stages")
  return _sft_run(config, ctx, "pretrain", p, p.model, "pretrain.model", sources.parse(p.data),
                  train_noise=False, key="pretrain", seed=run_seed(config, "pretrain"))


def cold_start(config, ctx) -> dict:
  c = config.cold_start
  out = _sft_run(config, ctx, "cold_start", c, c.model, "cold_start.model", sources.parse(c.data),
                 train_noise=True, key="cold_start", seed=run_seed(config, "cold_start"))
  # What it started from: the base model, or the pretrained one (configs/prior.py).
  return {"start": fingerprint_lib.portable(common.model_path(ctx, c.model), ctx.wd.root), **out}


def finetune(config, ctx) -> dict:
  f = config.finetune
  out = {}
  recipes = [r.strip() for r in f.recipes.split(",") if r.strip()]
  # Seed by seed: with several seeds every method has its first run before any has its third.
  for i in range(config.seeds):
    for recipe in recipes:
      name = run_name(recipe, i)
      figures = ctx.wd.figures(name)
      if ctx.wd.model_done(name):
        print(f"[finetune] {name}: done already")
        # An earlier invocation trained it: its figures still belong in the stage's summary.
        if os.path.exists(figures):
          out.update({f"{name}/{k}": v for k, v in json.load(open(figures)).items()})
        continue
      path = ctx.wd.recipe(recipe)
      if not os.path.exists(path):
        listed = recipe in [r.strip() for r in config.curate.recipes.split(",")]
        if not os.path.exists(ctx.wd.curation_summary):
          fix = "the 'curate' stage has not run in this workdir: run it first (and 'score' before it)"
        elif listed:
          fix = "the curation ran without it: --config.restart_stage=curate writes it"
        else:
          fix = f"add {recipe!r} to config.curate.recipes and run 'curate' again (--config.restart_stage=curate)"
        raise FileNotFoundError(f"{path} not found: {fix}")
      print(f"[finetune] {name} from {path}" + (f" (seed {i + 1} of {config.seeds})" if config.seeds > 1 else ""))
      res = _sft_run(config, ctx, name, _section_for(f, recipe), f.model, "finetune.model",
                     sources.Spec("json", path), train_noise=False, key="finetune", seed=run_seed(config, recipe, i))
      res = {k: v for k, v in res.items() if k != "written"}
      common.write_json(figures, res)
      out.update({f"{name}/{k}": v for k, v in res.items()})
  common.write_json(ctx.wd.finetune_done, out)
  return out


def _section_for(f, recipe: str):
  """The finetune section a recipe trains with: Table 1's balanced subsets train the paper's
  TABLE1_STEPS steps each and draw no curve (the table reports where they end); any other recipe, f."""
  if curation.parse_recipe(recipe)[0] not in curation.TABLE1:
    return f
  s = f.copy_and_resolve_references()
  s.steps, s.eval_every = curation.TABLE1_STEPS, 0
  return s


def grpo(config, ctx) -> dict:
  """Every RL baseline of grpo.algorithms (the paper's GRPO by default), seed by seed."""
  out = {}
  algorithms = run_config.rl_algorithms(config)
  alone = config.seeds == 1 and algorithms == ("grpo",)
  for i in range(config.seeds):
    for algo in algorithms:
      name = run_name(algo, i)
      if ctx.wd.model_done(name):
        print(f"[grpo] {name}: done already")
        if os.path.exists(ctx.wd.figures(name)):
          out.update({f"{name}/{k}": v for k, v in json.load(open(ctx.wd.figures(name))).items()})
        continue
      if not alone:
        print(f"[grpo] {name} ({algo}" + (f", seed {i + 1} of {config.seeds})" if config.seeds > 1 else ")"))
      figures = _grpo_run(config, ctx, name, run_seed(config, algo, i), algo)
      common.write_json(ctx.wd.figures(name), figures)
      # The paper's GRPO alone: the figures as they always were; else each under its run's name.
      out.update(figures if alone else {f"{name}/{k}": v for k, v in figures.items()})
  return out


def _grpo_run(config, ctx, name: str, seed: int, algo: str = "grpo") -> dict:
  g = config.grpo
  model = _start(config, ctx, g.model, "grpo.model")
  records = common.load_records(config, config.data.train, limit=config.data.train_limit, train=True)
  it = _iterator(config, records, model.processor, g, with_answers=False, seed=seed, source=config.data.train,
                 key="grpo", mesh=ctx.mesh)
  tc = train_config(config, g, _steps(g, it), seed, stage="grpo")
  params = model.params
  if tc.lora is not None:
    params = trainer.init_lora(params, model.cfg, tc.lora, seed=seed, mesh=ctx.mesh, opts=ctx.model_options)
  sp = sampling.settings(model.directory, model.processor, repetition_penalty=g.repetition_penalty,
                         pad_id=model.cfg.pad_token_id or 0, max_new_tokens=g.max_new_tokens,
                         num_samples=g.num_generations, temperature=g.temperature, top_k=g.top_k, top_p=g.top_p)
  parts = rollouts.parts(model.cfg, ctx.model_options, tc, ctx.mesh, ctx.wd.train(name), sampling_params=sp,
                         records=records, processor=model.processor, beta=g.beta, clip_eps=g.clip_eps,
                         algorithm=run_config.rl_algorithm(config, algo),
                         num_iterations=g.num_iterations)
  t = trainer.Trainer(model.cfg, ctx.model_options, params, tc, ctx.mesh, ctx.wd.train(name), parts,
                      fingerprint=_data_fingerprint(config, ctx, config.data.train, records, model))
  params = model.params = None   # the trainer holds the weights now
  figures = _fit(config, ctx, name, t, it, g, model)
  h = history(ctx.wd, name)
  if h:
    figures["final_reward"] = round(final_reward(h), 4)
  return {"prompts": len(records), **{k: v for k, v in figures.items() if k != "written"}}


def final_reward(h: list[dict], last: int = 5) -> float:
  """GRPO's reward at the end of a run: the mean of the last `last` steps (one step's 8 prompts are a
  noisy sample). The stage's log line and the report both show this figure."""
  tail = [x["reward"] for x in h[-last:] if "reward" in x]
  return sum(tail) / len(tail)


def history(wd: Workdir, name: str) -> list[dict]:
  """A run's per-step metrics (train/{name}/logs/metrics.jsonl)."""
  path = wd.metrics(name)
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(x) for x in f if x.strip()]
