"""Optax chain from config: schedule, clipping, decoupled weight decay (not on norms/biases), frozen params."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxalign.sharding import path_name


def make_schedule(ocfg, total_steps: int) -> optax.Schedule:
  lr, warm = ocfg.learning_rate, int(ocfg.warmup_steps)
  decay_steps = max(1, total_steps - warm)
  end = lr * ocfg.end_lr_fraction
  if ocfg.schedule == "constant":
    main = optax.constant_schedule(lr)
  elif ocfg.schedule == "linear":
    main = optax.linear_schedule(lr, end, decay_steps)
  elif ocfg.schedule == "cosine":
    main = optax.cosine_decay_schedule(lr, decay_steps, alpha=ocfg.end_lr_fraction)
  else:
    raise ValueError(f"optimizer.schedule={ocfg.schedule!r}: expected constant | linear | cosine")
  if warm <= 0:
    return main
  return optax.join_schedules([optax.linear_schedule(0.0, lr, warm), main], [warm])


def decay_mask(params):
  """True where weight decay applies: matrices, not norms, biases or the scalar head."""
  def rule(path, x):
    name = path_name(path).rsplit("/", 1)[-1]
    return not ("norm" in name or re.fullmatch(r"b[qkv]", name) or x.ndim < 2)
  return jax.tree_util.tree_map_with_path(rule, params)


def freeze_mask(params, patterns) -> object:
  """Multiplier tree (1 = train, 0 = frozen); 'layers:0-3' freezes those layers' slices of stacked params."""
  patterns = [p for p in (patterns or ()) if p]
  layer_ranges, names = [], []
  for p in patterns:
    m = re.fullmatch(r"layers:(\d+)-(\d+)", p)
    if m:
      layer_ranges.append((int(m.group(1)), int(m.group(2))))
    else:
      names.append(p)
  matched = {n: False for n in names}

  def rule(path, x):
    name = path_name(path)
    for n in names:
      if re.search(rf"(^|/){re.escape(n)}(/|$)", name):
        matched[n] = True
        return np.zeros((), np.float32)
    if layer_ranges and "layers/" in name:
      m = np.ones((x.shape[0],) + (1,) * (x.ndim - 1), np.float32)
      for a, b in layer_ranges:
        m[a:b + 1] = 0.0
      return m
    return np.ones((), np.float32)

  out = jax.tree_util.tree_map_with_path(rule, params)
  missing = [n for n, ok in matched.items() if not ok]
  if missing:
    raise ValueError(f"optimizer.freeze: {missing} match no parameter")
  return out


def mask_updates(mask) -> optax.GradientTransformation:
  """Multiply updates by a (broadcastable) mask tree: frozen params get exactly zero."""
  def init(params):
    del params
    return optax.EmptyState()

  def update(updates, state, params=None):
    del params
    return jax.tree.map(lambda u, m: u * jnp.asarray(m, u.dtype), updates, mask), state

  return optax.GradientTransformation(init, update)


def lora_labels(params):
  """'train' for adapters (and any scalar head), 'frozen' for the base weights of a LoRA model."""
  def rule(path, _):
    name = path_name(path)
    return "train" if ("lora_" in name or name.startswith("head")) else "frozen"
  return jax.tree_util.tree_map_with_path(rule, params)


def has_adapters(params) -> bool:
  return any("lora_" in path_name(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0])


def make_optimizer(ocfg, params, total_steps: int, freeze=None) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """(tx, schedule). `params` may be abstract (shapes only). `freeze` overrides optimizer.freeze.

  With LoRA adapters present only they (and a scalar head) are trained; the base weights get no optimizer
  state at all (optax.multi_transform with set_to_zero), so the optimizer costs adapter-sized memory."""
  if has_adapters(params) and freeze != "inner":
    inner, sched = make_optimizer(ocfg, params, total_steps, freeze="inner")
    return optax.multi_transform({"train": inner, "frozen": optax.set_to_zero()}, lora_labels(params)), sched
  sched = make_schedule(ocfg, total_steps)
  parts = []
  fmask = freeze_mask(params, ocfg.freeze if freeze in (None, "inner") else freeze)
  frozen = any(np.any(np.asarray(m) == 0) for m in jax.tree.leaves(fmask))
  if frozen:
    parts.append(mask_updates(fmask))
  if ocfg.clip_norm:
    parts.append(optax.clip_by_global_norm(ocfg.clip_norm))
  if ocfg.name == "adamw":
    parts.append(optax.adamw(sched, b1=ocfg.b1, b2=ocfg.b2, eps=ocfg.eps, weight_decay=ocfg.weight_decay,
                             mask=decay_mask(params)))
  elif ocfg.name == "sgd":
    parts.append(optax.sgd(sched))
  elif ocfg.name == "adafactor":
    parts.append(optax.adafactor(sched, weight_decay_rate=ocfg.weight_decay or None))
  else:
    raise ValueError(f"optimizer.name={ocfg.name!r}: expected adamw | sgd | adafactor")
  if frozen:
    parts.append(mask_updates(fmask))
  return optax.chain(*parts), sched
