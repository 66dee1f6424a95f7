"""Create or load params already sharded: shapes first, then shardings, then a jitted init or a sharded load."""

from __future__ import annotations

import math

import jax

from jaxalign import sharding
from jaxalign.models import heads, hf, moe, transformer
from jaxalign.models.config import ModelConfig


def param_shardings(cfg: ModelConfig, mesh, rules=None):
  moe.check_divisible(cfg, mesh)
  shapes, axes = transformer.abstract_params(cfg)
  return sharding.tree_shardings(shapes, axes, mesh, rules)


def head_shardings(cfg: ModelConfig, mesh, rules=None):
  return sharding.tree_shardings(heads.head_shapes(cfg), heads.HEAD_AXES, mesh, rules)


def init_sharded(cfg: ModelConfig, mesh, rng: jax.Array, rules=None) -> dict:
  """Fresh params, each created directly on its devices (never a full copy first)."""
  return jax.jit(lambda r: transformer.init_params(cfg, r), out_shardings=param_shardings(cfg, mesh, rules))(rng)


def init_head_sharded(cfg: ModelConfig, mesh, rng: jax.Array) -> dict:
  return jax.jit(lambda r: heads.init_head(cfg, r), out_shardings=head_shardings(cfg, mesh))(rng)


def add_adapters(cfg: ModelConfig, params: dict, mesh, rng: jax.Array, rules=None) -> dict:
  """Base params + fresh LoRA adapters (A random, B zero), created sharded."""
  from jaxalign.models import lora
  specs = lora.adapter_specs(cfg)
  shapes = {k: jax.ShapeDtypeStruct(s, jax.numpy.dtype(cfg.param_dtype)) for k, (s, _, _) in specs.items()}
  shard = sharding.tree_shardings(shapes, {k: a for k, (_, a, _) in specs.items()}, mesh, rules)

  def init(r):
    out = {}
    for i, (k, (s, _, kind)) in enumerate(sorted(specs.items())):
      if kind == "zeros":
        out[k] = jax.numpy.zeros(s, cfg.param_dtype)
      else:
        fan_in = max(1, math.prod(s[1:-1]))
        out[k] = (jax.random.normal(jax.random.fold_in(r, i), s) / fan_in ** 0.5).astype(cfg.param_dtype)
    return out

  adapters = jax.jit(init, out_shardings=shard)(rng)
  return {**params, "layers": {**params["layers"], **adapters}}


def load_hf_sharded(path: str, cfg: ModelConfig, mesh, rules=None) -> dict:
  return hf.load_params(path, cfg, param_shardings(cfg, mesh, rules))


def param_bytes(tree) -> int:
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def bytes_per_device(tree) -> dict:
  """Bytes each device actually holds (addressable shards)."""
  out: dict = {}
  for x in jax.tree.leaves(tree):
    for s in x.addressable_shards:
      out[s.device] = out.get(s.device, 0) + s.data.size * s.data.dtype.itemsize
  return out
