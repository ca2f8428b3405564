"""The entry point: runs the stages, resumes, and refuses a bad config before any work."""
import json
import os
import subprocess
import sys

import transformers

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _main(*args):
  env = dict(os.environ, PYTHONPATH=REPO, XLA_FLAGS="")
  return subprocess.run([sys.executable, "-m", "dcsft_jax.main", "--config=configs/dcsft.py", *args], cwd=REPO,
                        env=env, capture_output=True, text=True, timeout=600)


def test_default_run_writes_a_model_transformers_loads_and_resumes(tmp_path):
  wd = str(tmp_path / "wd")
  small = ("--config.data.train_limit=32", "--config.evaluate.limit=16")
  r = _main(f"--config.workdir={wd}", *small)
  assert r.returncode == 0, r.stderr[-3000:]
  summary = json.load(open(os.path.join(wd, "stages.json")))
  assert set(summary) == {"init", "score", "curate", "evaluate", "export"} and summary["init"]["parameters"] > 0
  assert summary["score"]["records"] == 32
  model = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(os.path.join(wd, "hf_export"))
  assert sum(p.numel() for p in model.parameters()) == summary["init"]["parameters"]
  tok = transformers.AutoTokenizer.from_pretrained(os.path.join(wd, "hf_export"))
  assert tok.convert_tokens_to_ids("<|image_pad|>") == model.config.image_token_id
  r = _main(f"--config.workdir={wd}", *small)
  assert r.returncode == 0 and r.stdout.count("skipped") == 5, r.stdout


def test_bad_config_fails_before_work_naming_the_key(tmp_path):
  wd = tmp_path / "wd"
  r = _main(f"--config.workdir={wd}", "--config.model.attention=flash")
  assert r.returncode != 0 and "config.model.attention" in r.stderr
  r = _main(f"--config.workdir={wd}", "--config.stages=init,score_everything")
  assert r.returncode != 0 and "score_everything" in r.stderr
  r = _main(f"--config.workdir={wd}", "--config.modle.dtype=float32")
  assert r.returncode != 0 and "modle" in r.stderr
  r = _main(f"--config.workdir={wd}", "--config.mesh.pipeline=2")
  assert r.returncode != 0 and "pipeline" in r.stderr
  assert not wd.exists()
