"""The whole pipeline, as users run it, on meshes and on two processes (issue 25).

`python -m dcsft_jax.main --config=configs/dcsft.py:short=true` (every stage of the default run, each
with few steps and little data) runs to its report and export:
- on 1 CPU device: the reference;
- on 4 simulated devices as data x fsdp = 2 x 2, and as fsdp x tensor = 2 x 2 (tensor parallelism
  splits the tiny model's heads, KV heads, MLP and vocabulary: 6, 2, 160 and 414 are all even);
- as 2 jax.distributed processes on localhost with 2 CPU devices each (fsdp = 4 across them).

What must agree with the reference, and why:
- **Exactly:** every sampled answer and verdict of scoring, the buckets and the curated training
  files, every greedy answer of evaluation (and so every accuracy, the OOD-vs-step curves and the
  report's accuracy, comparison and difficulty sections). XLA:CPU is deterministic, and a sharded
  program computes each row's logits from the same weights; FSDP's all-gathers are exact, and
  tensor parallelism only splits contractions into partial sums added in another order (float
  reassociation, about 1e-7 relative per reduction). The trained weights then drift by about 1e-4
  of their scale over 96 + 6 steps (measured: cold-start loss 0.82371 vs 0.82374, exported weights
  1.5e-4 apart), so a sampled or greedy token could flip only where two logits lie closer than that:
  none does in this run. A flip would show here as a failure: that is a change to look at, not noise
  (the same programs on the same kind of machine give the same bits).
- **Within float tolerance:** every training loss (relative 1e-3; measured up to 6e-5) and every
  exported weight (absolute 2e-3; measured up to 1.5e-4). A mesh that split a reduction wrongly
  (a missing psum, a mis-sharded head) is off by O(1) there.

The tiny Qwen3-VL (the other model family) runs alone and on fsdp x tensor = 2 x 2, compared the same way.

On main before issue 25 the 4-device runs died in finetune (the LoRA init traced a batch-1 forward
under the mesh's batch axes), and the two processes never got past curation.
"""
from __future__ import annotations

import fcntl
import json
import os
import re
import signal
import socket
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import load_file

from dcsft_jax import curation

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHORT = "--config=configs/dcsft.py:short=true"
LOSS_RTOL = 1e-3
WEIGHT_ATOL = 2e-3

pytestmark = pytest.mark.slow


def _env(devices: int, **extra) -> dict:
  return dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu",
              XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", **extra)


def _run(workdir, devices: int, *args, timeout: int = 1200) -> str:
  r = subprocess.run([sys.executable, "-m", "dcsft_jax.main", SHORT, f"--config.workdir={workdir}", *args],
                     cwd=REPO, env=_env(devices), capture_output=True, text=True, timeout=timeout)
  assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-4000:])
  assert os.path.isfile(os.path.join(workdir, "report.md")) and os.path.isdir(os.path.join(workdir, "hf_export"))
  return r.stdout


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> str:
  """The 1-device run, made once per test session and shared by the xdist workers (a file lock: the
  first worker to need it runs it, the others wait and reuse it)."""
  uid = os.environ.get("PYTEST_XDIST_TESTRUNUID")
  root = tmp_path_factory.getbasetemp()
  shared = (root.parent / f"pipeline-reference-{uid}") if uid else (root / "pipeline-reference")
  shared.mkdir(parents=True, exist_ok=True)
  wd = shared / "wd"
  with open(shared / "lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    if not (shared / "done").exists():
      out = _run(wd, 1)
      assert "mesh {'data': 1, 'fsdp': 1, 'tensor': 1}" in out
      (shared / "done").write_text("ok")
  return str(wd)


# ---------------------------------------------------------------------------------------- comparison
def _text(path: str, workdir: str) -> str:
  return open(path, encoding="utf-8").read().replace(os.path.abspath(workdir), "WORKDIR")


def _json(path: str, workdir: str):
  return json.loads(_text(path, workdir))


def _losses(workdir: str, run: str) -> np.ndarray:
  with open(os.path.join(workdir, "train", run, "logs", "metrics.jsonl")) as f:
    return np.array([json.loads(x)["loss"] for x in f if x.strip()])


def assert_same_results(ref: str, got: str) -> None:
  """`got`'s run equals the reference's: exactly where the module docstring says, within its float
  tolerances elsewhere."""
  p = lambda wd, *parts: os.path.join(wd, *parts)
  # Scoring: every completion, verdict and pass rate.
  a, b = curation.read_scores(p(ref, "scores", "scores.jsonl")), curation.read_scores(p(got, "scores", "scores.jsonl"))
  assert list(a) == list(b)
  for k in a:
    assert a[k] == b[k], (k, a[k], b[k])
  # Curation: the buckets, and each recipe's training file.
  sa, sb = _json(p(ref, "curation", "summary.json"), ref), _json(p(got, "curation", "summary.json"), got)
  assert sa["summary"] == sb["summary"] and sa["recipes"] == sb["recipes"]
  for recipe in sa["recipes"]:
    assert _json(p(ref, "curation", f"{recipe}.json"), ref) == _json(p(got, "curation", f"{recipe}.json"), got), recipe
  # Evaluation: every greedy answer of every model on every set.
  acc = _json(p(ref, "eval", "accuracy.json"), ref)
  assert acc == _json(p(got, "eval", "accuracy.json"), got)
  for model, row in acc["accuracy"].items():
    for s in row:
      ea, eb = (_json(p(wd, "eval", model, f"{s}.json"), wd)["results"] for wd in (ref, got))
      assert ea == eb, (model, s)
  # Training: every step's loss, in every run.
  runs = sorted(os.listdir(p(ref, "train")))
  assert runs == sorted(os.listdir(p(got, "train"))) and "cold_start" in runs and "grpo" in runs
  for run in runs:
    la, lb = _losses(ref, run), _losses(got, run)
    assert la.shape == lb.shape, run
    np.testing.assert_allclose(lb, la, rtol=LOSS_RTOL, atol=1e-6, err_msg=run)
  # The report: its accuracy, comparison and difficulty sections word for word (the training-loss and
  # timing sections below them print float losses and seconds).
  cut = lambda text: text.split("## Training runs")[0]
  assert cut(_text(p(ref, "report.md"), ref)) == cut(_text(p(got, "report.md"), got))
  ra, rb = _json(p(ref, "results.json"), ref), _json(p(got, "results.json"), got)
  for key in ("accuracy", "comparisons", "buckets"):
    assert ra[key] == rb[key], key
  # The exported HF model.
  assert _json(p(ref, "hf_export", "config.json"), ref) == _json(p(got, "hf_export", "config.json"), got)
  wa, wb = load_file(p(ref, "hf_export", "model.safetensors")), load_file(p(got, "hf_export", "model.safetensors"))
  assert sorted(wa) == sorted(wb)
  for k in wa:
    np.testing.assert_allclose(wb[k], wa[k], rtol=0, atol=WEIGHT_ATOL, err_msg=k)


# ---------------------------------------------------------------------------------------------- tests
MESHES = {
    "data2_fsdp2": ("--config.mesh.data=2", "--config.mesh.fsdp=2", "--config.mesh.tensor=1"),
    "fsdp2_tensor2": ("--config.mesh.data=1", "--config.mesh.fsdp=2", "--config.mesh.tensor=2"),
}


@pytest.mark.parametrize("mesh", sorted(MESHES))
def test_whole_pipeline_on_a_4_device_mesh_equals_one_device(mesh, reference, tmp_path):
  out = _run(tmp_path / "wd", 4, *MESHES[mesh])
  sizes = dict(a.split("=", 1) for a in (x[len("--config.mesh."):] for x in MESHES[mesh]))
  assert f"mesh {{'data': {sizes['data']}, 'fsdp': {sizes['fsdp']}, 'tensor': {sizes['tensor']}}}" in out
  assert_same_results(reference, str(tmp_path / "wd"))


def test_tensor_parallelism_splits_heads_mlp_and_vocabulary():
  """What the fsdp x tensor run's layout is: the rules put 'tensor' on the tiny model's head, KV head,
  MLP and vocabulary axes (else that run would test FSDP twice)."""
  import jax
  from dcsft_jax import mesh as mesh_lib
  from dcsft_jax.models import qwen2_5_vl as M
  from dcsft_jax.models.qwen2_5_vl.config import tiny_config
  mesh = mesh_lib.make_mesh({"data": 1, "fsdp": 2, "tensor": 2}, devices=jax.devices()[:4])
  shapes = M.init_params(tiny_config(), abstract=True)
  sh = mesh_lib.param_shardings(shapes, mesh)
  flat = {"/".join(str(getattr(k, "key", k)) for k in path): s.spec
          for path, s in jax.tree_util.tree_flatten_with_path(sh)[0]}
  split = {k for k, spec in flat.items() if "tensor" in jax.tree.leaves(tuple(spec))}
  for part in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head", "embed"):
    assert any(part in k for k in split), (part, sorted(split)[:20])


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_whole_pipeline_on_two_processes_equals_one_process(reference, tmp_path):
  """2 jax.distributed processes on localhost, 2 CPU devices each, the same command in both (as a
  launcher starts it: JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID): the report and the
  export equal the 1-process run's as above, and each process writes only what it should. What each
  process writes through Python is recorded with audit hooks (tests/pipeline_process.py): process 0
  writes the workdir's files; process 1 writes none, only Orbax's per-process array metadata
  (`process_1`, its shards' index) and directories it shares with process 0 (makedirs)."""
  wd = tmp_path / "wd"
  port = _free_port()
  procs = []
  for i in range(2):
    env = _env(2, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(i))
    procs.append(subprocess.Popen(
        [sys.executable, os.path.join(REPO, "tests", "pipeline_process.py"), str(tmp_path / f"writes{i}.json"),
         SHORT, f"--config.workdir={wd}"], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, start_new_session=True))
  try:
    outs = [p.communicate(timeout=1500) for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        os.killpg(p.pid, signal.SIGKILL)
  for i, (p, (out, err)) in enumerate(zip(procs, outs)):
    assert p.returncode == 0, (i, out[-2000:], err[-4000:])
    assert "4 cpu device(s), mesh {'data': 1, 'fsdp': 4, 'tensor': 1}" in out, (i, out[-2000:])
  assert_same_results(reference, str(wd))

  w0, w1 = (set(json.load(open(tmp_path / f"writes{i}.json"))) for i in range(2))
  assert "report.md" in w0 and "scores/scores.jsonl" in w0 and "curation/summary.json" in w0
  stray = sorted(x for x in w1 if not (re.search(r"(^|/)process_1$", x) or (wd / x).is_dir()))
  assert not stray, stray


def test_process_0_work_reaches_every_process_and_so_does_its_failure():
  """multihost.on_process_0 (curation, the report): process 0 alone runs it, every process gets its
  result; when it raises, every process raises the same type and message (else the others would wait
  at the next barrier for a process that has stopped)."""
  port = _free_port()
  env = dict(os.environ, PYTHONPATH=REPO, XLA_FLAGS="", JAX_PLATFORMS="cpu")
  procs = [subprocess.Popen([sys.executable, os.path.join(REPO, "tests", "two_process_multihost.py"), str(i),
                             str(port)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for i in range(2)]
  outs = [p.communicate(timeout=300) for p in procs]
  for i, (p, (out, err)) in enumerate(zip(procs, outs)):
    assert p.returncode == 0, err[-3000:]
    lines = out.splitlines()
    assert f"process {i}: text 'from 0 ü'" in lines and f"process {i}: empty ''" in lines, out
    assert f"process {i}: result {{'n': 3, 'who': 0}} ran {[0] if i == 0 else []}" in lines, out
    assert (f"process {i}: raised FileNotFoundError: scores.jsonl not found: run the 'score' stage first"
            in lines), out
    assert lines[-1] == f"process {i}: done"


def test_the_default_pipeline_on_the_tiny_qwen3_vl_alone_and_on_a_mesh(tmp_path):
  """Issue 26: `--config.model.preset=qwen3_vl_tiny` runs the default pipeline on the other family,
  every stage, to a report and an HF export that transformers' Qwen3-VL class loads with the family's
  own processor files; and the same run on fsdp x tensor = 2 x 2 (the tiny Qwen3-VL's 4 heads, 2 KV
  heads, MLP 128, vocabulary 414 and 2 vision heads all split) equals it as the Qwen2.5-VL runs above do."""
  import transformers

  from dcsft_jax.data import tokenizer
  from dcsft_jax.models import registry
  one, mesh = str(tmp_path / "one"), str(tmp_path / "mesh")
  _run(one, 1, "--config.model.preset=qwen3_vl_tiny")
  out = _run(mesh, 4, "--config.model.preset=qwen3_vl_tiny", *MESHES["fsdp2_tensor2"])
  assert "mesh {'data': 1, 'fsdp': 2, 'tensor': 2}" in out
  assert_same_results(one, mesh)
  summary = json.load(open(os.path.join(one, "stages.json")))
  assert json.load(open(os.path.join(one, "base_model", "config.json")))["model_type"] == "qwen3_vl"
  model = transformers.Qwen3VLForConditionalGeneration.from_pretrained(os.path.join(one, "hf_export"))
  assert sum(p.numel() for p in model.parameters()) == summary["init"]["parameters"]
  assert json.load(open(os.path.join(one, "hf_export", "generation_config.json"))) == \
      tokenizer.generation_config(registry.by_name("qwen3_vl"))
  tok = transformers.AutoTokenizer.from_pretrained(os.path.join(one, "hf_export"))
  text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
  assert text == "<|im_start|>user\nhi<|im_end|>\n"         # Qwen3-VL's template: no default system turn
