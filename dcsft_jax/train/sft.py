"""The SFT train step: cross-entropy on the assistant tokens, averaged over those tokens across the
whole (accumulated) batch, as transformers' loss does for one batch.

`make_train_step` returns a jitted pure function step(state, batch) -> (state, metrics):
- batch arrays carry a leading micro-batch axis [A, b, ...]; a `lax.scan` accumulates the summed
  token losses and their gradients, so A micro-batches give exactly the gradient of one A*b batch;
- only the trainable leaves are differentiated (optim.split), the state is donated;
- compute runs in the model's dtype (bf16 on accelerators) while params and Adam moments stay fp32.
"""
from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from dcsft_jax.models import registry
from dcsft_jax.models.layers import ModelOptions
from dcsft_jax.train import optim


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  train: Any          # trainable leaves (None elsewhere)
  frozen: Any         # frozen leaves (None elsewhere)
  opt_state: Any
  rng: jax.Array      # key data; step t uses fold_in(rng, t)

  @property
  def params(self):
    return optim.merge(self.train, self.frozen)


def init_state(params, tx: optax.GradientTransformation, mask, rng, frozen_dtype=None,
               layout: TrainState | None = None) -> TrainState:
  """The state of a run starting at `params` (the parameters are used as they are, not copied).

  `frozen_dtype` (e.g. bf16 under LoRA) stores the frozen leaves in that dtype: the layers cast weights
  to the compute dtype anyway, so a bf16 base computes what an fp32 one does in a bf16 run, in half
  the memory; trainable leaves and Adam moments keep theirs. `layout` (state_layout's) places the
  new leaves (moments, counters, step, RNG) where every step will keep them."""
  train, frozen = optim.split(params, mask)
  if frozen_dtype is not None:
    frozen = jax.tree.map(lambda x: x.astype(frozen_dtype), frozen)
  if layout is None:
    return TrainState(jnp.zeros((), jnp.int32), train, frozen, jax.jit(tx.init)(train), jnp.asarray(rng))
  opt_state = jax.jit(tx.init, out_shardings=shardings(layout.opt_state))(train)
  step = jax.device_put(jnp.zeros((), jnp.int32), layout.step.sharding)
  return TrainState(step, train, frozen, opt_state, jax.device_put(jnp.asarray(rng), layout.rng.sharding))


def state_layout(params, tx: optax.GradientTransformation, mask, mesh, frozen_dtype=None) -> TrainState:
  """The state `init_state` makes from `params` (ShapeDtypeStructs with shardings), as
  ShapeDtypeStructs with shardings: the Adam moments lie like their parameters, the step, the RNG
  and the optimizer's counters are replicated. The trainer builds its state into this layout and
  pins every step's output to it; dcsft_jax.aot compiles against it without any real array."""
  rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  sds = lambda x, sharding: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)
  train, frozen = optim.split(params, mask)
  if frozen_dtype is not None:
    frozen = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, frozen_dtype, sharding=x.sharding), frozen)
  opt_state = optax.tree_map_params(tx, lambda leaf, p: sds(leaf, p.sharding), jax.eval_shape(tx.init, train), train,
                                    transform_non_params=lambda leaf: sds(leaf, rep))
  rng = jax.eval_shape(lambda: jax.random.key_data(jax.random.key(0)))
  return TrainState(sds(jax.ShapeDtypeStruct((), jnp.int32), rep), train, frozen, opt_state, sds(rng, rep))


def shardings(tree):
  return jax.tree.map(lambda x: x.sharding, tree)


def token_nll(logits, input_ids, loss_mask):
  """(sum of -log p(next token) over masked targets, number of targets). logits [B, L, V]."""
  labels = input_ids[:, 1:]
  mask = loss_mask[:, 1:].astype(jnp.float32)
  logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(logp, labels[..., None], axis=-1)[..., 0]
  return jnp.sum(nll * mask), jnp.sum(mask)


def loss_positions(loss_mask, valid, *, min_size: int = 8):
  """Host side: the positions whose next token carries loss, so the step computes logits there only.

  loss_mask [..., b, L], valid [..., b] -> (loss_index int32 [..., b, C], loss_select [..., b, C]) with
  C the smallest power of two (>= min_size, <= L - 1) that holds every row's targets: a handful of
  compiled shapes, and the LM head and its fp32 log-softmax run on C positions instead of L (one-word
  answers: 4 of ~300 at the paper's shapes; 1.4 GB of fp32 logits a step less at 3B, batch 8).
  """
  target = (loss_mask[..., 1:] * valid[..., None]).astype(np.int32)     # position t predicts token t + 1
  L1 = target.shape[-1]
  need = max(int(target.sum(-1).max()), 1)
  C = min(max(min_size, 1 << (need - 1).bit_length()), L1)
  order = np.argsort(-target, axis=-1, kind="stable")[..., :C]
  return order.astype(np.int32), np.take_along_axis(target, order, axis=-1)


def sft_loss(model, params, batch, rng):
  images = registry.of(model.cfg).images(batch)
  if "loss_index" not in batch:
    logits = model.apply({"params": params}, batch["input_ids"], batch["positions"], images,
                         batch["attention_mask"], rngs={"dropout": rng})
    mask = batch["loss_mask"] * batch["valid"][:, None].astype(batch["loss_mask"].dtype)
    return token_nll(logits, batch["input_ids"], mask)
  idx = batch["loss_index"]

  def run(m):
    h = m(batch["input_ids"], batch["positions"], images, batch["attention_mask"], return_hidden=True)
    return m.logits(jnp.take_along_axis(h, idx[..., None], axis=1))

  logits = model.apply({"params": params}, method=run, rngs={"dropout": rng})             # [b, C, V]
  labels = jnp.take_along_axis(batch["input_ids"][:, 1:], idx, axis=1)
  sel = batch["loss_select"].astype(jnp.float32)
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(logp, labels[..., None], axis=-1)[..., 0]
  return jnp.sum(nll * sel), jnp.sum(sel)


def _split_aux(aux):
  """A loss's auxiliary output: its count, or {"count": n, NAME: summed figure, ...}. The figures are
  per-count means, or, when aux holds "completions" (a policy-gradient loss, whose count is what its
  aggregation divides by: completions, tokens, or completions x budget), per-completion means."""
  if isinstance(aux, dict):
    return aux["count"], {k: v for k, v in aux.items() if k != "count"}
  return aux, {}


def make_train_step(cfg, opts: ModelOptions, tx: optax.GradientTransformation, schedule,
                    loss=sft_loss, count_name: str = "tokens", state_sharding=None):
  """step(state, batch, extra=None) -> (state, metrics); batch arrays are [A, b, ...]
  (positions [A, 3, b, L]).

  `loss(model, params, micro_batch, rng[, extra]) -> (summed loss, aux)` where aux is the count the
  sum is averaged over, or a dict with "count" and other sums reported as per-count means. `extra`
  (e.g. a frozen reference model's params) is passed through undonated. `state_sharding` pins the
  new state to the old one's layout, so the second step does not compile again for a new layout.
  """
  model = registry.of(cfg).model(cfg, opts)

  def step(state: TrainState, batch, extra=None):
    rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    args = () if extra is None else (extra,)

    def micro(carry, xs):
      i, mb = xs
      grads, total, count, sums = carry
      # The summed loss is differentiated; its count (and any figures) ride along as auxiliary output.
      f = lambda train: loss(model, optim.merge(train, state.frozen), mb, jax.random.fold_in(rng, i), *args)
      (s, aux), g = jax.value_and_grad(f, has_aux=True)(state.train)
      n, figures = _split_aux(aux)
      grads = jax.tree.map(jnp.add, grads, g)
      sums = {k: sums[k] + figures[k] for k in sums}
      return (grads, total + s, count + n, sums), None

    zeros = jax.tree.map(jnp.zeros_like, state.train)
    A = batch["input_ids"].shape[0]
    first = jax.tree.map(lambda x: x[0], batch)
    shapes = jax.eval_shape(lambda: _split_aux(loss(model, state.params, first, jax.random.key(0), *args)[1])[1])
    sums0 = {k: jnp.zeros(v.shape, jnp.float32) for k, v in shapes.items()}
    (grads, total, count, sums), _ = jax.lax.scan(
        micro, (zeros, jnp.float32(0), jnp.float32(0), sums0), (jnp.arange(A), batch))
    denom = jnp.maximum(count, 1.0)
    grads = jax.tree.map(lambda g: g / denom, grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.train)
    train = optax.apply_updates(state.train, updates)
    if "completions" in sums:        # figures per completion, whatever the loss is divided by
      n = sums.pop("completions")
      figures = {count_name: n, **{k: v / jnp.maximum(n, 1.0) for k, v in sums.items()}}
    else:
      figures = {count_name: count, **{k: v / denom for k, v in sums.items()}}
    metrics = {"loss": total / denom, "grad_norm": optax.global_norm(grads), "learning_rate": schedule(state.step),
               **figures}
    return state.replace(step=state.step + 1, train=train, opt_state=opt_state), metrics

  if state_sharding is not None:
    return jax.jit(step, donate_argnums=(0,), out_shardings=(state_sharding, None))
  return jax.jit(step, donate_argnums=(0,))

