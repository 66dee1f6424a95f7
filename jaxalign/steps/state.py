"""TrainState and what every step shares: exact microbatch accumulation and a guarded optimizer update."""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax


class TrainState(NamedTuple):
  step: jax.Array  # int32 scalar.
  params: Any  # {'model': decoder params, ['head': scalar head]}.
  opt_state: Any
  rng: jax.Array  # uint32[2] raw key, checkpointable as a plain array.
  skipped: jax.Array  # int32: updates skipped for non-finite values (nan_policy=skip).
  loss_ema: jax.Array  # float32 running mean of the loss, for the spike guard (0 = unset).
  frozen: Any = None  # Models read but not trained (DPO/PPO reference, reward model); never checkpointed.
  extra: Any = None  # Stage scalars that resume with the state (PPO: {'kl_coef'}); checkpointed with `meta`.


def create(params, tx: optax.GradientTransformation, seed: int, frozen=None, extra=None, opt_state=None) -> TrainState:
  """A fresh state (`opt_state` given: PPO's two optimizers, built by its stage)."""
  opt_state = tx.init(params) if opt_state is None else opt_state
  return TrainState(jnp.zeros((), jnp.int32), params, opt_state, jax.random.PRNGKey(seed),
                    jnp.zeros((), jnp.int32), jnp.zeros((), jnp.float32), frozen, extra)


def checkpoint_items(state: TrainState) -> dict:
  """What a checkpoint holds of a state: everything but `frozen` (recorded in run.json instead)."""
  meta = {"step": state.step, "rng": state.rng, "skipped": state.skipped, "loss_ema": state.loss_ema}
  if state.extra:
    meta["extra"] = state.extra
  return {"params": state.params, "opt_state": state.opt_state, "meta": meta}


def from_items(items: dict, frozen=None) -> TrainState:
  m = items["meta"]
  return TrainState(m["step"], items["params"], items["opt_state"], m["rng"], m["skipped"], m["loss_ema"], frozen,
                    m.get("extra"))


def sub_state(state: TrainState, params, opt_state, updates_per_step: int, frozen=None) -> TrainState:
  """The state an inner optimizer loop (PPO/GRPO epochs x minibatches) runs on: its `step` counts optimizer
  updates (what the learning-rate schedule reads), while the outer state's `step` counts iterations."""
  return TrainState(state.step * updates_per_step, params, opt_state, state.rng, jnp.zeros((), jnp.int32),
                    state.loss_ema, frozen)


def split_microbatches(batch: dict, n: int) -> dict:
  """[B, ...] -> [n, B/n, ...], microbatch i = rows i, i+n, ... (each spread over every device)."""
  def split(x):
    b = x.shape[0]
    if b % n:
      raise ValueError(f"batch of {b} rows is not divisible by train.grad_accum={n}")
    return jnp.swapaxes(x.reshape((b // n, n) + x.shape[1:]), 0, 1)
  return jax.tree.map(split, batch)


LossFn = Callable[[Any, dict], tuple[jax.Array, tuple[jax.Array, dict]]]


def accumulate(loss_fn: LossFn, params, batch: dict, n_micro: int):
  """Gradient of sum(loss)/sum(denominator) over all microbatches, exact (not a mean of means).

  `loss_fn(params, mb) -> (loss_sum, (denominator, metric_sums))`; every metric is a sum divided by the
  total denominator at the end, so 1 x 8 and 4 x 2 microbatches give the same numbers.
  """
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  if n_micro == 1:
    (loss_sum, (den, sums)), g = grad_fn(params, batch)
  else:
    mbs = split_microbatches(batch, n_micro)
    first = jax.tree.map(lambda x: x[0], mbs)
    shapes = jax.eval_shape(grad_fn, params, first)
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)

    def body(acc, mb):
      out = grad_fn(params, mb)
      return jax.tree.map(jnp.add, acc, out), None

    ((loss_sum, (den, sums)), g), _ = jax.lax.scan(body, zeros, mbs)
  inv = 1.0 / jnp.maximum(den, 1e-8)
  g = jax.tree.map(lambda x: (x * inv).astype(x.dtype), g)
  metrics = {k: v * inv for k, v in sums.items()}
  metrics["loss"] = loss_sum * inv
  metrics["denominator"] = den
  return g, metrics


def apply_update(state: TrainState, grads, metrics: dict, tx: optax.GradientTransformation,
                 schedule=None, loss_spike: float = 0.0):
  """Optimizer update unless the loss/grads are non-finite (or spike): then params stay as they were.

  The skip decision is made on device (no host sync); `metrics['nonfinite']` tells the loop, which either
  counts it (nan_policy=skip) or stops (nan_policy=stop) with the last checkpoint intact.
  """
  loss = metrics["loss"]
  gnorm = optax.tree.norm(grads)
  finite = jnp.isfinite(loss) & jnp.isfinite(gnorm)
  spike = jnp.zeros((), bool)
  if loss_spike > 0:
    spike = (state.loss_ema > 0) & (loss > loss_spike * state.loss_ema)
  ok = finite & ~spike
  updates, new_opt = tx.update(grads, state.opt_state, state.params)
  new_params = optax.apply_updates(state.params, updates)
  keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)  # noqa: E731
  ema = jnp.where(state.loss_ema > 0, 0.95 * state.loss_ema + 0.05 * loss, loss)
  new_state = TrainState(
      step=state.step + 1, params=keep(new_params, state.params), opt_state=keep(new_opt, state.opt_state),
      rng=jax.random.fold_in(state.rng, state.step), skipped=state.skipped + (~ok).astype(jnp.int32),
      loss_ema=jnp.where(ok, ema, state.loss_ema), frozen=state.frozen, extra=state.extra)
  metrics = dict(metrics, grad_norm=gnorm, nonfinite=(~finite).astype(jnp.int32),
                 spike=spike.astype(jnp.int32))
  if schedule is not None:
    metrics["lr"] = schedule(state.step)
  return new_state, metrics
