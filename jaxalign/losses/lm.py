"""Token log-probabilities and masked reductions, all in float32; the LM head tiled over the vocabulary.

`head_logprobs` goes from final hidden states to log p(target) without ever holding [B, T, V] logits: the
vocabulary is cut into tiles, the log-normaliser is accumulated online over them, and a custom VJP recomputes
each tile's logits in the backward. Why tiles over the vocabulary and not over positions: each tile's weight
gradient is its own slice of dW (one reduce-scatter of dW in total, as the dense head), while tiling positions
would add up partial dW over the batch axis per tile (a full-size reduction per tile across the mesh).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from jaxalign import sharding

_BTV = ("act_batch", "act_length", "act_vocab")
_BTD = ("act_batch", "act_length", "act_embed")


def token_logprobs(logits_BTV, targets_BT) -> jax.Array:
  """log p(targets[t] | prefix) per position [B, T]; logsumexp form (no [B, T, V] log-softmax copy)."""
  logits_BTV = logits_BTV.astype(jnp.float32)
  lse_BT = jax.nn.logsumexp(logits_BTV, axis=-1)
  tgt_BT = jnp.take_along_axis(logits_BTV, targets_BT[..., None].astype(jnp.int32), axis=-1)[..., 0]
  return tgt_BT - lse_BT


def token_entropy(logits_BTV) -> jax.Array:
  logp = jax.nn.log_softmax(logits_BTV.astype(jnp.float32), axis=-1)
  return -jnp.sum(jnp.exp(logp) * logp, axis=-1)


def masked_mean(x, mask, axis=None, eps: float = 1e-8):
  return jnp.sum(x * mask, axis=axis) / jnp.maximum(jnp.sum(mask, axis=axis), eps)


def head_logprobs(h_BTD, w_DV, targets_BT, *, tiles: int, temperature: float = 1.0,
                  softcap: float | None = None, unroll: bool = False):
  """(log p(targets) [B, T], entropy [B, T]) of softmax(cap(h . w) / temperature), float32.

  `h_BTD`, `w_DV` in the matmul dtype (logits accumulate in float32); `softcap`: Gemma 2's tanh capping
  before the temperature; `tiles` must divide V. Exact against the dense head (tests/losses/test_lm.py).
  The entropy is a metric: its cotangent is ignored (no loss of the project differentiates it).
  `unroll`: the tile loops unrolled (models with `scan_layers=False`, as the compile plan builds them: XLA's
  cost model counts a loop body once, so a looped head would be counted at 1/tiles of its cost)."""
  v = w_DV.shape[1]
  if v % tiles:
    raise ValueError(f"vocab tiles: {tiles} tiles do not divide the vocabulary of {v}")
  return _head_logprobs(h_BTD, w_DV, targets_BT.astype(jnp.int32), tiles, float(temperature),
                        None if not softcap else float(softcap), bool(unroll))


def _tiled(w_DV, tiles: int):
  """[D, V] -> [tiles, D, V / tiles], tile i holding columns i, i + tiles, ... (strided, so a V sharded in
  contiguous blocks over `tensor` stays sharded inside every tile, and the scan axis is unsharded)."""
  d, v = w_DV.shape
  return w_DV.reshape(d, v // tiles, tiles).transpose(2, 0, 1)


def _tile_logits(h_BTD, w_DC, temperature, softcap):
  """(z, y): raw float32 logits of one tile and their capped, tempered form."""
  b, t, d = h_BTD.shape
  z = jnp.dot(h_BTD.reshape(b * t, d), w_DC, preferred_element_type=jnp.float32).reshape(b, t, -1)
  z = sharding.constrain(z, _BTV)
  y = jnp.tanh(z / softcap) * softcap if softcap else z
  return z, y / temperature


def _column_ids(i, c: int, tiles: int):
  return jnp.arange(c, dtype=jnp.int32) * tiles + i  # Vocabulary ids of tile i's columns.


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def _head_logprobs(h_BTD, w_DV, targets_BT, tiles, temperature, softcap, unroll):
  return _head_fwd(h_BTD, w_DV, targets_BT, tiles, temperature, softcap, unroll)[0]


def _head_fwd(h_BTD, w_DV, targets_BT, tiles, temperature, softcap, unroll):
  b, t, _ = h_BTD.shape
  c = w_DV.shape[1] // tiles

  def body(acc, xs):
    m, s, e, tgt = acc
    i, w_DC = xs
    _, y = _tile_logits(h_BTD, w_DC, temperature, softcap)
    m_new = jnp.maximum(m, jnp.max(y, axis=-1))
    scale = jnp.exp(m - m_new)
    p = jnp.exp(y - m_new[..., None])
    s = s * scale + jnp.sum(p, axis=-1)
    e = e * scale + jnp.sum(p * y, axis=-1)
    hit = _column_ids(i, c, tiles) == targets_BT[..., None]
    tgt = tgt + jnp.sum(jnp.where(hit, y, 0.0), axis=-1)
    return (m_new, s, e, tgt), None

  zeros = jnp.zeros((b, t), jnp.float32)
  init = (jnp.full((b, t), -jnp.inf, jnp.float32), zeros, zeros, zeros)
  (m, s, e, tgt), _ = jax.lax.scan(body, init, (jnp.arange(tiles, dtype=jnp.int32), _tiled(w_DV, tiles)),
                                   unroll=tiles if unroll else 1)
  lse = m + jnp.log(s)
  out = (tgt - lse, lse - e / s)
  return out, (h_BTD, w_DV, targets_BT, lse)


def _head_bwd(tiles, temperature, softcap, unroll, res, cotangents):
  h_BTD, w_DV, targets_BT, lse = res
  if unroll:  # Unrolled, XLA would merge the recomputed tile logits with the forward's (CSE): a cost the
    # scanned head pays would go uncounted in the compile plan.
    h_BTD, w_DV = jax.lax.optimization_barrier((h_BTD, w_DV))
  g_BT = cotangents[0]  # The entropy's cotangent is ignored (see head_logprobs).
  b, t, d = h_BTD.shape
  c = w_DV.shape[1] // tiles

  def body(dh, xs):
    i, w_DC = xs
    z, y = _tile_logits(h_BTD, w_DC, temperature, softcap)
    hit = _column_ids(i, c, tiles) == targets_BT[..., None]
    dy = g_BT[..., None] * (hit.astype(jnp.float32) - jnp.exp(y - lse[..., None]))
    dz = dy / temperature
    if softcap:
      dz = dz * (1.0 - jnp.square(jnp.tanh(z / softcap)))
    dz_c = dz.astype(h_BTD.dtype)
    dh = dh + jnp.dot(dz_c.reshape(b * t, c), w_DC.T, preferred_element_type=jnp.float32).reshape(b, t, d)
    dw_DC = jnp.dot(h_BTD.reshape(b * t, d).T, dz_c.reshape(b * t, c), preferred_element_type=jnp.float32)
    return sharding.constrain(dh, _BTD), dw_DC.astype(w_DV.dtype)

  dh, dw_tDC = jax.lax.scan(body, jnp.zeros((b, t, d), jnp.float32),
                            (jnp.arange(tiles, dtype=jnp.int32), _tiled(w_DV, tiles)), unroll=tiles if unroll else 1)
  dw_DV = dw_tDC.transpose(1, 2, 0).reshape(d, -1)  # Undo _tiled's strided layout.
  return dh.astype(h_BTD.dtype), dw_DV, None


_head_logprobs.defvjp(_head_fwd, _head_bwd)


def head_weighted_logprob_sum(h_BTD, w_DV, targets_BT, weights_BT, *, chunk: int = 0,
                              softcap: float | None = None, unroll: bool = False, vocab_major: bool = False):
  """sum(weights * log p(targets)) under softmax(cap(h . w)), float32, its gradients computed in the forward.

  SFT's loss is linear in the token log-probs with weights known before the backward, so each chunk of
  positions can take its full-vocabulary logits once and produce its share of dh and dW on the spot (Liger's
  fused linear cross-entropy): three head matmuls per token where `head_logprobs` needs four (its backward
  recomputes every tile's logits), and the head weight is gathered once, not again in the backward. The
  backward only scales the stored gradients by the scalar cotangent. The price is a [D, V] dW accumulator
  per device while the head runs (in the weight's dtype, as the tiled head's dW), so the tiled head stays for
  the losses whose per-token weights depend on the log-probs themselves (DPO, PPO, GRPO).

  Under a mesh the chunks run per device (shard_map): rows over the batch axes, vocabulary over `tensor`
  (normalisers psum'd), dW accumulated locally and reduce-scattered once over fsdp (psum'd over the other
  batch axes), so no reduction per chunk. `chunk`: positions per chunk (0 = the power of two nearest below
  2^26 logits per device: 512 positions of one row for a 128k vocabulary).
  `unroll`: the chunk loop unrolled (the compile plan's cost model counts a loop body once).
  `vocab_major`: the weight is given as [V, D] (a tied embedding) and used so, its gradient [V, D] too: a
  transposed embedding would be transposed again, whole, inside the chunk loop.
  Exact against the dense head (tests/losses/test_lm.py)."""
  return _fused(h_BTD, w_DV, targets_BT.astype(jnp.int32), weights_BT.astype(jnp.float32), int(chunk),
                None if not softcap else float(softcap), bool(unroll), bool(vocab_major))


_MAX_VALUE_BYTES = 2**31  # The largest float32 matmul result the fused head makes at once.


def _chunk_size(rows: int, t: int, v: int, chunk: int) -> int:
  if not chunk:  # A power of two (lengths are, mostly: no padded chunk) of about 2^26 logits.
    chunk = 1 << max(0, ((1 << 26) // max(1, rows * v)).bit_length() - 1)
  return max(1, min(chunk, t))


def _fused_local(h_BTD, w_DV, targets_BT, weights_BT, chunk, softcap, unroll, vm, tensor_axis, col0):
  """(loss, dh, dW) of one device's rows and vocabulary columns [col0, col0 + V_local); `vm`: the weight
  (and dW) vocabulary-major, [V, D]."""
  b, t, d = h_BTD.shape
  va = 0 if vm else 1  # The weight's vocabulary axis.
  v = w_DV.shape[va]
  mm = lambda x, y, cx, cy: jax.lax.dot_general(  # noqa: E731
      x, y, (((cx,), (cy,)), ((), ())), preferred_element_type=jnp.float32)
  c = _chunk_size(b, t, v, chunk)
  k = -(-t // c)
  if k * c != t:  # Pad positions with zero weight: they add nothing to the loss or the gradients.
    pad = ((0, 0), (0, k * c - t))
    h_BTD = jnp.pad(h_BTD, pad + ((0, 0),))
    targets_BT, weights_BT = jnp.pad(targets_BT, pad), jnp.pad(weights_BT, pad)
  sum_ = (lambda x: jax.lax.psum(x, tensor_axis)) if tensor_axis else (lambda x: x)
  cols = col0 + jnp.arange(v, dtype=jnp.int32)
  # dW's float32 matmul result in vocabulary tiles under 2^31 bytes: libtpu's cost model overflows on larger
  # values and prices the whole program at a negative time (seen with Gemma-2-9B's 3,584 x 256,000 head).
  vt = v
  if d * v * 4 >= _MAX_VALUE_BYTES:
    vt = -(-v // -(-(d * v * 4) // (_MAX_VALUE_BYTES // 2)))
    vt = min(v, -(-vt // 128) * 128) if vt > 128 else vt

  def body(carry, xs):
    loss, dw = carry
    h_ND, tgt_N, wt_N = xs
    z = mm(h_ND, w_DV, 1, 1 - va)
    y = jnp.tanh(z / softcap) * softcap if softcap else z
    m = jnp.max(y, axis=-1)
    if tensor_axis:
      m = jax.lax.pmax(m, tensor_axis)
    e = jnp.exp(y - m[:, None])
    s = sum_(jnp.sum(e, axis=-1))
    hit = cols == tgt_N[:, None]
    lp = sum_(jnp.sum(jnp.where(hit, y, 0.0), axis=-1)) - m - jnp.log(s)
    dy = wt_N[:, None] * (hit.astype(jnp.float32) - e / s[:, None])
    if softcap:
      dy = dy * (1.0 - jnp.square(jnp.tanh(z / softcap)))
    g = dy.astype(h_ND.dtype)
    dh = sum_(mm(g, w_DV, 1, va)).astype(h_ND.dtype)
    dw_of = lambda g_: mm(g_, h_ND, 0, 0) if vm else mm(h_ND, g_, 0, 0)  # noqa: E731
    if vt >= v:
      dw = (dw + dw_of(g)).astype(dw.dtype)
    else:
      for lo in range(0, v, vt):  # Vocabulary tiles, each updated in place.
        upd = jax.lax.dynamic_slice_in_dim(dw, lo, min(vt, v - lo), va).astype(jnp.float32) + dw_of(g[:, lo:lo + vt])
        dw = jax.lax.dynamic_update_slice_in_dim(dw, upd.astype(dw.dtype), lo, va)
    return (loss + jnp.sum(lp * wt_N), dw), dh

  def chunks(x):  # [B, k*c, ...] -> [k, B*c, ...]
    return x.reshape(b, k, c, *x.shape[2:]).swapaxes(0, 1).reshape(k, b * c, *x.shape[2:])

  init = (jnp.zeros((), jnp.float32), jnp.zeros(w_DV.shape, w_DV.dtype))
  (loss, dw), dh = jax.lax.scan(body, init, (chunks(h_BTD), chunks(targets_BT), chunks(weights_BT)),
                                unroll=k if unroll else 1)
  dh = dh.reshape(k, b, c, d).swapaxes(0, 1).reshape(b, k * c, d)[:, :t]
  return loss, dh, dw


def _fused_grads(h_BTD, w_DV, targets_BT, weights_BT, chunk, softcap, unroll, vm):
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.size == 1:
    return _fused_local(h_BTD, w_DV, targets_BT, weights_BT, chunk, softcap, unroll, vm, None, 0)
  b_spec = sharding.spec_for(("act_batch", None), targets_BT.shape, mesh)
  w_spec = sharding.spec_for(("vocab", "embed") if vm else ("embed", "vocab"), w_DV.shape, mesh)
  embed_axis, vocab_axis = (w_spec[1], w_spec[0]) if vm else (w_spec[0], w_spec[1])
  batch_axes = () if b_spec[0] is None else ((b_spec[0],) if isinstance(b_spec[0], str) else tuple(b_spec[0]))
  split_all = set(batch_axes) == {a for a in sharding.BATCH if mesh.shape[a] > 1}
  if not split_all or not isinstance(embed_axis, (str, type(None))):
    # Rows not split over every batch axis (an odd batch): XLA's own partitioning, correct if not lean.
    return _fused_local(h_BTD, w_DV, targets_BT, weights_BT, chunk, softcap, unroll, vm, None, 0)

  def body(h, w, tgt, wt):
    col0 = jax.lax.axis_index(vocab_axis) * w.shape[0 if vm else 1] if vocab_axis else 0
    loss, dh, dw = _fused_local(h, w, tgt, wt, chunk, softcap, unroll, vm, vocab_axis, col0)
    if batch_axes:
      loss = jax.lax.psum(loss, batch_axes)
    if embed_axis in batch_axes:
      dw = jax.lax.psum_scatter(dw, embed_axis, scatter_dimension=1 if vm else 0, tiled=True)
    rest = tuple(a for a in batch_axes if a != embed_axis)
    if rest:
      dw = jax.lax.psum(dw, rest)
    return loss, dh, dw

  h_spec = P(b_spec[0], None, None)
  fn = jax.shard_map(body, mesh=mesh, in_specs=(h_spec, P(vocab_axis, None) if vm else P(None, vocab_axis),
                                                b_spec, b_spec),
                     out_specs=(P(), h_spec, w_spec), check_vma=False)
  return fn(h_BTD, w_DV, targets_BT, weights_BT)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7))
def _fused(h_BTD, w_DV, targets_BT, weights_BT, chunk, softcap, unroll, vm):
  return _fused_grads(h_BTD, w_DV, targets_BT, weights_BT, chunk, softcap, unroll, vm)[0]


def _fused_fwd(h_BTD, w_DV, targets_BT, weights_BT, chunk, softcap, unroll, vm):
  loss, dh, dw = _fused_grads(h_BTD, w_DV, targets_BT, weights_BT, chunk, softcap, unroll, vm)
  # Materialise the sharded dW here: else XLA may fuse its slice of the full reduced buffer into the
  # backward's consumer and keep that [D, V] buffer alive through the whole backward pass.
  loss, dh, dw = jax.lax.optimization_barrier((loss, dh, dw))
  return loss, (dh, dw)


def _fused_bwd(chunk, softcap, unroll, vm, res, g):
  dh, dw = res
  scale = lambda x: (x.astype(jnp.float32) * g).astype(x.dtype)  # noqa: E731
  return scale(dh), scale(dw), None, None


_fused.defvjp(_fused_fwd, _fused_bwd)
