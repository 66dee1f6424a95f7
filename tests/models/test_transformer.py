"""Model properties: HF parity per family, HF round trip, KV-cache equivalence, packing, sharding."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jaxalign import sharding
from jaxalign.models import build, hf, transformer as T
from jaxalign.models.config import preset
from tests import hf_models

FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2"]


def _padded_batch(vocab=128, b=3, t=12, seed=0):
  rng = np.random.default_rng(seed)
  tok = rng.integers(0, vocab, (b, t))
  lens = np.array([t, 7, 9])[:b]
  mask = (np.arange(t)[None] < lens[:, None]).astype(np.int64)
  return tok, mask


@pytest.mark.parametrize("family", FAMILIES)
def test_hf_parity(hf_factory, family):
  path = hf_factory(family)
  cfg = hf.config_from_hf(path)
  params = hf.load_params(path, cfg)
  tok, mask = _padded_batch()
  with torch.no_grad():
    ref = hf_models.load(path)(input_ids=torch.tensor(tok), attention_mask=torch.tensor(mask)).logits.numpy()
  for jit in (False, True):
    fwd = (lambda p, t, s: T.forward(cfg, p, t, None, s)[0])
    out = np.asarray((jax.jit(fwd) if jit else fwd)(params, jnp.asarray(tok), jnp.asarray(mask, jnp.int32)))
    assert np.abs((out - ref) * mask[..., None]).max() <= 1e-4, family


@pytest.mark.parametrize("family,kw", [("llama", {"hidden_act": "gelu"}), ("gemma2", {"hidden_activation": "gelu"}),
                                       ("gemma", {"hidden_act": "gelu"})])
def test_gelu_is_mapped_as_transformers_runs_it(hf_factory, family, kw):
  """Exact GELU where transformers uses it (Llama hidden_act, Gemma 2 hidden_activation "gelu"); Gemma 1's
  legacy "gelu" is the tanh form, as its config rewrites it. A tanh-for-exact mix-up moves logits ~1e-3."""
  path = hf_factory(family, **kw)
  cfg = hf.config_from_hf(path)
  assert cfg.act == ("gelu_tanh" if family == "gemma" else "gelu")
  params = hf.load_params(path, cfg)
  tok, mask = _padded_batch()
  with torch.no_grad():
    ref = hf_models.load(path)(input_ids=torch.tensor(tok), attention_mask=torch.tensor(mask)).logits.numpy()
  out = np.asarray(T.forward(cfg, params, jnp.asarray(tok), None, jnp.asarray(mask, jnp.int32))[0])
  assert np.abs((out - ref) * mask[..., None]).max() <= 1e-4, family


@pytest.mark.parametrize("family", ["llama", "gemma2", "qwen2"])
def test_hf_round_trip(hf_factory, tmp_path, family):
  path = hf_factory(family)
  cfg = hf.config_from_hf(path)
  params = hf.load_params(path, cfg)
  params = jax.tree.map(lambda x: x * 1.01, params)  # Differ from the source so a no-op save cannot pass.
  hf.save_params(str(tmp_path), cfg, params)
  tok, mask = _padded_batch()
  with torch.no_grad():
    ref = hf_models.load(str(tmp_path))(input_ids=torch.tensor(tok), attention_mask=torch.tensor(mask)).logits.numpy()
  out = np.asarray(T.forward(cfg, params, jnp.asarray(tok), None, jnp.asarray(mask, jnp.int32))[0])
  assert np.abs((out - ref) * mask[..., None]).max() <= 1e-4
  assert hf.config_from_hf(str(tmp_path)) == cfg


@pytest.mark.parametrize("family,scan", [("llama", True), ("gemma2", False), ("mistral", True)])
def test_kv_cache_matches_full_forward(hf_factory, family, scan):
  path = hf_factory(family)
  cfg = hf.config_from_hf(path, scan_layers=scan)
  params = hf.load_params(path, cfg)
  tok, mask = _padded_batch(t=12)
  prompt = 4
  full = np.asarray(T.forward(cfg, params, jnp.asarray(tok))[0])
  cache = T.init_cache(cfg, tok.shape[0], 16)
  step = jax.jit(lambda p, t, pos, c: T.forward(cfg, p, t, pos, None, c))
  pos = jnp.broadcast_to(jnp.arange(prompt), (3, prompt))
  out, cache = step(params, jnp.asarray(tok[:, :prompt]), pos, cache)
  got = [np.asarray(out)]
  for i in range(prompt, tok.shape[1]):
    out, cache = step(params, jnp.asarray(tok[:, i:i + 1]), jnp.full((3, 1), i), cache)
    got.append(np.asarray(out))
  np.testing.assert_allclose(np.concatenate(got, 1), full, atol=1e-4, rtol=0)


def test_ragged_prompts_in_cache():
  """Right-padded prompts of different lengths decode as if each were alone."""
  cfg = preset("tiny")
  params = T.init_params(cfg, jax.random.key(1))
  rng = np.random.default_rng(0)
  a, b = rng.integers(1, 256, 5), rng.integers(1, 256, 3)
  prompts = np.zeros((2, 5), np.int32)
  prompts[0], prompts[1, :3] = a, b
  seg = np.array([[1] * 5, [1, 1, 1, 0, 0]], np.int32)
  pos = np.array([[0, 1, 2, 3, 4], [0, 1, 2, 0, 0]], np.int32)
  cache = T.init_cache(cfg, 2, 8)
  _, cache = T.forward(cfg, params, jnp.asarray(prompts), jnp.asarray(pos), jnp.asarray(seg), cache)
  nxt = np.array([[7], [9]], np.int32)
  out, _ = T.forward(cfg, params, jnp.asarray(nxt), jnp.array([[5], [3]]), jnp.ones((2, 1), jnp.int32), cache)
  alone = T.forward(cfg, params, jnp.asarray(np.concatenate([b, [9]])[None]))[0]
  np.testing.assert_allclose(np.asarray(out[1, 0]), np.asarray(alone[0, -1]), atol=1e-5)


def test_packing_equals_separate():
  cfg = preset("tiny", sliding_window=3, layer_types=("sliding_attention", "full_attention"))
  params = T.init_params(cfg, jax.random.key(2))
  rng = np.random.default_rng(1)
  a, b = rng.integers(0, 256, 6), rng.integers(0, 256, 5)
  packed = np.concatenate([a, b, [0]])[None]
  seg = np.array([[1] * 6 + [2] * 5 + [0]])
  pos = np.array([list(range(6)) + list(range(5)) + [0]])
  out = np.asarray(T.forward(cfg, params, jnp.asarray(packed), jnp.asarray(pos), jnp.asarray(seg))[0])[0]
  la = np.asarray(T.forward(cfg, params, jnp.asarray(a[None]))[0])[0]
  lb = np.asarray(T.forward(cfg, params, jnp.asarray(b[None]))[0])[0]
  np.testing.assert_allclose(out[:6], la, atol=1e-5)
  np.testing.assert_allclose(out[6:11], lb, atol=1e-5)


def test_causal():
  cfg = preset("tiny")
  params = T.init_params(cfg, jax.random.key(3))
  tok = jnp.arange(10)[None]
  base = T.forward(cfg, params, tok)[0]
  changed = T.forward(cfg, params, tok.at[0, 7].set(99))[0]
  np.testing.assert_allclose(base[0, :7], changed[0, :7], atol=1e-6)
  assert np.abs(np.asarray(base[0, 7:] - changed[0, 7:])).max() > 1e-4


def test_logits_at_equals_sliced_logits_and_gradients():
  # A static slice of positions (a fixed-length prompt's response) gives the same logits and gradients.
  cfg = preset("tiny", final_softcap=30.0)
  params = T.init_params(cfg, jax.random.key(4))
  tok = jnp.asarray(np.random.default_rng(0).integers(0, 256, (2, 12)))
  sl = slice(4, 11)
  full = T.forward(cfg, params, tok)[0][:, sl]
  part = T.forward(cfg, params, tok, logits_at=sl)[0]
  assert part.shape == (2, 7, cfg.vocab_size)
  np.testing.assert_allclose(np.asarray(part), np.asarray(full), atol=1e-5)
  g = lambda f: jax.grad(lambda p: jnp.sum(jnp.sin(f(p))))(params)  # noqa: E731
  ga = g(lambda p: T.forward(cfg, p, tok)[0][:, sl])
  gb = g(lambda p: T.forward(cfg, p, tok, logits_at=sl)[0])
  jax.tree.map(lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-5), ga, gb)


@pytest.mark.parametrize("remat", ["full", "dots"])
def test_remat_and_scan_same_gradients(remat):
  cfg = preset("tiny")
  params = T.init_params(cfg, jax.random.key(4))
  tok = jnp.arange(16).reshape(2, 8) % 256
  loss = lambda c: lambda p: T.forward(c, p, tok)[0].mean()  # noqa: E731
  g0 = jax.grad(loss(cfg))(params)
  g1 = jax.jit(jax.grad(loss(cfg.replace(remat=remat, scan_layers=False))))(params)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), g0, g1)


def test_sharded_forward_equals_unsharded(hf_factory):
  path = hf_factory("qwen3")
  cfg = hf.config_from_hf(path)
  mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
  params = build.load_hf_sharded(path, cfg, mesh)
  assert params["layers"]["wq"].sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None)
  tok, mask = _padded_batch(b=4 - 1)
  tok = np.concatenate([tok, tok[:1]]); mask = np.concatenate([mask, mask[:1]])
  bs = sharding.batch_sharding(mesh)
  fwd = jax.jit(lambda p, t, s: T.forward(cfg, p, t, None, s)[0])
  out = fwd(params, jax.device_put(jnp.asarray(tok), bs), jax.device_put(jnp.asarray(mask, jnp.int32), bs))
  ref = fwd(hf.load_params(path, cfg), jnp.asarray(tok), jnp.asarray(mask, jnp.int32))
  np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-5)


def test_fsdp_param_bytes_per_device():
  cfg = preset("tiny")
  mesh = sharding.make_mesh(data=1, fsdp=8, tensor=1)
  params = build.init_sharded(cfg, mesh, jax.random.key(0))
  total = build.param_bytes(params)
  per_dev = build.bytes_per_device(params)
  assert len(per_dev) == 8
  assert max(per_dev.values()) <= total / 8 * 1.05, (max(per_dev.values()), total)


def test_mesh_errors():
  with pytest.raises(ValueError, match="does not match the 8 available devices"):
    sharding.make_mesh(data=3, fsdp=1, tensor=1)
  with pytest.raises(ValueError, match="only one of"):
    sharding.make_mesh(data=-1, fsdp=-1)
  assert dict(sharding.make_mesh(data=2, fsdp=-1, tensor=2).shape) == {"data": 2, "fsdp": 2, "tensor": 2}
  with pytest.raises(KeyError, match="matches no sharding rule"):
    sharding.spec_for(("nonsense",), (4,), sharding.make_mesh(), name="x")


@pytest.mark.parametrize("t,block_min", [(16, 4), (19, 4), (16, 64)])  # even, ragged last block, one block
def test_blockwise_causal_attention_is_exact(t, block_min, monkeypatch):
  """Skipping the key blocks after each query block changes nothing: values and gradients equal the full
  kernel on packed rows (two segments, right padding), for both kernels."""
  from jaxalign.models import attention
  monkeypatch.setattr(attention, "CAUSAL_BLOCK_MIN", block_min)
  blocks = attention.causal_blocks(t)
  assert blocks[0][0] == 0 and blocks[-1][1] == t and all(a[1] == b[0] for a, b in zip(blocks, blocks[1:]))
  assert (len(blocks) > 1) == (t > block_min)
  k = jax.random.split(jax.random.key(1), 3)
  q = jax.random.normal(k[0], (2, t, 4, 8))
  kk, v = jax.random.normal(k[1], (2, t, 2, 8)), jax.random.normal(k[2], (2, t, 2, 8))
  cut = t // 2 + 1
  seg = jnp.array([[1] * cut + [2] * (t - cut), [1] * (t - 3) + [0] * 3])
  pos = jnp.array([list(range(cut)) + list(range(t - cut)), list(range(t - 3)) + [0] * 3])
  m = attention.make_mask(seg, jnp.arange(t), pos, seg, jnp.arange(t), pos, 0)
  for kernel in (lambda *a: attention.fused_attention(*a, scale=0.3),
                 lambda *a: attention.dense_attention(*a, scale=0.3, softcap=None)):
    full = lambda q, kk, v: (kernel(q, kk, v, m) ** 2 * (seg[:, :, None, None] > 0)).sum()  # noqa: E731
    blk = lambda q, kk, v: (attention.blockwise_causal(kernel, q, kk, v, m) ** 2  # noqa: E731
                            * (seg[:, :, None, None] > 0)).sum()
    np.testing.assert_allclose(full(q, kk, v), jax.jit(blk)(q, kk, v), rtol=1e-6)
    for a, b in zip(jax.grad(full, (0, 1, 2))(q, kk, v), jax.jit(jax.grad(blk, (0, 1, 2)))(q, kk, v)):
      np.testing.assert_allclose(a, b, atol=1e-5)


@pytest.mark.parametrize("t", [1, 3])  # One decode query; a prefill-like block of queries.
def test_cache_layout_attention_matches_dense(t):
  """Queries against a cache (keys [B, K, H, S], values [B, K, S, H]) with empty and other-segment slots."""
  from jaxalign.models.attention import dense_attention, fused_attention, make_mask
  k = jax.random.split(jax.random.key(1), 3)
  q = jax.random.normal(k[0], (2, t, 4, 8))
  kk, v = jax.random.normal(k[1], (2, 12, 2, 8)), jax.random.normal(k[2], (2, 12, 2, 8))
  k_seg = jnp.array([[0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0], [1] * 11 + [0]])
  k_pos = jnp.maximum(jnp.cumsum(k_seg, -1) - 1, 0)
  slots = 8 + jnp.arange(t)
  m = make_mask(jnp.ones((2, t), jnp.int32), slots, k_pos[:, slots], k_seg, jnp.arange(12), k_pos, 0)
  dense = dense_attention(q, kk, v, m, scale=0.3, softcap=None)
  got = fused_attention(q, kk.transpose(0, 2, 3, 1), v.transpose(0, 2, 1, 3), m, scale=0.3, cache_layout=True)
  np.testing.assert_allclose(got, dense, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("fold_max", [256 * 256, 0])  # Both layouts: groups folded into queries, and not.
def test_fused_attention_matches_dense_values_and_gradients(fold_max, monkeypatch):
  from jaxalign.models import attention
  from jaxalign.models.attention import dense_attention, fused_attention, make_mask
  monkeypatch.setattr(attention, "FOLD_MAX_SCORES", fold_max)
  k = jax.random.split(jax.random.key(0), 3)
  q = jax.random.normal(k[0], (2, 16, 4, 8))
  kk, v = jax.random.normal(k[1], (2, 16, 2, 8)), jax.random.normal(k[2], (2, 16, 2, 8))
  seg = jnp.array([[1] * 10 + [2] * 6, [1] * 12 + [0] * 4])
  pos = jnp.array([list(range(10)) + list(range(6)), list(range(12)) + [0] * 4])
  m = make_mask(seg, jnp.arange(16), pos, seg, jnp.arange(16), pos, 0)
  f1 = lambda *a: (dense_attention(*a, m, scale=0.3, softcap=None) ** 2).sum()  # noqa: E731
  f2 = lambda *a: (fused_attention(*a, m, scale=0.3) ** 2).sum()  # noqa: E731
  np.testing.assert_allclose(f1(q, kk, v), f2(q, kk, v), rtol=1e-6)
  for a, b in zip(jax.grad(f1, (0, 1, 2))(q, kk, v), jax.jit(jax.grad(f2, (0, 1, 2)))(q, kk, v)):
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_rope_tables_are_exactly_sin_and_cos():
  """The tables pass through an identity matmul (so XLA computes them once): it must not change a bit."""
  cfg = preset("tiny")
  pos = jnp.asarray(np.random.default_rng(0).integers(0, 100_000, (3, 37)), jnp.int32)
  sin, cos = jax.jit(lambda p: T.rope_tables(cfg, p))(pos)
  ang = pos.astype(jnp.float32)[..., None] * jnp.asarray(T.inv_frequencies(cfg))
  ang = jnp.concatenate([ang, ang], -1)
  np.testing.assert_array_equal(sin, jnp.sin(ang))
  np.testing.assert_array_equal(cos, jnp.cos(ang))


def test_frozen_models_held_in_the_compute_dtype_are_exact():
  """A reference/reward model held in bf16 (loops.setup.hold_in_compute_dtype) loses nothing beyond the
  cast at use: its forward is bit-identical to that of the same weights rounded to bf16 and stored in f32
  (XLA:CPU may skip the rounding of an f32 weight at use, `xla_allow_excess_precision`; TPUs round)."""
  from jaxalign.loops.setup import hold_in_compute_dtype
  cfg = preset("tiny", dtype="bfloat16")
  params = T.init_params(cfg, jax.random.PRNGKey(0))
  params = jax.tree.map(lambda x: x + 1e-3 * jax.random.normal(jax.random.PRNGKey(1), x.shape), params)
  held = hold_in_compute_dtype({"reference": params}, cfg.dtype)["reference"]
  assert held["layers"]["wq"].dtype == jnp.bfloat16 and held["final_norm"].dtype == jnp.float32
  tok = jnp.arange(16)[None] % cfg.vocab_size
  rounded = jax.tree.map(lambda x: x.astype(jnp.bfloat16).astype(x.dtype) if x.ndim >= 2 else x, params)
  a, _ = T.forward(cfg, rounded, tok)
  b, _ = T.forward(cfg, held, tok)
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
