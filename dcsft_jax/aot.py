"""Will it fit? Compiles every jitted program a config's stages would run, for an accelerator this
host may not have, and checks each against the device's memory.

  python -m dcsft_jax.aot --config=configs/bench/imagenet_synthetic_3b.py --target=h100x1 [--json=out.json]
      [--max_batch [--max_batch_limit=N]] [--programs=cold_start,score] [--records=N] [--patches=P --tokens=L]

Targets (dcsft_jax/targets.py): h100x1, h100x8, h200x1, h200x8, a100-80x8 (XLA:GPU through the CUDA
plugin) and v4-8, v5e-4, v5e-8, v5p-8, v6e-8 (XLA:TPU through libtpu); `pip install -r
requirements-aot.txt` brings both compilers. On a host with the target's accelerators attached, their
real devices are used.

Programs, at the config's shapes (batch, accumulation, K, bucket sizes, new tokens), for the stages in
config.stages: the cold-start step (full SFT), the LoRA SFT step (finetune), GRPO's rollout prefill and
decode at G and its train step (completion log-probs, clipped loss, KL), scoring's prefill and decode at
K, and greedy evaluation's. The batch shapes are the largest bucket the config's data needs (image
headers read, nothing decoded); where a source is not on this machine they come from data.max_pixels
(or --patches/--tokens).

For each program: the per-device bytes (arguments, outputs, temporaries, aliased, total) beside the
device's memory, the compile seconds, the attention kernel in the compiled program, and whether it fits;
with --max_batch, the largest per-device micro-batch that fits (up to --max_batch_limit). The exit
status is 1 when a program fails to compile or does not fit, and the message names it.
"""
from __future__ import annotations

import os
import re
import sys

from dcsft_jax import targets as targets_lib

if __name__ == "__main__":
  # Before JAX starts a backend: compile-only devices need JAX on the CPU (targets.prepare_environment).
  _t = next((a.split("=", 1)[1] for a in sys.argv if a.startswith("--target=")), "")
  _attached = next((a.split("=", 1)[1] for a in sys.argv if a.startswith("--attached=")), "auto")
  if _t in targets_lib.TARGETS:
    _p = targets_lib.TARGETS[_t].platform
    targets_lib.prepare_environment(_attached == "yes" or (_attached == "auto" and targets_lib.hardware_present(_p)))

# pylint: disable=wrong-import-position
import contextlib  # noqa: E402
import copy  # noqa: E402
import dataclasses  # noqa: E402
import functools  # noqa: E402
import time  # noqa: E402
from typing import Any, Callable  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from dcsft_jax import mesh as mesh_lib  # noqa: E402
from dcsft_jax import run_config, sampling  # noqa: E402
from dcsft_jax.data import batching, sources  # noqa: E402
from dcsft_jax.models import params as params_lib  # noqa: E402
from dcsft_jax.models import registry  # noqa: E402

GiB = 1 << 30


# ------------------------------------------------------------------------------------------ shapes
@dataclasses.dataclass(frozen=True)
class Shape:
  bucket: batching.Bucket
  answer_tokens: int            # target tokens per row (the SFT loss gathers logits at this many)
  source: str                   # where the shape comes from: the data, or the config's max_pixels


def model_and_processor(config):
  """The config's model shapes, and a processor to measure its data with (None without a tokenizer)."""
  from dcsft_jax.data.processor import Processor
  m, d = config.model, config.data
  kw = dict(min_pixels=d.min_pixels or None, max_pixels=d.max_pixels or None)
  if m.hf_path and os.path.isfile(os.path.join(m.hf_path, "config.json")):
    cfg = registry.from_pretrained(m.hf_path)
    return cfg, Processor.from_pretrained(m.hf_path, cfg=cfg, **kw)
  if m.hf_path:
    if not m.preset or registry.is_tiny(m.preset):
      raise ValueError(f"config.model.hf_path={m.hf_path!r} is not on this machine: set config.model.preset "
                       f"(one of {', '.join(registry.preset_names())}) so the shapes are known")
    return registry.preset(m.preset), None
  cfg = registry.run_config(m.preset)
  return cfg, Processor.tiny(cfg=cfg, **kw)


def plan_shape(config, specs: list[str], processor, cfg, *, with_answers: bool, records: int = 0,
               patches: int = 0, tokens: int = 0, max_pixels: int = 0) -> Shape:
  """The largest bucket the stage's data needs (what sets its peak memory)."""
  mu = cfg.vision.merge_unit
  if patches and tokens:
    return Shape(batching.Bucket(patches, tokens), 16, "--patches/--tokens")
  found, answers = [], 1
  d = config.data
  for text in specs:
    spec = sources.parse(text)
    if processor is None or sources.check(spec, tfds_dir=d.tfds_dir) is not None:
      found = None
      break
    from dcsft_jax.stages import common
    recs = common.load_records(config, spec, limit=records or None)
    found += list(batching.auto_buckets(recs, processor, with_answers=with_answers, max_buckets=d.max_buckets,
                                        skip_bad_records=True))
    if with_answers:
      for r in recs[:256]:
        with_a = processor.measure(None, r.prompt, r.answer)[1]
        answers = max(answers, with_a - processor.measure(None, r.prompt, None)[1] + 1)
  if found:
    b = max(found, key=lambda x: (x.patches, x.length))
    length = max(x.length for x in found)
    return Shape(batching.Bucket(b.patches, length), answers, "data")
  max_pixels = max_pixels or d.max_pixels or (processor.image_settings.max_pixels if processor is not None else 0)
  if not max_pixels:
    raise ValueError("no data to plan shapes from and no data.max_pixels: give --patches and --tokens")
  merged = max_pixels // registry.of(cfg).pixels_per_token(cfg)
  text = 64 if not with_answers else 96
  return Shape(batching.Bucket(merged * mu, -(-(merged + text) // 8) * 8), 32 if with_answers else 1,
               f"max_pixels {max_pixels} + {text} text tokens")


def _empty_batch(bucket: batching.Bucket, rows: int, cfg) -> dict[str, jax.ShapeDtypeStruct]:
  """The shapes and dtypes of batching.empty_arrays(bucket, rows, cfg), without allocating them: the
  largest-batch search probes thousands of rows per device, and their pixel arrays alone (rows x
  patches x 1176 or 1536 fp32) would exhaust the compiling host's memory."""
  one = batching.empty_arrays(bucket, 1, cfg)
  return {k: jax.ShapeDtypeStruct((v.shape[0], rows) + v.shape[2:] if k == "positions" else (rows,) + v.shape[1:],
                                  v.dtype) for k, v in one.items()}


def _abstract_batch(arrays: dict, mesh, micro_axis: bool) -> dict:
  """Host arrays or unsharded ShapeDtypeStructs -> ShapeDtypeStructs sharded as the trainers and
  samplers shard real batches."""
  out = {}
  for k, v in arrays.items():
    dim = (1 if k == "positions" else 0) + (1 if micro_axis else 0)
    out[k] = jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=mesh_lib.batch_sharding(mesh, v.ndim, dim))
  return out


# ------------------------------------------------------------------------------------------ programs
@dataclasses.dataclass
class Program:
  name: str
  stage: str
  rows: int                                  # global rows of its batch (micro-batch, prompts; 0: none)
  shape: Shape | None                        # None: a program without a batch (parameter init)
  build: Callable[[int], tuple[Any, tuple]]  # global rows -> (jitted function, abstract arguments)
  note: str = ""


# A program that fits with less than this share of the budget to spare is marked tight. Near the limit
# XLA's plan is not monotone in the batch (BENCHMARKS.md: the 7B LoRA step on 8 H100s needs 57.7 GiB at
# 320 rows and 64.1 at 321), and a real run adds what compile-only accounting does not see (the
# allocator's fragmentation, a profiler's or a checkpoint's buffers): a few percent either way.
TIGHT_MARGIN = 0.05


@dataclasses.dataclass
class Result:
  name: str
  stage: str
  compiled: bool
  fits: bool
  attention: str
  bytes: dict
  device_bytes: int
  budget_bytes: int
  seconds: float
  rows: int
  rows_per_device: int
  shape: str
  error: str = ""
  note: str = ""
  max_rows_per_device: int | None = None
  max_rows_at_least: bool = False       # the search stopped at its cap: a bigger batch may fit too

  @property
  def headroom(self) -> float | None:
    """The share of the budget left over (negative: over it); None when not compiled."""
    total = self.bytes.get("total") if self.compiled else None
    return None if total is None or not self.budget_bytes else 1.0 - total / self.budget_bytes

  @property
  def tight(self) -> bool:
    """Fits, with less than TIGHT_MARGIN of the budget to spare."""
    return self.fits and self.headroom is not None and self.headroom < TIGHT_MARGIN

  def to_json(self) -> dict:
    return {**dataclasses.asdict(self), "headroom": self.headroom, "tight": self.tight}


def _stack(arrays: dict, accum: int) -> dict[str, jax.ShapeDtypeStruct]:
  """The accumulation axis in front, as the trainers stack micro-batches (shapes only)."""
  return {k: jax.ShapeDtypeStruct((accum,) + tuple(v.shape), v.dtype) for k, v in arrays.items()}


def init_program(name: str, stage: str, cfg, opts, mesh, keep=None, note: str = "") -> Program:
  """A parameter-init program the stages run (models' init_program): the init stage's random weights,
  or a LoRA run's fresh adapters (keep=is_adapter), written straight into their shardings on the
  target's mesh. It takes only an RNG key, so a sharding the mesh cannot take fails here."""
  def build(rows: int):
    return registry.of(cfg).init_program(cfg, opts, mesh, keep), (params_lib.abstract_key(),)
  return Program(name, stage, 0, None, build, note)


def adapter_init_program(name: str, section, cfg, opts, mesh) -> list[Program]:
  """A LoRA run's adapter init (trainer.init_lora), or nothing for full fine-tuning."""
  from dcsft_jax.stages import training
  from dcsft_jax.train import trainer
  lora = training.lora_spec(section)
  if lora is None:
    return []
  return [init_program(f"{name} adapters init", name, cfg, trainer.adapter_options(opts, lora), mesh,
                       keep=params_lib.is_adapter, note=f"LoRA r{lora.rank} adapters, into their shardings")]


def sft_program(config, name: str, section, cfg, opts, mesh, shape: Shape) -> Program:
  from dcsft_jax.stages import training
  from dcsft_jax.train import sft, trainer
  s = section
  tc = training.train_config(config, s, max(int(s.steps), 1), config.seed)
  spec = trainer.step_spec(cfg, opts, tc, mesh)

  def build(rows: int):
    host = _stack(_empty_batch(shape.bucket, rows, cfg), s.accum)
    # The loss positions' shape depends on the answers' length: computed from a real (small) mask.
    loss_mask = np.zeros(host["loss_mask"].shape, np.int32)
    loss_mask[..., :min(shape.answer_tokens, shape.bucket.length)] = 1
    host["loss_index"], host["loss_select"] = sft.loss_positions(loss_mask, np.ones(host["valid"].shape, bool))
    return spec.step_fn, (spec.layout, _abstract_batch(host, mesh, micro_axis=True))

  kind = "LoRA" if tc.lora is not None else "full"
  return Program(f"{name} step", name, s.batch_size // s.accum, shape, build,
                 f"{kind} SFT, accum {s.accum}")


def grpo_programs(config, cfg, opts, mesh, shape: Shape, attached: bool = False) -> list[Program]:
  from dcsft_jax.stages import training
  from dcsft_jax.train import grpo, sft, trainer
  g = config.grpo
  tc = training.train_config(config, g, max(int(g.steps), 1), config.seed)
  # One step program per RL baseline of grpo.algorithms (the rollout programs are shared).
  algos = {a: run_config.rl_algorithm(config, a) for a in run_config.rl_algorithms(config)}
  specs = {a: trainer.step_spec(cfg, opts, tc, mesh, loss=grpo.make_loss(algo, temperature=float(g.temperature)),
                                count_name="completions") for a, algo in algos.items()}
  spec = next(iter(specs.values()))
  G, T = g.num_generations, g.max_new_tokens
  sp = sampling.SamplingParams(max_new_tokens=T, num_samples=G, temperature=g.temperature, top_k=g.top_k,
                               top_p=g.top_p, eos_ids=(cfg.eos_token_id or 0,),
                               repetition_penalty=_penalty(config, g.repetition_penalty))
  params = sft.TrainState(None, spec.layout.train, spec.layout.frozen, None, None).params
  micro = g.batch_size // g.accum
  ref = None
  if tc.lora is None:        # full fine-tuning keeps a frozen reference copy (trainer: tc.frozen_dtype)
    dt = tc.frozen_dtype
    ref = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, dt or x.dtype, sharding=x.sharding), spec.params)

  def build_step(algo: str, rows: int):
    # The loss tokens: T sampled + the <|im_end|> a truncated completion gets (grpo.loss_tokens).
    rollouts = {"completions": jax.ShapeDtypeStruct((rows, G, T + 1), np.int32),
                "completion_mask": jax.ShapeDtypeStruct((rows, G, T + 1), np.int32),
                "rewards": jax.ShapeDtypeStruct((rows, G), np.float32),
                "truncated": jax.ShapeDtypeStruct((rows, G), np.float32)}
    if algos[algo].dynamic_sampling:
      rollouts["keep"] = jax.ShapeDtypeStruct((rows,), np.float32)
    if g.num_iterations > 1:
      rollouts["old_logprobs"] = jax.ShapeDtypeStruct((rows, G, T + 1), np.float32)
    host = _stack({**_empty_batch(shape.bucket, rows, cfg), **rollouts}, g.accum)
    s = specs[algo]
    args = (s.layout, _abstract_batch(host, mesh, micro_axis=True)) + ((ref,) if ref is not None else ())
    return s.step_fn, args

  prefill, decode = sampler_programs("grpo rollout", "grpo", cfg, spec.opts, params, shape, sp, mesh, micro, attached)
  steps = [Program(f"{a} step", "grpo", micro, shape, functools.partial(build_step, a),
                   f"{'LoRA' if tc.lora else 'full'}, G {G} x {T} tokens, accum {g.accum}") for a in algos]
  return [prefill, decode, *steps]


def sampler_programs(name: str, stage: str, cfg, opts, params, shape: Shape, sp: sampling.SamplingParams, mesh,
                     rows: int, attached: bool = False) -> list[Program]:
  sampler = sampling.shared_sampler(cfg, opts)
  compiled_prefill: dict[int, Any] = {}

  def prefill_args(r: int):
    a = _abstract_batch(_empty_batch(shape.bucket, r, cfg), mesh, micro_axis=False)
    images = registry.of(cfg).images(a)
    return a, (params, a["input_ids"], a["positions"], a["attention_mask"], a["lengths"], images)

  def build_prefill(r: int):
    return sampler.prefill, prefill_args(r)[1]

  def build_decode(r: int):
    a, args = prefill_args(r)
    if r not in compiled_prefill:
      # The decode reads the prefill's outputs with the shardings XLA gave them, so building it needs
      # that compile. Where the prefill is refused (XLA:TPU, out of HBM) the decode cannot be built:
      # say whose error it is rather than pass the prefill's off as the decode's own.
      try:
        compiled_prefill[r] = compile_lowered(sampler.prefill.lower(*args), attached)[0]
      except Exception as e:  # pylint: disable=broad-except
        raise RuntimeError(f"the prefill whose outputs this decode reads does not compile at {r} rows: "
                           f"{type(e).__name__}: {e}") from e
    c = compiled_prefill[r]
    outs = jax.tree.map(lambda i, s: jax.ShapeDtypeStruct(i.shape, i.dtype, sharding=s), c.out_info,
                        c.output_shardings)
    logits, prefix, prefix_mask = outs
    keys = jax.ShapeDtypeStruct((r, sp.num_samples, 2), jnp.uint32, sharding=mesh_lib.batch_sharding(mesh, 3))
    prompt_ids = a["input_ids"] if sp.repetition_penalty != 1.0 else None
    return _Bound(sampler.decode, dict(params_=sp)), (params, prefix, prefix_mask, logits, a["lengths"], keys,
                                                      prompt_ids)

  what = "greedy" if sp.greedy else f"K {sp.num_samples}, T {sp.temperature}, top-k {sp.top_k}"
  if sp.repetition_penalty != 1.0:
    what += f", repetition penalty {sp.repetition_penalty}"
  return [Program(f"{name} prefill", stage, rows, shape, build_prefill, "vision tower + prompt, once per prompt"),
          Program(f"{name} decode", stage, rows, shape, build_decode, f"{what}, {sp.max_new_tokens} new tokens")]


@dataclasses.dataclass
class _Bound:
  """A jitted function with static keyword arguments, lowered like the plain ones."""
  fn: Any
  kwargs: dict

  def lower(self, *args):
    return self.fn.lower(*args, **self.kwargs)


def programs(config, mesh, *, records: int = 0, patches: int = 0, tokens: int = 0, only: set[str] | None = None,
             attached: bool = False) -> tuple[list[Program], dict]:
  """Every program the config's stages run, on `mesh`, with what it was planned from."""
  import dataclasses as dc
  from dcsft_jax.stages import training
  names = run_config.validate(config, _stage_names(), check_files=False)
  cfg, processor = model_and_processor(config)
  opts = dc.replace(run_config.model_options(config), platform=mesh_lib.platform(mesh))
  def shape_of(specs, answers, max_pixels=0):
    p = processor
    if max_pixels and p is not None:       # a stage's own image cap (scoring, evaluation)
      p = copy.copy(p)
      p.image_settings = dc.replace(p.image_settings, max_pixels=int(max_pixels))
    return plan_shape(config, specs, p, cfg, with_answers=answers, records=records, patches=patches, tokens=tokens,
                      max_pixels=max_pixels)
  d = config.data
  train = [d.train]
  base_params = mesh_lib.abstract_params(registry.of(cfg).init_params(cfg, opts, abstract=True), mesh)
  sopts = run_config.sampling_options(config, opts)      # what scoring and evaluation load
  sparams = mesh_lib.abstract_params(registry.of(cfg).init_params(cfg, sopts, abstract=True), mesh)
  out: list[Program] = []
  want = lambda stage: stage in names and (not only or stage in only)
  if want("init") and not config.model.hf_path:
    # (a checkpoint is streamed into its shardings instead: hf.load_hf, no program of its own)
    out.append(init_program("init params", "init", cfg, opts, mesh, note="random weights, into their shardings"))
  if want("cold_start"):
    out.append(sft_program(config, "cold_start", config.cold_start, cfg, opts, mesh,
                           shape_of([config.cold_start.data], True)))
  if want("score"):
    s = config.score
    sp = sampling.SamplingParams(max_new_tokens=s.max_new_tokens, num_samples=s.num_samples, temperature=s.temperature,
                                 top_k=s.top_k, top_p=s.top_p, eos_ids=(cfg.eos_token_id or 0,),
                                 repetition_penalty=_penalty(config, s.repetition_penalty))
    out += sampler_programs("score", "score", cfg, sopts, sparams, shape_of(train, False, s.max_pixels), sp, mesh,
                            s.batch_size, attached)
  if want("finetune"):
    out += adapter_init_program("finetune", config.finetune, cfg, opts, mesh)
    out.append(sft_program(config, "finetune", config.finetune, cfg, opts, mesh, shape_of(train, True)))
  if want("grpo"):
    out += adapter_init_program("grpo", config.grpo, cfg, opts, mesh)
    out += grpo_programs(config, cfg, opts, mesh, shape_of(train, False), attached)
  if want("evaluate"):
    e = config.evaluate
    lora = training.lora_spec(config.finetune) if "finetune" in names else None
    eopts = dc.replace(sopts, lora=lora)
    eparams = mesh_lib.abstract_params(registry.of(cfg).init_params(cfg, eopts, abstract=True), mesh)
    sp = sampling.SamplingParams(max_new_tokens=e.max_new_tokens, num_samples=1, temperature=0.0,
                                 eos_ids=(cfg.eos_token_id or 0,),
                                 repetition_penalty=_penalty(config, e.repetition_penalty))
    specs = [str(v) for v in sources.parse_sets(d.eval).values()]
    out += sampler_programs("evaluate", "evaluate", cfg, eopts, eparams, shape_of(specs, False, e.max_pixels), sp,
                            mesh, e.batch_size, attached)
  info = {"model": {"parameters": params_lib.count_params(base_params), "dtype": config.model.dtype,
                    "param_dtype": config.model.param_dtype,
                    "frozen_in_compute_dtype": bool(config.model.frozen_in_compute_dtype),
                    "remat": bool(config.model.remat)},
          "mesh": dict(mesh.shape)}
  return out, info


def _penalty(config, value: float) -> float:
  """A stage's repetition penalty: its own, or (0) the model's generation_config.json, or where the
  checkpoint is not on this machine Qwen2.5-VL-Instruct's 1.05 (a presence mask more in decode)."""
  if value:
    return float(value)
  gen = sampling.generation_config(config.model.hf_path or None)
  return float(gen.get("repetition_penalty") or (1.05 if config.model.hf_path or config.model.preset else 1.0))


def _stage_names():
  from dcsft_jax import stages
  return [s.name for s in stages.STAGES]


# ------------------------------------------------------------------------------------------ compiling
def _attention(compiled_text: str | None) -> str:
  """The attention kernel in a compiled program: cuDNN's fused attention shows as custom calls
  (`__cudnn$fmha...`, one per attention in a scanned layer body, forward and backward), Splash on a
  TPU as Mosaic kernels (`tpu_custom_call`, the only Pallas kernels the programs hold); anything else
  is XLA's own attention (models/attention.py's einsum path)."""
  n = compiled_text.count("__cudnn$fmha") if compiled_text else 0
  if n:
    return f"cudnn ({n} fmha calls)"
  n = len(re.findall(r'custom_call_target="tpu_custom_call"', compiled_text)) if compiled_text else 0
  return f"splash ({n} kernel calls)" if n else "xla"


def _memory(compiled) -> dict:
  m = compiled.memory_analysis()
  get = lambda k: int(getattr(m, k, 0) or 0)
  b = {"arguments": get("argument_size_in_bytes"), "outputs": get("output_size_in_bytes"),
       "temporaries": get("temp_size_in_bytes"), "aliased": get("alias_size_in_bytes"),
       "code": get("generated_code_size_in_bytes")}
  # Donated inputs that become outputs are counted once.
  b["total"] = b["arguments"] + b["outputs"] - b["aliased"] + b["temporaries"] + b["code"]
  return b


TRITON_NOTE = "cuBLAS GEMMs (compile-only XLA:GPU cannot autotune a Triton tiling for a small matrix)"


def compile_lowered(lowered, attached: bool):
  """-> (compiled, note). XLA:GPU without a device cannot autotune its Triton GEMM tilings; on the
  hardware the autotuner drops a tiling that does not compile for a small matrix (the tiny model's)
  and takes cuBLAS, which is what the retry asks for. Never through JAX's persistent compilation
  cache: an executable for a device this process has no client for cannot be read back (JAX warns
  on every such entry), and a process that also runs on its own devices would share the cache with it."""
  with _without_persistent_cache():
    try:
      return lowered.compile(), ""
    except Exception as e:  # pylint: disable=broad-except
      if attached or "output tile sizes" not in str(e):
        raise
    return lowered.compile(compiler_options={"xla_gpu_enable_triton_gemm": False}), TRITON_NOTE


@contextlib.contextmanager
def _without_persistent_cache():
  """JAX decides once per process whether its cache is used; reset_cache makes it decide again."""
  from jax.experimental.compilation_cache import compilation_cache
  was = jax.config.jax_enable_compilation_cache
  jax.config.update("jax_enable_compilation_cache", False)
  compilation_cache.reset_cache()
  try:
    yield
  finally:
    jax.config.update("jax_enable_compilation_cache", was)
    compilation_cache.reset_cache()


def compile_program(p: Program, devices: targets_lib.Devices, mesh, rows: int | None = None) -> Result:
  rows = p.rows if rows is None else rows
  shards = mesh.shape["data"] * mesh.shape["fsdp"]
  shape = "-" if p.shape is None else f"{p.shape.bucket.patches} patches, {p.shape.bucket.length} tokens ({p.shape.source})"
  base = dict(name=p.name, stage=p.stage, budget_bytes=devices.budget_bytes, rows=rows,
              rows_per_device=rows // max(shards, 1), shape=shape)
  if rows % shards:
    return Result(compiled=False, fits=False, attention="-", bytes={}, device_bytes=devices.memory_bytes, seconds=0.0,
                  error=f"{rows} rows do not divide over the mesh's {shards} batch shards", **base)
  t0 = time.time()
  note = ""
  try:
    with mesh_lib.use(mesh):
      fn, args = p.build(rows)
      compiled, note = compile_lowered(fn.lower(*args), devices.attached)
  except Exception as e:  # pylint: disable=broad-except
    msg = f"{type(e).__name__}: {e}".strip().splitlines()
    short = next((ln for ln in msg if "RESOURCE_EXHAUSTED" in ln or "Ran out of memory" in ln), msg[0] if msg else "")
    return Result(compiled=False, fits=False, attention="-", bytes={}, device_bytes=devices.memory_bytes,
                  seconds=round(time.time() - t0, 1), error=short[:500], **base)
  seconds = round(time.time() - t0, 1)
  b = _memory(compiled)
  text = compiled.as_text() if devices.target.platform in ("gpu", "tpu") else None
  return Result(compiled=True, fits=b["total"] <= devices.budget_bytes,
                attention=_attention(text), bytes=b, device_bytes=devices.memory_bytes,
                seconds=seconds, note=note, **base)


def max_rows(p: Program, devices: targets_lib.Devices, mesh, first: Result,
             limit_per_device: int = 4096, log=None) -> tuple[int, bool]:
  """The largest per-device batch that fits, and whether that is only a lower bound: the search probes
  no batch above limit_per_device (each probe is a full compile, and a probe of tens of thousands of
  rows costs minutes and host memory for an answer no run uses), so when the limit fits the answer is
  "at least" it. Memory grows
  about linearly with the rows, so each next try is where the line through two measured points crosses
  the budget (regula falsi), which lands within a compile or two of the answer; a compile that runs
  out of memory (XLA:TPU refuses programs that do not fit) gives no bytes, and the bracket is then
  halved instead."""
  step = mesh.shape["data"] * mesh.shape["fsdp"]
  seen: dict[int, Result] = {first.rows_per_device: first}
  budget = devices.budget_bytes

  def fits(n: int) -> bool:
    if n not in seen:
      seen[n] = compile_program(p, devices, mesh, rows=n * step)
      if log:
        r = seen[n]
        log(f"[aot {devices.target.name}]   {p.name} at {n} rows/device: "
            + (f"{_gib(r.bytes.get('total'))} GiB, {'fits' if r.fits else 'does not fit'}" if r.compiled
               else f"refused: {r.error}") + f" ({r.seconds} s)")
    return seen[n].fits

  total = lambda n: seen[n].bytes.get("total") if seen[n].compiled else None

  def crossing(a: int, b: int) -> int | None:
    ta, tb = total(a), total(b)
    if ta is None or tb is None or tb == ta:
      return None
    return a + int((budget - ta) * (b - a) / (tb - ta))

  n = max(first.rows_per_device, 1)
  if fits(n):
    lo, hi = n, None
    nxt = min(2 * n, limit_per_device)
    while hi is None:
      if lo >= limit_per_device:
        return lo, True
      if not fits(nxt):
        hi = nxt
        break
      prev, lo = lo, nxt
      guess = crossing(prev, lo)
      nxt = min(max(guess if guess is not None else 2 * lo, lo + 1), limit_per_device)
  else:
    hi = n
    while hi > 1 and not fits(hi // 2):
      hi //= 2
    if hi == 1:
      return 0, False
    lo = hi // 2
  while hi - lo > 1:
    guess = crossing(lo, hi)
    mid = min(max(guess, lo + 1), hi - 1) if guess is not None else (lo + hi) // 2
    if fits(mid):
      lo = mid
    else:
      hi = mid
  return lo, False


def _gib(n: int | None) -> str:
  return "-" if n is None else f"{n / GiB:.2f}"


def max_rows_text(max_rows: int | None, at_least: bool) -> str:
  """A searched largest batch for people: "-" when not searched, ">=N" where the search stopped at its cap."""
  return "-" if max_rows is None else f"{'>=' if at_least else ''}{max_rows}"


def fits_text(fits: bool, tight: bool) -> str:
  return ("yes, tight" if tight else "yes") if fits else "NO"


def headroom_text(headroom: float | None) -> str:
  """The share of the budget to spare, for people: "12.3%" ("-" when not compiled)."""
  return "-" if headroom is None else f"{100 * headroom:.1f}%"


def report(results: list[Result], devices: targets_lib.Devices, info: dict) -> str:
  t = devices.target
  lines = [f"target {t.name}: {t.description}, {'attached' if devices.attached else 'compile-only'}, "
           f"{_gib(devices.memory_bytes)} GiB per device; a program fits in {_gib(devices.budget_bytes)} GiB "
           f"({devices.budget_note})",
           f"mesh {info['mesh']}; model {info['model']['parameters'] / 1e6:,.1f} M parameters, compute "
           f"{info['model']['dtype']}, params {info['model']['param_dtype']}, frozen in compute dtype "
           f"{info['model']['frozen_in_compute_dtype']}, remat {info['model']['remat']}", "",
           "| program | rows/device | shape | compile s | attention | arguments | outputs | temporaries | aliased "
           "| total GiB | fits | headroom | max rows/device |", "|" + "---|" * 13]
  for r in results:
    b = r.bytes
    lines.append(f"| {r.name} | {r.rows_per_device} | {r.shape} | {r.seconds} | {r.attention} | "
                 f"{_gib(b.get('arguments'))} | {_gib(b.get('outputs'))} | {_gib(b.get('temporaries'))} | "
                 f"{_gib(b.get('aliased'))} | {_gib(b.get('total'))} | "
                 f"{fits_text(r.fits, r.tight)} | {headroom_text(r.headroom)} | "
                 f"{max_rows_text(r.max_rows_per_device, r.max_rows_at_least)} |")
  for r in results:
    if r.error or r.note:
      lines.append(f"{r.name}: {r.error or r.note}")
  return "\n".join(lines)


def run(config, target: str, *, max_batch: bool = False, max_batch_limit: int = 4096, only: set[str] | None = None,
        records: int = 0, patches: int = 0, tokens: int = 0, attached: bool | None = None, log=print) -> dict:
  devices = targets_lib.devices(target, attached=attached)
  mesh = mesh_lib.make_mesh(config.mesh.to_dict(), devices=devices.devices)
  progs, info = programs(config, mesh, records=records, patches=patches, tokens=tokens, only=only,
                         attached=devices.attached)
  results = []
  for p in progs:
    log(f"[aot {target}] {p.name} ({p.note}): {p.rows} rows ...")
    r = compile_program(p, devices, mesh)
    if max_batch and p.rows:
      r.max_rows_per_device, r.max_rows_at_least = max_rows(p, devices, mesh, r, log=log,
                                                            limit_per_device=max_batch_limit)
    log(f"[aot {target}] {p.name}: {'compiled' if r.compiled else 'FAILED'} in {r.seconds} s, "
        f"{_gib(r.bytes.get('total'))} GiB of {_gib(devices.budget_bytes)}, attention {r.attention}"
        + (f", max {max_rows_text(r.max_rows_per_device, r.max_rows_at_least)} rows/device"
           if r.max_rows_per_device is not None else "")
        + (f": {r.error}" if r.error else ""))
    results.append(r)
  return {"target": target, "description": devices.target.description, "attached": devices.attached,
          "platform": devices.target.platform, "device_bytes": devices.memory_bytes,
          "budget_bytes": devices.budget_bytes, "budget": devices.budget_note, **info,
          "jax": jax.__version__, "programs": [r.to_json() for r in results],
          "table": report(results, devices, info)}


def main(argv):
  from absl import flags
  F = flags.FLAGS
  if len(argv) > 1:
    sys.exit(f"unexpected arguments {argv[1:]}")
  if F.config is None:
    sys.exit("give --config=CONFIG.py")
  if F.target not in targets_lib.TARGETS:
    sys.exit(f"give --target=NAME, one of {', '.join(targets_lib.TARGETS)}")
  attached = {"yes": True, "no": False}.get(F.attached)
  only = {x.strip() for x in F.programs.split(",") if x.strip()} or None
  from dcsft_jax import errors
  out = errors.cli("aot", lambda: run(F.config, F.target, max_batch=F.max_batch, max_batch_limit=F.max_batch_limit,
                                      only=only, records=F.records, patches=F.patches, tokens=F.tokens,
                                      attached=attached))
  print(out["table"])
  if F.json:
    from dcsft_jax.stages import common
    common.write_json(os.path.abspath(F.json), {k: v for k, v in out.items() if k != "table"})
  bad = [p for p in out["programs"] if not (p["compiled"] and p["fits"])]
  if bad:
    sys.exit("aot: " + "; ".join(f"{p['name']} {'does not fit' if p['compiled'] else 'failed to compile'}"
                                  f" ({p['error'] or _gib(p['bytes'].get('total')) + ' GiB'})" for p in bad))


if __name__ == "__main__":
  from absl import app, flags, logging
  from ml_collections import config_flags
  config_flags.DEFINE_config_file("config", None, "the run's config file (configs/dcsft.py)", lock_config=True)
  flags.DEFINE_string("target", "", f"one of {', '.join(targets_lib.TARGETS)}")
  flags.DEFINE_string("json", "", "also write the results here")
  flags.DEFINE_bool("max_batch", False, "search the largest per-device micro-batch that fits, per program")
  flags.DEFINE_integer("max_batch_limit", 4096, "stop the --max_batch search here (reported as at least this)")
  flags.DEFINE_string("programs", "", "only these stages' programs (comma list: cold_start,score,finetune,grpo,"
                      "evaluate)")
  flags.DEFINE_integer("records", 0, "plan bucket shapes from the first N records of each source (0 = all)")
  flags.DEFINE_integer("patches", 0, "force one bucket: patches per image (with --tokens)")
  flags.DEFINE_integer("tokens", 0, "force one bucket: tokens per row (with --patches)")
  flags.DEFINE_string("attached", "auto", "auto | yes | no: use this host's accelerators (auto: when it has them)")
  logging.set_verbosity(logging.WARNING)
  from dcsft_jax import config_base
  sys.argv = [f"--config={config_base.resolve_config(a[len('--config='):])}" if a.startswith("--config=") else a
              for a in sys.argv]
  app.run(main)
