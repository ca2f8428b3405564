"""Pipeline stages. Each is thin wiring: it reads earlier stages' outputs from the workdir and
writes its own; `main` skips a stage whose outputs exist, so a re-run resumes."""
from __future__ import annotations

import dataclasses
from typing import Callable

from dcsft_jax.stages import curate, evaluate, model_stage, report, score, training


@dataclasses.dataclass(frozen=True)
class Stage:
  name: str
  run: Callable                    # run(config, ctx) -> dict of figures for the summary
  doc: str                         # (the file marking it done: dcsft_jax.workdir.Workdir.done_marker)


STAGES = (
    Stage("init", model_stage.init, "load the HF checkpoint (or build the embedded tiny model) onto the mesh and "
          "save it as an Orbax model directory"),
    Stage("pretrain", training.pretrain, "full SFT of the base model on a broad set: the prior a pretrained "
          "model brings (optional; cold_start.model=pretrained_model starts from it)"),
    Stage("cold_start", training.cold_start, "full SFT of the base model (or cold_start.model's) on the cold-start set"),
    Stage("score", score.run, "sample K answers per training prompt and verify them: pass rates"),
    Stage("curate", curate.run, "bucket prompts into easy / medium / hard and write the training files of the "
          "configured recipes"),
    Stage("finetune", training.finetune, "LoRA SFT from the cold-start model on each curated recipe (SFT, SFT-M, "
          "SFT-EM)"),
    Stage("grpo", training.grpo, "GRPO from the cold-start model on all training prompts (the RL baseline)"),
    Stage("evaluate", evaluate.run, "greedy accuracy of each model on every evaluation set"),
    Stage("report", report.run, "report.md, results.json and plots from the stages' outputs"),
    Stage("export", model_stage.export, "write the model back as a Hugging Face directory"),
)
BY_NAME = {s.name: s for s in STAGES}

# What each stage reads from earlier stages: restarting one redoes every stage downstream of it.
DEPENDS = {
    "init": (), "pretrain": ("init",), "cold_start": ("init", "pretrain"), "score": ("cold_start",), "curate": ("score",),
    "finetune": ("curate", "cold_start"), "grpo": ("cold_start",), "evaluate": ("cold_start", "finetune", "grpo"),
    "report": ("score", "curate", "finetune", "grpo", "evaluate"), "export": ("finetune", "grpo", "cold_start"),
}

# The settings that shape each stage's outputs: a finished stage keeps them (WORKDIR/settings/STAGE.json),
# and a run asking other ones for it stops before any work. A section name covers all its keys but
# those in _NOT_OUTPUTS (checkpoint cadence, batch sizes of the samplers, which change no result).
# Lists that only add work (finetune.recipes, evaluate.models, data.eval's sets, seeds) are not here: a
# finished stage does the new part alone (main._missing).
_IMAGES = ("data.min_pixels", "data.max_pixels", "data.image_root", "data.builtin_image_size",
           "data.max_image_pixels", "data.skip_bad_records", "data.tfds_dir")
_TRAIN_DATA = ("data.train", "data.train_limit", "data.label_noise", "data.label_names")
_NOT_OUTPUTS = {"keep", "save_every", "eval_every", "batch_size", "recipes", "models", "algorithms"}
SETTINGS = {
    "init": ("model.hf_path", "model.preset", "seed"),
    "pretrain": ("pretrain", "model.dtype", "model.param_dtype", "data.max_buckets", "seed") + _IMAGES,
    "cold_start": ("cold_start", "model.dtype", "model.param_dtype", "data.max_buckets", "seed") + _IMAGES,
    "score": ("score", "model.dtype", "model.frozen_in_compute_dtype", "seed") + _TRAIN_DATA + _IMAGES,
    "curate": ("curate", "seed") + _TRAIN_DATA,
    "finetune": ("finetune", "model.dtype", "model.param_dtype", "data.max_buckets", "seed") + _IMAGES,
    "grpo": ("grpo", "model.dtype", "model.param_dtype", "data.max_buckets", "seed") + _TRAIN_DATA + _IMAGES,
    "evaluate": ("evaluate", "model.dtype", "model.frozen_in_compute_dtype") + _IMAGES,
    "report": (), "export": ("export",),
}


def settings(config, name: str) -> dict:
  """The flattened settings of `config` that shape stage `name`'s outputs."""
  out = {}
  for key in SETTINGS[name]:
    node = config
    for part in key.split("."):
      node = node[part]
    if hasattr(node, "keys"):
      out.update({f"{key}.{k}": node[k] for k in node.keys() if k not in _NOT_OUTPUTS})
    else:
      out[key] = node
  # The verifier shapes every verdict, but enters only when on: workdirs from before it still resume.
  if name in ("score", "grpo", "evaluate") and config.get("verify", {}).get("math_verify_only"):
    out["verify.math_verify_only"] = True
  return out


def downstream(name: str) -> list[str]:
  """`name` and every stage that reads its outputs, directly or not, in pipeline order."""
  hit = {name}
  for s in STAGES:
    if any(d in hit for d in DEPENDS[s.name]):
      hit.add(s.name)
  return [s.name for s in STAGES if s.name in hit]
