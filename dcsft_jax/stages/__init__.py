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
    Stage("cold_start", training.cold_start, "full SFT of the base model on the cold-start set"),
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
