"""One decoder-only transformer for the Llama, Mistral, Qwen2/3, Gemma 1/2/3, Phi-3 and OLMo 2 families.

Einsum letters: B batch, T query length, S key/cache length, D hidden, F MLP width, V vocab, L layers,
N query heads, K kv heads, H head dim.

Layers are stored stacked ([L, ...] leaves) whether or not they are scanned, so checkpoints and HF mapping
have one layout; `scan_layers` only changes how the forward is traced. Parameters are kept in
`param_dtype` and cast to `dtype` at use; norms, softmax and logits are float32.
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxalign import sharding
from jaxalign.losses import lm
from jaxalign.models import lora, moe, rope, splash
from jaxalign.models.attention import blockwise_causal, dense_attention, fused_attention, make_mask
from jaxalign.models.config import ModelConfig


# Logical axes of the activations (jaxalign.sharding's table): constrained at each block boundary and inside
# attention and the MLP, as MaxText does, so no chip holds a global-batch-sized activation.
BTD = ("act_batch", "act_length", "act_embed")
BTNH = ("act_batch", "act_length", "act_heads", None)
BTKH = ("act_batch", "act_length", "act_kv_heads", None)
BTF = ("act_batch", "act_length", "act_mlp")
BTV = ("act_batch", "act_length", "act_vocab")
_c = sharding.constrain


class KVCache(NamedTuple):
  """Preallocated decode cache; `index` is the next slot to write (shared by all rows).

  One array per layer: an unrolled decode step updates each in place and attention reads it as is (a stacked
  [L, ...] array costs a copy of the layer's slice per token). Keys are [batch, kv heads, head dim, slots]
  and values [batch, kv heads, slots, head dim]: a decode query's scores then sum over the head dim of
  slot-contiguous rows, and its output over the slots of head-contiguous rows (attention._decode_attention:
  measured faster than either layout for both)."""

  k_BKHS: tuple[jax.Array, ...]
  v_BKSH: tuple[jax.Array, ...]
  seg_BS: jax.Array  # 0 = empty or padding.
  pos_BS: jax.Array
  index: jax.Array  # int32 scalar.


def init_cache(cfg: ModelConfig, batch: int, length: int, dtype=None) -> KVCache:
  dtype = jnp.dtype(dtype or cfg.dtype)
  zeros = lambda *shape: tuple(jnp.zeros(shape, dtype) for _ in range(cfg.num_layers))  # noqa: E731
  b, k, h = batch, cfg.num_kv_heads, cfg.head_dim
  return KVCache(zeros(b, k, h, length), zeros(b, k, length, h), jnp.zeros((batch, length), jnp.int32),
                 jnp.zeros((batch, length), jnp.int32), jnp.zeros((), jnp.int32))


def repeat_cache(cache: KVCache, n: int) -> KVCache:
  """Each row's cache n times (rows i * n + j, as `jnp.repeat`): n continuations of one prefilled prompt."""
  return jax.tree.map(lambda x: x if x.ndim == 0 else jnp.repeat(x, n, axis=0), cache)


def _param(rngs, shape, axes, dtype, init="normal"):
  if init == "normal":
    value = 0.02 * jax.random.normal(rngs.params(), shape, jnp.float32)
  elif init == "lora_a":  # Fan-in scaled, as the usual Kaiming init of A.
    fan_in = int(np.prod(shape[1:-1]))
    value = jax.random.normal(rngs.params(), shape, jnp.float32) / np.sqrt(fan_in)
  elif init == "ones":
    value = jnp.ones(shape, jnp.float32)
  else:
    value = jnp.zeros(shape, jnp.float32)
  return nnx.Param(value.astype(dtype), axes=axes)


class Transformer(nnx.Module):
  """Decoder with stacked layers; `__call__` returns float32 logits and the updated cache."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    pd = jnp.dtype(cfg.param_dtype)
    d, f, v, l = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, cfg.num_layers
    n, k, h = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    norm_init = "zeros" if cfg.norm_offset else "ones"
    self.embed = _param(rngs, (v, d), ("vocab", "embed"), pd)
    layers = dict(
        wq=_param(rngs, (l, d, n, h), ("layers", "embed", "heads", "head_dim"), pd),
        wk=_param(rngs, (l, d, k, h), ("layers", "embed", "kv_heads", "head_dim"), pd),
        wv=_param(rngs, (l, d, k, h), ("layers", "embed", "kv_heads", "head_dim"), pd),
        wo=_param(rngs, (l, n, h, d), ("layers", "heads", "head_dim", "embed"), pd),
    )
    if cfg.num_experts:
      e, fe = cfg.num_experts, cfg.expert_size
      layers.update(router=_param(rngs, (l, d, e), ("layers", "embed", None), pd),
                    moe_gate=_param(rngs, (l, e, d, fe), ("layers", "expert", "embed", "mlp"), pd),
                    moe_up=_param(rngs, (l, e, d, fe), ("layers", "expert", "embed", "mlp"), pd),
                    moe_down=_param(rngs, (l, e, fe, d), ("layers", "expert", "mlp", "embed"), pd))
    else:
      layers.update(w_gate=_param(rngs, (l, d, f), ("layers", "embed", "mlp"), pd),
                    w_up=_param(rngs, (l, d, f), ("layers", "embed", "mlp"), pd),
                    w_down=_param(rngs, (l, f, d), ("layers", "mlp", "embed"), pd))
    if cfg.qkv_bias:
      layers.update(bq=_param(rngs, (l, n, h), ("layers", "heads", "head_dim"), pd, "zeros"),
                    bk=_param(rngs, (l, k, h), ("layers", "kv_heads", "head_dim"), pd, "zeros"),
                    bv=_param(rngs, (l, k, h), ("layers", "kv_heads", "head_dim"), pd, "zeros"))
    if cfg.pre_norms:
      layers.update(attn_norm=_param(rngs, (l, d), ("layers", "norm"), pd, norm_init),
                    mlp_norm=_param(rngs, (l, d), ("layers", "norm"), pd, norm_init))
    if cfg.qk_norm and cfg.qk_norm_all_heads:  # OLMo 2: one norm over every head's dims.
      layers.update(q_norm=_param(rngs, (l, n, h), ("layers", "heads", "head_dim"), pd, norm_init),
                    k_norm=_param(rngs, (l, k, h), ("layers", "kv_heads", "head_dim"), pd, norm_init))
    elif cfg.qk_norm:
      layers.update(q_norm=_param(rngs, (l, h), ("layers", "norm"), pd, norm_init),
                    k_norm=_param(rngs, (l, h), ("layers", "norm"), pd, norm_init))
    if cfg.post_norms:
      layers.update(post_attn_norm=_param(rngs, (l, d), ("layers", "norm"), pd, norm_init),
                    post_mlp_norm=_param(rngs, (l, d), ("layers", "norm"), pd, norm_init))
    if cfg.lora_rank:
      for name, (shape, axes, init) in lora.adapter_specs(cfg).items():
        layers[name] = _param(rngs, shape, axes, pd, init)
    self.layers = nnx.Dict(layers)
    self.final_norm = _param(rngs, (d,), ("norm",), pd, norm_init)
    if not cfg.tie_embeddings:
      self.lm_head = _param(rngs, (d, v), ("embed", "vocab"), pd)

  def __call__(self, tokens_BT, positions_BT=None, segment_ids_BT=None, cache: KVCache | None = None,
               use_lora: bool = True, layers: list[dict] | None = None, logits_at: slice | None = None):
    """Logits [B, T, V] and the updated cache. `logits_at`: a static slice of positions to compute logits for
    (a fixed-length prompt's response, a prefill's last position): the LM head skips the rest."""
    h_BTD, cache = self.hidden_states(tokens_BT, positions_BT, segment_ids_BT, cache, use_lora, layers)
    return self.logits(h_BTD if logits_at is None else h_BTD[:, logits_at]), cache

  def head_weight(self) -> jax.Array:
    """The LM head [D, V] (the embedding, transposed, when tied)."""
    return self.embed[...].T if self.cfg.tie_embeddings else self.lm_head[...]

  def token_logprobs(self, h_BTD, targets_BT, temperature: float = 1.0):
    """(log p(targets) [B, T], entropy [B, T]) from final-normed hidden states, float32, under
    softmax(logits / temperature). Over `cfg.head_tiles()` vocabulary tiles (losses.lm.head_logprobs) no
    [B, T, V] logits exist; with one tile it is the dense head (unused entropy is dropped by jit)."""
    cfg = self.cfg
    tiles = cfg.head_tiles()
    if tiles == 1:
      logits_BTV = self.logits(h_BTD)
      if temperature != 1.0:
        logits_BTV = logits_BTV / temperature
      return lm.token_logprobs(logits_BTV, targets_BT), lm.token_entropy(logits_BTV)
    dt = jnp.dtype(cfg.dtype)
    return lm.head_logprobs(h_BTD.astype(dt), self.head_weight().astype(dt), targets_BT, tiles=tiles,
                            temperature=temperature, softcap=cfg.final_softcap, unroll=not cfg.scan_layers)

  def weighted_logprob_sum(self, h_BTD, targets_BT, weights_BT):
    """sum(weights * log p(targets)), float32: the SFT loss's head. Over several vocabulary tiles (a large
    vocabulary) it is the fused head (losses.lm.head_weighted_logprob_sum: gradients made in the forward,
    three head matmuls instead of four, for a [D, V] gradient buffer while it runs; `fused_head=False` keeps
    the tiled head); with one tile the dense head."""
    cfg = self.cfg
    if cfg.head_tiles() == 1 or not cfg.fused_head:
      lp_BT, _ = self.token_logprobs(h_BTD, targets_BT)
      return jnp.sum(lp_BT * weights_BT.astype(jnp.float32))
    dt = jnp.dtype(cfg.dtype)
    tied = cfg.tie_embeddings  # The embedding [V, D] as it is: no transposed copy of it in the chunk loop.
    w = self.embed[...] if tied else self.lm_head[...]
    return lm.head_weighted_logprob_sum(h_BTD.astype(dt), w.astype(dt), targets_BT, weights_BT,
                                        softcap=cfg.final_softcap, unroll=not cfg.scan_layers, vocab_major=tied)

  def logits(self, h_BTD) -> jax.Array:
    """Final-normed hidden states -> float32 logits (soft-capped for Gemma 2)."""
    cfg = self.cfg
    dt = jnp.dtype(cfg.dtype)
    w_DV = self.head_weight()
    logits_BTV = _c(dense(h_BTD.astype(dt), w_DV.astype(dt), preferred=jnp.float32), BTV)
    if cfg.final_softcap:
      logits_BTV = jnp.tanh(logits_BTV / cfg.final_softcap) * cfg.final_softcap
    return logits_BTV

  def hidden_states(self, tokens_BT, positions_BT=None, segment_ids_BT=None, cache: KVCache | None = None,
                    use_lora: bool = True, layers: list[dict] | None = None,
                    shared_prefix: tuple[int, int, int] | None = None):
    """Token ids -> final-normed hidden states [B, T, D] (float32) and the updated cache.

    `use_lora=False` runs the base model of a LoRA-adapted one (the reference, without a second copy).
    `layers`: this model's `layer_list()`, sliced once outside a decode loop (unrolled layers only), so a
    decode step does not copy every layer's weights out of the stacked arrays again.
    `shared_prefix`: (prompt, response, group) when each row is one prompt followed by `group` responses
    that each see the prompt and themselves only (splash attention's SharedPrefixMask; TPU path)."""
    cfg = self.cfg
    dt = jnp.dtype(cfg.dtype)
    b, t = tokens_BT.shape
    if positions_BT is None:
      positions_BT = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    if segment_ids_BT is None:
      segment_ids_BT = jnp.ones((b, t), jnp.int32)
    x_BTD = _c(embed_lookup(self.embed[...], tokens_BT, dt), BTD)
    if cfg.embed_scale:
      x_BTD = x_BTD * jnp.asarray(math.sqrt(cfg.hidden_size), dt)
    sin_RBTH, cos_RBTH = rope.tables(cfg, positions_BT)

    if cache is None:
      q_slot_T = jnp.arange(t, dtype=jnp.int32)
      k_seg, k_pos, k_slot = segment_ids_BT, positions_BT, q_slot_T
    else:
      q_slot_T = cache.index + jnp.arange(t, dtype=jnp.int32)
      k_seg = jax.lax.dynamic_update_slice(cache.seg_BS, segment_ids_BT.astype(jnp.int32), (0, cache.index))
      k_pos = jax.lax.dynamic_update_slice(cache.pos_BS, positions_BT.astype(jnp.int32), (0, cache.index))
      k_slot = jnp.arange(cache.seg_BS.shape[1], dtype=jnp.int32)
    mask_args = (segment_ids_BT, q_slot_T, positions_BT, k_seg, k_slot, k_pos)
    windows_L = jnp.asarray(cfg.window_sizes(), jnp.int32)
    rope_L = jnp.asarray(rope.set_index(cfg), jnp.int32)
    layer_params = {name: p[...] for name, p in self.layers.items()}

    def body(x_BTD, layer):
      p, (window, r), kv = layer
      sin_BTH, cos_BTH = (sin_RBTH[0], cos_RBTH[0]) if cfg.rope_local is None else (sin_RBTH[r], cos_RBTH[r])
      x_BTD, kv, stats = _block(cfg, p, _c(x_BTD, BTD), sin_BTH, cos_BTH, mask_args, window, kv, cache, use_lora,
                                shared_prefix)
      return _c(x_BTD, BTD), (kv, stats)

    if cfg.remat != "none":
      body = jax.checkpoint(body, policy=remat_policy(cfg.remat), prevent_cse=not cfg.scan_layers)

    if cfg.scan_layers:
      kv_in = (jnp.stack(cache.k_BKHS), jnp.stack(cache.v_BKSH)) if cache is not None else None
      x_BTD, (kv_out, stats_L) = jax.lax.scan(body, x_BTD, (layer_params, (windows_L, rope_L), kv_in))
      stats = jax.tree.map(lambda a: a.sum(0), stats_L)
      if cache is not None:
        kv_out = tuple(tuple(x[i] for i in range(cfg.num_layers)) for x in kv_out)
    else:  # Unrolled; the cache is updated in place per layer (no per-token copy of the whole cache).
      ks, vs, per_layer = [], [], []
      layers = layers if layers is not None else unstack_layers(layer_params, cfg.num_layers)
      for i in range(cfg.num_layers):
        p_i = layers[i]
        kv = None if cache is None else (cache.k_BKHS[i], cache.v_BKSH[i])
        x_BTD, (kv, st) = body(x_BTD, (p_i, (windows_L[i], rope_L[i]), kv))
        per_layer.append(st)
        if cache is not None:
          ks.append(kv[0])
          vs.append(kv[1])
      kv_out = (tuple(ks), tuple(vs))
      stats = jax.tree.map(lambda *a: sum(a), *per_layer)
    if cfg.num_experts:
      moe.record(stats)
    h_BTD = _c(rms_norm(x_BTD, self.final_norm[...], cfg), BTD)
    if cache is not None:
      cache = KVCache(kv_out[0], kv_out[1], k_seg, k_pos, cache.index + t)
    return h_BTD, cache


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def embed_lookup(table_VD, tokens_BT, dtype):
  """table[tokens] in the compute dtype; its gradient accumulated in the table's dtype as autodiff does, but
  with the rows' gradients moved to the table's sharding (embed over fsdp) in the compute dtype first.

  Why: autodiff converts the bf16 cotangent to float32 before the scatter-add, and XLA's partitioner then
  moves it between devices in float32 (an all-to-all of [rows, T, D] per step: 64 MiB per 4k row); the same
  sum from the bf16 values, converted after the move, is equal and moves half (MaxText's moves bf16 and
  sums in bf16)."""
  return jnp.take(table_VD, tokens_BT, axis=0).astype(dtype)


def _embed_fwd(table_VD, tokens_BT, dtype):
  return embed_lookup(table_VD, tokens_BT, dtype), (table_VD, tokens_BT)


def _embed_bwd(dtype, res, g_BTD):
  table_VD, tokens_BT = res
  g_BTD = _c(g_BTD, (None, None, "embed"))  # The table's sharding of D: the move happens here, in bf16.
  d_VD = jnp.zeros(table_VD.shape, table_VD.dtype).at[tokens_BT].add(g_BTD.astype(table_VD.dtype))
  return d_VD, None


embed_lookup.defvjp(_embed_fwd, _embed_bwd)


def remat_policy(remat: str):
  """What a layer keeps for its backward: 'full' nothing (recompute the layer), 'dots' every matmul output,
  'offload' the weight matmuls' outputs moved to host memory (TPU/GPU; recomputes attention and
  elementwise ops, reads the projections back instead of recomputing them)."""
  cp = jax.checkpoint_policies
  if remat == "dots":
    return cp.checkpoint_dots
  if remat == "offload":
    return cp.offload_dot_with_no_batch_dims(offload_src="device", offload_dst="pinned_host")
  return cp.nothing_saveable


def dense(x, w, contract: int = 1, preferred=None):
  """x [..., *c] . w [*c, *out] over the `contract` trailing dims of x: on the CPU as one 2-D matmul, on
  TPU and GPU as one dot_general over the weight as it is stored.

  Why 2-D on the CPU: autodiff of a [B, T, D] x [D, F] einsum gives a weight-gradient dot that contracts two
  batch dims, which XLA:CPU lowers to a transpose copy and a slow generic dot; flattened to [B*T, D] the
  backward is two plain matmuls (measured: LM head fwd+bwd 64 -> 34 ms, MLP 40 -> 33 ms on the bench shape).
  Why not on TPU: a flattened [D, N*H] k/v projection made XLA gather those weights a third time per layer
  in the backward, in a transposed layout (Llama-3-8B under FSDP on v5p-128: 16 MiB more all-gathers per
  layer, and the layer 0.1 ms slower in the cost model); the weight as stored is gathered twice, as MaxText's.
  """
  if sharding.platform() != "cpu":
    dims = ((tuple(range(x.ndim - contract, x.ndim)), tuple(range(contract))), ((), ()))
    return jax.lax.dot_general(x, w, dims, preferred_element_type=preferred)
  lead, c, out = x.shape[:x.ndim - contract], w.shape[:contract], w.shape[contract:]
  k = math.prod(c)
  y = jnp.dot(x.reshape(-1, k), w.reshape(k, -1), preferred_element_type=preferred)
  return y.reshape(*lead, *out)


def dense_many(x, ws):
  """[x . w for w in ws], one input and each weight contracted over x's last dim: on the CPU as one matmul over
  the weights side by side, split after; elsewhere one dot per weight.

  Why one matmul on the CPU: XLA:CPU's dots run a wider output faster at a small model's sizes (2-core Xeon,
  2,048 rows of 256: 147 GFLOP/s at 128 output columns, 176 at 256, 184 at 512, 195 at 688, 242 at 1,376), a
  decode step runs one kernel where it ran three, and each weight's gradient is a piece of the fused one (a
  split: no padded arrays). Why not on TPU/GPU: the weights are sharded there, and a concatenate of sharded
  weights is a relayout the compile plan would pay per layer, for MXU tiles that are full anyway."""
  if sharding.platform() != "cpu" or len(ws) == 1:
    return [dense(x, w) for w in ws]
  flat = [w.reshape(w.shape[0], -1) for w in ws]
  parts = jax.lax.split(dense(x, jnp.concatenate(flat, axis=1)), [f.shape[1] for f in flat], axis=-1)
  return [y.reshape(*x.shape[:-1], *w.shape[1:]) for y, w in zip(parts, ws)]


def rms_norm(x, w, cfg: ModelConfig):
  """RMSNorm in float32; Gemma's variant scales by (1 + w). The scale is taken in the compute dtype first,
  as a transformers model in that dtype holds it; under FSDP its gradient is then summed across chips in
  that dtype too (bf16: 8 KiB per 4,096-wide norm where float32 moved 16, as MaxText's)."""
  dtype = x.dtype
  x32 = x.astype(jnp.float32)
  x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + cfg.norm_eps)
  w32 = w.astype(dtype).astype(jnp.float32)
  scale = 1.0 + w32 if cfg.norm_offset else w32
  return (x32 * scale).astype(dtype)


def rms_norm_heads(x_BTNH, w_NH, cfg: ModelConfig):
  """RMSNorm over all heads' dims together (OLMo 2's q/k norms over the [N*H] projection), float32."""
  dtype = x_BTNH.dtype
  x32 = x_BTNH.astype(jnp.float32)
  x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=(-2, -1), keepdims=True) + cfg.norm_eps)
  w32 = w_NH.astype(dtype).astype(jnp.float32)
  return (x32 * (1.0 + w32 if cfg.norm_offset else w32)).astype(dtype)


def rope_tables(cfg: ModelConfig, positions_BT):
  """sin, cos [B, T, rotary dims] of the model's global rope set (rope.tables has every set)."""
  sin_RBTH, cos_RBTH = rope.tables(cfg, positions_BT)
  return sin_RBTH[0], cos_RBTH[0]


apply_rope = rope.apply


def _act(cfg: ModelConfig, x):
  if cfg.act == "silu":
    return jax.nn.silu(x)
  return jax.nn.gelu(x, approximate=cfg.act == "gelu_tanh")


def _block(cfg: ModelConfig, p: dict[str, Any], x_BTD, sin_BTH, cos_BTH, mask_args, window, kv, cache,
           use_lora: bool = True, shared_prefix: tuple[int, int, int] | None = None):
  dt = x_BTD.dtype

  def c(name):
    w = p[name].astype(dt)
    if name == "wq":
      # Gathered once per use, as the activations see it: else XLA gathers the query weight a third time per
      # layer for its backward matmul (Llama-3-8B on v5p-128: 32 MiB a layer, 1 GiB a step); with this every
      # layer weight is gathered twice, as MaxText's, and the unrolled step prices no slower.
      w = _c(w, ("act_embed", "act_heads", None))
    return w

  def with_lora(y, x, name):
    """y = x . p[name], plus the LoRA delta when adapters are on."""
    return y + lora.delta(cfg, p, name, x) if use_lora and f"lora_a_{name}" in p else y

  def proj(x, name, contract: int = 1):
    """x . p[name] over x's `contract` trailing dims."""
    return with_lora(dense(x, c(name), contract=contract), x, name)

  def projs(x, names):
    """x . p[name] for each name, as dense_many computes them."""
    return [with_lora(y, x, n) for y, n in zip(dense_many(x, [c(n) for n in names]), names)]

  h_BTD = rms_norm(x_BTD, p["attn_norm"], cfg) if cfg.pre_norms else x_BTD
  q_BTNH, k_BTKH, v_BTKH = projs(h_BTD, ("wq", "wk", "wv"))
  q_BTNH, k_BTKH, v_BTKH = _c(q_BTNH, BTNH), _c(k_BTKH, BTKH), _c(v_BTKH, BTKH)
  if cfg.qkv_bias:
    q_BTNH, k_BTKH, v_BTKH = q_BTNH + c("bq"), k_BTKH + c("bk"), v_BTKH + c("bv")
  if cfg.qk_norm and cfg.qk_norm_all_heads:
    q_BTNH, k_BTKH = rms_norm_heads(q_BTNH, p["q_norm"], cfg), rms_norm_heads(k_BTKH, p["k_norm"], cfg)
  elif cfg.qk_norm:
    q_BTNH, k_BTKH = rms_norm(q_BTNH, p["q_norm"], cfg), rms_norm(k_BTKH, p["k_norm"], cfg)
  q_BTNH = apply_rope(q_BTNH, sin_BTH, cos_BTH)
  k_BTKH = apply_rope(k_BTKH, sin_BTH, cos_BTH)
  if cache is not None:
    k_all, v_all = kv
    new_k = k_BTKH.transpose(0, 2, 3, 1).astype(k_all.dtype)
    new_v = v_BTKH.transpose(0, 2, 1, 3).astype(v_all.dtype)
    k_all = jax.lax.dynamic_update_slice(k_all, new_k, (0, 0, 0, cache.index))
    v_all = jax.lax.dynamic_update_slice(v_all, new_v, (0, 0, cache.index, 0))
    kv = (k_all, v_all)
    k_use, v_use = k_all.astype(dt), v_all.astype(dt)
  else:
    k_use, v_use = k_BTKH, v_BTKH
  scale = (cfg.query_scale or cfg.head_dim) ** -0.5
  if shared_prefix is not None:
    o_BTNH = splash.attention(q_BTNH, k_use, v_use, mask_args[0], scale=scale, softcap=cfg.attn_softcap,
                              windows=(0,), layout=shared_prefix)
  elif cache is None and use_splash(cfg, q_BTNH.shape[1]):
    o_BTNH = splash.attention(q_BTNH, k_use, v_use, mask_args[0], scale=scale, softcap=cfg.attn_softcap,
                              windows=tuple(sorted(set(cfg.window_sizes()))), window=window)
  else:
    o_BTNH = attend(cfg, q_BTNH, k_use, v_use, make_mask(*mask_args, window), scale, causal=cache is None,
                    cache_layout=cache is not None)
  o_BTD = _c(proj(_c(o_BTNH, BTNH), "wo", contract=2), BTD)
  if cfg.post_norms:
    o_BTD = rms_norm(o_BTD, p["post_attn_norm"], cfg)
  x_BTD = x_BTD + o_BTD
  h_BTD = rms_norm(x_BTD, p["mlp_norm"], cfg) if cfg.pre_norms else x_BTD
  stats = ()
  if cfg.num_experts:
    m_BTD, stats = moe.moe_mlp(cfg, functools.partial(_act, cfg), h_BTD, c("router"), c("moe_gate"), c("moe_up"),
                               c("moe_down"), mask_args[0], cfg.moe_impl)
    m_BTD = _c(m_BTD, BTD)
  else:
    gate_BTF, up_BTF = projs(h_BTD, ("w_gate", "w_up"))
    g_BTF = _c(_act(cfg, _c(gate_BTF, BTF)) * _c(up_BTF, BTF), BTF)
    m_BTD = _c(proj(g_BTF, "w_down"), BTD)
  if cfg.post_norms:
    m_BTD = rms_norm(m_BTD, p["post_mlp_norm"], cfg)
  return x_BTD + m_BTD, kv, stats


def use_splash(cfg: ModelConfig, t: int) -> bool:
  """Splash attention (models/splash.py) for a forward without a KV cache: `attention='splash'`, or 'auto'
  when the mesh in context (else the default backend) is a TPU; lengths it cannot tile keep the XLA path."""
  if cfg.attention == "auto":
    return sharding.platform() == "tpu" and splash.supported(t)
  return cfg.attention == "splash" and splash.supported(t)


def use_cudnn(cfg: ModelConfig, q_BTNH, cache_layout: bool) -> bool:
  """cuDNN's fused attention (`jax.nn.dot_product_attention(implementation='cudnn')`): `attention='cudnn'`, or
  'auto' on a GPU, for bf16/f16 queries with head_dim <= 128 (cuDNN's limits), no soft-cap, no KV cache."""
  if cache_layout or cfg.attn_softcap or q_BTNH.dtype not in (jnp.bfloat16, jnp.float16) or q_BTNH.shape[-1] > 128:
    return False
  return cfg.attention == "cudnn" or (cfg.attention == "auto" and sharding.platform() == "gpu")


def cudnn_attention(q_BTNH, k_BSKH, v_BSKH, mask_BTS, *, scale: float, causal: bool):
  """cuDNN flash attention (GPU). Padding, packing and sliding windows are in `mask_BTS`, passed as cuDNN's
  mask (an additive bias); `causal` also tells cuDNN to skip the blocks above the diagonal."""
  return jax.nn.dot_product_attention(q_BTNH, k_BSKH, v_BSKH, mask=mask_BTS[:, None], scale=scale,
                                      is_causal=causal, implementation="cudnn")


def attend(cfg: ModelConfig, q_BTNH, k, v, mask_BTS, scale, causal: bool = False, cache_layout: bool = False):
  """Dispatch to the configured attention kernel ('auto': the fused backward unless soft-capping).

  Keys/values are [B, S, K, H], or the KV cache's layouts with `cache_layout` (keys [B, K, H, S], values
  [B, K, S, H]).
  `causal`: queries and keys are the same slots 0..T-1 (no KV cache), so key blocks after a query block
  are skipped (attention.blockwise_causal) unless `cfg.causal_blocks` is off."""
  if use_cudnn(cfg, q_BTNH, cache_layout):
    return cudnn_attention(q_BTNH, k, v, mask_BTS, scale=scale, causal=causal)
  if cfg.attention in ("auto", "fused") and not cfg.attn_softcap:
    kernel = lambda q, k, v, m: fused_attention(q, k, v, m, scale=scale, cache_layout=cache_layout)  # noqa: E731
  else:
    if cache_layout:
      k, v = k.transpose(0, 3, 1, 2), v.transpose(0, 2, 1, 3)
    kernel = lambda q, k, v, m: dense_attention(q, k, v, m, scale=scale, softcap=cfg.attn_softcap)  # noqa: E731
  if causal and cfg.causal_blocks:
    return blockwise_causal(kernel, q_BTNH, k, v, mask_BTS)
  return kernel(q_BTNH, k, v, mask_BTS)


# ---------------------------------------------------------------------------------------------------------------
# Functional boundary: a graph definition (static) and a plain dict of arrays (the params pytree).


@functools.lru_cache(maxsize=64)
def graphdef(cfg: ModelConfig):
  """The static half of the model, from shapes only (no parameter is materialised)."""
  g, _ = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))))
  return g


def abstract_params(cfg: ModelConfig):
  """ShapeDtypeStructs of the params and their logical axis names, without allocating."""
  _, state = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))))
  shapes = nnx.to_pure_dict(state)
  is_var = lambda x: isinstance(x, nnx.Variable)  # noqa: E731
  axes = jax.tree.map(lambda v: v.get_metadata()["axes"], state, is_leaf=is_var)
  return shapes, nnx.to_pure_dict(axes)


def init_params(cfg: ModelConfig, rng: jax.Array) -> dict:
  """Fresh params as a plain dict; jit it with out_shardings to create them sharded."""
  _, state = nnx.split(Transformer(cfg, rngs=nnx.Rngs(params=rng)))
  return nnx.to_pure_dict(state)


def unstack_layers(stacked: dict, n: int) -> list[dict]:
  """The stacked [L, ...] layer params as n per-layer pytrees, by one `lax.split` per array.

  Why not `a[i]` per layer: the gradient of a slice is the full [L, ...] array zero-padded around it, so the
  stacked gradient was built from L (2L when the layers run twice, as in GRPO's prompt + response passes)
  full-size padded arrays added up, and XLA re-added them inside each optimizer fusion that reads the gradient.
  A split's gradient is one concatenate."""
  parts = jax.tree.map(lambda a: [p.reshape(a.shape[1:]) for p in jax.lax.split(a, [1] * n, axis=0)], stacked)
  is_list = lambda x: isinstance(x, list)  # noqa: E731
  return [jax.tree.map(lambda ps: ps[i], parts, is_leaf=is_list) for i in range(n)]


def layer_list(model: Transformer) -> list[dict]:
  """The stacked layer params sliced per layer (for `layers=`; slice once, outside a decode loop)."""
  return unstack_layers({name: p[...] for name, p in model.layers.items()}, model.cfg.num_layers)


def bind(cfg: ModelConfig, params: dict) -> Transformer:
  """Params pytree -> module (cheap: inside jit it only re-wraps tracers)."""
  return nnx.merge(graphdef(cfg), params)


def forward(cfg: ModelConfig, params, tokens_BT, positions_BT=None, segment_ids_BT=None, cache=None,
            use_lora: bool = True, logits_at: slice | None = None):
  """Pure forward: float32 logits [B, T, V] (only at `logits_at`, if given) and the updated cache."""
  return bind(cfg, params)(tokens_BT, positions_BT, segment_ids_BT, cache, use_lora, logits_at=logits_at)


def token_logprobs(cfg: ModelConfig, params, tokens_BT, positions_BT, segment_ids_BT, targets_BW, *,
                   at: slice | None = None, use_lora: bool = True, temperature: float = 1.0):
  """Pure: (log p(targets) [B, W], entropy [B, W]) predicted at the static positions `at` (default the last
  W: a loss window's targets), through the tiled LM head: the steps' way to log-probs (no [B, T, V] logits)."""
  model = bind(cfg, params)
  h_BTD, _ = model.hidden_states(tokens_BT, positions_BT, segment_ids_BT, None, use_lora)
  return model.token_logprobs(_at(h_BTD, targets_BW, at), targets_BW, temperature)


def weighted_logprob_sum(cfg: ModelConfig, params, tokens_BT, positions_BT, segment_ids_BT, targets_BW, weights_BW,
                         *, use_lora: bool = True):
  """Pure: sum(weights * log p(targets)) over the last W positions, float32 (SFT's loss; see
  Transformer.weighted_logprob_sum): for a large vocabulary its gradients are made in the forward."""
  model = bind(cfg, params)
  h_BTD, _ = model.hidden_states(tokens_BT, positions_BT, segment_ids_BT, None, use_lora)
  return model.weighted_logprob_sum(_at(h_BTD, targets_BW), targets_BW, weights_BW)


def _at(h_BTD, targets_BW, at: slice | None = None):
  """The hidden states that predict the targets: at the static positions `at`, by default the last W (a
  loss window's); no slice when that is all of them."""
  w, t = targets_BW.shape[1], h_BTD.shape[1]
  at = slice(t - w, t) if at is None else at
  return h_BTD if (at.start or 0, at.stop) == (0, t) else h_BTD[:, at]


def hidden_states(cfg: ModelConfig, params, tokens_BT, positions_BT=None, segment_ids_BT=None, cache=None,
                  use_lora: bool = True):
  return bind(cfg, params).hidden_states(tokens_BT, positions_BT, segment_ids_BT, cache, use_lora)
