"""The vocabulary-tiled LM head equals the dense one: log-probs, entropy and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxalign.losses import lm
from jaxalign.models import transformer
from jaxalign.models.config import preset


def _dense(h, w, tgt, temperature, softcap):
  z = jnp.einsum("btd,dv->btv", h, w, preferred_element_type=jnp.float32)
  if softcap:
    z = jnp.tanh(z / softcap) * softcap
  z = z / temperature
  return lm.token_logprobs(z, tgt), lm.token_entropy(z)


@pytest.mark.parametrize("tiles,temperature,softcap,unroll", [(4, 1.0, None, False), (8, 0.7, None, False),
                                                              (2, 1.0, 3.0, False), (4, 0.7, 3.0, True)])
def test_head_logprobs_matches_dense(tiles, temperature, softcap, unroll):
  k1, k2, k3, k4 = jax.random.split(jax.random.PRNGKey(0), 4)
  b, t, d, v = 2, 5, 16, 64
  h = jax.random.normal(k1, (b, t, d))
  w = jax.random.normal(k2, (d, v)) * 0.5
  tgt = jax.random.randint(k3, (b, t), 0, v)
  g = jax.random.normal(k4, (b, t))  # A non-uniform cotangent.
  kw = dict(temperature=temperature, softcap=softcap)
  lp, ent = lm.head_logprobs(h, w, tgt, tiles=tiles, unroll=unroll, **kw)
  lp0, ent0 = _dense(h, w, tgt, **kw)
  np.testing.assert_allclose(lp, lp0, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(ent, ent0, rtol=1e-5, atol=1e-5)
  loss = lambda f: lambda h, w: jnp.sum(f(h, w)[0] * g)  # noqa: E731
  grads = jax.grad(loss(lambda h, w: lm.head_logprobs(h, w, tgt, tiles=tiles, unroll=unroll, **kw)),
                   argnums=(0, 1))(h, w)
  grads0 = jax.grad(loss(lambda h, w: _dense(h, w, tgt, **kw)), argnums=(0, 1))(h, w)
  for a, b_ in zip(grads, grads0):
    np.testing.assert_allclose(a, b_, rtol=1e-4, atol=1e-5)


def test_head_tiles_refuses_a_non_divisor():
  with pytest.raises(ValueError, match="do not divide"):
    lm.head_logprobs(jnp.zeros((1, 2, 4)), jnp.zeros((4, 10)), jnp.zeros((1, 2), jnp.int32), tiles=3)


def test_auto_tiles():
  assert preset("tiny").head_tiles() == 1
  assert preset("tiny", vocab_size=128256).head_tiles() == 8  # 16,032 tokens per tile.
  assert preset("tiny", vocab_size=152064).head_tiles() == 11  # 13,824 per tile.
  assert preset("tiny", vocab_size=262144).head_tiles() == 16


def test_model_log_probs_tiled_equal_dense():
  """Through the model (tied embeddings, as Gemma), a tiled head gives the dense head's loss and gradient."""
  cfg1 = preset("tiny", tie_embeddings=True, final_softcap=5.0, vocab_tiles=1)
  cfg4 = cfg1.replace(vocab_tiles=4)
  params = transformer.init_params(cfg1, jax.random.PRNGKey(1))
  tok = jax.random.randint(jax.random.PRNGKey(2), (2, 12), 0, cfg1.vocab_size)

  def loss(cfg):
    return lambda p: -jnp.sum(transformer.token_logprobs(cfg, p, tok, None, None, tok[:, 4:],
                                                         at=slice(3, 11), temperature=0.9)[0])

  v1, g1 = jax.value_and_grad(loss(cfg1))(params)
  v4, g4 = jax.value_and_grad(loss(cfg4))(params)
  np.testing.assert_allclose(v4, v1, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(g4), jax.tree.leaves(g1)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("chunk,softcap,unroll,vm,tiles", [
    (2, None, False, False, False), (3, 3.0, True, False, False), (0, None, False, False, False),
    (2, 3.0, False, True, False), (3, None, False, False, True), (2, None, True, True, True)])
def test_fused_head_equals_dense_value_and_gradients(chunk, softcap, unroll, vm, tiles, monkeypatch):
  """sum(w * log p) and its gradients computed in the forward equal the dense head's under autodiff: several
  chunks, a ragged last chunk (t=5 by 2 or 3: padded), one chunk (auto), soft-capping; a non-unit cotangent;
  the weight given vocabulary-major ([V, D], a tied embedding); dW made in vocabulary tiles (as for heads whose
  float32 dW would pass 2^31 bytes: here forced by lowering the limit: 4 tiles of a 64-word vocabulary)."""
  if tiles:
    monkeypatch.setattr(lm, "_MAX_VALUE_BYTES", 16 * 64 * 4 // 2)
  k1, k2, k3, k4 = jax.random.split(jax.random.PRNGKey(3), 4)
  b, t, d, v = 2, 5, 16, 64
  h = jax.random.normal(k1, (b, t, d))
  w = jax.random.normal(k2, (d, v)) * 0.5
  tgt = jax.random.randint(k3, (b, t), 0, v)
  wt = jax.random.uniform(k4, (b, t)) * (jnp.arange(t) != 2)  # Non-uniform weights, one position masked.

  def fused(h, w):
    w_ = w.T if vm else w
    return lm.head_weighted_logprob_sum(h, w_, tgt, wt, chunk=chunk, softcap=softcap, unroll=unroll,
                                        vocab_major=vm)

  def dense(h, w):
    return jnp.sum(_dense(h, w, tgt, 1.0, softcap)[0] * wt)

  np.testing.assert_allclose(fused(h, w), dense(h, w), rtol=1e-5)
  grads = jax.grad(lambda h, w: -0.37 * fused(h, w), argnums=(0, 1))(h, w)
  grads0 = jax.grad(lambda h, w: -0.37 * dense(h, w), argnums=(0, 1))(h, w)
  for a, b_ in zip(grads, grads0):
    np.testing.assert_allclose(a, b_, rtol=1e-4, atol=1e-6)


def test_fused_head_sharded_equals_unsharded():
  """Over data 2 x fsdp 2 x tensor 2 (rows over the batch axes, vocabulary over tensor, dW reduce-scattered
  over fsdp once) the fused head gives one device's loss and gradients, with dW in the weight's sharding; a
  batch the mesh cannot split falls back to XLA's partitioning and is exact too."""
  from jax.sharding import NamedSharding, PartitionSpec as P

  from jaxalign import sharding
  k1, k2, k3 = jax.random.split(jax.random.PRNGKey(4), 3)
  d, v = 16, 64
  w = jax.random.normal(k2, (d, v)) * 0.5
  mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)

  for b, vm in ((8, False), (3, False), (8, True)):
    h = jax.random.normal(k1, (b, 6, d))
    tgt = jax.random.randint(k3, (b, 6), 0, v)
    wt = (jnp.arange(6)[None] < jnp.arange(b)[:, None] % 6 + 1).astype(jnp.float32)
    w_ = w.T if vm else w  # Vocabulary-major: a tied embedding [V, D], sharded (tensor, fsdp).
    spec = P("tensor", "fsdp") if vm else P("fsdp", "tensor")

    def loss(h, w):
      return -lm.head_weighted_logprob_sum(h, w, tgt, wt, chunk=4, vocab_major=vm) / jnp.sum(wt)

    want = jax.value_and_grad(loss, argnums=(0, 1))(h, w_)
    with jax.set_mesh(mesh):
      ws = jax.device_put(w_, NamedSharding(mesh, spec))
      got = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(h, ws)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
    for a, b_ in zip(got[1], want[1]):
      np.testing.assert_allclose(np.asarray(a), b_, rtol=1e-4, atol=1e-6)
    if b == 8:
      assert got[1][1].sharding.spec == spec


def test_sft_loss_through_the_fused_head_equals_the_dense_head():
  """A large-vocabulary model's SFT loss goes through the fused head (tiles > 1): the same loss and gradients
  as the dense head, the tied embedding included; evaluation's unfused path gives the same loss."""
  from jaxalign.steps.sft import sft_loss
  cfg1 = preset("tiny", tie_embeddings=True, final_softcap=5.0, vocab_tiles=1)
  cfg4 = cfg1.replace(vocab_tiles=4)
  params = {"model": transformer.init_params(cfg1, jax.random.PRNGKey(1))}
  tok = jax.random.randint(jax.random.PRNGKey(2), (2, 12), 0, cfg1.vocab_size)
  batch = {"tokens": tok, "positions": jnp.broadcast_to(jnp.arange(12), (2, 12)),
           "segment_ids": jnp.ones((2, 12), jnp.int32), "targets": tok[:, 3:],
           "weights": (jnp.arange(9) > 1).astype(jnp.float32)[None].repeat(2, 0)}
  v1, g1 = jax.value_and_grad(lambda p: sft_loss(p, batch, model_cfg=cfg1)[0])(params)
  v4, g4 = jax.value_and_grad(lambda p: sft_loss(p, batch, model_cfg=cfg4)[0])(params)
  np.testing.assert_allclose(v4, v1, rtol=1e-5)
  np.testing.assert_allclose(sft_loss(params, batch, model_cfg=cfg4, fused=False)[0], v1, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(g4), jax.tree.leaves(g1)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
