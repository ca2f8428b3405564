"""benchmarks/fit_table.py: the BENCHMARKS.md memory table's cells from the aot command's JSON."""
import importlib.util
import os

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
spec = importlib.util.spec_from_file_location("fit_table", os.path.join(REPO, "benchmarks", "fit_table.py"))
fit_table = importlib.util.module_from_spec(spec)
spec.loader.exec_module(fit_table)
GIB = 2 ** 30


def _prog(stage, total_gib, *, fits=True, compiled=True, error="", max_rows=None, at_least=False):
  return {"stage": stage, "compiled": compiled, "fits": fits, "error": error, "max_rows_per_device": max_rows,
          "max_rows_at_least": at_least,
          "bytes": {"total": int(total_gib * GIB)} if compiled else {}}


def test_cells_say_fits_gib_and_the_smallest_max_batch():
  assert fit_table.cell([_prog("grpo", 2.6), _prog("grpo", 9.46)]) == "yes 9.5"
  assert fit_table.cell([_prog("score", 15.3, max_rows=471), _prog("score", 4.0, max_rows=900)]) == \
      "yes 15.3, max 471"
  assert fit_table.cell([_prog("cold_start", 123.5, fits=False)]) == "**no** 123.5"
  assert fit_table.cell([_prog("cold_start", 123.5, fits=False, max_rows=0)]) == "**no** 123.5"
  assert fit_table.cell([]) == "-"


def test_a_cell_states_its_headroom_and_marks_a_tight_fit():
  """The 3B cold start on one H100 fit at 58.98 of 59.33 GiB: 0.6% to spare, which a real run's other
  buffers can exceed; below aot.TIGHT_MARGIN (5%) a cell says so."""
  budget = {"budget_bytes": int(59.33 * GIB)}
  assert fit_table.cell([{**_prog("cold_start", 58.98, max_rows=17), **budget}]) == \
      "yes 59.0 (0.6% spare, tight), max 17"
  assert fit_table.cell([{**_prog("finetune", 9.95), **budget}, {**_prog("finetune", 2.0), **budget}]) == \
      "yes 9.9 (83.2% spare)"
  assert fit_table.aot.TIGHT_MARGIN == 0.05
  r = fit_table.aot.Result(name="x", stage="x", compiled=True, fits=True, attention="xla",
                           bytes={"total": 96}, device_bytes=120, budget_bytes=100, seconds=0.0, rows=1,
                           rows_per_device=1, shape="-")
  assert r.tight and abs(r.headroom - 0.04) < 1e-12 and r.to_json()["tight"] is True
  assert fit_table.aot.fits_text(r.fits, r.tight) == "yes, tight" and fit_table.aot.headroom_text(r.headroom) == "4.0%"


def test_a_search_stopped_at_its_cap_says_at_least():
  assert fit_table.cell([_prog("score", 3.0, max_rows=512, at_least=True), _prog("score", 2.0, max_rows=900)]) \
      == "yes 3.0, max >=512"
  assert fit_table.cell([_prog("score", 3.0, max_rows=511)]) == "yes 3.0, max 511"


def test_a_compile_time_oom_shows_what_the_temporaries_need():
  err = ("JaxRuntimeError: RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO "
         "temporaries (17.13G) exceeds available HBM (15.75G).")
  assert fit_table.cell([_prog("cold_start", 0, compiled=False, fits=False, error=err)]) == \
      "**no**, temporaries alone 17.13"


def test_table_marks_missing_pairs_not_run():
  results = {("c3b.py", "h100x1"): {"budget_bytes": 59.3 * GIB, "programs": [_prog("finetune", 9.9)]}}
  md = fit_table.table(results, ["c3b.py"], ["h100x1", "v5e-8"])
  assert "| 3B | LoRA SFT | yes 9.9 | not run |" in md and "h100x1: 59.3 GiB" in md


def test_a_column_merges_with_its_per_stage_parts(tmp_path):
  import json

  def write(name, programs):
    (tmp_path / name).write_text(json.dumps({"target": "v6e-8", "budget_bytes": 31.25 * GIB, "programs": programs}))

  def named(name, *args, **kw):
    return {**_prog(*args, **kw), "name": name}

  assert fit_table.load(str(tmp_path), "configs/bench/c7b.py", "v6e-8") is None
  # A TPU column compiled stage by stage: no whole-column file, two parts.
  write("c7b.v6e-8.score.json", [named("score prefill", "score", 3.0), named("score decode", "score", 3.3)])
  write("c7b.v6e-8.finetune.json", [named("finetune step", "finetune", 4.2)])
  got = fit_table.load(str(tmp_path), "configs/bench/c7b.py", "v6e-8")
  assert sorted(p["name"] for p in got["programs"]) == ["finetune step", "score decode", "score prefill"]
  # A later max-batch search of one stage replaces that stage's programs, and only theirs.
  write("c7b.v6e-8.json", [named("score prefill", "score", 3.0), named("finetune step", "finetune", 4.2)])
  write("c7b.v6e-8.max.json", [named("score prefill", "score", 3.0, max_rows=700),
                               named("score decode", "score", 3.3, max_rows=400)])
  # (it sorts before the score part, whose unsearched programs must not replace its searched ones)
  got = fit_table.load(str(tmp_path), "configs/bench/c7b.py", "v6e-8")
  md = fit_table.table({("c7b.py", "v6e-8"): got}, ["c7b.py"], ["v6e-8"])
  assert "| 7B | scoring (K = 8) | yes 3.3, max 400 |" in md and "| 7B | LoRA SFT | yes 4.2 |" in md
  # Another target's files are not this pair's.
  assert fit_table.load(str(tmp_path), "configs/bench/c7b.py", "v6e-4") is None
