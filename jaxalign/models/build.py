"""Create or load params already sharded: shapes first, then shardings, then a jitted init or a sharded load."""

from __future__ import annotations

import jax

from jaxalign import sharding
from jaxalign.models import heads, hf, transformer
from jaxalign.models.config import ModelConfig


def param_shardings(cfg: ModelConfig, mesh, rules=None):
  shapes, axes = transformer.abstract_params(cfg)
  return sharding.tree_shardings(shapes, axes, mesh, rules)


def head_shardings(cfg: ModelConfig, mesh, rules=None):
  return sharding.tree_shardings(heads.head_shapes(cfg), heads.HEAD_AXES, mesh, rules)


def init_sharded(cfg: ModelConfig, mesh, rng: jax.Array, rules=None) -> dict:
  """Fresh params, each created directly on its devices (never a full copy first)."""
  return jax.jit(lambda r: transformer.init_params(cfg, r), out_shardings=param_shardings(cfg, mesh, rules))(rng)


def init_head_sharded(cfg: ModelConfig, mesh, rng: jax.Array) -> dict:
  return jax.jit(lambda r: heads.init_head(cfg, r), out_shardings=head_shardings(cfg, mesh))(rng)


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
