"""Every config file under configs/ loads, validates and dry-runs (model shapes with jax.eval_shape, no
weights, no data read); the paper configs carry the paper's numbers; the launch scripts parse; a bad
key or a bad config argument is refused naming the key, before any work starts."""
from __future__ import annotations

import glob
import inspect
import os
import subprocess
import sys

import pytest

from dcsft_jax import config_base, run_config
from dcsft_jax import stages as stages_lib
from dcsft_jax.data import sources

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAGES = [s.name for s in stages_lib.STAGES]

CONFIG_FILES = sorted(p for p in glob.glob(os.path.join(REPO, "configs", "**", "*.py"), recursive=True)
                      if not os.path.basename(p).startswith("_"))
PAPER = {os.path.basename(p)[:-3]: p for p in CONFIG_FILES if os.sep + "paper" + os.sep in p}
IMAGENET = sorted(k for k in PAPER if k.startswith("imagenet_"))
LAUNCH_SCRIPTS = sorted(glob.glob(os.path.join(REPO, "launch", "*.sh")) +
                        glob.glob(os.path.join(REPO, "launch", "*.sbatch")))

# Parameter counts of the released shapes (dry runs build `model.preset`, or the tiny default).
SIZE_CLASS = {"3b": (3.70e9, 3.80e9), "7b": (8.20e9, 8.40e9), "qwen3_vl_8b": (8.70e9, 8.80e9), "tiny": (1, 1e6), "": (1, 1e6)}
# What sources.check says, per kind, besides naming the spec: the fix (or, for files, that the path is wrong).
HINTS = {"json": ("file not found",), "hf": ("no such dataset",), "tfds": ("data.tfds_dir", "tfds build")}


def _load(path: str):
  return config_base.load_config_file(path)


def _takes_arg(mod) -> bool:
  return len(inspect.signature(mod.get_config).parameters) > 0


def _config(path: str, arg: str | None = None):
  mod = _load(path)
  return mod.get_config(arg) if arg is not None else mod.get_config()


def _check_dry_run(config):
  out = run_config.dry_run(config, STAGES)
  preset = config.model.preset
  if not (config.model.hf_path and os.path.isfile(os.path.join(config.model.hf_path, "config.json"))):
    lo, hi = SIZE_CLASS[preset]
    assert lo <= out["parameters"] <= hi, (preset, out["parameters"])
  assert out["parameters"] > 0
  for key, problem in out["sources"].items():
    if problem is None:
      continue
    spec = config.data.train if key == "data.train" else (
        config.cold_start.data if key == "cold_start.data" else
        str(sources.parse_sets(config.data.eval)[key[len("data.eval["):-1]]))
    parsed = sources.parse(spec)
    assert str(parsed) in problem, (key, problem)
    assert any(h in problem for h in HINTS[parsed.kind]), (key, problem)
  return out


def test_config_files_found():
  assert os.path.join(REPO, "configs", "dcsft.py") in CONFIG_FILES
  assert {"imagenet_qwen25vl_3b", "imagenet_qwen25vl_7b", "refcoco_qwen25vl_7b", "mmk12_qwen25vl_7b"} <= set(PAPER)


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: os.path.relpath(p, REPO))
def test_config_dry_run(path):
  mod = _load(path)
  _check_dry_run(mod.get_config())


@pytest.mark.parametrize("path", [p for p in PAPER.values() if _takes_arg(_load(p))], ids=lambda p: os.path.relpath(p, REPO))
def test_config_dry_run_on_the_paper_data(path, paper_data):
  out = _check_dry_run(_load(path).get_config(f"data_dir={paper_data}"))
  if os.path.basename(path).startswith("imagenet_"):
    assert out["sources"] and all(v is None for v in out["sources"].values()), out["sources"]


@pytest.mark.parametrize("name", sorted(k for k in PAPER if k.startswith(("imagenet_", "refcoco_"))))
def test_tfds_variant(name):
  c = _config(PAPER[name], "source=tfds,tfds_dir=/nonexistent/tfds")
  out = _check_dry_run(c)
  tfds_keys = [k for k, v in out["sources"].items() if v and v.startswith("tfds:")]
  assert tfds_keys and all("tfds build" in out["sources"][k] for k in tfds_keys)
  if name.startswith("imagenet_"):
    assert c.data.label_names.endswith("imagenet_label_names.json")
    assert c.data.train.startswith("json:")   # the paper's 100-class subset is defined by its files


@pytest.mark.parametrize("name", IMAGENET)
def test_imagenet_paper_numbers(name):
  c = _config(PAPER[name])
  size = name.rsplit("_", 1)[1]
  assert c.model.preset == size and c.model.hf_path.endswith(f"Qwen2.5-VL-{size.upper()}-Instruct")
  assert (c.model.dtype, c.model.param_dtype) == ("bfloat16", "float32")
  assert c.data.max_pixels == 802816
  assert c.cold_start.data.endswith("imagenet_cold_sft.json") and c.data.train.endswith("imagenet_left_grpo.json")
  cs = c.cold_start
  assert (cs.lora, cs.epochs, cs.steps, cs.batch_size, cs.learning_rate, cs.warmup_ratio) == (False, 1.0, 0, 16, 1e-5, 0.1)
  assert (cs.freeze_vit, cs.freeze_aligner) == (False, False)
  s = c.score
  assert (s.num_samples, s.temperature, s.top_k, s.top_p, s.max_new_tokens) == (8, 0.9, 50, 1.0, 128)
  assert c.curate.recipes == "sft,sft_m,sft_em" and c.finetune.recipes == "sft,sft_m,sft_em"
  for t in (c.finetune, c.grpo):
    assert (t.lora, t.lora_rank, t.lora_alpha, t.lora_dropout) == (True, 32, 64.0, 0.05)
    assert (t.steps, t.batch_size, t.learning_rate, t.warmup_ratio) == (600, 16, 1e-5, 0.1)
    assert t.eval_every == 100
  g = c.grpo
  assert (g.num_generations, g.beta, g.temperature, g.top_p, g.max_new_tokens) == (8, 0.04, 0.9, 1.0, 128)
  assert c.evaluate.max_new_tokens == 128
  sets = sources.parse_sets(c.data.eval)
  assert [os.path.basename(s.path) for s in sets.values()] == [
      "imagenet_val_processed.json", "imagenet-r_val_processed.json", "imagenet-a_val_processed.json"]
  assert c.data.ood == "imagenet_r,imagenet_a"
  assert c.report.curve_limit > 0


def test_grounding_and_reasoning_numbers():
  for name in [k for k in PAPER if k.startswith("refcoco_")]:
    c = _config(PAPER[name])
    assert set(sources.parse_sets(c.data.eval)) == {"refcoco", "ref_l4", "lisa"} and c.data.ood == "ref_l4,lisa"
    assert (c.finetune.steps, c.grpo.steps, c.grpo.beta, c.score.num_samples) == (600, 600, 0.04, 8)
  for name in [k for k in PAPER if k.startswith("mmk12_")]:
    c = _config(PAPER[name])
    assert (c.finetune.steps, c.grpo.steps, c.grpo.beta) == (400, 400, 0.001)
    assert c.evaluate.max_new_tokens == 4096
    assert {"mmmu", "mathvista", "mathvision", "mathverse", "wemath"} <= set(sources.parse_sets(c.data.eval))


def test_config_arg_sets_paths():
  c = _config(PAPER["imagenet_qwen25vl_7b"], "data_dir=/d,image_root=/data/dataset/Imagenet=/mnt/in,"
              "hf_path=/m/7b,tfds_dir=/t,workdir=/w")
  assert c.cold_start.data == "json:/d/imagenet_cold_sft.json" and c.data.train == "json:/d/imagenet_left_grpo.json"
  assert (c.data.image_root, c.model.hf_path, c.data.tfds_dir, c.workdir) == (
      "/data/dataset/Imagenet=/mnt/in", "/m/7b", "/t", "/w")


def test_bad_config_arg_names_the_key():
  with pytest.raises(ValueError, match="data_dri"):
    _config(PAPER["imagenet_qwen25vl_3b"], "data_dri=/x")
  with pytest.raises(ValueError, match="source"):
    _config(PAPER["imagenet_qwen25vl_3b"], "source=parquet")
  with pytest.raises(ValueError, match="nokey"):
    config_base.parse_arg("nokey", data_dir="x")


def test_config_files_load_each_other_by_path(tmp_path):
  """configs/ is not a package: demo.py, the 7B bench twin and the paper files reach their base files
  through config_base.load_config_file; a missing one is named."""
  demo = config_base.load_config_file(os.path.join(REPO, "configs", "demo.py")).get_config()
  default = config_base.load_config_file("dcsft.py", beside=os.path.join(REPO, "configs", "demo.py")).get_config()
  assert demo.model.to_dict() == default.model.to_dict() and demo.seeds == 4
  b7 = config_base.load_config_file(os.path.join(REPO, "configs", "bench", "imagenet_synthetic_7b.py")).get_config()
  assert b7.model.preset == "7b" and b7.finetune.steps == 600
  with pytest.raises(FileNotFoundError, match="nothere.py"):
    config_base.load_config_file("nothere.py", beside=str(tmp_path / "x.py"))


@pytest.mark.parametrize("path", [os.path.join(REPO, "configs", "dcsft.py"), PAPER["imagenet_qwen25vl_3b"]],
                         ids=["dcsft", "imagenet_3b"])
def test_bad_key_names_the_key(path):
  c = _config(path)
  c.finetune.stepz = 5                     # a typo'd field
  with pytest.raises(run_config.ConfigError, match=r"config\.finetune\.stepz"):
    run_config.dry_run(c, STAGES)
  c = _config(path)
  c.grpo.beta = -1.0                       # a bad value
  with pytest.raises(run_config.ConfigError, match=r"config\.grpo\.beta"):
    run_config.dry_run(c, STAGES)


@pytest.mark.parametrize("script", LAUNCH_SCRIPTS, ids=os.path.basename)
def test_launch_script_parses(script):
  assert open(script).readline().startswith("#!"), "needs a shebang"
  assert "set -euo pipefail" in open(script).read()
  subprocess.run(["bash", "-n", script], check=True, timeout=30)


def test_launch_scripts_found():
  assert {"gpu_local.sh", "tpu_pod.sh", "slurm_multinode.sbatch"} <= {os.path.basename(s) for s in LAUNCH_SCRIPTS}


def test_main_refuses_missing_data_before_any_work(tmp_path):
  """The CLI loads a paper config by path with its argument and stops at validation: exit status
  non-zero, `bad config: config.KEY: ...` on stderr, no workdir. (hf_path= empties the model path, so
  the first missing file is the data's, not the model's, which this checkout does not have either.)"""
  workdir = tmp_path / "wd"
  arg = f"data_dir=/nonexistent,hf_path=,workdir={workdir}"
  env = dict(os.environ, PYTHONPATH=REPO, XLA_FLAGS="", JAX_PLATFORMS="cpu")
  p = subprocess.run([sys.executable, "-m", "dcsft_jax.main", f"--config=configs/paper/imagenet_qwen25vl_3b.py:{arg}"],
                     cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
  assert p.returncode != 0
  assert "bad config: config.cold_start.data" in p.stderr, p.stderr[-2000:]
  assert "/nonexistent/imagenet_cold_sft.json" in p.stderr
  assert not workdir.exists()


def test_default_and_demo_configs_take_the_hard_sweep_argument():
  """configs/dcsft.py:hard_sweep=true adds Fig. 5's recipes to curation, fine-tuning and evaluation,
  table1=true Table 1's protocol; the demonstration is the default with seeds, full evaluation sets,
  the sweep and Table 1's protocol, nothing else; the miniature with a prior adds the pretraining and
  its light cold start to the demonstration, without the sweep."""
  base, sweep = _config(os.path.join(REPO, "configs", "dcsft.py")), _config(os.path.join(REPO, "configs", "dcsft.py"),
                                                                            "hard_sweep=true,table1=true")
  extra = ["sft_em+hard0.2", "sft_em+hard0.5", "table1_easy", "table1_medium", "table1_hard"]
  assert sweep.curate.recipes == sweep.finetune.recipes == base.finetune.recipes + "," + ",".join(extra)
  assert all(f"{r}=models/{r}" in sweep.evaluate.models for r in extra)
  demo = _config(os.path.join(REPO, "configs", "demo.py"))
  assert (demo.seeds, demo.evaluate.limit, demo.finetune.recipes) == (4, 0, sweep.finetune.recipes)
  changed = {k for k in ("seeds", "workdir") if demo[k] != sweep[k]}
  changed |= {f"{s}.{k}" for s in ("data", "cold_start", "score", "curate", "finetune", "grpo", "evaluate", "report")
              for k in sweep[s].keys() if demo[s][k] != sweep[s][k]}
  assert changed == {"seeds", "workdir", "evaluate.limit", "report.curve_limit"}, changed
  prior = _config(os.path.join(REPO, "configs", "prior.py"))
  changed = {k for k in ("seeds", "workdir", "stages") if prior[k] != demo[k]}
  changed |= {f"{s}.{k}" for s in ("data", "pretrain", "cold_start", "score", "curate", "finetune", "grpo", "evaluate",
                                   "report") for k in demo[s].keys() if prior[s][k] != demo[s][k]}
  assert changed == {"workdir", "stages", "pretrain.data", "pretrain.epochs", "pretrain.learning_rate",
                     "pretrain.warmup_ratio", "pretrain.save_every", "cold_start.model", "cold_start.epochs",
                     "cold_start.learning_rate", "curate.recipes", "finetune.recipes", "evaluate.models"}, changed
  assert "sft_em+hard" not in prior.finetune.recipes and prior.stages.startswith("init,pretrain,cold_start,")
  with pytest.raises(ValueError, match="hard_sweep"):
    _config(os.path.join(REPO, "configs", "dcsft.py"), "hardsweep=1")

