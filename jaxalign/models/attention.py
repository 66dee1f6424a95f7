"""Attention kernels over segment ids, positions and cache slots.

Letters: B batch, T query length, S key length, N query heads, K kv heads, G = N // K, H head dim,
Q = G * T (the query groups of one KV head, folded into the query axis).
Masking is by (segment, slot, position): a query attends a key of the same segment whose slot is not later
than its own, and (for sliding layers) whose position is within `window`. Packed rows and ragged KV caches
are therefore exact with one rule.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxalign import sharding

_NEG = -1e30
FOLD_MAX_SCORES = 256 * 256  # Query x key positions up to which fused_attention folds groups into queries.
CAUSAL_BLOCK_MIN = 64  # Smallest query block of causal_blocks (smaller blocks cost more per-op overhead)...
CAUSAL_MAX_BLOCKS = 16  # ...and the most blocks (each block is its own ops: compile time grows with the count).


def make_mask(q_seg_BT, q_slot_T, q_pos_BT, k_seg_BS, k_slot_S, k_pos_BS, window) -> jax.Array:
  """Boolean [B, T, S] mask; `window` (traced int, 0 = full) bounds q_pos - k_pos."""
  same_seg = q_seg_BT[:, :, None] == k_seg_BS[:, None, :]
  causal = (k_slot_S[None, :] <= q_slot_T[:, None])[None]
  dist = q_pos_BT[:, :, None] - k_pos_BS[:, None, :]
  in_window = jnp.where(window > 0, dist < window, True)
  return same_seg & causal & in_window


def dense_attention(q_BTNH, k_BSKH, v_BSKH, mask_BTS, *, scale: float, softcap: float | None):
  """Reference attention; scores, softmax in float32."""
  b, t, n, h = q_BTNH.shape
  k = k_BSKH.shape[2]
  q_BTKGH = q_BTNH.reshape(b, t, k, n // k, h)
  s_BKGTS = jnp.einsum("btkgh,bskh->bkgts", q_BTKGH, k_BSKH, preferred_element_type=jnp.float32) * scale
  if softcap:
    s_BKGTS = jnp.tanh(s_BKGTS / softcap) * softcap
  s_BKGTS = jnp.where(mask_BTS[:, None, None], s_BKGTS, _NEG)
  p_BKGTS = jax.nn.softmax(s_BKGTS, axis=-1).astype(v_BSKH.dtype)
  o_BTKGH = jnp.einsum("bkgts,bskh->btkgh", p_BKGTS, v_BSKH)
  return o_BTKGH.reshape(b, t, n, h)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _fused_attention(q_BKQH, k_BKSH, v_BKSH, bias_BTS, scale):
  o, _ = _fused_fwd(q_BKQH, k_BKSH, v_BKSH, bias_BTS, scale)
  return o


def _scaled(q, scale):
  """q * scale, applied to the queries rather than to the [.., S] scores: XLA:CPU hands a scalar multiply
  on the scores to the dot's fusion as a materialised [B, K, Q, S] broadcast of the scale (a score-sized
  write and read per attention call); on q it is S / H times smaller and fuses into the layout copy."""
  return q * jnp.asarray(scale, q.dtype)


def _probs(qs_BKQH, k_BKSH, bias_BTS):
  """Softmax probabilities [B, K, G*T, S] from scaled queries; the bias broadcasts over the G query groups."""
  b, kh, q, _ = qs_BKQH.shape
  t, s_len = bias_BTS.shape[1:]
  s = jnp.einsum("bkqh,bksh->bkqs", qs_BKQH, k_BKSH, preferred_element_type=jnp.float32)
  s = s.reshape(b, kh, q // t, t, s_len) + bias_BTS[:, None, None]
  m = jnp.max(s, axis=-1, keepdims=True)
  e = jnp.exp(s - m)
  return (e / jnp.sum(e, axis=-1, keepdims=True)).reshape(b, kh, q, s_len)


def _fused_fwd(q_BKQH, k_BKSH, v_BKSH, bias_BTS, scale):
  qs_BKQH = _scaled(q_BKQH, scale)
  p_BKQS = _probs(qs_BKQH, k_BKSH, bias_BTS)
  o_BKQH = jnp.einsum("bkqs,bksh->bkqh", p_BKQS.astype(v_BKSH.dtype), v_BKSH)
  return o_BKQH, (qs_BKQH, k_BKSH, v_BKSH, bias_BTS, p_BKQS)


def _fused_bwd(scale, res, do_BKQH):
  """The attention backward written out (dV = P^T dO; dS = P (dP - rowsum(dO o O)); dQ, dK from dS):
  fewer passes over [B, H, T, S] than autodiff of mask + softmax + einsums. Every dot has one batch pair
  (B, K) and one contracting dim, which XLA:CPU runs as a plain batched matmul."""
  qs, k, v, bias, p = res  # qs: the scaled queries, so dK = dS^T qs and dQ = scale * dS k (dS unscaled).
  dp = jnp.einsum("bkqh,bksh->bkqs", do_BKQH, v, preferred_element_type=jnp.float32)
  delta = jnp.sum(dp * p, axis=-1, keepdims=True)
  ds = (p * (dp - delta)).astype(qs.dtype)
  dq = _scaled(jnp.einsum("bkqs,bksh->bkqh", ds, k), scale)
  dv = _key_side(p.astype(do_BKQH.dtype), do_BKQH)
  dk = _key_side(ds, qs)
  return dq, dk, dv, jnp.zeros_like(bias)


def _key_side(x_BKQS, a_BKQH):
  """x^T a [B, K, S, H] (dV = P^T dO, dK = dS^T qs): on the CPU as the dot a^T x, written [B, K, H, S], kept
  apart from the transpose back (an optimization barrier, else XLA folds the two into the first form).

  Why: both contract Q, the major dim of both operands; XLA:CPU runs that dot 2-3x faster when it writes the
  keys minor (2-core Xeon, [8, 4, 128, 256] probabilities against a [8, 4, 128, 32] gradient: 2.8 ms against
  1.0; at 128 keys 1.1 against 0.44; bench SFT step paired in one process 1.04-1.07x, same loss). The
  [B, K, H, S] result is H / Q the probabilities' size, and the projections' gradients transpose it anyway."""
  if sharding.platform() != "cpu":
    return jnp.einsum("bkqs,bkqh->bksh", x_BKQS, a_BKQH)
  return jnp.swapaxes(jax.lax.optimization_barrier(jnp.einsum("bkqh,bkqs->bkhs", a_BKQH, x_BKQS)), 2, 3)


_fused_attention.defvjp(_fused_fwd, _fused_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _grouped_attention(q_BTKGH, k_BSKH, v_BSKH, bias_BTS, scale):
  o, _ = _grouped_fwd(q_BTKGH, k_BSKH, v_BSKH, bias_BTS, scale)
  return o


def _grouped_probs(qs_BTKGH, k_BSKH, bias_BTS):
  s = jnp.einsum("btkgh,bskh->bkgts", qs_BTKGH, k_BSKH, preferred_element_type=jnp.float32)
  s = s + bias_BTS[:, None, None]
  m = jnp.max(s, axis=-1, keepdims=True)
  e = jnp.exp(s - m)
  return e / jnp.sum(e, axis=-1, keepdims=True)


def _grouped_fwd(q_BTKGH, k_BSKH, v_BSKH, bias_BTS, scale):
  qs_BTKGH = _scaled(q_BTKGH, scale)
  p_BKGTS = _grouped_probs(qs_BTKGH, k_BSKH, bias_BTS)
  o_BTKGH = jnp.einsum("bkgts,bskh->btkgh", p_BKGTS.astype(v_BSKH.dtype), v_BSKH)
  return o_BTKGH, (qs_BTKGH, k_BSKH, v_BSKH, bias_BTS, p_BKGTS)


def _grouped_bwd(scale, res, do_BTKGH):
  """As _fused_bwd, in the [B, T, K, G, H] layout (faster on XLA:CPU for long sequences; see fused_attention)."""
  qs, k, v, bias, p = res
  dp_BKGTS = jnp.einsum("btkgh,bskh->bkgts", do_BTKGH, v, preferred_element_type=jnp.float32)
  dv = jnp.einsum("bkgts,btkgh->bskh", p.astype(do_BTKGH.dtype), do_BTKGH)
  delta = jnp.sum(dp_BKGTS * p, axis=-1, keepdims=True)
  ds = (p * (dp_BKGTS - delta)).astype(qs.dtype)
  dq = _scaled(jnp.einsum("bkgts,bskh->btkgh", ds, k), scale)
  dk = jnp.einsum("bkgts,btkgh->bskh", ds, qs)
  return dq, dk, dv, jnp.zeros_like(bias)


_grouped_attention.defvjp(_grouped_fwd, _grouped_bwd)


def fused_attention(q_BTNH, k_BSKH, v_BSKH, mask_BTS, *, scale: float, cache_layout: bool = False):
  """Same result as dense_attention (no soft-capping), with a hand-written backward.

  Layout: the G query heads sharing a KV head are folded into the query axis ([B, K, G*T, H]), so grouped
  attention is a plain batched matmul per (batch, KV head) in both directions (measured on the bench
  shape: one layer's fwd+bwd ~64 -> ~30 ms against the [B, T, K, G, H] einsums). For T x S above
  FOLD_MAX_SCORES the [B, T, K, G, H] layout is kept: on XLA:CPU it measured faster there (SFT step at
  T=2048: 1.6 s vs 2.3 s). Both have the same values and gradients (tested). `cache_layout`: keys come as
  [B, K, H, S] and values as [B, K, S, H] (the KV cache's layouts, see transformer.KVCache): one decode
  query reads them as they are; a longer query (prefill) transposes the keys once.
  """
  b, t, n, h = q_BTNH.shape
  bias_BTS = jnp.where(mask_BTS, 0.0, _NEG).astype(jnp.float32)
  if cache_layout:
    if t == 1:
      return _decode_attention(q_BTNH, k_BSKH, v_BSKH, bias_BTS, scale)
    k_BSKH = k_BSKH.transpose(0, 1, 3, 2)  # [B, K, S, H], as the values.
  kh, s_len = (k_BSKH.shape[1], k_BSKH.shape[2]) if cache_layout else (k_BSKH.shape[2], k_BSKH.shape[1])
  g = n // kh
  fold = t * s_len <= FOLD_MAX_SCORES
  if fold != cache_layout:  # The folded kernel wants [B, K, S, H], the grouped one [B, S, K, H].
    k_BSKH, v_BSKH = k_BSKH.transpose(0, 2, 1, 3), v_BSKH.transpose(0, 2, 1, 3)
  if not fold:
    o = _grouped_attention(q_BTNH.reshape(b, t, kh, g, h), k_BSKH, v_BSKH, bias_BTS, scale)
    return o.reshape(b, t, n, h)
  q_BKQH = q_BTNH.reshape(b, t, kh, g, h).transpose(0, 2, 3, 1, 4).reshape(b, kh, g * t, h)
  o = _fused_attention(q_BKQH, k_BSKH, v_BSKH, bias_BTS, scale)
  return o.reshape(b, kh, g, t, h).transpose(0, 3, 1, 2, 4).reshape(b, t, n, h)


def _decode_attention(q_B1NH, k_BKHS, v_BKSH, bias_B1S, scale):
  """One query per row against the cache, as multiply-reduce instead of matmuls, keys stored [B, K, H, S].

  Why: as dots, a decode step's scores are B x K GEMMs of [G, H] x [H, S] (G = 2 query heads here), which
  XLA:CPU runs as one YNNPACK fusion of tiny GEMMs (~0.65 ms per layer per step on the bench shape). With
  the keys' slots minor, the scores are a sum over H of [S]-long vector products (no horizontal reduction
  per slot); the values' head dim is minor for the same reason. Exact same math; autodiff gives the
  backward."""
  b, _, n, h = q_B1NH.shape
  kh = k_BKHS.shape[1]
  q_BKGH = _scaled(q_B1NH.reshape(b, kh, n // kh, h).astype(jnp.float32), scale)
  s_BKGS = jnp.sum(q_BKGH[..., None] * k_BKHS[:, :, None].astype(jnp.float32), axis=-2)
  p_BKGS = jax.nn.softmax(s_BKGS + bias_B1S[:, None], axis=-1)
  o_BKGH = jnp.sum(p_BKGS[..., None] * v_BKSH[:, :, None, :, :].astype(jnp.float32), axis=-2)
  return o_BKGH.reshape(b, 1, n, h).astype(q_B1NH.dtype)


def causal_blocks(t: int) -> list[tuple[int, int]]:
  """Static query blocks [start, end) for blockwise causal attention over t positions."""
  if t <= CAUSAL_BLOCK_MIN:
    return [(0, t)]
  size = max(CAUSAL_BLOCK_MIN, -(-t // CAUSAL_MAX_BLOCKS))
  return [(a, min(a + size, t)) for a in range(0, t, size)]


def blockwise_causal(kernel, q_BTNH, k_BSKH, v_BSKH, mask_BTS):
  """Causal attention that never computes the key blocks after a query block.

  Valid when key slot s > query slot t is always masked and slots are the positions 0..T-1 of both sides
  (a forward without a KV cache, packed or not). Query block [a, e) attends keys [0, e) only, with its full
  softmax there: exact, no online rescaling, and each block is the unchanged `kernel` (so its hand-written
  backward applies per block; slicing sums the key/value gradients). Measured on the bench shape
  (T=256, 4 blocks): one layer's attention fwd+bwd 48 -> 24 ms; at T=1024 (16 blocks) 341 -> 103 ms --
  about the 2x of skipped work, plus smaller score blocks that stay in cache.
  """
  t = q_BTNH.shape[1]
  blocks = causal_blocks(t)
  if len(blocks) == 1 or k_BSKH.shape[1] != t:
    return kernel(q_BTNH, k_BSKH, v_BSKH, mask_BTS)
  # Blocks by split and prefixes by concatenating them: the gradients are then block-sized adds and one
  # concatenate, where slicing (q[:, a:e], k[:, :e]) transposes to a zero-padded [B, T, ...] array per block,
  # all summed (with transformer.unstack_layers and rope.apply splitting too, the bench SFT step: 94 -> 2 pads).
  sizes = [e - a for a, e in blocks]
  q_blocks = jax.lax.split(q_BTNH, sizes, axis=1)
  k_blocks, v_blocks = jax.lax.split(k_BSKH, sizes, axis=1), jax.lax.split(v_BSKH, sizes, axis=1)
  prefix = lambda xs, j: xs[0] if j == 0 else jnp.concatenate(xs[:j + 1], axis=1)  # noqa: E731
  outs = [kernel(q_blocks[j], prefix(k_blocks, j), prefix(v_blocks, j), mask_BTS[:, a:e, :e])
          for j, (a, e) in enumerate(blocks)]
  return jnp.concatenate(outs, axis=1)
