"""Batched sampling: one prefill per prompt, K samples decoding against its shared KV prefix.

The two jitted programs are pure functions of (params, arrays):
- `prefill`: vision tower + prompt for B prompts -> the prompt's KV cache [layers, B, L, KV, hd]
  and the logits of each row's last prompt token. It runs once per prompt, whatever K is.
- `decode`: the K samples of every prompt (B*K rows, prompt-major) in a `lax.while_loop` with a
  fixed shape. Each row's own cache holds only its generated tokens; attention reads the prompt's
  prefix cache in place (attention.shared_prefix_attention), so the prefix is never copied K times.
  The loop stops early once every row has produced an end-of-sequence token.

Prompts stay right-padded as the batcher made them: row b's prompt occupies prefix slots
[0, length_b), its generated token t sits in its own slot t at M-RoPE position
length_b + rope_delta_b + t on all three axes (transformers' decoding positions).

Randomness: every (prompt, sample) row has its own key, and step t draws with fold_in(key, t).
`sample_keys` derives the keys from (seed, record id, sample index), so a record's samples do not
depend on the batch it lands in, the mesh, or whether a run was resumed.
"""
from __future__ import annotations

import dataclasses
import hashlib
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dcsft_jax.models import attention as attn_lib
from dcsft_jax.models import registry
from dcsft_jax.models.layers import ModelOptions


@dataclasses.dataclass(frozen=True)
class SamplingParams:
  max_new_tokens: int = 128
  num_samples: int = 1                 # K answers per prompt
  temperature: float = 0.0             # 0 = greedy (argmax), as transformers' do_sample=False
  top_k: int = 0                       # 0 = no top-k filter
  top_p: float = 1.0                   # 1.0 = no nucleus filter
  eos_ids: tuple[int, ...] = ()        # any of them ends a sequence (kept in the output)
  pad_id: int = 0                      # written after a sequence has ended
  # transformers' RepetitionPenaltyLogitsProcessor: the logit of every token already in the prompt
  # or the answer is divided by it (multiplied where negative), before temperature; greedy too.
  repetition_penalty: float = 1.0

  def __post_init__(self):
    if self.max_new_tokens < 1:
      raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
    if self.num_samples < 1:
      raise ValueError(f"num_samples must be >= 1, got {self.num_samples}")
    if self.temperature < 0:
      raise ValueError(f"temperature must be >= 0, got {self.temperature}")
    if self.top_k < 0:
      raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
    if not 0.0 < self.top_p <= 1.0:
      raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
    if not self.repetition_penalty > 0:
      raise ValueError(f"repetition_penalty must be > 0 (1.0 = off), got {self.repetition_penalty}")
    object.__setattr__(self, "eos_ids", tuple(int(e) for e in self.eos_ids))

  @property
  def greedy(self) -> bool:
    return self.temperature == 0.0


# ------------------------------------------------------------------------------ token choice
def filter_logits(logits, params: SamplingParams):
  """Temperature, then top-k, then top-p (transformers' warper order), on fp32 logits [..., V].

  Removed tokens get -inf. Ties at the top-k threshold are kept, as TopKLogitsWarper keeps them.
  """
  x = logits.astype(jnp.float32) / jnp.float32(params.temperature)
  V = x.shape[-1]
  k = min(params.top_k, V) if params.top_k else 0
  if k and params.top_p >= 1.0:
    x = jnp.where(x < kth_largest(x, k)[..., None], -jnp.inf, x)
  elif k:
    top = jax.lax.top_k(x, k)[0]
    x = jnp.where(x < top[..., -1:], -jnp.inf, x)
  if params.top_p < 1.0:
    # Nucleus over the (at most k) survivors, sorted descending: keep a token while the mass
    # strictly before it is < top_p. That is TopPLogitsWarper's "remove where the ascending
    # cumulative mass <= 1 - top_p", restated from the top. The first token is always kept.
    srt = top if k else -jnp.sort(-x, axis=-1)
    probs = jax.nn.softmax(srt, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs
    keep = before < params.top_p
    cutoff = jnp.min(jnp.where(keep, srt, jnp.inf), axis=-1, keepdims=True)
    x = jnp.where(x < cutoff, -jnp.inf, x)
  return x


def kth_largest(x, k: int):
  """The k-th largest fp32 value along the last axis, exactly (ties counted), without a sort.

  Only the threshold is needed for top-k filtering, and `lax.top_k` dominated a K = 8 decode step on
  the CPU (BENCHMARKS.md): 32 halving steps over fp32's order-preserving uint32 image find it with
  V compares each. Bit by bit from the top, keep a bit when at least k values are >= the candidate:
  the result is the largest key with k values at or above it, i.e. the k-th largest.
  """
  u = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32)
  sign = jnp.uint32(0x80000000)
  key = jnp.where(u >= sign, ~u, u | sign)

  def bit(i, t):
    cand = t | (jnp.uint32(1) << (31 - i).astype(jnp.uint32))
    enough = jnp.sum(key >= cand[..., None], axis=-1) >= k
    return jnp.where(enough, cand, t)

  t = jax.lax.fori_loop(0, 32, bit, jnp.zeros(x.shape[:-1], jnp.uint32))
  back = jnp.where(t >= sign, t & ~sign, ~t)
  return jax.lax.bitcast_convert_type(back, jnp.float32)


def penalize(logits, seen, penalty: float):
  """RepetitionPenaltyLogitsProcessor on fp32 logits [R, V] with `seen` [R, V] bool: the tokens of the
  prompt and of the answer so far (each counts once, however often it occurs)."""
  if penalty == 1.0:
    return logits
  p = jnp.float32(penalty)
  return jnp.where(seen, jnp.where(logits < 0, logits * p, logits / p), logits)


def prompt_tokens_seen(input_ids, attention_mask, vocab: int):
  """[B, L] prompt ids (padding excluded) -> [B, V] bool: which tokens the prompt holds."""
  B = input_ids.shape[0]
  rows = jnp.broadcast_to(jnp.arange(B)[:, None], input_ids.shape)
  ids = jnp.clip(input_ids, 0, vocab - 1)
  return jnp.zeros((B, vocab), bool).at[rows, ids].max(attention_mask.astype(bool))


def choose_tokens(logits, keys, step, params: SamplingParams):
  """logits [R, V]; keys [R, 2] uint32 (one per row); -> int32 [R]."""
  if params.greedy:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  x = filter_logits(logits, params)
  draw = lambda key, row: jax.random.categorical(jax.random.fold_in(jax.random.wrap_key_data(key), step), row)
  return jax.vmap(draw)(keys, x).astype(jnp.int32)


def sample_keys(seed: int, ids: Sequence[str | None], num_samples: int) -> np.ndarray:
  """uint32 [B, K, 2] threefry key data from (seed, record id, sample index); None rows get zeros."""
  out = np.zeros((len(ids), num_samples, 2), np.uint32)
  for b, rid in enumerate(ids):
    if rid is None:
      continue
    for k in range(num_samples):
      h = hashlib.blake2b(f"{seed}\0{rid}\0{k}".encode(), digest_size=8).digest()
      out[b, k] = np.frombuffer(h, np.uint32)
  return out


# ------------------------------------------------------------------------------ the programs
class Sampler:
  """Jitted prefill + decode for one model (of any family). `generate(params, arrays, keys)` runs both.

  arrays: a batch from data.batching (input_ids, attention_mask, positions, rope_deltas, lengths and
  the family's image arrays), host NumPy or global device arrays.
  """

  def __init__(self, cfg, opts: ModelOptions = ModelOptions(), *, cache_dtype=None):
    self.cfg = cfg
    self.family = registry.of(cfg)
    self.opts = dataclasses.replace(opts, deterministic=True)
    self.model = self.family.model(cfg, self.opts)
    self.cache_dtype = jnp.dtype(cache_dtype or self.opts.dtype)
    self.prefill = jax.jit(self._prefill)
    self.decode = jax.jit(self._decode, static_argnames=("params_",))

  # -- prefill
  def _prefill(self, params, input_ids, positions, attention_mask, lengths, images):
    B, L = input_ids.shape
    cache = self.family.init_cache(self.cfg, B, L, self.cache_dtype)
    valid = attention_mask.astype(bool)
    # Causal over each row's real tokens (rows are right-padded): the fused kernels take it as lengths.
    mask = attn_lib.RightPadding(lengths.astype(jnp.int32))

    def run(m):
      h, visual = m.embed_inputs(input_ids, images)
      h, new_cache = m.decode(h, positions, mask=mask, cache=cache, cache_index=0, visual=visual)
      last = jnp.take_along_axis(h, jnp.maximum(lengths - 1, 0)[:, None, None], axis=1)   # [B, 1, D]
      return m.logits(last)[:, 0].astype(jnp.float32), new_cache

    logits, prefix = self.model.apply({"params": params}, method=run)
    return logits, self.family.constrain_cache(prefix), valid

  # -- decode
  def _decode(self, params, prefix, prefix_mask, first_logits, start_positions, keys, prompt_ids=None, *,
              params_: SamplingParams):
    sp = params_
    B, K, T = first_logits.shape[0], sp.num_samples, sp.max_new_tokens
    R, V = B * K, first_logits.shape[-1]
    keys = keys.reshape(R, 2)
    eos = jnp.asarray(sp.eos_ids or (-1,), jnp.int32)
    logits0 = jnp.repeat(first_logits, K, axis=0)                      # [R, V]: rows are prompt-major
    rows = jnp.arange(R)
    if sp.repetition_penalty != 1.0:
      if prompt_ids is None:
        raise ValueError("a repetition penalty needs the prompt's token ids (decode(..., prompt_ids))")
      # Which tokens each row has seen, [R, V] bool (Qwen's 152k vocabulary x 128 rows is 19 MB).
      seen = jnp.repeat(prompt_tokens_seen(prompt_ids, prefix_mask, V), K, axis=0)
    else:
      seen = jnp.zeros((R, 0), bool)                                   # no penalty: carried empty
    tok = choose_tokens(penalize(logits0, seen, sp.repetition_penalty), keys, 0, sp)
    if sp.repetition_penalty != 1.0:
      seen = seen.at[rows, tok].set(True)
    tokens = jnp.full((R, T), sp.pad_id, jnp.int32).at[:, 0].set(tok)
    done = jnp.isin(tok, eos)
    cache = self.family.init_cache(self.cfg, R, T, self.cache_dtype)
    start = jnp.repeat(start_positions, K)                             # [R]
    slots = jnp.arange(T)

    def cond(state):
      step, _, _, _, done, _ = state
      return (step < T - 1) & ~jnp.all(done)

    def body(state):
      step, tok, tokens, cache, done, seen = state
      pos = self.family.decode_positions(start, jnp.reshape(step, (1,)))
      own_mask = (slots <= step)[None, None, :]

      def run(m):
        h, _ = m.embed_inputs(tok[:, None])
        h, new_cache = m.decode(h, pos, mask=(prefix_mask, own_mask), cache=cache, cache_index=step,
                                prefix=prefix)
        return m.logits(h)[:, 0].astype(jnp.float32), new_cache

      logits, cache = self.model.apply({"params": params}, method=run)
      nxt = choose_tokens(penalize(logits, seen, sp.repetition_penalty), keys, step + 1, sp)
      nxt = jnp.where(done, sp.pad_id, nxt)
      if sp.repetition_penalty != 1.0:
        seen = seen.at[rows, nxt].set(True)
      tokens = jax.lax.dynamic_update_slice(tokens, nxt[:, None], (0, step + 1))
      return step + 1, nxt, tokens, self.family.constrain_cache(cache), done | jnp.isin(nxt, eos), seen

    steps, _, tokens, _, done, _ = jax.lax.while_loop(cond, body, (jnp.int32(0), tok, tokens, cache, done, seen))
    # Completion length: up to and including the first end-of-sequence token.
    is_eos = jnp.isin(tokens, eos)
    first = jnp.argmax(is_eos, axis=1)
    lengths = jnp.where(is_eos.any(axis=1), first + 1, T).astype(jnp.int32)
    return tokens.reshape(B, K, T), lengths.reshape(B, K), steps + 1

  # -- both
  def generate(self, params, arrays: dict, keys, sampling: SamplingParams):
    """-> (tokens int32 [B, K, T], lengths int32 [B, K], decode steps run)."""
    images = self.family.images(arrays)
    logits, prefix, prefix_mask = self.prefill(params, arrays["input_ids"], arrays["positions"],
                                               arrays["attention_mask"], arrays["lengths"], images)
    start = jnp.asarray(arrays["lengths"]) + jnp.asarray(arrays["rope_deltas"])
    prompt_ids = arrays["input_ids"] if sampling.repetition_penalty != 1.0 else None
    return self.decode(params, prefix, prefix_mask, logits, start, jnp.asarray(keys), prompt_ids, params_=sampling)


_SHARED: dict = {}


def shared_sampler(cfg, opts: ModelOptions) -> Sampler:
  """One Sampler per (architecture, options) in a process: models of the same shape (a pipeline's
  LoRA runs, a resumed trainer) share its compiled programs instead of compiling their own."""
  key = (cfg, dataclasses.replace(opts, deterministic=True))
  if key not in _SHARED:
    _SHARED[key] = Sampler(cfg, opts)
  return _SHARED[key]


def completions(tokens, lengths, eos_ids: Sequence[int] = ()) -> list[list[list[int]]]:
  """Host lists of each sample's tokens, cut at its length and without the end-of-sequence token."""
  tokens, lengths = np.asarray(tokens), np.asarray(lengths)
  eos = set(int(e) for e in eos_ids)
  out = []
  for b in range(tokens.shape[0]):
    row = []
    for k in range(tokens.shape[1]):
      seq = tokens[b, k, :lengths[b, k]].tolist()
      if seq and seq[-1] in eos:
        seq = seq[:-1]
      row.append(seq)
    out.append(row)
  return out



GENERATION_CONFIG = "generation_config.json"


def generation_config(directory: str | None) -> dict:
  """A model directory's generation_config.json ({} where it has none)."""
  import json
  import os
  path = os.path.join(directory, GENERATION_CONFIG) if directory else None
  if not path or not os.path.exists(path):
    return {}
  try:
    with open(path) as f:
      out = json.load(f)
  except (OSError, ValueError) as e:
    raise ValueError(f"{path}: unreadable generation config ({e}); fix or delete the file") from None
  if not isinstance(out, dict):
    raise ValueError(f"{path}: expected a JSON object, got {type(out).__name__}")
  return out


def stop_ids(directory: str | None, processor) -> tuple[int, ...]:
  """End-of-sequence ids: generation_config.json's eos_token_id (the Qwen-VL Instruct models: <|im_end|>
  and <|endoftext|>) plus the chat template's <|im_end|>, which ends every assistant turn."""
  ids = {int(processor.im_end_id)}
  eos = generation_config(directory).get("eos_token_id")
  ids.update(int(e) for e in (eos if isinstance(eos, list) else [eos]) if e is not None)
  return tuple(sorted(ids))


def settings(directory: str | None, processor, *, repetition_penalty: float = 0.0, pad_id: int = 0,
             **kw) -> SamplingParams:
  """SamplingParams for a model directory: its end tokens, and its generation_config.json's
  repetition_penalty where `repetition_penalty` is 0 (what transformers' generate does with a
  setting the call leaves out); 1.0 where the file has none."""
  if not repetition_penalty:
    repetition_penalty = float(generation_config(directory).get("repetition_penalty") or 1.0)
  return SamplingParams(eos_ids=stop_ids(directory, processor), pad_id=pad_id,
                        repetition_penalty=float(repetition_penalty), **kw)


def _to_host(x) -> np.ndarray:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(x)


@dataclasses.dataclass
class Generated:
  """One batch's answers, on every host: `rows` are indices into the records (-1 = padding)."""
  rows: np.ndarray               # [B] global batch rows
  tokens: list[list[list[int]]]  # [B][K] token ids without the end-of-sequence token
  texts: list[list[str]]         # [B][K]
  index: int                     # batch position in the plan
  decode_steps: int


class RecordGenerator:
  """Records -> static-shape batches -> sampler -> decoded answers, batch by batch.

  The batch order is the iterator's fixed plan, so `start_batch` resumes exactly where an earlier
  run stopped, and each record's samples are keyed by (seed, record id, k), not by its batch.
  """

  def __init__(self, sampler: Sampler, params, processor, mesh, sampling: SamplingParams, *, batch_size: int,
               buckets, seed: int = 0, system_prompt: str | None = None, skip_bad_records: bool = False,
               source: str = "dataset"):
    self.sampler, self.params, self.processor, self.mesh = sampler, params, processor, mesh
    self.sampling, self.batch_size, self.buckets, self.seed = sampling, batch_size, buckets, seed
    self.system_prompt, self.skip_bad_records, self.source = system_prompt, skip_bad_records, source

  def iterator(self, records):
    from dcsft_jax.data import batching
    return batching.BatchIterator(records, self.processor, batch_size=self.batch_size, buckets=self.buckets,
                                  with_answers=False, shuffle=False, epochs=1, drop_remainder=False,
                                  skip_bad_records=self.skip_bad_records, system_prompt=self.system_prompt,
                                  source=self.source)

  def run(self, records, *, start_batch: int = 0, iterator=None):
    from dcsft_jax.data import batching
    it = iterator or self.iterator(records)
    it.restore({"epoch": 0, "batch": start_batch})
    plan = it.plan(0)
    K = self.sampling.num_samples
    try:
      for batch in it:
        arrays = dict(batch.arrays)
        arrays["keys"] = sample_keys(self.seed, batch.ids, K)
        arrays = batching.to_global(arrays, self.mesh)
        tokens, lengths, steps = self.sampler.generate(self.params, arrays, arrays.pop("keys"), self.sampling)
        toks = completions(_to_host(tokens), _to_host(lengths), self.sampling.eos_ids)
        texts = [[self.processor.decode(t) for t in row] for row in toks]
        # A record that failed to decode (and was skipped) leaves a padding row: not an answer.
        rows = np.where(_to_host(arrays["valid"]), plan[batch.index][1], -1)
        yield Generated(rows, toks, texts, batch.index, int(steps))
    finally:
      it.close()
