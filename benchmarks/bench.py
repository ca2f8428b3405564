"""dcsft_jax against the transformers/PyTorch path, in ONE run, on the same weights and inputs (issue 7).

  python benchmarks/bench.py [--shape=small|3b] [--sections=scoring,greedy,sft,lora,grpo] [--repeats=3]

Random weights are built once (ours, `init_params`), exported with `hf.save_hf` to a temporary
directory and loaded by `Qwen2_5_VLForConditionalGeneration.from_pretrained` (sdpa attention), so
both sides hold the same numbers. Both get the same token ids and pixels; positions are computed by
each side from them, and a prefill-logit parity check proves the two agree end to end.

Sections (timings interleaved ours / theirs, median of --repeats; compile excluded, reported apart):
- scoring: K=8 samples, T=0.9, top-k 50, top-p 1.0, --new_tokens forced (random weights never emit
  EOS: ours eos_ids=(), HF min_new_tokens=max_new_tokens). Ours: Sampler.generate (one prefill per
  prompt, K samples on its shared KV prefix). HF: generate(num_return_sequences=8) at its best batch
  of --hf_batches, and the paper's loop (8 generate calls of 1 sample each) at that batch.
- greedy: K=1, T=0 vs HF greedy generate.
- sft / lora: one optimizer step (AdamW, clip 1.0) on a batch with the answer tokens as labels;
  full parameters, and LoRA r32/a64 (dropout 0.05) on the language model's 7 projections. The torch
  side's LoRA is plain torch modules around nn.Linear (PEFT is not installed), base weights frozen.
- grpo: a hook; it runs only once dcsft_jax.train.grpo exposes a `make_grpo_step`.

Prints one JSON object and appends a run section to BENCHMARKS.md (--md=, --no_md to skip).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import gc
import json
import os
import platform
import resource
import shutil
import statistics
import sys
import tempfile
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")   # jax and torch share the GPU


def _threads_arg() -> int | None:
  for i, x in enumerate(sys.argv):
    if x.startswith("--threads="):
      return int(x.split("=", 1)[1])
    if x == "--threads" and i + 1 < len(sys.argv):
      return int(sys.argv[i + 1])
  return None


if _threads_arg() == 1:
  # One thread for both sides (XLA's CPU client has to be told before jax starts): on a machine
  # shared with other jobs, parallel runtimes lose far more to descheduled threads than they gain.
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             " --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1").strip()
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from dcsft_jax import hf, sampling  # noqa: E402
from dcsft_jax.models import qwen2_5_vl as M  # noqa: E402
from dcsft_jax.models.qwen2_5_vl import rope  # noqa: E402
from dcsft_jax.models.qwen2_5_vl.config import Qwen25VLConfig, TextConfig, VisionConfig, tiny_config  # noqa: E402
from dcsft_jax.train import optim, sft  # noqa: E402

K_SAMPLES, TEMPERATURE, TOP_K, TOP_P = 8, 0.9, 50, 1.0
TARGETS = {"scoring": 5.0, "greedy": 1.5, "sft": 1.0, "lora": 1.0}


# ------------------------------------------------------------------------------ shapes
@dataclasses.dataclass(frozen=True)
class Shape:
  name: str
  cfg: Qwen25VLConfig
  grid: tuple[int, int, int]      # image patch grid (t, h, w): 224 px -> 16x16, 448 px -> 32x32
  pre_tokens: int                 # text before the image (system turn, "<|im_start|>user\n")
  question_tokens: int            # text after it (question + "<|im_end|>\n<|im_start|>assistant\n")
  dtype: str                      # compute and parameter dtype on both sides


def small_shape(vocab: int) -> Shape:
  # A 4-block ViT (hidden 384) and an 8-layer LM (hidden 512, GQA 8/2): the vision tower is about
  # half of a prompt's prefill FLOPs and the LM head about a sixth of a decode step, roughly the
  # 3B's proportions (44% and 10%). 224x224 images: 16x16 patches, 64 merged tokens, 2x2 windows of
  # 112 px; blocks 1 and 3 attend over the whole image.
  cfg = tiny_config(vocab_size=vocab, text_layers=8, vision_depth=4, fullatt_block_indexes=(1, 3),
                    window_size=112, hidden_size=512, num_heads=8, num_kv_heads=2, intermediate_size=1376,
                    mrope_section=(8, 12, 12), vision_hidden=384, vision_heads=6, vision_intermediate=1024,
                    tie_word_embeddings=True)
  return Shape("small", cfg, (1, 16, 16), 8, 20, "float32")


def shape_3b() -> Shape:
  # Qwen2.5-VL-3B-Instruct (ANCHORS.md): one 448x448 image (32x32 patches, 256 merged tokens) plus
  # 28 text tokens = a 286-token prompt. bf16 weights and compute on both sides.
  text = TextConfig(vocab_size=151936, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
                    num_attention_heads=16, num_key_value_heads=2, rope_theta=1_000_000.0,
                    mrope_section=(16, 24, 24))
  vision = VisionConfig(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=2048,
                        window_size=112, fullatt_block_indexes=(7, 15, 23, 31), tokens_per_second=2)
  cfg = Qwen25VLConfig(text=text, vision=vision, tie_word_embeddings=True, pad_token_id=151643,
                       torch_dtype="bfloat16").validate()
  return Shape("3b", cfg, (1, 32, 32), 8, 20, "bfloat16")


# ------------------------------------------------------------------------------ inputs
@dataclasses.dataclass
class Prompts:
  """N same-length prompts (no padding): identical ids and pixels go to both sides."""
  ids: np.ndarray          # [N, L] int
  pixels: np.ndarray       # [N, P, patch_dim] float32 (ours); transformers gets rows packed
  grid: tuple[int, int, int]
  arrays: dict             # our sampler's batch arrays, all N rows

  def ours(self, b: int) -> dict:
    return {k: v[:, :b] if k == "positions" else v[:b] for k, v in self.arrays.items()}

  def hf(self, b: int, cfg, device, dtype) -> dict:
    import torch
    ids = self.ids[:b].astype(np.int64)
    kw = dict(input_ids=torch.tensor(ids, device=device),
              attention_mask=torch.ones(ids.shape, dtype=torch.long, device=device),
              pixel_values=torch.tensor(self.pixels[:b].reshape(-1, self.pixels.shape[-1]), device=device, dtype=dtype),
              image_grid_thw=torch.tensor([self.grid] * b, device=device))
    if _hf_takes_mm_types():
      kw["mm_token_type_ids"] = torch.tensor(rope.mm_token_types(ids, cfg).astype(np.int64), device=device)
    return kw


def _hf_takes_mm_types() -> bool:
  import inspect
  import transformers
  return "mm_token_type_ids" in inspect.signature(transformers.Qwen2_5_VLForConditionalGeneration.forward).parameters


def make_prompts(shape: Shape, n: int, answer_tokens: int = 0, seed: int = 0) -> Prompts:
  cfg, (t, h, w) = shape.cfg, shape.grid
  rng = np.random.default_rng(seed)
  ordinary = cfg.vision_start_token_id - 1          # ids below the special tokens
  n_img = t * h * w // cfg.vision.merge_unit
  rows = []
  for _ in range(n):
    rows.append(rng.integers(0, ordinary, shape.pre_tokens).tolist() + [cfg.vision_start_token_id]
                + [cfg.image_token_id] * n_img + [cfg.vision_end_token_id]
                + rng.integers(0, ordinary, shape.question_tokens + answer_tokens).tolist())
  ids = np.asarray(rows, np.int32)
  am = np.ones_like(ids)
  grids = np.asarray([shape.grid] * n)
  positions, deltas = rope.get_rope_index(ids, cfg, image_grid_thw=grids, attention_mask=am)
  P = t * h * w
  pixels = rng.standard_normal((n, P, cfg.vision.patch_dim)).astype(np.float32)
  arrays = {"input_ids": ids, "attention_mask": am, "positions": positions, "rope_deltas": deltas,
            "lengths": am.sum(1).astype(np.int32), "valid": np.ones(n, bool), "pixel_values": pixels,
            **rope.vision_layout([shape.grid] * n, cfg.vision, P)}
  if answer_tokens:
    loss = np.zeros_like(ids)
    loss[:, -answer_tokens:] = 1
    arrays["loss_mask"] = loss
  return Prompts(ids, pixels, shape.grid, arrays)


# ------------------------------------------------------------------------------ measuring
class CompileCounter:
  """Counts XLA compilations (and their seconds) through jax.monitoring."""
  EVENT = "/jax/core/compile/backend_compile_duration"

  def __init__(self):
    self.count, self.seconds = 0, 0.0
    jax.monitoring.register_event_duration_secs_listener(self._listen)

  def _listen(self, event, duration, **kw):
    if event == self.EVENT:
      self.count += 1
      self.seconds += duration

  @contextlib.contextmanager
  def window(self, out: dict, prefix: str):
    c0, s0 = self.count, self.seconds
    yield
    out[f"{prefix}compiles"] = self.count - c0
    out[f"{prefix}compile_s"] = round(self.seconds - s0, 2)


def set_torch_threads(n: int):
  import torch
  torch.set_num_threads(n)


def _sync_torch():
  import torch
  if torch.cuda.is_available():
    torch.cuda.synchronize()


def timed(fn) -> float:
  t0 = time.perf_counter()
  fn()
  return time.perf_counter() - t0


def interleaved(fns: dict, repeats: int) -> dict:
  """Median seconds of each fn, calling them in turn (a, b, c, a, b, c, ...) so that load from
  other processes on the machine falls on all of them alike."""
  times = {k: [] for k in fns}
  for _ in range(repeats):
    for k, fn in fns.items():
      times[k].append(timed(fn))
  return {k: statistics.median(v) for k, v in times.items()}, times


def peak_memory() -> dict:
  out = {"host_peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20, 2)}
  stats = jax.devices()[0].memory_stats() or {}
  if "peak_bytes_in_use" in stats:
    out["jax_peak_gib"] = round(stats["peak_bytes_in_use"] / 2 ** 30, 2)
  import torch
  if torch.cuda.is_available():
    out["torch_peak_gib"] = round(torch.cuda.max_memory_allocated() / 2 ** 30, 2)
  return out


# ------------------------------------------------------------------------------ the two sides
def build_models(shape: Shape, workdir: str):
  """Ours (random init) and the same weights in transformers."""
  import torch
  import transformers
  dtype = jnp.dtype(shape.dtype)
  opts = M.ModelOptions(dtype=dtype, param_dtype=dtype)
  params = M.unbox(jax.jit(lambda r: M.init_params(shape.cfg, opts, r))(jax.random.PRNGKey(0)))
  d = os.path.join(workdir, "hf")
  hf.save_hf(params, shape.cfg, d, dtype=shape.dtype)
  device = "cuda" if torch.cuda.is_available() else "cpu"
  tdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[shape.dtype]
  model = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(
      d, attn_implementation="sdpa", dtype=tdtype).to(device).eval()
  shutil.rmtree(d, ignore_errors=True)
  return opts, params, model, device, tdtype


def parity(shape, opts, params, model, prompts, device, tdtype) -> dict:
  """Last-prompt-token logits of ours (the sampler's prefill) against transformers' forward."""
  import torch
  b = min(2, prompts.ids.shape[0])
  a = prompts.ours(b)
  s = sampling.Sampler(shape.cfg, opts)
  images = {k: a[k] for k in ("pixel_values", "pos_hw", "frame_seg", "window_seg")}
  ours = np.asarray(s.prefill(params, a["input_ids"], a["positions"], a["attention_mask"], a["lengths"], images)[0],
                    np.float32)
  with torch.no_grad():
    theirs = model(**prompts.hf(b, shape.cfg, device, tdtype)).logits[:, -1].float().cpu().numpy()
  scale = float(np.abs(theirs).max())
  return {"prefill_logits_max_rel_diff": float(np.abs(ours - theirs).max() / scale),
          "prefill_argmax_agree": float((ours.argmax(-1) == theirs.argmax(-1)).mean())}


def hf_generate(model, kw, new_tokens, *, sample: bool, n: int = 1, pad_id: int = 0):
  import torch
  g = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=pad_id)
  if sample:
    g.update(do_sample=True, num_return_sequences=n, temperature=TEMPERATURE, top_k=TOP_K, top_p=TOP_P)
  else:
    g.update(do_sample=False, temperature=None, top_k=None, top_p=None)
  with torch.no_grad():
    out = model.generate(**kw, **g)
  _sync_torch()
  return out


def bench_generation(kind, shape, opts, params, model, prompts, device, tdtype, a, counter) -> dict:
  """kind 'scoring' (K=8 sampling) or 'greedy' (K=1, T=0)."""
  cfg = shape.cfg
  K = K_SAMPLES if kind == "scoring" else 1
  T = a.new_tokens
  pad = cfg.pad_token_id or 0
  sp = sampling.SamplingParams(max_new_tokens=T, num_samples=K, temperature=TEMPERATURE if K > 1 else 0.0,
                               top_k=TOP_K if K > 1 else 0, top_p=TOP_P, eos_ids=(), pad_id=pad)
  B = a.batch
  sampler = sampling.Sampler(cfg, opts)
  batch = prompts.ours(B)
  keys = sampling.sample_keys(0, [f"p{i}" for i in range(B)], K)
  out = {"K": K, "new_tokens": T, "ours_batch": B}

  def ours():
    tok, lengths, steps = sampler.generate(params, batch, keys, sp)
    return np.asarray(tok)

  with counter.window(out, "ours_first_call_"):
    out["ours_first_call_s"] = round(timed(ours), 2)
  tok = ours()
  assert tok.shape == (B, K, T)
  out["ours_jit_cache_sizes"] = {n: (getattr(f, "_cache_size", lambda: None)())
                                 for n, f in (("prefill", sampler.prefill), ("decode", sampler.decode))}

  # transformers at its best batch size: one timing per candidate, then the best is repeated.
  sample = K > 1
  hf_kw = {b: prompts.hf(b, cfg, device, tdtype) for b in a.hf_batches}
  run_hf = {b: (lambda b=b: hf_generate(model, hf_kw[b], T, sample=sample, n=K, pad_id=pad)) for b in a.hf_batches}
  hf_generate(model, hf_kw[a.hf_batches[0]], T, sample=sample, n=K, pad_id=pad)   # warm-up
  sweep = {}
  for th in a.torch_threads:
    set_torch_threads(th)
    for b in a.hf_batches:
      sweep[(b, th)] = b / timed(run_hf[b])
  hb, hth = max(sweep, key=sweep.get)
  set_torch_threads(hth)
  out["hf_sweep_prompts_per_s"] = {f"batch{b}_threads{th}": round(v, 3) for (b, th), v in sweep.items()}
  out["hf_batch"], out["hf_torch_threads"] = hb, hth
  fns = {"ours": ours, "hf": run_hf[hb]}
  if kind == "scoring":
    # The paper's loop (infer/test_dp.py): K separate generate calls of one sample each.
    fns["hf_loop"] = lambda: [hf_generate(model, hf_kw[hb], T, sample=True, n=1, pad_id=pad) for _ in range(K)]
  with counter.window(out, "timed_"):
    med, raw = interleaved(fns, a.repeats)
  out["raw_s"] = {k: [round(x, 4) for x in v] for k, v in raw.items()}
  out["ours_prompts_per_s"] = B / med["ours"]
  out["hf_prompts_per_s"] = hb / med["hf"]
  if "hf_loop" in med:
    out["hf_loop_prompts_per_s"] = hb / med["hf_loop"]
  for k in [k for k in out if k.endswith("_per_s") and "sweep" not in k]:
    out[k.replace("prompts", "answers")] = out[k] * K
  out["ratio_vs_hf"] = out["ours_prompts_per_s"] / out["hf_prompts_per_s"]
  if "hf_loop" in med:
    out["ratio_vs_hf_loop"] = out["ours_prompts_per_s"] / out["hf_loop_prompts_per_s"]
  if kind == "greedy":
    theirs = hf_generate(model, prompts.hf(B, cfg, device, tdtype), T, sample=False, pad_id=pad)
    theirs = theirs[:, prompts.ids.shape[1]:].cpu().numpy()
    out["greedy_token_agreement"] = float((theirs == tok[:, 0]).mean())
  out["ours_phases_s"] = phase_times(sampler, params, batch, keys, sp)
  return out


def phase_times(sampler, params, batch, keys, sp, n=3) -> dict:
  """Our prefill and decode apart (medians), for profiling."""
  images = {k: batch[k] for k in ("pixel_values", "pos_hw", "frame_seg", "window_seg")}
  args = (params, batch["input_ids"], batch["positions"], batch["attention_mask"], batch["lengths"], images)
  pre, dec = [], []
  for _ in range(n):
    t0 = time.perf_counter()
    logits, prefix, pm = sampler.prefill(*args)
    jax.block_until_ready(prefix)
    t1 = time.perf_counter()
    start = jnp.asarray(batch["lengths"]) + jnp.asarray(batch["rope_deltas"])
    jax.block_until_ready(sampler.decode(params, prefix, pm, logits, start, jnp.asarray(keys), params_=sp))
    pre.append(t1 - t0)
    dec.append(time.perf_counter() - t1)
  return {"prefill": round(statistics.median(pre), 4), "decode": round(statistics.median(dec), 4)}


# ------------------------------------------------------------------------------ SFT
class LoRALinear:
  """Built lazily (torch imported inside): nn.Linear plus dropout(x) @ A^T @ B^T * alpha/r."""

  @staticmethod
  def make(base, r, alpha, dropout):
    import torch
    from torch import nn

    class _LoRA(nn.Module):
      def __init__(self):
        super().__init__()
        self.base = base
        self.drop = nn.Dropout(dropout)
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features, device=base.weight.device, dtype=base.weight.dtype))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r, device=base.weight.device, dtype=base.weight.dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=5 ** 0.5)
        self.scale = alpha / r

      def forward(self, x):
        return self.base(x) + (self.drop(x) @ self.lora_A.t() @ self.lora_B.t()) * self.scale

    return _LoRA()


def torch_lora(model, spec: M.LoraSpec):
  """Freezes the model and wraps the language model's q/k/v/o/gate/up/down projections."""
  from torch import nn
  for p in model.parameters():
    p.requires_grad_(False)
  wrapped = 0
  for name, mod in list(model.named_modules()):
    if ".visual" in f".{name}" or "visual." in name:
      continue
    for child_name, child in list(mod.named_children()):
      if isinstance(child, nn.Linear) and child_name in M.TEXT_LORA_TARGETS:
        setattr(mod, child_name, LoRALinear.make(child, spec.rank, spec.alpha, spec.dropout))
        wrapped += 1
  return wrapped


def bench_sft(lora: bool, shape, opts, params, model_dir_model, prompts, device, tdtype, a, counter) -> dict:
  import copy
  import torch
  cfg = shape.cfg
  spec = M.LoraSpec(rank=32, alpha=64.0, dropout=0.05) if lora else None
  b = a.sft_batch
  arrays = {k: (v[:, :b] if k == "positions" else v[:b]) for k, v in prompts.arrays.items()
            if k not in ("lengths", "rope_deltas")}
  batch = {k: (v[None] if k != "positions" else v[None]) for k, v in arrays.items()}   # one micro-batch
  if not a.full_logits:
    # As the trainer does by default: the LM head runs only where a target is (same loss, same gradients).
    batch["loss_index"], batch["loss_select"] = sft.loss_positions(batch["loss_mask"], batch["valid"])
  tokens = int(arrays["attention_mask"].sum())
  out = {"batch": b, "tokens_per_step": tokens}

  # ours
  ours_opts = dataclasses.replace(opts, lora=spec, deterministic=spec is None, remat=a.remat)
  p = params
  if lora:
    from dcsft_jax.train import trainer
    p = trainer.init_lora(params, cfg, spec, seed=0)
    p = jax.tree.map(lambda x: x.astype(ours_opts.param_dtype), p)
  oc = optim.OptimConfig(learning_rate=1e-5, warmup_ratio=0.0, schedule="constant", weight_decay=0.1,
                         max_grad_norm=1.0, total_steps=1000)
  tx = optim.optimizer(oc)
  mask = optim.trainable_mask(p, lora=lora)
  state = sft.init_state(jax.tree.map(jnp.copy, p), tx, mask, jax.random.key_data(jax.random.key(0)))
  out["ours_trainable_params"] = int(sum(x.size for x in jax.tree.leaves(state.train)))
  step = sft.make_train_step(cfg, ours_opts, tx, optim.schedule(oc))
  with counter.window(out, "ours_"):
    t0 = time.perf_counter()
    compiled = step.lower(state, batch).compile()
    out["ours_compile_wall_s"] = round(time.perf_counter() - t0, 2)
  holder = {"state": state, "step": compiled}
  del state, compiled

  def ours():
    holder["state"], m = holder["step"](holder["state"], batch)
    return float(m["loss"])

  out["ours_first_loss"] = ours()
  ours()
  med, raw = {}, {}
  if a.sequential:    # 3B on one GPU: both sides' training states do not fit at once
    m1, r1 = interleaved({"ours": ours}, a.repeats)
    med.update(m1)
    raw.update(r1)
    out["ours_memory"] = peak_memory()
    holder.clear()     # frees our state before torch's is built
    gc.collect()

  # transformers + torch AdamW (fused where the build has it), same hyper-parameters. On a GPU
  # (sequential) the loaded model is trained in place, which saves a copy; its values do not
  # matter to the timings of the sections after this one.
  tm = model_dir_model if a.sequential else copy.deepcopy(model_dir_model)
  if lora:
    out["hf_lora_modules"] = torch_lora(tm, spec)
  tm.train()
  labels = np.where(arrays["loss_mask"] > 0, arrays["input_ids"], -100).astype(np.int64)
  kw = prompts.hf(b, cfg, device, tdtype)
  kw["labels"] = torch.tensor(labels, device=device)
  trainable = [(n, q) for n, q in tm.named_parameters() if q.requires_grad]
  out["hf_trainable_params"] = int(sum(q.numel() for _, q in trainable))
  no_decay = lambda n: n.endswith("bias") or "layernorm" in n     # optim.decayed's rule
  groups = [{"params": [q for n, q in trainable if not no_decay(n)], "weight_decay": 0.1},
            {"params": [q for n, q in trainable if no_decay(n)], "weight_decay": 0.0}]
  try:
    opt = torch.optim.AdamW(groups, lr=1e-5, betas=(oc.b1, oc.b2), eps=oc.eps, fused=True)
    out["hf_adamw"] = "fused"
  except (RuntimeError, TypeError):
    opt = torch.optim.AdamW(groups, lr=1e-5, betas=(oc.b1, oc.b2), eps=oc.eps)
    out["hf_adamw"] = "default"

  def theirs():
    opt.zero_grad(set_to_none=True)
    loss = tm(**kw).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_([q for _, q in trainable], 1.0)
    opt.step()
    _sync_torch()
    return float(loss.detach())

  out["hf_first_loss"] = theirs()
  theirs()
  pick = {}
  for th in a.torch_threads:
    set_torch_threads(th)
    theirs()
    pick[th] = timed(theirs)
  out["hf_torch_threads"] = min(pick, key=pick.get)
  out["hf_thread_sweep_s"] = {str(k): round(v, 3) for k, v in pick.items()}
  set_torch_threads(out["hf_torch_threads"])
  if a.sequential:
    m1, r1 = interleaved({"hf": theirs}, a.repeats)
    med.update(m1)
    raw.update(r1)
  else:
    with counter.window(out, "timed_"):
      m1, r1 = interleaved({"ours": ours, "hf": theirs}, a.repeats)
      med.update(m1)
      raw.update(r1)
  out["raw_s"] = {k: [round(x, 4) for x in v] for k, v in raw.items()}
  out["ours_step_s"], out["hf_step_s"] = med["ours"], med["hf"]
  out["ours_tokens_per_s"] = tokens / med["ours"]
  out["hf_tokens_per_s"] = tokens / med["hf"]
  out["ratio_vs_hf"] = out["ours_tokens_per_s"] / out["hf_tokens_per_s"]
  out.update(peak_memory())
  opt.zero_grad(set_to_none=True)
  tm.eval()
  return out


def bench_grpo(shape, opts, params, prompts, a, counter) -> dict:
  """Ours only (no TRL here): one GRPO iteration with LoRA = K=8 rollouts of b prompts with the
  sampler, then one policy step (sft.make_train_step with grpo.make_loss; the reference policy is
  the base model without adapters). Runs only while that API is there; otherwise says why not."""
  import inspect
  from dcsft_jax.train import grpo
  if not hasattr(grpo, "make_loss") or "count_name" not in inspect.signature(sft.make_train_step).parameters:
    return {"skipped": "dcsft_jax.train.grpo has no make_loss usable by sft.make_train_step yet"}
  from dcsft_jax.train import trainer
  cfg, K, T, b = shape.cfg, K_SAMPLES, a.new_tokens, a.sft_batch
  spec = M.LoraSpec(rank=32, alpha=64.0, dropout=0.05)
  ours_opts = dataclasses.replace(opts, lora=spec, deterministic=False)
  p = jax.tree.map(lambda x: x.astype(ours_opts.param_dtype), trainer.init_lora(params, cfg, spec, seed=0))
  oc = optim.OptimConfig(learning_rate=1e-5, warmup_ratio=0.0, schedule="constant", total_steps=1000)
  tx = optim.optimizer(oc)
  state = sft.init_state(jax.tree.map(jnp.copy, p), tx, optim.trainable_mask(p, lora=True),
                         jax.random.key_data(jax.random.key(0)))
  step = sft.make_train_step(cfg, ours_opts, tx, optim.schedule(oc), loss=grpo.make_loss(),
                             count_name="completions")
  sampler = sampling.Sampler(cfg, dataclasses.replace(ours_opts, deterministic=True))
  sp = sampling.SamplingParams(max_new_tokens=T, num_samples=K, temperature=TEMPERATURE, top_k=TOP_K,
                               top_p=TOP_P, eos_ids=(), pad_id=cfg.pad_token_id or 0)
  batch = prompts.ours(b)
  keys = sampling.sample_keys(0, [f"p{i}" for i in range(b)], K)
  rng = np.random.default_rng(0)
  holder = {"state": state}
  out = {"batch": b, "G": K, "new_tokens": T}

  def one():
    tok, _, _ = sampler.generate(holder["state"].params, batch, keys, sp)
    mb = dict(batch, completions=np.asarray(tok), completion_mask=np.ones((b, K, T), np.int32),
              rewards=rng.integers(0, 2, (b, K)).astype(np.float32))
    mb = {k: v[None] for k, v in mb.items()}
    holder["state"], m = step(holder["state"], mb)
    return float(m["loss"])

  try:
    with counter.window(out, "ours_first_call_"):
      out["ours_first_call_s"] = round(timed(one), 2)
    one()
    with counter.window(out, "timed_"):
      med, raw = interleaved({"ours": one}, a.repeats)
  except Exception as e:   # the API is being written while this runs: report, do not crash the run
    return {"skipped": f"GRPO step failed: {type(e).__name__}: {str(e)[:300]}"}
  out["raw_s"] = {k: [round(x, 4) for x in v] for k, v in raw.items()}
  out["ours_step_s"] = med["ours"]
  out["ours_prompts_per_s"] = b / med["ours"]
  out["hf"] = "not measured: no TRL/GRPO trainer on the torch side in this environment"
  return out


# ------------------------------------------------------------------------------ reporting
def versions() -> dict:
  import flax
  import jaxlib
  import torch
  import transformers
  return {"python": platform.python_version(), "jax": jax.__version__, "jaxlib": jaxlib.__version__,
          "flax": flax.__version__, "torch": torch.__version__, "transformers": transformers.__version__}


def device_name() -> dict:
  import torch
  d = {"jax_device": jax.devices()[0].device_kind, "jax_backend": jax.default_backend(),
       "torch_device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
       "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()}
  return d


def flop_estimate(shape: Shape) -> dict:
  """Analytic FLOPs (2 x multiply-adds of the matmuls; attention scores included)."""
  t, v = shape.cfg.text, shape.cfg.vision
  P = int(np.prod(shape.grid))
  n_img = P // v.merge_unit
  L = shape.pre_tokens + n_img + 2 + shape.question_tokens
  vis_block = 4 * v.hidden_size ** 2 + 3 * v.hidden_size * v.intermediate_size
  vision = 2 * P * (v.patch_dim * v.hidden_size + v.depth * vis_block)
  # Attention: P x P in the full-attention blocks; the windowed ones by window blocks where that is less
  # work (models/qwen2_5_vl/rope.py), else the masked P x P.
  n_full = len(v.fullatt_block_indexes)
  window_keys = (rope.window_count(P, v) * rope.window_block(v) ** 2 / P if rope.use_window_blocks(P, v) else P)
  vision += 2 * 2 * P * v.hidden_size * (n_full * P + (v.depth - n_full) * window_keys)
  merged = v.merge_unit * v.hidden_size
  vision += 2 * n_img * (merged * merged + merged * v.out_hidden_size)
  layer = t.hidden_size * t.head_dim * (2 * t.num_attention_heads + 2 * t.num_key_value_heads) \
      + 3 * t.hidden_size * t.intermediate_size
  lm = 2 * L * t.num_hidden_layers * layer + 2 * t.num_hidden_layers * 2 * L * L * t.hidden_size // 2
  head = 2 * t.hidden_size * t.vocab_size
  step = 2 * t.num_hidden_layers * layer + head + 2 * t.num_hidden_layers * 2 * L * t.hidden_size
  return {"prompt_tokens": L, "vision_gflop": vision / 1e9, "lm_prefill_gflop": (lm + head) / 1e9,
          "decode_step_gflop_per_sample": step / 1e9}


def write_md(path, res, command):
  lines = [f"\n### {res['date']} — {res['device']['jax_device']} ({res['shape']} shape)\n",
           f"- command: `{command}`",
           "- versions: " + ", ".join(f"{k} {v}" for k, v in res["versions"].items()),
           f"- device: jax {res['device']['jax_backend']} `{res['device']['jax_device']}`, torch "
           f"`{res['device']['torch_device']}`, {res['device']['cpu_count']} CPU cores, torch default threads "
           f"{res['device']['torch_threads']}, XLA_FLAGS `{os.environ.get('XLA_FLAGS', '')}`",
           f"- parity (prefill logits, same weights and inputs): max rel diff "
           f"{res.get('parity', {}).get('prefill_logits_max_rel_diff', float('nan')):.2e}",
           "", "| measurement | ours | transformers/PyTorch | ratio | target | met |", "|---|---|---|---|---|---|"]
  S = res["sections"]
  if "scoring" in S:
    s = S["scoring"]
    lines.append(f"| scoring K=8, {s['new_tokens']} new tokens (prompts/s) | {s['ours_prompts_per_s']:.2f} "
                 f"(batch {s['ours_batch']}) | {s['hf_prompts_per_s']:.2f} (num_return_sequences, batch "
                 f"{s['hf_batch']}, {s['hf_torch_threads']} thread(s)) | {s['ratio_vs_hf']:.2f}x | >= 5x | {'yes' if s['ratio_vs_hf'] >= 5 else 'no'} |")
    lines.append(f"| scoring, the paper's loop (prompts/s) | {s['ours_prompts_per_s']:.2f} | "
                 f"{s['hf_loop_prompts_per_s']:.2f} (8 generate calls, batch {s['hf_batch']}) | "
                 f"{s['ratio_vs_hf_loop']:.2f}x | | |")
    lines.append(f"| scoring (answers/s) | {s['ours_answers_per_s']:.1f} | {s['hf_answers_per_s']:.1f} | | | |")
  if "greedy" in S:
    s = S["greedy"]
    lines.append(f"| greedy eval K=1 (prompts/s) | {s['ours_prompts_per_s']:.2f} (batch {s['ours_batch']}) | "
                 f"{s['hf_prompts_per_s']:.2f} (batch {s['hf_batch']}, {s['hf_torch_threads']} thread(s)) | {s['ratio_vs_hf']:.2f}x | >= 1.5x | "
                 f"{'yes' if s['ratio_vs_hf'] >= 1.5 else 'no'} |")
  for k, label in (("sft", "SFT full, AdamW"), ("lora", "SFT LoRA r32 a64")):
    if k in S:
      s = S[k]
      lines.append(f"| {label} (tokens/s; batch {s['batch']} x {s['tokens_per_step'] // s['batch']}) | "
                   f"{s['ours_tokens_per_s']:.0f} | {s['hf_tokens_per_s']:.0f} ({s['hf_adamw']} AdamW, {s['hf_torch_threads']} "
                   f"thread(s)) | {s['ratio_vs_hf']:.2f}x | "
                   f">= 1.0x | {'yes' if s['ratio_vs_hf'] >= 1.0 else 'no'} |")
  lines.append("")
  comp = []
  for k, s in S.items():
    if k == "grpo" and "ours_step_s" in s:
      comp.append(f"grpo (ours only, LoRA, {s['batch']} prompts x G={s['G']} x {s['new_tokens']} tokens: rollout + "
                  f"policy step): {s['ours_step_s']:.3f} s an iteration, first call {s['ours_first_call_s']} s "
                  f"({s['ours_first_call_compiles']} compiles), {s.get('timed_compiles', '?')} compiles while timed")
    elif "ours_phases_s" in s:
      comp.append(f"{k}: first call {s['ours_first_call_s']} s ({s['ours_first_call_compiles']} compiles, "
                  f"{s['ours_first_call_compile_s']} s in XLA), {s.get('timed_compiles', '?')} compiles while timed; "
                  f"prefill {s['ours_phases_s']['prefill']} s + decode {s['ours_phases_s']['decode']} s a call")
    elif "ours_compile_wall_s" in s:
      comp.append(f"{k}: compile {s['ours_compile_wall_s']} s ({s['ours_compiles']} compiles), "
                  f"{s.get('timed_compiles', '?')} compiles while timed; step {s['ours_step_s']:.3f} s vs "
                  f"{s['hf_step_s']:.3f} s")
    elif "skipped" in s:
      comp.append(f"{k}: skipped — {s['skipped']}")
  lines += [f"- {c}" for c in comp]
  mem = res.get("memory", {})
  lines.append("- peak memory: " + ", ".join(f"{k} {v}" for k, v in mem.items()))
  lines.append(f"- wall time of the whole run: {res['wall_s']:.0f} s")
  if not os.path.exists(path):
    lines.insert(0, "# Benchmarks\n")
  with open(path, "a") as f:
    f.write("\n".join(lines) + "\n")


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--shape", choices=("small", "3b"), default="small")
  ap.add_argument("--sections", default="scoring,greedy,sft,lora,grpo")
  ap.add_argument("--repeats", type=int, default=3)
  ap.add_argument("--new_tokens", type=int, default=4)
  ap.add_argument("--batch", type=int, default=None, help="our prompts per generate call")
  ap.add_argument("--hf_batches", default=None, help="comma list; HF's best is kept")
  ap.add_argument("--sft_batch", type=int, default=None)
  ap.add_argument("--answer_tokens", type=int, default=6)
  ap.add_argument("--vocab", type=int, default=8192, help="small shape's vocabulary")
  ap.add_argument("--threads", type=int, default=None,
                  help="1: both sides single-threaded (XLA_FLAGS set before jax starts; torch 1 thread)")
  ap.add_argument("--torch_threads", default=None,
                  help="comma list of torch intra-op thread counts tried for HF (its best is kept); "
                       "default 1 and all cores on a CPU, unchanged on a GPU")
  ap.add_argument("--full_logits", action="store_true",
                  help="ours: LM head at every position (before the target-positions-only loss)")
  ap.add_argument("--remat", action="store_true", help="ours: recompute each layer in the backward pass (SFT)")
  ap.add_argument("--sequential", action="store_true", help="time SFT sides one after the other (3B)")
  ap.add_argument("--md", default=os.path.join(ROOT, "BENCHMARKS.md"))
  ap.add_argument("--no_md", action="store_true")
  ap.add_argument("--json", default=None, help="also write the JSON summary here")
  a = ap.parse_args()
  big = a.shape == "3b"
  shape = shape_3b() if big else small_shape(a.vocab)
  a.batch = a.batch or (32 if big else 4)
  a.hf_batches = [int(x) for x in (a.hf_batches or ("8,16,32" if big else "1,2,4")).split(",")]
  a.sft_batch = a.sft_batch or (8 if big else 4)
  a.sequential = a.sequential or big
  import torch
  default_threads = torch.get_num_threads()
  if a.threads is not None and a.threads != 1:
    raise SystemExit("--threads takes only 1 (the default uses every core)")
  if a.threads == 1:
    a.torch_threads = "1"
  if a.torch_threads:
    a.torch_threads = [int(x) for x in a.torch_threads.split(",")]
  else:
    a.torch_threads = [default_threads] if torch.cuda.is_available() else sorted({1, default_threads})
  sections = [s for s in a.sections.split(",") if s]
  command = "python benchmarks/bench.py " + " ".join(sys.argv[1:])

  import torch
  t_start = time.perf_counter()
  counter = CompileCounter()
  res = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "shape": shape.name,
         "command": command, "versions": versions(), "device": device_name(), "flops": flop_estimate(shape),
         "config": {"text": dataclasses.asdict(shape.cfg.text), "vision": dataclasses.asdict(shape.cfg.vision),
                    "grid": shape.grid, "dtype": shape.dtype}, "sections": {}}
  with tempfile.TemporaryDirectory() as work:
    opts, params, model, device, tdtype = build_models(shape, work)
  res["params"] = M.count_params(params)
  n = max([a.batch, a.sft_batch] + a.hf_batches)
  prompts = make_prompts(shape, n)
  res["parity"] = parity(shape, opts, params, model, prompts, device, tdtype)
  for sec in sections:
    t0 = time.perf_counter()
    if sec in ("scoring", "greedy"):
      r = bench_generation(sec, shape, opts, params, model, prompts, device, tdtype, a, counter)
    elif sec in ("sft", "lora"):
      sft_prompts = make_prompts(shape, a.sft_batch, answer_tokens=a.answer_tokens, seed=1)
      r = bench_sft(sec == "lora", shape, opts, params, model, sft_prompts, device, tdtype, a, counter)
    elif sec == "grpo":
      r = bench_grpo(shape, opts, params, prompts, a, counter)
    else:
      raise SystemExit(f"unknown section {sec!r}")
    r["section_wall_s"] = round(time.perf_counter() - t0, 1)
    res["sections"][sec] = r
    print(f"[bench] {sec}: " + json.dumps({k: v for k, v in r.items() if "ratio" in k or k.endswith("_per_s")}),
          file=sys.stderr, flush=True)
    if device == "cuda":
      torch.cuda.empty_cache()
  res["memory"] = peak_memory()
  res["total_compiles"] = counter.count
  res["wall_s"] = time.perf_counter() - t_start
  text = json.dumps(res, indent=2, default=float)
  if a.json:
    with open(a.json, "w") as f:
      f.write(text)
  print(text, flush=True)
  if not a.no_md:
    write_md(a.md, res, command)


if __name__ == "__main__":
  main()
