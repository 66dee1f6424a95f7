"""Model properties: HF parity per family, HF round trip, KV-cache equivalence, packing, sharding."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jaxalign import sharding
from jaxalign.models import build, hf, rope, transformer as T
from jaxalign.models.config import preset
from tests import hf_models

FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3", "olmo2", "qwen3_moe",
            "mixtral"]


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


@pytest.mark.parametrize("family", ["llama", "gemma2", "qwen2", "gemma3_text", "phi3", "olmo2", "qwen3_moe",
                                    "mixtral"])
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


# The newer families' cache paths are also checked by test_greedy_sampler_equals_transformers_generate.
@pytest.mark.parametrize("family,scan", [("llama", True), ("gemma2", False), ("mistral", True),
                                         ("qwen3_moe", False)])
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


def test_unrolled_gradient_builds_no_padded_arrays(monkeypatch):
  """Per-layer params, causal query/key blocks and RoPE halves are split, not sliced, out of their arrays: the
  gradient then concatenates the pieces, where slices transposed to one zero-padded full-size array each,
  summed (the bench SFT step had 94; ~4% of its time). Counted in the compiled HLO of a 3-block model."""
  from jaxalign.models import attention
  monkeypatch.setattr(attention, "CAUSAL_BLOCK_MIN", 4)
  cfg = preset("tiny", scan_layers=False)
  params = T.init_params(cfg, jax.random.key(4))
  tok = jnp.arange(24).reshape(2, 12) % 256
  assert len(attention.causal_blocks(12)) == 3
  hlo = jax.jit(jax.grad(lambda p: T.forward(cfg, p, tok)[0].mean())).lower(params).compile().as_text()
  assert " pad(" not in hlo


def test_cpu_projections_of_one_input_run_as_one_matmul(monkeypatch):
  """On the CPU q/k/v and gate/up are one matmul each (transformer.dense_many: XLA:CPU's dots run wider outputs
  faster, and a decode step runs 2 kernels where it ran 5): 3 fewer 2-D dots per layer, the same outputs and
  gradients as one dot per weight."""
  cfg = preset("tiny", scan_layers=False)
  params = T.init_params(cfg, jax.random.key(6))
  tok = jnp.arange(24).reshape(2, 12) % 256
  loss = lambda p: jnp.mean(jnp.square(T.forward(cfg, p, tok)[0]))  # noqa: E731

  def matmuls():
    hlo = jax.jit(lambda p: T.forward(cfg, p, tok)[0]).lower(params).compile().as_text()
    return len(re.findall(r"= f32\[\d+,\d+\]\S* dot\(", hlo))

  fused, (v0, g0) = matmuls(), jax.value_and_grad(loss)(params)
  monkeypatch.setattr(T, "dense_many", lambda x, ws: [T.dense(x, w) for w in ws])
  assert matmuls() - fused == 3 * cfg.num_layers
  v1, g1 = jax.value_and_grad(loss)(params)
  np.testing.assert_allclose(v1, v0, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), g1, g0)


def test_attention_backward_writes_key_gradients_keys_minor():
  """dV = P^T dO and dK = dS^T qs contract the query axis, the major dim of both operands; XLA:CPU runs that
  dot 2-3x faster writing [.., H, S] than [.., S, H] (attention._key_side), so both are written keys-minor."""
  from jaxalign.models import attention
  r = np.random.default_rng(0)
  q = jnp.asarray(r.standard_normal((2, 2, 8, 4), dtype=np.float32))
  k, v = (jnp.asarray(r.standard_normal((2, 2, 16, 4), dtype=np.float32)) for _ in range(2))
  bias = jnp.zeros((2, 4, 16), jnp.float32)
  grad = jax.jit(jax.grad(lambda q, k, v: jnp.sum(attention._fused_attention(q, k, v, bias, 0.5) ** 2), (0, 1, 2)))
  hlo = grad.lower(q, k, v).compile().as_text()
  layouts = re.findall(r"= f32\[2,2,16,4\](\{[\d,]+\}) dot\([^\n]*lhs_contracting_dims=\{2\}, rhs_batch_dims=\{0,1\}, "
                       r"rhs_contracting_dims=\{2\}", hlo)
  assert layouts == ["{2,3,1,0}"] * 2


def test_accelerator_dense_path_equals_the_cpu_path(monkeypatch):
  """On TPU/GPU `dense` contracts the weight as stored (no [D, N*H] flattening, which made XLA re-gather the
  k/v weights per layer); the same model gives the CPU path's outputs and gradients."""
  cfg = preset("tiny")
  params = T.init_params(cfg, jax.random.key(5))
  tok = jnp.arange(24).reshape(2, 12) % 256
  loss = lambda p: jnp.mean(jnp.square(T.forward(cfg, p, tok)[0]))  # noqa: E731
  v0, g0 = jax.value_and_grad(loss)(params)
  monkeypatch.setattr(sharding, "platform", lambda: "tpu")
  jaxpr = str(jax.make_jaxpr(loss)(params))
  assert "dimension_numbers=(([2, 3], [0, 1]), ([], []))" in jaxpr  # wo contracted over its [N, H] dims.
  v1, g1 = jax.value_and_grad(loss)(params)
  np.testing.assert_allclose(v1, v0, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), g1, g0)


def test_embedding_gradient_is_autodiffs_and_moves_in_the_compute_dtype():
  """The lookup's gradient equals autodiff's (float32 sums of the bf16 rows, repeated tokens included); for an
  FSDP-sharded table on a TPU slice the rows' gradients move between chips in bf16, not float32."""
  table = jax.random.normal(jax.random.key(0), (64, 16))
  tok = jnp.array([[1, 3, 3, 7], [63, 1, 0, 3]])
  f = lambda t: jnp.sum(jnp.sin(T.embed_lookup(t, tok, jnp.bfloat16).astype(jnp.float32)))  # noqa: E731
  g = lambda t: jnp.sum(jnp.sin(jnp.take(t, tok, axis=0).astype(jnp.bfloat16).astype(jnp.float32)))  # noqa: E731
  np.testing.assert_array_equal(jax.grad(f)(table), jax.grad(g)(table))
  pytest.importorskip("libtpu")
  from jax.sharding import NamedSharding, PartitionSpec as P

  from jaxalign import plan, topology
  mesh = sharding.make_mesh(1, -1, 1, devices=topology.parse("v5p-8").devices())
  ts = jax.ShapeDtypeStruct((128, 256), jnp.float32, sharding=NamedSharding(mesh, P(None, "fsdp")))
  ks = jax.ShapeDtypeStruct((8, 64), jnp.int32, sharding=NamedSharding(mesh, P("fsdp")))

  def loss(t, k):
    x = sharding.constrain(T.embed_lookup(t, k, jnp.bfloat16), ("act_batch", None, None))
    return jnp.sum(jnp.square(x.astype(jnp.float32)))
  with jax.set_mesh(mesh):
    hlo = jax.jit(jax.grad(loss)).lower(ts, ks).compile().as_text()
  moved = [r for op in plan.COLLECTIVES for r in plan.largest(hlo, op, None) if r["dtype"] != "s32"]
  # Autodiff's version all-reduces the whole float32 table gradient here (an f32 all-to-all at 8B scale).
  assert moved and all(r["dtype"] == "bf16" for r in moved), moved


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
  assert dict(sharding.make_mesh(data=2, fsdp=-1, tensor=2).shape) == {"data": 2, "expert": 1, "fsdp": 2, "tensor": 2}
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
  ang = pos.astype(jnp.float32)[..., None] * jnp.asarray(rope.inv_frequencies(rope.params_sets(cfg)[0], 16, 4096)[0])
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


def _hf_logits(path, tok, mask, positions=None):
  with torch.no_grad():
    kw = {} if positions is None else {"position_ids": torch.tensor(positions)}
    return hf_models.load(path)(input_ids=torch.tensor(tok), attention_mask=torch.tensor(mask), **kw).logits.numpy()


@pytest.mark.parametrize("rope_parameters", [
    {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 8},
    {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 8,
     "truncate": False, "beta_fast": 16.0, "beta_slow": 2.0, "attention_factor": 1.3},
    {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 3.0},
], ids=["yarn", "yarn-untruncated", "dynamic-ntk"])
def test_rope_scaling_matches_transformers(hf_factory, rope_parameters):
  """YaRN (its beta/truncate/attention-factor options move the frequencies) and dynamic NTK (its base grows
  with the longest position in the batch beyond max_position_embeddings=8: the 12-token rows cross it)."""
  path = hf_factory("llama", rope_parameters=rope_parameters, max_position_embeddings=8)
  cfg = hf.config_from_hf(path)
  params = hf.load_params(path, cfg)
  tok, mask = _padded_batch()
  ref = _hf_logits(path, tok, mask)
  out = np.asarray(jax.jit(lambda p, t, s: T.forward(cfg, p, t, None, s)[0])(params, tok, jnp.asarray(mask, jnp.int32)))
  assert np.abs((out - ref) * mask[..., None]).max() <= 1e-4
  if rope_parameters["rope_type"] == "dynamic":  # Within the original length the base is unchanged.
    short = T.forward(cfg, params, jnp.asarray(tok[:, :8]))[0]
    plain = T.forward(cfg.replace(rope_scaling=None), params, jnp.asarray(tok[:, :8]))[0]
    np.testing.assert_allclose(np.asarray(short), np.asarray(plain), atol=1e-6)


@pytest.mark.parametrize("family", ["gemma3_text", "phi3", "olmo2", "qwen3_moe", "mixtral"])
def test_left_padded_and_packed_parity(hf_factory, family):
  """Left padding (positions from the mask, as generate sets them) and two packed documents per row."""
  path = hf_factory(family)
  cfg = hf.config_from_hf(path)
  params = hf.load_params(path, cfg)
  tok, mask = _padded_batch()
  left, lmask = np.zeros_like(tok), np.zeros_like(mask)
  for i, n in enumerate(mask.sum(1)):
    left[i, tok.shape[1] - n:], lmask[i, tok.shape[1] - n:] = tok[i, :n], 1
  pos = np.maximum(np.cumsum(lmask, 1) - 1, 0)
  ref = _hf_logits(path, left, lmask, pos)
  out = np.asarray(T.forward(cfg, params, jnp.asarray(left), jnp.asarray(pos), jnp.asarray(lmask, jnp.int32))[0])
  assert np.abs((out - ref) * lmask[..., None]).max() <= 1e-4
  a, b = tok[0, :7], tok[1, :5]
  packed = np.concatenate([a, b])[None]
  seg = np.array([[1] * 7 + [2] * 5])
  ppos = np.array([list(range(7)) + list(range(5))])
  out = np.asarray(T.forward(cfg, params, jnp.asarray(packed), jnp.asarray(ppos), jnp.asarray(seg))[0])[0]
  np.testing.assert_allclose(out[:7], _hf_logits(path, a[None], np.ones((1, 7), np.int64))[0], atol=1e-4)
  np.testing.assert_allclose(out[7:], _hf_logits(path, b[None], np.ones((1, 5), np.int64))[0], atol=1e-4)


def test_unbuilt_model_options_are_rejected_at_load(tmp_path):
  """A config only the forward could reject fails at load time, with the option named."""
  import transformers
  c = transformers.AutoConfig.for_model("phi3", **hf_models.TINY, pad_token_id=0, rope_parameters={
      "rope_type": "longrope", "rope_theta": 1e4, "short_factor": [1.0] * 8, "long_factor": [2.0] * 8,
      "original_max_position_embeddings": 64})
  with pytest.raises(NotImplementedError, match="rope_type='longrope' is not supported.*LongRoPE"):
    hf.config_from_hf(c)
  with pytest.raises(ValueError, match="yarn.*original_max_position_embeddings"):
    preset("tiny", rope_scaling=(("factor", 4.0), ("rope_type", "yarn")))
  g3 = transformers.AutoConfig.for_model("gemma3", text_config=dict(hf_models.TINY))
  with pytest.raises(ValueError, match="gemma3_text"):
    hf.config_from_hf(g3)


@pytest.mark.parametrize("family", ["gemma3_text", "phi3", "olmo2", "qwen3_moe", "mixtral"])
def test_greedy_sampler_equals_transformers_generate(hf_factory, family):
  """The KV-cache sampler (left-padded prompts, unrolled layers, both rope sets) decodes HF's greedy tokens."""
  from jaxalign import sampling
  path = hf_factory(family)
  cfg = hf.config_from_hf(path)
  params = hf.load_params(path, cfg)
  tok, mask = _padded_batch(t=8)
  left, lmask = np.zeros_like(tok), np.zeros_like(mask)
  for i, n in enumerate(mask.sum(1)):
    left[i, 8 - n:], lmask[i, 8 - n:] = tok[i, :n], 1
  with torch.no_grad():
    ref = hf_models.load(path).generate(input_ids=torch.tensor(left), attention_mask=torch.tensor(lmask),
                                        max_new_tokens=6, do_sample=False, eos_token_id=None, pad_token_id=0)
  out = sampling.generate(cfg, params, jnp.asarray(left, jnp.int32), jnp.asarray(lmask, jnp.int32), jax.random.key(0),
                          max_new_tokens=6, greedy=True)
  np.testing.assert_array_equal(np.asarray(out.tokens), ref[:, 8:].numpy())


@pytest.mark.parametrize("family", ["gemma3_text", "phi3", "olmo2", "qwen3_moe", "mixtral"])
def test_reward_model_export_scores_as_transformers(hf_factory, tmp_path, family):
  """A reward head exported as *ForSequenceClassification scores rows as jaxalign does, and loads back."""
  from jaxalign.models import heads
  path = hf_factory(family)
  cfg = hf.config_from_hf(path, pad_token_id=0)
  params = hf.load_params(path, cfg)
  head = {"w": jnp.asarray(np.random.default_rng(0).normal(size=cfg.hidden_size), jnp.float32)}
  hf.save_params(str(tmp_path), cfg, params, head=head)
  tok, mask = _padded_batch()
  tok = np.where(mask > 0, np.maximum(tok, 1), 0)  # HF finds the last token as the one before the first pad.
  with torch.no_grad():
    ref = hf_models.load(str(tmp_path), seq_cls=True)(input_ids=torch.tensor(tok),
                                                        attention_mask=torch.tensor(mask)).logits[:, 0].numpy()
  got = heads.sequence_scores(cfg, params, head, jnp.asarray(tok), None, jnp.asarray(mask, jnp.int32))
  np.testing.assert_allclose(np.asarray(got), ref, atol=1e-4)
  np.testing.assert_array_equal(np.asarray(hf.load_score_head(str(tmp_path), cfg)["w"]), np.asarray(head["w"]))


def test_cudnn_attention_is_chosen_only_where_it_applies():
  """'auto' is cuDNN only on a GPU, for half-precision queries with head_dim <= 128, no soft-cap and no KV
  cache; on this CPU 'auto' keeps the XLA path (the GPU check is bench/gpu_attention.py)."""
  q16 = jnp.zeros((1, 4, 4, 16), jnp.bfloat16)
  cfg = preset("tiny", attention="cudnn")
  assert T.use_cudnn(cfg, q16, False)
  assert not T.use_cudnn(cfg, q16.astype(jnp.float32), False)
  assert not T.use_cudnn(cfg, q16, True)
  assert not T.use_cudnn(cfg.replace(attn_softcap=50.0), q16, False)
  assert not T.use_cudnn(cfg, jnp.zeros((1, 4, 4, 256), jnp.bfloat16), False)
  assert T.use_cudnn(preset("tiny"), q16, False) == (jax.default_backend() == "gpu")
  with pytest.raises(ValueError, match="auto\\|dense\\|fused\\|splash\\|cudnn"):
    preset("tiny", attention="flash")
