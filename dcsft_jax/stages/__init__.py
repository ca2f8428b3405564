"""Pipeline stages. Each is thin wiring: it reads earlier stages' outputs from the workdir and
writes its own; `main` skips a stage whose outputs exist, so a re-run resumes."""
from __future__ import annotations

import dataclasses
from typing import Callable

from dcsft_jax.stages import curate, evaluate, model_stage, score


@dataclasses.dataclass(frozen=True)
class Stage:
  name: str
  output: str                      # path (relative to the workdir) that marks the stage done
  run: Callable                    # run(config, ctx) -> dict of figures for the summary
  doc: str


STAGES = (
    Stage("init", model_stage.BASE_DONE, model_stage.init, "load the HF checkpoint (or build the embedded tiny "
          "model) onto the mesh and save it as an Orbax model directory"),
    Stage("score", score.OUTPUT, score.run, "sample K answers per training prompt and verify them: pass rates"),
    Stage("curate", curate.OUTPUT, curate.run, "bucket prompts into easy / medium / hard and write the "
          "training files of the configured recipes"),
    Stage("evaluate", evaluate.OUTPUT, evaluate.run, "greedy accuracy of each model on every evaluation set"),
    Stage("export", model_stage.EXPORT_DIR, model_stage.export, "write the model back as a Hugging Face directory"),
)
BY_NAME = {s.name: s for s in STAGES}
