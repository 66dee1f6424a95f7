"""Mixture-of-Experts: router loss as transformers, grouped matmuls, no [tokens, experts, hidden] buffer,
expert parallelism equal to the unsharded model."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jaxalign import sharding
from jaxalign.models import build, hf, moe, transformer as T
from jaxalign.models.config import preset
from tests import hf_models


def test_router_aux_loss_matches_transformers(hf_factory):
  """The load-balancing loss over all layers' real tokens equals `load_balancing_loss_func` on HF's own
  router logits and attention mask (padding excluded)."""
  from transformers.models.qwen3_moe.modeling_qwen3_moe import load_balancing_loss_func
  path = hf_factory("qwen3_moe")
  cfg = hf.config_from_hf(path)
  params = hf.load_params(path, cfg)
  rng = np.random.default_rng(0)
  tok = rng.integers(0, 128, (3, 12))
  mask = (np.arange(12)[None] < np.array([12, 7, 9])[:, None]).astype(np.int64)
  with torch.no_grad():
    out = hf_models.load(path)(input_ids=torch.tensor(tok), attention_mask=torch.tensor(mask), output_router_logits=True)
  want = float(load_balancing_loss_func(out.router_logits, cfg.num_experts, cfg.experts_per_token, torch.tensor(mask)))
  with moe.collect() as box:
    T.forward(cfg, params, jnp.asarray(tok), None, jnp.asarray(mask, jnp.int32))
  got = float(moe.collected_loss(cfg, box))
  assert abs(got - want) <= 1e-5 * max(1.0, abs(want)), (got, want)
  assert got > 1.0  # Above its balanced minimum (1.0 when routing is uniform): a real number was compared.


@pytest.mark.parametrize("impl", ["tiled", "ragged", "megablox"])
def test_grouped_matmul_values_and_gradients(impl):
  """Each implementation (megablox in Pallas interpret mode) equals per-group dense matmuls, with empty
  groups and rows past the groups' total (zero), and so do its gradients."""
  rng = np.random.default_rng(0)
  sizes = jnp.asarray([5, 0, 17, 3], jnp.int32)
  x = jnp.asarray(rng.normal(size=(29, 16)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(4, 16, 24)), jnp.float32)

  def dense(x, w):
    gid = jnp.searchsorted(jnp.cumsum(sizes), jnp.arange(29), side="right")
    y = jnp.einsum("md,mdf->mf", x, w[jnp.minimum(gid, 3)])
    return jnp.where((gid < 4)[:, None], y, 0.0)

  f = lambda fn: lambda x, w: jnp.sum(jnp.sin(fn(x, w)))  # noqa: E731
  np.testing.assert_allclose(moe.grouped_matmul(x, w, sizes, impl), dense(x, w), atol=1e-4)
  for a, b in zip(jax.grad(f(lambda x, w: moe.grouped_matmul(x, w, sizes, impl)), (0, 1))(x, w),
                  jax.grad(f(dense), (0, 1))(x, w)):
    np.testing.assert_allclose(a, b, atol=1e-4)


def _moe_cfg(**kw):
  return preset("tiny", **{"num_experts": 16, "experts_per_token": 2, "expert_size": 32, "router_aux_coef": 0.01, **kw})


def _largest_array(compiled) -> int:
  """Elements of the largest array in a compiled program's HLO."""
  import re
  return max(math.prod(int(d) for d in m.group(1).split(","))
             for m in re.finditer(r"(?:f32|bf16|s32|pred)\[([0-9,]+)\]", compiled.as_text()))


def test_no_tokens_by_experts_by_hidden_buffer():
  """The compiled SFT gradient of a 32-expert model over 1,024 tokens holds no array of even half of
  [tokens, experts, hidden] elements (the CPU path is the tiled grouped matmul); ragged_dot's CPU fallback,
  compiled the same way, does (so the check can fail)."""
  from jaxalign.steps.sft import sft_loss
  cfg = _moe_cfg(num_experts=32)
  params = T.init_params(cfg, jax.random.key(0))
  b, t = 8, 128
  batch = {"tokens": jnp.zeros((b, t), jnp.int32), "positions": jnp.broadcast_to(jnp.arange(t), (b, t)),
           "segment_ids": jnp.ones((b, t), jnp.int32), "targets": jnp.zeros((b, t), jnp.int32),
           "weights": jnp.ones((b, t), jnp.float32)}
  dense = b * t * cfg.num_experts * cfg.hidden_size

  def largest(c):
    grad = jax.jit(jax.grad(lambda p: sft_loss({"model": p}, batch, model_cfg=c)[0]))
    return _largest_array(grad.lower(params).compile())

  assert largest(cfg) < dense / 2
  assert largest(cfg.replace(moe_impl="ragged")) >= dense


def test_router_loss_is_in_the_sft_loss():
  from jaxalign.steps.sft import sft_loss
  cfg = _moe_cfg()
  params = {"model": T.init_params(cfg, jax.random.key(0))}
  rng = np.random.default_rng(0)
  batch = {"tokens": jnp.asarray(rng.integers(0, 256, (2, 16))), "positions": jnp.broadcast_to(jnp.arange(16), (2, 16)),
           "segment_ids": jnp.ones((2, 16), jnp.int32), "targets": jnp.asarray(rng.integers(0, 256, (2, 16))),
           "weights": jnp.ones((2, 16), jnp.float32)}
  with_aux, (n, sums) = sft_loss(params, batch, model_cfg=cfg)
  without, _ = sft_loss(params, batch, model_cfg=cfg.replace(router_aux_coef=0.0))
  aux = sums["router_aux_loss"] / n
  assert aux > 0.9
  np.testing.assert_allclose((with_aux - without) / n, 0.01 * aux, rtol=1e-4)


def test_expert_parallel_equals_unsharded():
  """Experts over a 4-way expert axis (the batch split over it too) and fsdp 2: the same logits, router loss
  and gradients as one device."""
  cfg = _moe_cfg()
  params = T.init_params(cfg, jax.random.key(1))
  rng = np.random.default_rng(1)
  tok = jnp.asarray(rng.integers(0, 256, (8, 16)))
  seg = jnp.asarray((np.arange(16)[None] < rng.integers(8, 17, (8, 1))).astype(np.int32))

  def loss(p, tok, seg):
    with moe.collect() as box:
      logits, _ = T.forward(cfg, p, tok, None, seg)
    return jnp.sum(jnp.sin(logits) * seg[..., None]) + moe.collected_loss(cfg, box)

  want = jax.jit(jax.value_and_grad(loss))(params, tok, seg)
  mesh = sharding.make_mesh(data=1, expert=4, fsdp=2, tensor=1)
  shardings = build.param_shardings(cfg, mesh)
  assert shardings["layers"]["moe_gate"].spec == jax.sharding.PartitionSpec(None, "expert", "fsdp", None)
  placed = jax.device_put(params, shardings)
  bs = sharding.batch_sharding(mesh)
  with jax.set_mesh(mesh):
    got = jax.jit(jax.value_and_grad(loss))(placed, jax.device_put(tok, bs), jax.device_put(seg, bs))
  np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-4), got[1], want[1])


def test_expert_axis_must_divide_the_experts():
  """mesh.expert that does not divide the experts is a config error naming both keys and the choices; a dense
  model on an expert axis is data parallel over it."""
  from jaxalign.errors import ConfigError
  cfg = _moe_cfg(num_experts=12)
  mesh = sharding.make_mesh(data=1, expert=8, fsdp=1, tensor=1)
  with pytest.raises(ConfigError, match=r"mesh\.expert=8 does not divide .*model\.num_experts.*set --config\.mesh\.expert"):
    build.param_shardings(cfg, mesh)
  build.param_shardings(preset("tiny"), mesh)
