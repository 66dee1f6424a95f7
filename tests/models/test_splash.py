"""The TPU splash-attention path, run in Pallas interpret mode on the CPU: the same values and gradients as
the XLA path (causal, sliding windows, soft-cap, packing), alone and under an 8-device mesh (shard_map)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxalign import sharding
from jaxalign.models import attention, splash, transformer
from jaxalign.models.config import preset


def _inputs(b=2, t=256, n=4, kh=2, h=32):
  ks = jax.random.split(jax.random.PRNGKey(0), 3)
  q = jax.random.normal(ks[0], (b, t, n, h))
  k = jax.random.normal(ks[1], (b, t, kh, h))
  v = jax.random.normal(ks[2], (b, t, kh, h))
  seg = jnp.ones((b, t), jnp.int32).at[0, :100].set(0).at[1, 128:].set(2)  # Left padding; two packed rows.
  pos = jnp.where(jnp.arange(t) >= 128, jnp.arange(t) - 128, jnp.arange(t))[None].repeat(b, 0)
  pos = pos.at[0].set(jnp.maximum(jnp.arange(t) - 100, 0))
  return q, k, v, seg, pos


@pytest.mark.parametrize("window,softcap", [(0, None), (64, None), (0, 20.0)])
def test_splash_matches_dense_values_and_gradients(window, softcap):
  q, k, v, seg, pos = _inputs()
  t = q.shape[1]
  slots = jnp.arange(t)
  mask = attention.make_mask(seg, slots, pos, seg, slots, pos, jnp.int32(window))
  scale = q.shape[-1] ** -0.5
  # Padding (segment 0) is left out: splash counts a window in slots, the XLA path in positions; the two
  # agree wherever positions run consecutively within a segment (all real tokens), not on padding.
  g = jax.random.normal(jax.random.PRNGKey(9), q.shape) * (seg > 0)[:, :, None, None]

  def dense(q, k, v):
    return jnp.sum(attention.dense_attention(q, k, v, mask, scale=scale, softcap=softcap) * g)

  def pallas(q, k, v):
    return jnp.sum(splash.attention(q, k, v, seg, scale=scale, softcap=softcap, windows=(window,)) * g)

  v0, g0 = jax.value_and_grad(dense, argnums=(0, 1, 2))(q, k, v)
  v1, g1 = jax.value_and_grad(pallas, argnums=(0, 1, 2))(q, k, v)
  np.testing.assert_allclose(v1, v0, rtol=1e-4)
  for a, b in zip(g1, g0):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-4)


def test_model_with_splash_equals_fused_under_a_mesh():
  """A Gemma-2-like tiny model (alternating sliding/full layers, soft-caps) through splash under an
  8-device fsdp x tensor mesh: the loss and gradients of the CPU's fused path."""
  if jax.device_count() < 8:
    pytest.skip("needs 8 devices (XLA_FLAGS=--xla_force_host_platform_device_count=8)")
  base = preset("tiny", num_heads=4, num_kv_heads=2, head_dim=32, sliding_window=64, attn_softcap=30.0,
                layer_types=("sliding_attention", "full_attention"), attention="dense")
  params = transformer.init_params(base, jax.random.PRNGKey(1))
  tok = jax.random.randint(jax.random.PRNGKey(2), (4, 128), 0, base.vocab_size)
  seg = jnp.ones_like(tok).at[1, 64:].set(2)

  def loss(cfg):
    return lambda p: -jnp.sum(transformer.token_logprobs(cfg, p, tok, None, seg, tok[:, 1:], at=slice(0, 127))[0])

  v0, g0 = jax.value_and_grad(loss(base))(params)
  mesh = sharding.make_mesh(1, 4, 2)
  with jax.set_mesh(mesh):
    v1, g1 = jax.jit(jax.value_and_grad(loss(base.replace(attention="splash"))))(params)
  np.testing.assert_allclose(v1, v0, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0)):
    np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-5)


def test_grouped_row_equals_the_kv_cache_path():
  """GRPO's response log-probs with each group as one splash row (SharedPrefixMask) equal the KV-cache
  path's (prompt prefilled once, cache repeated per response): values and gradients."""
  from jaxalign.steps import policy
  base = preset("tiny", head_dim=32)
  params = transformer.init_params(base, jax.random.PRNGKey(3))
  b, group, p, n = 2, 4, 64, 16  # One group as a row: 64 + 4 x 16 = 128 slots (splash tiles 128).
  tok = jax.random.randint(jax.random.PRNGKey(4), (b * group, p + n), 0, base.vocab_size)
  tok = tok.at[:, :p].set(jnp.repeat(tok[::group, :p], group, axis=0))  # Rows of a group share the prompt.
  seg = jnp.ones_like(tok).at[:group, :5].set(0)  # The first prompt left-padded.
  pos = jnp.maximum(jnp.cumsum(seg, axis=1) - 1, 0)

  def lp(cfg):
    return lambda prm: policy.response_logprobs(cfg, prm, tok, pos, seg, p, 0.8, group=group)

  splash_cfg = base.replace(attention="splash")
  assert policy.grouped_row_length(splash_cfg, p + n, p, group) == 128
  assert policy.grouped_row_length(base, p + n, p, group) == 0  # The CPU keeps the KV-cache path.
  g = jax.random.normal(jax.random.PRNGKey(5), (b * group, n))
  v0, g0 = jax.value_and_grad(lambda prm: jnp.sum(lp(base)(prm) * g))(params)
  v1, g1 = jax.value_and_grad(lambda prm: jnp.sum(lp(splash_cfg)(prm) * g))(params)
  np.testing.assert_allclose(v1, v0, rtol=1e-5)
  for a, b_ in zip(jax.tree.leaves(g1), jax.tree.leaves(g0)):
    np.testing.assert_allclose(a, b_, rtol=2e-4, atol=1e-5)
