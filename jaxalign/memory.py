"""Dry run: compile a stage's train step for the configured mesh and report per-device memory, before any
weight or data is read (`launch/train.py --dry_run`). Everything is abstract: shapes and shardings only.
"""

from __future__ import annotations

import functools
import logging

import jax
import jax.numpy as jnp
import numpy as np

from jaxalign import sharding
from jaxalign.loops import setup
from jaxalign.models import heads, lora, transformer
from jaxalign.optim import make_optimizer
from jaxalign.steps import dpo, reward, sft
from jaxalign.steps.state import TrainState


def _model_cfg(config):
  init = config.model.init
  if init:
    return setup.resolve_model_config(init, config.model)
  from jaxalign.models.config import preset
  return preset(config.model.preset, **setup.model_overrides(config.model))


def _abstract(tree, shardings):
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def _per_device_bytes(tree) -> int:
  """Bytes one device holds of an abstract sharded tree (the largest shard of each leaf)."""
  total = 0
  for x in jax.tree.leaves(tree):
    shape = x.sharding.shard_shape(x.shape) if hasattr(x, "sharding") and x.sharding is not None else x.shape
    total += int(np.prod(shape)) * np.dtype(x.dtype).itemsize
  return total


def analyse(config) -> dict:
  """Per-device bytes: params, optimizer state, frozen models, and XLA's compiled temp (activations etc.)."""
  mesh = sharding.mesh_from_config(config.mesh)
  cfg = _model_cfg(config)
  base_cfg = cfg.replace(lora_rank=0)
  shapes, axes = transformer.abstract_params(cfg)
  p_sh = sharding.tree_shardings(shapes, axes, mesh)
  params = {"model": _abstract(shapes, p_sh)}
  stage = config.stage
  if stage == "reward":
    hs = heads.head_shapes(cfg)
    params["head"] = _abstract(hs, sharding.tree_shardings(hs, heads.HEAD_AXES, mesh))
  tx, sched = make_optimizer(config.optimizer, params, config.train.steps)
  opt_shapes = jax.eval_shape(tx.init, params)
  rep = sharding.replicated(mesh)
  # Optimizer moments mirror the params; everything else (counts) is replicated.
  flat_p = {tuple(p): s for p, s in _paths(params)}
  opt_sh = jax.tree_util.tree_map_with_path(lambda p, x: _match(p, x, flat_p, rep), opt_shapes)
  opt = _abstract(opt_shapes, opt_sh)
  frozen = None
  if stage == "dpo" and config.loss.type not in dpo.REFERENCE_FREE and not cfg.lora_rank \
      and not config.reference.precompute:
    rs, ra = transformer.abstract_params(base_cfg)
    frozen = {"reference": _abstract(rs, sharding.tree_shardings(rs, ra, mesh))}
  scalar = lambda dt: jax.ShapeDtypeStruct((), dt, sharding=rep)  # noqa: E731
  state = TrainState(scalar(jnp.int32), params, opt, jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=rep),
                     scalar(jnp.int32), scalar(jnp.float32), frozen)
  b, t = config.train.batch_size, config.train.seq_len
  bs = sharding.batch_sharding(mesh)
  lead = (b, 2) if stage in ("reward", "dpo") else (b,)
  i32 = lambda: jax.ShapeDtypeStruct((*lead, t), jnp.int32, sharding=bs)  # noqa: E731
  batch = {"tokens": i32(), "positions": i32(), "segment_ids": i32(), "targets": i32(),
           "weights": jax.ShapeDtypeStruct((*lead, t), jnp.float32, sharding=bs)}
  if stage in ("reward", "dpo"):
    batch["margin"] = jax.ShapeDtypeStruct((b,), jnp.float32, sharding=bs)
    batch["valid"] = jax.ShapeDtypeStruct((b,), jnp.float32, sharding=bs)
  if stage == "sft":
    fn = functools.partial(sft.sft_step, model_cfg=cfg, tx=tx, grad_accum=config.train.grad_accum)
  elif stage == "reward":
    fn = functools.partial(reward.reward_step, model_cfg=cfg, tx=tx, grad_accum=config.train.grad_accum)
  elif stage == "dpo":
    fn = functools.partial(dpo.dpo_step, model_cfg=cfg, loss_cfg=config.loss, tx=tx, grad_accum=config.train.grad_accum)
  else:
    raise ValueError(f"--dry_run supports stages sft, reward, dpo (got {stage!r})")
  state_sh = jax.tree.map(lambda x: x.sharding, state)
  compiled = jax.jit(fn, in_shardings=(state_sh, bs), out_shardings=(state_sh, None),
                     donate_argnums=(0,)).lower(state, batch).compile()
  mem = compiled.memory_analysis()
  out = {"mesh": dict(mesh.shape), "devices": mesh.devices.size, "params_total": cfg.num_params(),
         "params_per_device": _per_device_bytes(params), "opt_state_per_device": _per_device_bytes(opt),
         "frozen_per_device": _per_device_bytes(frozen) if frozen else 0}
  if cfg.lora_rank:
    out["trainable_params"] = sum(int(np.prod(s)) for s, _, _ in lora.adapter_specs(cfg).values())
  if mem is not None:
    out.update(argument_bytes=mem.argument_size_in_bytes, output_bytes=mem.output_size_in_bytes,
               temp_bytes=mem.temp_size_in_bytes, alias_bytes=mem.alias_size_in_bytes)
    out["peak_estimate_bytes"] = mem.argument_size_in_bytes + mem.output_size_in_bytes - \
        mem.alias_size_in_bytes + mem.temp_size_in_bytes
  return out


def _paths(tree):
  return [(tuple(str(getattr(k, "key", k)) for k in p), x.sharding)
          for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]]


def _match(path, x, flat_params, rep):
  """The param sharding whose path is a suffix of this optimizer-state leaf's path (mu/nu mirror params)."""
  keys = tuple(str(getattr(k, "key", k)) for k in path)
  for n in range(len(keys)):
    s = flat_params.get(keys[n:])
    if s is not None and x.ndim:
      return s
  return rep


def report(config) -> dict:
  out = analyse(config)
  gib = lambda v: f"{v / 2**30:.3f} GiB" if v >= 2**30 else f"{v / 2**20:.2f} MiB"  # noqa: E731
  lines = [f"dry run: stage {config.stage}, mesh {out['mesh']} ({out['devices']} devices), "
           f"{out['params_total'] / 1e6:.1f}M params",
           f"  params per device:     {gib(out['params_per_device'])}",
           f"  optimizer per device:  {gib(out['opt_state_per_device'])}",
           f"  frozen per device:     {gib(out['frozen_per_device'])}"]
  if "temp_bytes" in out:
    lines += [f"  XLA temp (activations, grads, workspace): {gib(out['temp_bytes'])}",
              f"  peak estimate per device: {gib(out['peak_estimate_bytes'])}"]
  msg = "\n".join(lines)
  logging.info("%s", msg)
  print(msg, flush=True)
  return out
