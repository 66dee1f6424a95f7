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
